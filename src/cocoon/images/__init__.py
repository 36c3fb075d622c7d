"""The OCI image store: registry pull, archive import, unpack, one block image per image."""

import sys

# httpcore probes for trio when it is imported (37 ms here, a tenth of a small
# pull); cocoon never runs on trio, so the probe is answered "not installed".
sys.modules.setdefault("trio", None)  # type: ignore[arg-type]
# httpx's own command line (``python -m httpx``) imports click, rich and pygments
# when httpx is imported (~40 ms); httpx falls back to a stub ``main`` without it.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
