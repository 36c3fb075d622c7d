"""OCI image layouts built from scratch by the tests: tar layers, config, manifest, index.

Nothing comes from Docker Hub or any network: each test image is a few files
packed here with tarfile, compressed as the test asks (gzip, zstd or not at
all), then pushed to a real registry with skopeo.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

LAYER_MEDIA_TYPE = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


Files = dict[str, bytes | tuple[bytes, int]]


def tar_of(files: Files) -> bytes:
    """A deterministic tar (fixed mtime, owner) of regular files; (data, mode) sets a mode."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, item in sorted(files.items()):
            data, mode = item if isinstance(item, tuple) else (item, 0o644)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    assert how == "none"
    return data


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str
    diff_id: str


@dataclass(frozen=True)
class Image:
    """What the test knows about an image it built, to compare a pull against."""

    manifest_digest: str
    manifest_size: int
    config_digest: str
    layers: list[Layer]
    platform: str  # os/arch

    def descriptor(self) -> dict[str, Any]:
        os_, arch = self.platform.split("/")
        return {
            "mediaType": OCI_MANIFEST,
            "digest": self.manifest_digest,
            "size": self.manifest_size,
            "platform": {"os": os_, "architecture": arch},
        }


class Layout:
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self._refs: list[dict[str, Any]] = []
        self._write_index()

    def blob(self, data: bytes) -> str:
        d = digest_of(data)
        (self.root / "blobs" / "sha256" / d[7:]).write_bytes(data)
        return d

    def image(self, layers: list[tuple[Files, str]], platform: str = "linux/amd64") -> Image:
        """An image of ``layers`` (files, compression), for ``platform`` (os/arch)."""
        built = []
        for files, how in layers:
            tar = tar_of(files)
            blob = compress(tar, how)
            built.append(Layer(self.blob(blob), len(blob), LAYER_MEDIA_TYPE[how], digest_of(tar)))
        os_, arch = platform.split("/")
        config = json.dumps(
            {
                "architecture": arch,
                "os": os_,
                "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
                "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in built]},
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": self.blob(config),
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": x.media_type, "digest": x.digest, "size": x.size} for x in built
                ],
            }
        ).encode()
        return Image(self.blob(manifest), len(manifest), digest_of(config), built, platform)

    def index(self, images: list[Image]) -> tuple[str, int]:
        """A multi-platform image index over ``images``: (digest, size)."""
        data = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [i.descriptor() for i in images],
            }
        ).encode()
        return self.blob(data), len(data)

    def tag(self, name: str, digest: str, size: int, media_type: str = OCI_MANIFEST) -> None:
        """Name a manifest or index in index.json, as ``oci:<dir>:<name>`` finds it."""
        self._refs.append(
            {
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                "annotations": {"org.opencontainers.image.ref.name": name},
            }
        )
        self._write_index()

    def _write_index(self) -> None:
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": self._refs})
        )
