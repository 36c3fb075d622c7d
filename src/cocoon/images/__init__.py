"""The OCI image store: registry pull, archive import, unpack, one block image per image."""

import sys

# httpcore probes for trio when it is imported (37 ms here, a tenth of a small
# pull); cocoon never runs on trio, so the probe is answered "not installed".
sys.modules.setdefault("trio", None)  # type: ignore[arg-type]
