"""``cocoon load`` archives (images/archive.py): ``docker save`` tars and OCI
layouts, read into an image store in a temp dir.

The store records an image only as far as decoding goes: manifest and config
parsed and matched to their digests, layer blobs present and of the right
size. Unpacking the layers is the tar_layer target's, and mkfs.erofs decodes
nothing. ``mutate`` edits the JSON members and then, most of the time, renames
each blob to its new digest and fixes the descriptors that point at it, so the
edits get past the digest checks into the parsers behind them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mutate as mut
from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images import archive
from cocoon.images.manifest import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST
from cocoon.images.store import Image, ImageStore

EXPECTED: tuple[type[BaseException], ...] = (ImageError,)
MAX_INPUT = 256 << 10


class _CheckingStore(ImageStore):
    """An ImageStore whose ``add`` checks what it is given and builds nothing."""

    def add(
        self,
        manifest_digest: str,
        manifest_bytes: bytes,
        config_bytes: bytes,
        tags: Sequence[str] = (),
        *,
        repo_digests: Sequence[str] | None = None,
    ) -> Image:
        mf, config, digests = self._check(
            manifest_digest, manifest_bytes, config_bytes, tags, repo_digests
        )
        self._check_layers(mf)
        return Image(
            mf.config.digest, manifest_digest, mf.media_type, list(tags), list(digests),
            config.created, 0, [], "", "",
        )  # fmt: skip


def run(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(data_dir=str(Path(tmp) / "data"))
        # Bombs are refused at these caps instead of filling the scratch dir.
        cfg.images.max_unpacked_bytes = 64 << 20
        cfg.images.max_layer_bytes = 16 << 20
        path = Path(tmp) / "archive.tar"
        path.write_bytes(data)
        archive.load(_CheckingStore(cfg), path)


# -- seeds --------------------------------------------------------------------


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, body in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(body)
            tf.addfile(ti, io.BytesIO(body))
    return buf.getvalue()


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def seeds() -> list[bytes]:
    layer = _tar({"bin/sh": b"#!/bin/true\n", "etc/passwd": b"root:x:0:0::/:/bin/sh\n"})
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"], "User": "0"},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
    }).encode()  # fmt: skip
    docker = _tar({
        "manifest.json": json.dumps([{"Config": "cfg.json", "RepoTags": ["busybox:latest"],
                                      "Layers": ["l1/layer.tar"]}]).encode(),
        "cfg.json": config,
        "l1/layer.tar": layer,
    })  # fmt: skip
    gz = gzip.compress(layer, mtime=0)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _digest(gz), "size": len(gz)}],
    }).encode()  # fmt: skip
    index = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": _digest(manifest),
                       "size": len(manifest), "platform": {"os": "linux", "architecture": "amd64"},
                       "annotations": {"io.containerd.image.name": "docker.io/library/x:1"}}],
    }).encode()  # fmt: skip
    blobs = {f"blobs/sha256/{_digest(b)[7:]}": b for b in (config, gz, manifest)}
    oci = _tar({"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index, **blobs})
    both = _tar({
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index, **blobs,
        "manifest.json": json.dumps([{"Config": f"blobs/sha256/{_digest(config)[7:]}",
                                      "RepoTags": ["x:2"], "Layers": [
                                          f"blobs/sha256/{_digest(gz)[7:]}"]}]).encode(),
    })  # fmt: skip
    return [docker, oci, both, gzip.compress(docker, mtime=0)]


# -- structure-aware mutation -----------------------------------------------------


def _members(data: bytes) -> list[list[bytes]] | None:
    """[header, body] of each ustar member, read by hand (no tarfile in the
    parent: a hostile header is the decoder's problem, not the mutator's)."""
    out = []
    pos = 0
    while pos + 512 <= len(data):
        hdr = data[pos : pos + 512]
        if hdr == bytes(512):
            break
        try:
            size = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        body = data[pos + 512 : pos + 512 + size]
        out.append([hdr, body])
        pos += 512 + -(-size // 512) * 512
    return out or None


def _header(hdr: bytes, size: int, name: bytes | None = None) -> bytes:
    h = bytearray(hdr)
    if name is not None:
        h[0:100] = name[:100].ljust(100, b"\0")
    h[124:136] = b"%011o\0" % size
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _join(members: list[list[bytes]]) -> bytes:
    out = bytearray()
    for hdr, body in members:
        out += _header(hdr, len(body)) + body + bytes(-len(body) % 512)
    return bytes(out + bytes(1024))


def _name(hdr: bytes) -> str:
    return hdr[0:100].split(b"\0", 1)[0].decode("latin-1")


def _fix_digests(members: list[list[bytes]]) -> None:
    """Rename each edited blob to its digest and repoint descriptors at it (a
    few rounds: index -> manifest -> config)."""
    for _ in range(4):
        moved: dict[str, tuple[str, int]] = {}
        for m in members:
            found = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", _name(m[0]))
            new = hashlib.sha256(m[1]).hexdigest()
            if found and found.group(1) != new:
                moved["sha256:" + found.group(1)] = ("sha256:" + new, len(m[1]))
                m[0] = _header(m[0], len(m[1]), f"blobs/sha256/{new}".encode())
        if not moved:
            return
        for m in members:
            m[1] = _repoint(m[1], moved)


def _repoint(body: bytes, moved: dict[str, tuple[str, int]]) -> bytes:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body
    changed = False
    for node in mut.walk(doc):
        if (
            isinstance(node, dict)
            and isinstance(node.get("digest"), str)
            and node["digest"] in moved
        ):
            node["digest"], node["size"] = moved[node["digest"]]
            changed = True
    return json.dumps(doc).encode() if changed else body


def mutate(data: bytes, rng: random.Random, pool: mut.Pool) -> bytes | None:
    members = _members(data)
    if members is None:
        return None
    jsons = [m for m in members if m[1][:1] in (b"{", b"[")]
    target = rng.choice(jsons or members)
    if rng.random() < 0.8:
        target[1] = mut.mutate_json(target[1], rng, pool) or mut.mutate_bytes(target[1], rng)
    elif rng.random() < 0.5:
        target[0] = mut.mutate_bytes(target[0], rng)[:512].ljust(512, b"\0")
    else:
        members.insert(rng.randrange(len(members) + 1), list(rng.choice(members)))
    if rng.random() < 0.8:
        _fix_digests(members)
    return _join(members)
