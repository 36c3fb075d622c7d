"""Fuzz target: an image layer blob, unpacked as `cocoon pull` unpacks it.

Each input is a layer blob (gzip, zstd or plain tar: chosen by its magic bytes,
as a media type would say). It is unpacked into a fresh temporary directory
with a small budget, so bombs are refused in milliseconds. Next to the
staging root sits a canary file, where ``../canary`` from the root points:
after every input its content and mtime must be as they were, and nothing
else may have appeared beside the root. A changed canary is a finding even
when unpack_layer raised ImageError: refusing after writing outside is still
an escape. Everything is removed afterwards, whatever the layer left.

The budget has no CPU cap (images.max_unpack_cpu_s): a slow input must show
as a hang to the runner, not hide behind an expected ImageError.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from cocoon.errors import ImageError
from cocoon.images.decompress import GZIP_MAGIC, ZSTD_MAGIC
from cocoon.images.layers import Budget, unpack_layer

EXPECTED: tuple[type[BaseException], ...] = (ImageError,)

#: Small caps: a bomb should cost the fuzzer milliseconds, not the disk.
MAX_BYTES = 64 << 20
MAX_ENTRIES = 10_000
CANARY = b"the layer must never touch this\n"
CANARY_NS = 1_000_000_000_123_456_789


def _compression(data: bytes) -> str:
    if data[:2] == GZIP_MAGIC:
        return "gzip"
    if data[:4] == ZSTD_MAGIC:
        return "zstd"
    return "none"


def _writable(root: Path) -> None:
    """Open up every directory a layer made 0000, so that removing them works unprivileged."""
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)


def _check_outside(base: Path, canary: Path) -> None:
    st = canary.lstat()
    if canary.read_bytes() != CANARY or st.st_mtime_ns != CANARY_NS:
        raise AssertionError("the layer changed the canary outside its root")
    if sorted(os.listdir(base)) != ["blob", "canary", "rootfs"]:
        raise AssertionError(f"the layer wrote beside its root: {sorted(os.listdir(base))}")


def run(data: bytes) -> None:
    base = Path(tempfile.mkdtemp(prefix="cocoon-fuzz-tar-"))
    try:
        root = base / "rootfs"
        root.mkdir()
        canary = base / "canary"
        canary.write_bytes(CANARY)
        os.utime(canary, ns=(CANARY_NS, CANARY_NS))
        blob = base / "blob"
        blob.write_bytes(data)
        try:
            unpack_layer(
                blob, _compression(data), root, Budget(MAX_BYTES, MAX_ENTRIES), what="fuzz layer"
            )
        finally:
            _check_outside(base, canary)
    finally:
        _writable(base)
        shutil.rmtree(base)
