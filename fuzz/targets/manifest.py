"""Manifests and indexes from a registry or an archive (images/manifest.py), read
as ``registry.resolve`` does: the declared media type decides the parser, and an
index then yields the manifest for the default platform."""

from __future__ import annotations

import json

from cocoon.errors import ImageError
from cocoon.images import manifest as m

EXPECTED: tuple[type[BaseException], ...] = (ImageError,)

D = ["sha256:" + c * 64 for c in "0123"]


def run(data: bytes) -> None:
    mt = m.media_type_of(data)
    if mt in m.INDEX_TYPES:
        m.parse_index(data).select(m.DEFAULT_PLATFORM)
    else:
        mf = m.parse_manifest(data)
        for layer in mf.layers:
            _ = layer.compression


def seeds() -> list[bytes]:
    layer = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": D[1],
        "size": 100,
        "annotations": {"org.opencontainers.image.title": "l.tgz"},
    }
    docs = [
        {"schemaVersion": 2, "mediaType": m.OCI_MANIFEST,
         "config": {"mediaType": m.OCI_CONFIG, "digest": D[0], "size": 10}, "layers": [layer]},
        {"schemaVersion": 2, "mediaType": m.DOCKER_MANIFEST,
         "config": {"mediaType": m.DOCKER_CONFIG, "digest": D[0], "size": 10},
         "layers": [dict(layer, mediaType="application/vnd.docker.image.rootfs.diff.tar.gzip")]},
        {"schemaVersion": 2, "config": {"digest": D[0], "size": 1}, "layers": []},
        {"schemaVersion": 2, "mediaType": m.OCI_INDEX, "manifests": [
            {"mediaType": m.OCI_MANIFEST, "digest": D[2], "size": 500,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": m.OCI_MANIFEST, "digest": D[3], "size": 500,
             "platform": {"os": "linux", "architecture": "amd64"}},
        ]},
        {"schemaVersion": 2, "mediaType": m.DOCKER_LIST, "manifests": [
            {"mediaType": m.DOCKER_MANIFEST, "digest": D[2], "size": 1,
             "platform": {"os": "linux", "architecture": "amd64"}}]},
        {"schemaVersion": 1, "name": "old"},
    ]  # fmt: skip
    return [json.dumps(d).encode() for d in docs]
