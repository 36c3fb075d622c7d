"""The function service's Python runtime image, built offline like the default one.

busybox's tree (images.default) plus Debian's python3.11 from this host: the
interpreter and the shared libraries ``ldd`` finds for it and for every
extension module in ``lib-dynload``, and the standard library without what a
function never needs (tests, IDLE, tkinter, the build config, 2to3, pip's
wheels), with Debian's precompiled ``__pycache__`` kept (and the sources'
mtimes, so the bytecode stays valid: each import would otherwise compile
again in every instance). And the runtime's handler loop,
``/opt/cocoon/loop.py`` (images/pyloop.py): one process per instance that
imports the handler once and serves invocations over framed stdin/stdout.

It is not the agent's guest image: that is the guest's own root, never a
container's. Built on first need (a few seconds) and added through
ImageStore.add like any image.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import stat
import tarfile
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images.default import LAYER_MEDIA_TYPE, PATH_ENV, Entries, layer_entries, tar_of
from cocoon.images.manifest import OCI_CONFIG, OCI_MANIFEST
from cocoon.images.store import Image, ImageStore
from cocoon.util.proc import run

PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
#: Parts of the standard library no function needs.
LEFT_OUT = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "site-packages", "dist-packages", "config-3.11-x86_64-linux-gnu",
    "EXTERNALLY-MANAGED", "turtle.py",
}  # fmt: skip
#: The handler loop (pyloop.py), copied in as /opt/cocoon/loop.py.
LOOP = (Path(__file__).parent / "pyloop.py").read_bytes()
#: The tag names the loop's revision: a new loop is a new image.
TAG = "localhost/cocoon/python:3.11-" + hashlib.sha256(LOOP).hexdigest()[:12]
_LDD_RE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def _libs(binary: Path) -> set[str]:
    cp = run(["ldd", str(binary)], timeout_s=30, error=ImageError, check=False)
    return set(_LDD_RE.findall(cp.stdout.decode())) if cp.returncode == 0 else set()


def _add_file(entries: Entries, path: str) -> None:
    """A host file at its own path, and the symlink chain that names it.
    Directories are taken at their real paths (Debian's /lib is usr/lib):
    the image gets the same top-level links (``build_layer``)."""
    while True:
        path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        name = path.lstrip("/")
        if name in entries:
            return
        # The directories on the way, as the busybox tree has them or 0755.
        parts = name.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in entries:
                entries[d] = (_info(d, tarfile.DIRTYPE, 0o755), None)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            link = os.readlink(path)
            entries[name] = (_info(name, tarfile.SYMTYPE, 0o777, link=link), None)
            path = os.path.normpath(os.path.join(os.path.dirname(path), link))
            continue
        data = Path(path).read_bytes()
        ti = _info(name, tarfile.REGTYPE, st.st_mode & 0o755, size=len(data))
        ti.mtime = int(st.st_mtime)  # .pyc files check their source's mtime
        entries[name] = (ti, data)
        return


def _info(name: str, kind: bytes, mode: int, *, link: str = "", size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime, ti.size, ti.linkname = kind, mode, 0, size, link
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def build_layer() -> bytes:
    """The uncompressed layer: busybox, python3.11, its libraries and stdlib, the bootstrap."""
    if not PYTHON.is_file() or not STDLIB.is_dir():
        raise ImageError(f"{PYTHON} not found: install Debian's python3.11 (see README set-up)")
    entries = layer_entries()
    for top in ("lib", "lib32", "lib64", "libx32"):  # merged /usr, as on the host
        if os.path.islink(f"/{top}"):
            entries[top] = (_info(top, tarfile.SYMTYPE, 0o777, link=os.readlink(f"/{top}")), None)
    libs = _libs(PYTHON)
    for dirpath, dirnames, filenames in os.walk(STDLIB):
        rel = os.path.relpath(dirpath, STDLIB)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in LEFT_OUT]
            filenames = [f for f in filenames if f not in LEFT_OUT]
        dirnames.sort()
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            _add_file(entries, path)
            if rel == "lib-dynload" and f.endswith(".so"):
                libs |= _libs(Path(path))
    for lib in sorted(libs):
        _add_file(entries, lib)
    _add_file(entries, str(PYTHON))
    for name in ("usr/bin/python3", "usr/bin/python"):
        entries[name] = (_info(name, tarfile.SYMTYPE, 0o777, link="python3.11"), None)
    for d in ("opt", "opt/cocoon"):
        entries[d] = (_info(d, tarfile.DIRTYPE, 0o755), None)
    entries["opt/cocoon/loop.py"] = (
        _info("opt/cocoon/loop.py", tarfile.REGTYPE, 0o644, size=len(LOOP)),
        LOOP,
    )
    return tar_of(entries)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ensure_python_image(cfg: Config) -> Image:
    """The image tagged TAG, built from this host's python3.11 if none is."""
    store = ImageStore(cfg)
    try:
        return store.resolve(TAG)
    except ImageError:
        pass
    layer = build_layer()
    blob = gzip.compress(layer, compresslevel=6, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Cmd": ["python3"], "Env": [PATH_ENV, "PYTHONUNBUFFERED=1"]},
        "rootfs": {"type": "layers", "diff_ids": [_sha256(layer)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cocoon: python3.11"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _sha256(config_bytes),
                   "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": _sha256(blob), "size": len(blob)}],
    }  # fmt: skip
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    store.blobs.put(_sha256(blob), blob)
    return store.add(_sha256(manifest_bytes), manifest_bytes, config_bytes, [TAG])
