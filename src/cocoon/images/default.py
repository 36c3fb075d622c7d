"""The built-in busybox image, so `cocoon run busybox ...` works with no registry.

It is a real OCI image (one gzip layer, config, manifest) made from the host's
Debian busybox-static and added through the same ImageStore.add as a pulled
image: the code that runs it cannot tell the difference, and the tests of the
store exercise it for free. The layer is deterministic (mtime 0, uid/gid 0,
sorted entries, gzip header without name or time), so the same busybox binary
always gives the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images.manifest import OCI_CONFIG, OCI_MANIFEST
from cocoon.images.store import Image, ImageStore
from cocoon.util.proc import run

BUSYBOX = Path("/bin/busybox")
DEFAULT_TAG = "docker.io/library/busybox:latest"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_APPLET_RE = re.compile(r"^[A-Za-z0-9_.\[\]-]{1,64}$")

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnobody:x:65534:\n"
DIRS = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "proc": 0o555, "root": 0o700, "sys": 0o555}
DIRS |= {"tmp": 0o1777, "var": 0o755}


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def applets(busybox: Path = BUSYBOX) -> list[str]:
    out = run([str(busybox), "--list"], timeout_s=10, error=ImageError).stdout.decode()
    names = sorted({a for a in out.split() if a != "busybox"})
    bad = [a for a in names if not _APPLET_RE.match(a) or a in (".", "..")]
    if bad:
        raise ImageError(f"{busybox} --list printed odd applet names: {bad[:3]!r}")
    return names


Entries = dict[str, tuple[tarfile.TarInfo, bytes | None]]


def build_layer(busybox: Path = BUSYBOX) -> bytes:
    """The uncompressed layer tar: busybox, one symlink per applet, passwd/group, base dirs."""
    return tar_of(layer_entries(busybox))


def tar_of(entries: Entries) -> bytes:
    """A deterministic tar: sorted names, PAX."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(entries):
            ti, data = entries[name]
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def layer_entries(busybox: Path = BUSYBOX) -> Entries:
    """busybox's tree (the default image's, and the base of the runtime images')."""
    entries: Entries = {}

    def add(name: str, kind: bytes, mode: int, data: bytes | None = None, link: str = "") -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime = kind, mode, 0
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.linkname = link
        ti.size = len(data) if data is not None else 0
        entries[name] = (ti, data)

    for d, mode in DIRS.items():
        add(d, tarfile.DIRTYPE, mode)
    add("bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
    for a in applets(busybox):
        add(f"bin/{a}", tarfile.SYMTYPE, 0o777, link="busybox")
    add("etc/passwd", tarfile.REGTYPE, 0o644, PASSWD)
    add("etc/group", tarfile.REGTYPE, 0o644, GROUP)
    return entries


def build_image(busybox: Path = BUSYBOX) -> tuple[bytes, bytes, bytes]:
    """(layer .tar.gz, config, manifest): deterministic for a given busybox binary."""
    layer = build_layer(busybox)
    blob = gzip.compress(layer, compresslevel=9, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Cmd": ["sh"], "Env": [PATH_ENV]},
        "rootfs": {"type": "layers", "diff_ids": [_sha256(layer)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cocoon: busybox-static"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": _sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": _sha256(blob), "size": len(blob)}],
    }
    return blob, config_bytes, json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def ensure_default_image(cfg: Config, busybox: Path = BUSYBOX) -> Image:
    """The image tagged busybox:latest, built from the host's busybox if none is.

    Cheap when present: one read of index.json. An image the user pulled
    under that tag is left alone (it is busybox too).
    """
    store = ImageStore(cfg)
    try:
        return store.resolve(DEFAULT_TAG)
    except ImageError:
        pass
    if not busybox.is_file():
        raise ImageError(f"{busybox} not found: install busybox-static (see README set-up)")
    blob, config, manifest = build_image(busybox)
    store.blobs.put(_sha256(blob), blob)
    return store.add(_sha256(manifest), manifest, config, [DEFAULT_TAG])
