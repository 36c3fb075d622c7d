"""Pull tests against a real docker-registry 2.8, images pushed with skopeo.

Session-scoped registries serve the tests that only read from them (a plain
one, one behind token auth, one behind htpasswd Basic auth), each with its
test images pushed once. Tests that corrupt a registry's storage or kill it
start their own. Every registry process is SIGKILLed at the end. Docker's
config.json is pointed at an empty per-test directory so a developer's own
``docker login`` can never leak into (or out of) a test.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.images.blobs import BlobStore

from .layout import OCI_INDEX, Image, Layout
from .servers import HTPASSWD, REGISTRY, SKOPEO, Registry, TokenServer, push, require, running

USER, PASSWORD = "alice", "s3cret-pw"


@pytest.fixture(autouse=True)
def _isolated_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "docker-config"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    return d


@pytest.fixture
def docker_config(_isolated_docker_config: Path) -> Path:
    """The config.json the code under test reads (empty until a test writes it)."""
    return _isolated_docker_config / "config.json"


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    c = Config()
    c.data_dir = str(tmp_path / "data")
    return c


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@dataclass(frozen=True)
class Pushed:
    """The session registry and what the tests pushed into it."""

    registry: Registry
    mixed: Image  # test/mixed:1 - gzip, zstd and uncompressed layers, OCI manifest
    amd64: Image  # test/multi:1 - an OCI index of amd64 + arm64
    arm64: Image
    index_digest: str
    layout: Path

    @property
    def host(self) -> str:
        return self.registry.host


def _build(root: Path) -> tuple[Layout, Image, Image, Image, str]:
    lay = Layout(root)
    mixed = lay.image(
        [
            ({"etc/gzip.txt": b"from a gzip layer\n"}, "gzip"),
            ({"etc/zstd.txt": b"from a zstd layer\n" * 100}, "zstd"),
            ({"etc/plain.txt": b"from an uncompressed layer\n"}, "none"),
        ]
    )
    lay.tag("mixed", mixed.manifest_digest, mixed.manifest_size)
    amd64 = lay.image([({"arch": b"amd64\n"}, "gzip")], "linux/amd64")
    arm64 = lay.image([({"arch": b"arm64\n"}, "zstd")], "linux/arm64")
    index, size = lay.index([amd64, arm64])
    lay.tag("multi", index, size, OCI_INDEX)
    # Becomes docker schema 2 on push: gzip, since docker media types have no zstd.
    v2s2 = lay.image([({"etc/docker.txt": b"docker schema 2\n"}, "gzip")], "linux/arm64")
    lay.tag("v2s2", v2s2.manifest_digest, v2s2.manifest_size)
    return lay, mixed, amd64, arm64, index


@pytest.fixture(scope="session")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    require(REGISTRY, SKOPEO)
    root = tmp_path_factory.mktemp("registry")
    lay, mixed, amd64, arm64, index = _build(root / "layout")
    with running(Registry(root / "plain")) as reg:
        push(lay.root, "mixed", f"{reg.host}/test/mixed:1")
        push(lay.root, "multi", f"{reg.host}/test/multi:1", all_images=True)
        # skopeo rewrites this one as docker schema 2 (docker media types throughout).
        push(lay.root, "v2s2", f"{reg.host}/test/docker:1", fmt="v2s2")
        yield Pushed(reg, mixed, amd64, arm64, index, lay.root)


@dataclass(frozen=True)
class Secured:
    registry: Registry
    image: Image
    tokens: TokenServer | None


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """A registry that takes only Bearer tokens from our token server; alice may pull."""
    require(REGISTRY, SKOPEO)
    root = tmp_path_factory.mktemp("token")
    tokens = TokenServer(root, {USER: PASSWORD})
    lay, mixed, *_ = _build(root / "layout")
    try:
        with running(Registry(root / "reg", tokens.registry_auth())) as reg:
            push(lay.root, "mixed", f"{reg.host}/secret/app:1", creds=f"{USER}:{PASSWORD}")
            yield Secured(reg, mixed, tokens)
    finally:
        tokens.close()


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """A registry with htpasswd Basic auth (distribution 2.8 allows it over plain HTTP)."""
    require(REGISTRY, SKOPEO, HTPASSWD)
    root = tmp_path_factory.mktemp("basic")
    htpasswd = root / "htpasswd"
    r = subprocess.run(
        [HTPASSWD, "-Bbn", USER, PASSWORD], capture_output=True, text=True, check=True
    )
    htpasswd.write_text(r.stdout)
    lay, mixed, *_ = _build(root / "layout")
    auth = {"htpasswd": {"realm": "cocoon-test", "path": str(htpasswd)}}
    with running(Registry(root / "reg", auth)) as reg:
        push(lay.root, "mixed", f"{reg.host}/private/app:1", creds=f"{USER}:{PASSWORD}")
        yield Secured(reg, mixed, None)


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry for one test, which may corrupt its storage or kill it."""
    require(REGISTRY, SKOPEO)
    reg = Registry(tmp_path / "own-registry")
    try:
        yield reg
    finally:
        reg.kill()
