"""Test helpers for the image tests: layer tars built in memory, images pushed into a store."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from cocoon.images.manifest import OCI_CONFIG, OCI_MANIFEST
from cocoon.images.store import Image, ImageStore

MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def dg(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


@dataclass
class Tar:
    """A layer tar, entry by entry, in the order given (order matters for whiteouts)."""

    entries: list[tuple[tarfile.TarInfo, bytes | None]] = field(default_factory=list)
    fmt: int = tarfile.PAX_FORMAT

    def _add(
        self,
        name: str,
        kind: bytes,
        data: bytes | None = None,
        *,
        mode: int | None = None,
        mtime: int = 1_000_000,
        uid: int = 0,
        gid: int = 0,
        linkname: str = "",
        pax: dict[str, str] | None = None,
    ) -> Tar:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode if mode is not None else 0o755 if kind == tarfile.DIRTYPE else 0o644
        ti.mtime, ti.uid, ti.gid, ti.linkname = mtime, uid, gid, linkname
        ti.pax_headers = dict(pax or {})
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            ti.devmajor, ti.devminor = 1, 3
        ti.size = len(data) if data is not None else 0
        self.entries.append((ti, data))
        return self

    def file(self, name: str, data: bytes = b"x", **kw: Any) -> Tar:
        return self._add(name, tarfile.REGTYPE, data, **kw)

    def dir(self, name: str, **kw: Any) -> Tar:
        return self._add(name, tarfile.DIRTYPE, **kw)

    def symlink(self, name: str, target: str, **kw: Any) -> Tar:
        return self._add(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw)

    def hardlink(self, name: str, target: str) -> Tar:
        return self._add(name, tarfile.LNKTYPE, linkname=target)

    def fifo(self, name: str) -> Tar:
        return self._add(name, tarfile.FIFOTYPE)

    def device(self, name: str, kind: bytes = tarfile.CHRTYPE) -> Tar:
        return self._add(name, kind)

    def raw(self, ti: tarfile.TarInfo, data: bytes | None = None) -> Tar:
        self.entries.append((ti, data))
        return self

    def bytes(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=self.fmt) as tf:
            for ti, data in self.entries:
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


# -- raw tar blocks: what tarfile will not write (hostile or odd headers) -------

END = bytes(1024)


def header(
    name: bytes, kind: bytes = b"0", size: int = 0, fields: dict[int, bytes] | None = None
) -> bytes:
    """One ustar header block with a right checksum; ``fields`` overwrite raw bytes
    at their offsets (a base-256 size at 124, a GNU sparse map at 386...)."""
    b = bytearray(512)
    b[0 : len(name[:100])] = name[:100]
    b[100:108] = b"0000644\0"
    b[108:124] = b"0000000\0" * 2
    b[124:136] = b"%011o\0" % size
    b[136:148] = b"%011o\0" % 1_000_000
    b[156:157] = kind
    b[257:265] = b"ustar\x0000"
    for offset, raw in (fields or {}).items():
        b[offset : offset + len(raw)] = raw
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def record(key: bytes, value: bytes) -> bytes:
    """One pax record, its length (which counts itself) worked out."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax(records: bytes, kind: bytes = b"x") -> bytes:
    """A pax extended header (``x``, or ``g`` for a global one) with these raw records."""
    return header(b"PaxHeaders/x", kind, len(records)) + padded(records)


def member(name: bytes, data: bytes = b"", kind: bytes = b"0") -> bytes:
    return header(name, kind, len(data)) + padded(data)


def make_image(
    store: ImageStore,
    layers: list[bytes],
    *,
    compression: str = "gzip",
    tags: tuple[str, ...] = (),
    cmd: tuple[str, ...] = ("sh",),
    diff_ids: list[str] | None = None,
    blobs: list[bytes] | None = None,
) -> tuple[str, bytes, bytes]:
    """Put the layers in the blob store; the (manifest digest, manifest, config) to add().

    ``blobs``: the layers compressed already (then ``diff_ids`` are needed).
    """
    blobs = blobs or [compress(t, compression) for t in layers]
    for b in blobs:
        store.blobs.put(dg(b), b)
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
        "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids or [dg(t) for t in layers]},
    }).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": dg(config), "size": len(config)},
        "layers": [{"mediaType": MEDIA[compression], "digest": dg(b), "size": len(b)}
                   for b in blobs],
    }).encode()  # fmt: skip
    return dg(manifest), manifest, config


def add_image(store: ImageStore, layers: list[bytes], **kw: Any) -> Image:
    md, mb, cb = make_image(store, layers, **kw)
    return store.add(md, mb, cb, list(kw.get("tags", ())))


@contextlib.contextmanager
def mounted(image: str | os.PathLike[str], where: Path) -> Iterator[Path]:
    """The erofs image loop-mounted read-only (we are root); yields the mount point."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(where)], capture_output=True
    )
    if r.returncode != 0:
        import pytest

        pytest.skip(f"cannot loop-mount erofs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


Entry = tuple[int, int, int, int, bytes]


def snapshot(root: Path) -> dict[str, Entry]:
    """Everything under root (mode, links, size, mtime, content): a hostile layer left it be."""
    out: dict[str, Entry] = {str(root): _entry(root)}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            out[str(p)] = _entry(p)
    return out


def _entry(p: Path) -> Entry:
    st = p.lstat()
    data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
    return st.st_mode, st.st_nlink, st.st_size, st.st_mtime_ns, data
