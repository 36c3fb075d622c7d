"""OCI / Docker manifests, indexes and image configs: parsed, bounded, validated.

Registries and archives are untrusted input: every document is size-capped
before parsing, every digest validated, every field type-checked. The result
is a small typed view; the raw bytes stay in the blob store (their digest is
the identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cocoon.errors import ImageError
from cocoon.images.blobs import check_digest
from cocoon.util import boundedjson

MAX_MANIFEST = 4 << 20
MAX_CONFIG = 16 << 20
MAX_LAYERS = 512

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

#: Layer media types and how their bytes are compressed.
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    # Non-distributable variants are the same bytes.
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def compression(self) -> str:
        return LAYER_TYPES[self.media_type]


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(f"invalid platform {text!r}: use os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")


DEFAULT_PLATFORM = Platform("linux", "amd64")


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: list[Descriptor]

    def select(self, want: Platform) -> Descriptor:
        """The manifest for ``want``; a missing variant matches any (amd64 has none)."""
        for d in self.manifests:
            p = d.platform
            if (
                p
                and (p.os, p.architecture) == (want.os, want.architecture)
                and (not want.variant or p.variant == want.variant)
            ):
                return d
        have = ", ".join(str(d.platform) for d in self.manifests if d.platform) or "none"
        raise ImageError(f"no image for platform {want} (available: {have})")


@dataclass(frozen=True)
class ImageConfig:
    """The parts of the image config that `run` honours, plus layer diff_ids."""

    architecture: str
    os: str
    diff_ids: list[str]
    entrypoint: list[str]
    cmd: list[str]
    env: list[str]
    working_dir: str
    user: str
    exposed_ports: list[str]
    volumes: list[str]
    stop_signal: str
    labels: dict[str, str]
    created: str


def _load(data: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(data) > limit:
        raise ImageError(f"{what} is {len(data)} B, more than the {limit} B allowed")
    try:
        obj = boundedjson.loads(data, max_bytes=limit)
    except boundedjson.JSONError as e:
        raise ImageError(f"{what} is not usable JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ImageError(f"{what} is not a JSON object")
    return obj


def _str(obj: dict[str, Any], key: str, what: str, default: str | None = None) -> str:
    v = obj.get(key)
    if v is None:
        v = default
    if not isinstance(v, str):
        raise ImageError(f"{what}: {key} must be a string")
    return v


def _strlist(v: Any, what: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ImageError(f"{what} must be a list of strings")
    return list(v)


def _descriptor(obj: Any, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ImageError(f"{what} is not an object")
    digest = _str(obj, "digest", what)
    check_digest(digest)
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}: size must be a non-negative integer")
    platform = None
    if isinstance(obj.get("platform"), dict):
        p = obj["platform"]
        platform = Platform(
            _str(p, "os", what, ""), _str(p, "architecture", what, ""), _str(p, "variant", what, "")
        )
    ann = obj.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
        raise ImageError(f"{what}: annotations must map strings to strings")
    return Descriptor(_str(obj, "mediaType", what, ""), digest, size, platform, dict(ann))


def media_type_of(data: bytes) -> str:
    """The mediaType a manifest/index declares (or implies, for old OCI documents)."""
    obj = _load(data, MAX_MANIFEST, "manifest")
    mt = obj.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if obj.get("schemaVersion") == 1:
        raise ImageError(
            "docker schema 1 manifests are not supported (deprecated); re-push the image"
        )
    if "manifests" in obj:
        return OCI_INDEX
    if "layers" in obj:
        return OCI_MANIFEST
    raise ImageError("document is neither a manifest nor an index")


def parse_index(data: bytes) -> Index:
    obj = _load(data, MAX_MANIFEST, "index")
    mt = media_type_of(data)
    if mt not in INDEX_TYPES:
        raise ImageError(f"expected an image index, got {mt}")
    ms = obj.get("manifests")
    if not isinstance(ms, list) or len(ms) > 4096:
        raise ImageError("index: manifests must be a list (at most 4096)")
    return Index(mt, [_descriptor(m, f"index.manifests[{i}]") for i, m in enumerate(ms)])


def parse_manifest(data: bytes) -> Manifest:
    obj = _load(data, MAX_MANIFEST, "manifest")
    mt = media_type_of(data)
    if mt not in MANIFEST_TYPES:
        raise ImageError(f"expected an image manifest, got {mt}")
    config = _descriptor(obj.get("config"), "manifest.config")
    raw_layers = obj.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError("manifest: layers must be a list")
    if len(raw_layers) > MAX_LAYERS:
        raise ImageError(f"manifest has {len(raw_layers)} layers, more than {MAX_LAYERS}")
    layers = [_descriptor(x, f"manifest.layers[{i}]") for i, x in enumerate(raw_layers)]
    for d in layers:
        if d.media_type not in LAYER_TYPES:
            raise ImageError(f"unsupported layer media type {d.media_type[:100]!r}")
    return Manifest(mt, config, layers)


def parse_config(data: bytes) -> ImageConfig:
    obj = _load(data, MAX_CONFIG, "image config")
    c = obj.get("config") or {}
    if not isinstance(c, dict):
        raise ImageError("image config: config must be an object")
    rootfs = obj.get("rootfs") or {}
    if not isinstance(rootfs, dict):
        raise ImageError("image config: rootfs must be an object")
    diff_ids = _strlist(rootfs.get("diff_ids"), "image config: rootfs.diff_ids")
    for d in diff_ids:
        check_digest(d)

    def keys(v: Any, what: str) -> list[str]:
        if v is None:
            return []
        if not isinstance(v, dict):
            raise ImageError(f"image config: {what} must be an object")
        return sorted(str(k) for k in v)

    labels = c.get("Labels") or {}
    if not isinstance(labels, dict):
        raise ImageError("image config: Labels must be an object")
    return ImageConfig(
        architecture=_str(obj, "architecture", "image config", ""),
        os=_str(obj, "os", "image config", ""),
        diff_ids=diff_ids,
        entrypoint=_strlist(c.get("Entrypoint"), "image config: Entrypoint"),
        cmd=_strlist(c.get("Cmd"), "image config: Cmd"),
        env=_strlist(c.get("Env"), "image config: Env"),
        working_dir=_str(c, "WorkingDir", "image config", "") or "",
        user=_str(c, "User", "image config", "") or "",
        exposed_ports=keys(c.get("ExposedPorts"), "ExposedPorts"),
        volumes=keys(c.get("Volumes"), "Volumes"),
        stop_signal=_str(c, "StopSignal", "image config", "") or "",
        labels={str(k): str(v) for k, v in labels.items()},
        created=_str(obj, "created", "image config", "") or "",
    )
