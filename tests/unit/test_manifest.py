"""Manifest, index and config parsing: untrusted JSON, checked field by field."""

from __future__ import annotations

import json

import pytest

from cocoon.errors import ImageError
from cocoon.images import manifest as m

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64


def doc(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_manifest_and_layers() -> None:
    mf = m.parse_manifest(doc({
        "schemaVersion": 2, "mediaType": m.DOCKER_MANIFEST,
        "config": {"mediaType": m.DOCKER_CONFIG, "digest": D1, "size": 10},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                    "digest": D2, "size": 5}],
    }))  # fmt: skip
    assert mf.config.digest == D1 and mf.layers[0].compression == "zstd"


def test_index_platform_selection() -> None:
    idx = m.parse_index(doc({"schemaVersion": 2, "manifests": [
        {"mediaType": m.OCI_MANIFEST, "digest": D1, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": m.OCI_MANIFEST, "digest": D2, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]}))  # fmt: skip
    assert idx.media_type == m.OCI_INDEX
    assert idx.select(m.DEFAULT_PLATFORM).digest == D2
    assert idx.select(m.Platform.parse("linux/arm64")).digest == D1
    with pytest.raises(ImageError, match="available: linux/arm64/v8, linux/amd64"):
        idx.select(m.Platform.parse("linux/s390x"))


def test_config_fields() -> None:
    cfg = m.parse_config(doc({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": None, "Cmd": ["sh"], "Env": ["A=1"], "WorkingDir": None,
                   "ExposedPorts": {"80/tcp": {}}, "StopSignal": "SIGQUIT", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": [D1]},
    }))  # fmt: skip
    assert cfg.cmd == ["sh"] and cfg.entrypoint == [] and cfg.working_dir == ""
    assert cfg.exposed_ports == ["80/tcp"] and cfg.stop_signal == "SIGQUIT"


@pytest.mark.parametrize(
    "body, why",
    [
        (b"x" * (m.MAX_MANIFEST + 1), "more than"),
        (b"[1]", "not a JSON object"),
        (doc({"schemaVersion": 1}), "schema 1"),
        (
            doc(
                {
                    "mediaType": m.OCI_MANIFEST,
                    "config": {"digest": "md5:x", "size": 1},
                    "layers": [],
                }
            ),
            "malformed digest",
        ),  # fmt: skip
        (
            doc({"mediaType": m.OCI_MANIFEST, "config": {"digest": D1, "size": -1}, "layers": []}),
            "non-negative",
        ),  # fmt: skip
        (
            doc(
                {
                    "mediaType": m.OCI_MANIFEST,
                    "config": {"digest": D1, "size": 1},
                    "layers": [{"mediaType": "application/x-evil", "digest": D2, "size": 1}],
                }
            ),
            "unsupported layer media type",
        ),  # fmt: skip
    ],
)
def test_hostile_manifests(body: bytes, why: str) -> None:
    with pytest.raises(ImageError, match=why):
        m.parse_manifest(body)


DEEP = b'{"mediaType": "x", "annotations": ' + b"[" * 1000 + b"]" * 1000 + b"}"


@pytest.mark.parametrize("parse", [m.parse_manifest, m.parse_index, m.parse_config])
def test_deep_nesting_is_an_image_error(parse: object) -> None:
    """Issue 19: 1,000 nested arrays raised RecursionError out of json.loads."""
    assert callable(parse)
    with pytest.raises(ImageError, match="nested 1001 deep, more than the 64 allowed"):
        parse(DEEP)
