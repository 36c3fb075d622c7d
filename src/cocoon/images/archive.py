"""Import image archives: `docker save` tars and OCI image-layout tars.

An archive is as untrusted as a registry. Its members are never extracted by
name: the tar is indexed by cocoon's own reader (tarreader.py: headers only,
linear time, capped count and sizes; tarfile's pax parsing is quadratic before
3.11.10), and members are read as windows of it straight into the
blob store, every digest computed or verified on the way, every size capped.
Symlinks and hardlinks between members (old `docker save` links repeated
layers) are followed by name inside the index only.

Formats:
- OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/*``): each
  entry of index.json is followed through nested indexes to its linux/amd64
  manifest; tags come from ``io.containerd.image.name`` (docker >= 25) or
  ``org.opencontainers.image.ref.name`` when it names a repository (a bare
  "latest" does not, and is skipped: the image loads untagged).
- `docker save` (``manifest.json``: Config, RepoTags, Layers): layers (plain
  tars as docker writes them, gzip/zstd if another tool compressed them) are
  copied into the blob store under the digest computed while copying, and an
  OCI manifest is written for them.
Archives with both (docker >= 25) load through the OCI layout, with the
RepoTags of manifest.json added.

Tags are normalised the way docker does (``busybox`` ->
``docker.io/library/busybox:latest``) by reference.py, the grammar `pull` uses.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import posixpath
import re
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from cocoon.errors import ImageError
from cocoon.images.blobs import CHUNK, check_digest
from cocoon.images.decompress import GZIP_MAGIC, ZSTD_MAGIC
from cocoon.images.guard import WriteGuard
from cocoon.images.manifest import (
    DEFAULT_PLATFORM,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG,
    MAX_MANIFEST,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    media_type_of,
    parse_index,
    parse_manifest,
)
from cocoon.images.reference import parse as parse_reference
from cocoon.images.store import Image, ImageStore
from cocoon.images.tarreader import Member, TarReader
from cocoon.util import boundedjson

MAX_MEMBERS = 100_000
MAX_LINK_HOPS = 8
MAX_INDEX_DEPTH = 4
MAX_DOCKER_ENTRIES = 4096
MAX_LAYOUT_FILE = 4096

ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

LAYER_MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_REF_RE = re.compile(
    rf"^(?:({_DOMAIN})/)?({_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*)(?::({_TAG}))?$"
)


def canonical_tag(ref: str) -> str:
    """docker's normalisation of a tagged name (``busybox`` -> docker.io/library/busybox:latest),
    by the same parser `pull` uses."""
    try:
        r = parse_reference(ref)
    except ImageError as e:
        raise ImageError(f"archive names an invalid image reference: {e}") from e
    if r.digest and not r.tag:
        raise ImageError(f"archive tag {ref[:100]!r} is a digest, not a tag")
    return f"{r.name}:{r.tag or 'latest'}"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(data: bytes, what: str, limit: int) -> Any:
    try:
        return boundedjson.loads(data, max_bytes=limit)
    except boundedjson.JSONError as e:
        raise ImageError(f"archive: {what} is not usable JSON: {e}") from e


@dataclass
class _Layer:
    digest: str
    size: int
    compression: str


class _Window:
    """A member's bytes as a stream of its own: reads and seeks stay inside
    ``[start, start + size)`` of the archive, however members interleave."""

    def __init__(self, f: IO[bytes], start: int, size: int, what: str) -> None:
        self.f, self.start, self.size, self.what = f, start, size, what
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        if len(data) < n:
            raise ImageError(f"{self.what}: the archive ends inside this member")
        self.pos += n
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, min(pos, self.size))
        return self.pos

    def tell(self) -> int:
        return self.pos


class _Archive:
    """An index of the tar's members by name; members are opened as streams, never written out."""

    def __init__(self, f: IO[bytes], store: ImageStore, what: str) -> None:
        self.f = f
        self.store = store
        self.members: dict[str, Member] = {}
        reader = TarReader(f, what)
        count = 0
        while (m := reader.next()) is not None:
            count += 1
            if count > MAX_MEMBERS:
                raise ImageError(f"archive has more than {MAX_MEMBERS} members")
            self.members[self.norm(m.name)] = m

    @staticmethod
    def norm(name: str) -> str:
        return posixpath.normpath("/" + name).lstrip("/")

    def has(self, name: str) -> bool:
        return self.norm(name) in self.members

    def member(self, name: str) -> Member:
        """The regular file ``name`` names, following links between members (by name only)."""
        key = self.norm(name)
        for _ in range(MAX_LINK_HOPS):
            m = self.members.get(key)
            if m is None:
                raise ImageError(f"archive has no member {name[:200]!r}")
            if m.isreg():
                if m.sparse is not None:  # no tool writes image archives sparse
                    raise ImageError(f"archive member {name[:200]!r} is a sparse file")
                return m
            if m.issym():
                key = self.norm(posixpath.join(posixpath.dirname(key), m.linkname))
            elif m.islnk():
                key = self.norm(m.linkname)
            else:
                raise ImageError(f"archive member {name[:200]!r} is not a file")
        raise ImageError(f"archive member {name[:200]!r}: too many links")

    def open(self, name: str, limit: int) -> tuple[_Window, int]:
        m = self.member(name)
        if m.size > limit:
            raise ImageError(f"archive member {name[:200]!r} is {m.size} B, more than {limit} B")
        return _Window(self.f, m.offset_data, m.size, f"archive member {name[:200]!r}"), m.size

    def read(self, name: str, limit: int) -> bytes:
        f, _ = self.open(name, limit)
        return f.read()

    # -- OCI layout ------------------------------------------------------------

    def blob_name(self, digest: str) -> str:
        return f"blobs/sha256/{check_digest(digest)}"

    def read_blob(self, d: Descriptor, limit: int) -> bytes:
        data = self.read(self.blob_name(d.digest), limit)
        if len(data) != d.size or _sha256(data) != d.digest:
            raise ImageError(f"archive: blob {d.digest[:19]} does not match its descriptor")
        return data

    def copy_blob(self, digest: str, size: int) -> None:
        """A blob whose digest is known, streamed into the store and verified there."""
        blobs = self.store.blobs
        if blobs.has(digest):
            return
        f, msize = self.open(self.blob_name(digest), self.store.cfg.images.max_layer_bytes)
        if msize != size:
            raise ImageError(
                f"archive: blob {digest[:19]} is {msize} B, its descriptor says {size}"
            )
        w = blobs.writer(digest, size)
        try:
            f.seek(w.offset)  # resume what an interrupted import left
            while chunk := f.read(CHUNK):
                w.write(chunk)
        except BaseException:
            w.abort()
            raise
        w.commit()

    def manifest_for(self, d: Descriptor, depth: int = 0) -> tuple[str, bytes] | None:
        """Follow d (through indexes) to the linux/amd64 manifest; None if d is for another."""
        if depth > MAX_INDEX_DEPTH:
            raise ImageError(f"archive: indexes nested more than {MAX_INDEX_DEPTH} deep")
        data = self.read_blob(d, MAX_MANIFEST)
        mt = d.media_type or media_type_of(data)
        if mt in INDEX_TYPES:
            return self.manifest_for(parse_index(data).select(DEFAULT_PLATFORM), depth + 1)
        if mt not in MANIFEST_TYPES:
            return None  # e.g. an attestation or artifact manifest
        p = d.platform
        if p and (p.os, p.architecture) != (DEFAULT_PLATFORM.os, DEFAULT_PLATFORM.architecture):
            return None
        return d.digest, data

    # -- docker save -------------------------------------------------------------

    def ingest_layer(self, name: str) -> _Layer:
        """A docker-save layer: its digest is computed while it is copied into the store."""
        f, size = self.open(name, self.store.cfg.images.max_layer_bytes)
        head = f.read(4)
        f.seek(0)
        compression = "gzip" if head[:2] == GZIP_MAGIC else "zstd" if head == ZSTD_MAGIC else "none"
        key = self.norm(self.member(name).name)
        m = re.fullmatch(r"blobs/sha256/([a-f0-9]{64})", key)
        if m:  # docker >= 25 names layers by digest: check it, don't trust it
            digest = "sha256:" + m.group(1)
            self.copy_blob(digest, size)
            return _Layer(digest, size, compression)
        digest, n = self.store.blobs.ingest(f, self.store.cfg.images.max_layer_bytes)
        return _Layer(digest, n, compression)


@contextlib.contextmanager
def _plain_tar(store: ImageStore, path: Path) -> Iterator[IO[bytes]]:
    """The archive as a seekable plain tar: a compressed one is decompressed to an anonymous
    temp file first (random access into gzip would re-read from the start each time)."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise ImageError(f"cannot open archive {path}: {e.strerror}") from e
    with raw:
        head = raw.read(4)
        raw.seek(0)
        if head[:2] != GZIP_MAGIC and head != ZSTD_MAGIC:
            yield raw
            return
        src: Any = (
            gzip.GzipFile(fileobj=raw, mode="rb")
            if head[:2] == GZIP_MAGIC
            else zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        )
        cap = store.cfg.images.max_unpacked_bytes
        what = f"archive {path}"
        # The same guards as a layer's: a ratio cap past a floor (a bomb is
        # refused early), the disk's free-space reserve, zeros left as holes.
        guard = WriteGuard.from_config(store.cfg.images, str(store.root))
        guard.check_room(store.tmp_dir, 0, what)
        meter = guard.inflation(os.fstat(raw.fileno()).st_size, what)
        with tempfile.TemporaryFile(dir=store.tmp_dir) as tmp:
            n = 0
            try:
                while chunk := src.read(CHUNK):
                    if n + len(chunk) > cap:
                        raise ImageError(
                            f"{what} decompresses to more than {cap} B (images.max_unpacked_bytes)"
                        )
                    meter.add(len(chunk))
                    guard.write(tmp.fileno(), chunk, 0, len(chunk), n, what)
                    n += len(chunk)
            except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
                raise ImageError(f"{what}: corrupt compressed data: {e}") from e
            os.ftruncate(tmp.fileno(), n)  # a tail of zeros was left as a hole
            tmp.seek(0)
            yield tmp


def load(store: ImageStore, path: Path) -> list[Image]:
    """Import every image of a docker-save or OCI-layout archive; the images, in archive order."""
    with _plain_tar(store, path) as f:
        try:
            arc = _Archive(f, store, f"archive {path}")
            docker = _docker_entries(arc) if arc.has("manifest.json") else None
            if arc.has("oci-layout") and arc.has("index.json"):
                images = _load_oci(arc, docker or [])
            elif docker is not None:
                images = _load_docker(arc, docker)
            else:
                raise ImageError(
                    f"{path} is neither a docker-save archive (no manifest.json) "
                    "nor an OCI image layout (no oci-layout/index.json)"
                )
        except (EOFError, OSError) as e:
            raise ImageError(f"archive {path} is corrupt or unreadable: {e}") from e
    if not images:
        raise ImageError(f"archive {path} holds no {DEFAULT_PLATFORM} image")
    return list({img.id: img for img in images}.values())


def _docker_entries(arc: _Archive) -> list[dict[str, Any]]:
    doc = _json(arc.read("manifest.json", MAX_MANIFEST), "manifest.json", MAX_MANIFEST)
    if not isinstance(doc, list) or len(doc) > MAX_DOCKER_ENTRIES:
        raise ImageError(f"archive: manifest.json must be a list (at most {MAX_DOCKER_ENTRIES})")
    for i, e in enumerate(doc):
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("Config"), str)
            and isinstance(e.get("Layers"), list)
            and all(isinstance(x, str) for x in e["Layers"])
            and isinstance(e.get("RepoTags") or [], list)
            and all(isinstance(x, str) for x in e.get("RepoTags") or [])
        )
        if not ok:
            raise ImageError(f"archive: manifest.json[{i}] needs Config, Layers (and RepoTags)")
    return doc


def _load_docker(arc: _Archive, entries: list[dict[str, Any]]) -> list[Image]:
    images = []
    seen: dict[str, _Layer] = {}
    for e in entries:
        config = arc.read(e["Config"], MAX_CONFIG)
        layers = []
        for name in e["Layers"]:
            if name not in seen:
                seen[name] = arc.ingest_layer(name)
            layers.append(seen[name])
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": _sha256(config), "size": len(config)},
            "layers": [
                {"mediaType": LAYER_MEDIA_TYPES[x.compression], "digest": x.digest, "size": x.size}
                for x in layers
            ],
        }
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        tags = [canonical_tag(t) for t in e.get("RepoTags") or []]
        images.append(arc.store.add(_sha256(data), data, config, tags))
    return images


def _oci_tags(d: Descriptor) -> list[str]:
    name = d.annotations.get(ANNOTATION_CONTAINERD_NAME)
    if name:
        return [canonical_tag(name)]
    ref = d.annotations.get(ANNOTATION_REF_NAME, "")
    # A bare word is a tag without a repository (the layout's own name for it).
    return [canonical_tag(ref)] if ("/" in ref or ":" in ref) else []


def _load_oci(arc: _Archive, docker: list[dict[str, Any]]) -> list[Image]:
    layout = _json(arc.read("oci-layout", MAX_LAYOUT_FILE), "oci-layout", MAX_LAYOUT_FILE)
    version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImageError(f"archive: unsupported OCI layout version {version!r}")
    docker_tags: dict[str, list[str]] = {}
    for e in docker:
        docker_tags.setdefault(arc.norm(e["Config"]), []).extend(e.get("RepoTags") or [])
    index = parse_index(arc.read("index.json", MAX_MANIFEST))
    images = []
    for d in index.manifests:
        found = arc.manifest_for(d)
        if found is None:
            continue
        digest, data = found
        mf = parse_manifest(data)
        config = arc.read_blob(mf.config, MAX_CONFIG)
        for layer in mf.layers:
            arc.copy_blob(layer.digest, layer.size)
        tags = _oci_tags(d)
        tags += [canonical_tag(t) for t in docker_tags.get(arc.blob_name(mf.config.digest), [])]
        images.append(arc.store.add(digest, data, config, list(dict.fromkeys(tags))))
    return images
