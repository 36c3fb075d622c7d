"""Credentials: docker's config.json and cocoon's auth.json, token and Basic auth, login.

The registries here refuse anonymous pulls for real: one trusts only tokens
from our token server (RS256 JWTs with an x5c certificate, checked by the
registry against its rootcertbundle), one checks an htpasswd file itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import stat
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images import auth
from cocoon.images.auth import Credentials, logout, lookup
from cocoon.images.blobs import BlobStore
from cocoon.images.registry import PulledImage, pull
from cocoon.images.registry_auth import parse_challenge
from cocoon.images.service import login

from .conftest import PASSWORD, USER, Secured

pytestmark = pytest.mark.timeout(60)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_docker_config(path: Path, auths: dict[str, object]) -> None:
    path.write_text(json.dumps({"auths": auths}))


def run_pull(cfg: Config, store: BlobStore, ref: str) -> PulledImage:
    return asyncio.run(pull(cfg, store, ref))


# -- files, no network --------------------------------------------------------


def test_lookup_docker_config_forms(cfg: Config, docker_config: Path) -> None:
    write_docker_config(
        docker_config,
        {
            "https://index.docker.io/v1/": {"auth": b64("hub:pw:with:colons")},
            "http://127.0.0.1:5000/v2/": {"username": "u", "password": "p"},
            "ghcr.io": {"auth": ""},  # e.g. left by a credential helper: no secret here
            "not a host!": {"auth": b64("x:y")},
        },
    )
    assert lookup(cfg, "docker.io") == Credentials("hub", "pw:with:colons")
    assert lookup(cfg, "registry-1.docker.io") == Credentials("hub", "pw:with:colons")
    assert lookup(cfg, "127.0.0.1:5000") == Credentials("u", "p")
    assert lookup(cfg, "127.0.0.1:5001") is None
    assert lookup(cfg, "ghcr.io") is None


def test_cocoon_file_wins_over_docker(cfg: Config, docker_config: Path) -> None:
    write_docker_config(docker_config, {"example.com": {"auth": b64("docker:1")}})
    cfg.data.mkdir(parents=True)
    write_docker_config(cfg.data / "auth.json", {"example.com": {"auth": b64("cocoon:2")}})
    assert lookup(cfg, "example.com") == Credentials("cocoon", "2")


def test_broken_files_are_named_without_secrets(
    cfg: Config, docker_config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # docker's file: a warning (as the docker CLI does), public pulls go on.
    docker_config.write_text('{"auths": {"example.com": {"auth": "c2VjcmV0"}')  # cut short
    assert lookup(cfg, "example.com") is None
    assert f"credentials file {docker_config} is not valid JSON" in caplog.text
    write_docker_config(docker_config, {"example.com": {"auth": b64("no-colon-hunter2")}})
    assert lookup(cfg, "example.com") is None
    assert "not base64 of user:password" in caplog.text
    assert "hunter2" not in caplog.text and "c2VjcmV0" not in caplog.text
    # cocoon's own file: an error, since cocoon wrote it.
    cfg.data.mkdir(parents=True)
    (cfg.data / "auth.json").write_text('{"auths": {"example.com": {"auth": "c2VjcmV0"}')
    with pytest.raises(ImageError) as e:
        lookup(cfg, "example.com")
    assert str(e.value) == f"credentials file {cfg.data / 'auth.json'} is not valid JSON"


def test_password_never_in_repr() -> None:
    c = Credentials("alice", "hunter2")
    assert "hunter2" not in repr(c) and "alice" in repr(c)


def test_parse_challenge() -> None:
    assert parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    ) == (
        "bearer",
        {
            "realm": "https://auth.example/token",
            "service": "reg",
            "scope": "repository:a/b:pull,push",
        },
    )
    assert parse_challenge('Basic realm="x \\"y\\""') == ("basic", {"realm": 'x "y"'})


# -- token auth -----------------------------------------------------------------


def test_token_registry_refuses_anonymous(
    token_registry: Secured, cfg: Config, store: BlobStore
) -> None:
    host = token_registry.registry.host
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, f"{host}/secret/app:1")
    assert str(e.value) == f"authentication required: run `cocoon login {host}`"
    assert store.digests() == []


def test_token_pull_with_docker_credentials(
    token_registry: Secured,
    cfg: Config,
    store: BlobStore,
    docker_config: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = token_registry.registry.host
    tokens = token_registry.tokens
    assert tokens is not None
    write_docker_config(docker_config, {host: {"auth": b64(f"{USER}:{PASSWORD}")}})
    del tokens.requests[:]
    caplog.set_level(logging.DEBUG, logger="cocoon")
    got = run_pull(cfg, store, f"{host}/secret/app:1")
    assert got.manifest_digest == token_registry.image.manifest_digest
    assert all(store.has(x.digest) for x in got.layers)
    # One token for the whole pull, scoped to pulling this repository, as alice.
    assert tokens.requests == [
        {
            "user": USER,
            "ok": True,
            "scope": ["repository:secret/app:pull"],
            "service": [tokens.SERVICE],
        }
    ]
    assert PASSWORD not in caplog.text and b64(f"{USER}:{PASSWORD}") not in caplog.text


def test_token_wrong_password(
    token_registry: Secured, cfg: Config, store: BlobStore, docker_config: Path
) -> None:
    host = token_registry.registry.host
    write_docker_config(docker_config, {host: {"auth": b64(f"{USER}:wrong-pw")}})
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, f"{host}/secret/app:1")
    assert str(e.value) == (
        f"unauthorized: {host} rejected the credentials of 'alice'; run `cocoon login {host}`"
    )


def test_login_pull_logout_token(token_registry: Secured, cfg: Config, store: BlobStore) -> None:
    host = token_registry.registry.host
    with pytest.raises(ImageError) as e:
        asyncio.run(login(cfg, host, USER, "wrong-pw"))
    assert str(e.value) == f"login to {host} failed: wrong username or password"
    assert not auth.auth_file(cfg).exists()

    assert asyncio.run(login(cfg, f"http://{host}/", USER, PASSWORD)) == host
    path = auth.auth_file(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"auths": {host: {"auth": b64(f"{USER}:{PASSWORD}")}}}
    run_pull(cfg, store, f"{host}/secret/app:1")

    assert logout(cfg, host) is True
    assert logout(cfg, host) is False
    assert json.loads(path.read_text()) == {"auths": {}}
    with pytest.raises(ImageError, match="authentication required"):
        run_pull(cfg, BlobStore(store.root.parent / "other"), f"{host}/secret/app:1")


# -- Basic auth (htpasswd) --------------------------------------------------------


def test_basic_registry(
    basic_registry: Secured, cfg: Config, store: BlobStore, docker_config: Path
) -> None:
    host = basic_registry.registry.host
    ref = f"{host}/private/app:1"
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, ref)
    assert str(e.value) == f"authentication required: run `cocoon login {host}`"

    # username/password fields (not "auth"), under a URL-shaped key: both as docker writes them.
    write_docker_config(docker_config, {f"http://{host}/v2/": {"username": USER, "password": "x"}})
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, ref)
    assert str(e.value) == (
        f"unauthorized: {host} rejected the credentials of 'alice'; run `cocoon login {host}`"
    )

    write_docker_config(
        docker_config, {f"http://{host}/v2/": {"username": USER, "password": PASSWORD}}
    )
    got = run_pull(cfg, store, ref)
    assert got.manifest_digest == basic_registry.image.manifest_digest
    assert all(store.has(x.digest) for x in got.layers)


def test_login_basic(basic_registry: Secured, cfg: Config) -> None:
    host = basic_registry.registry.host
    with pytest.raises(ImageError, match="wrong username or password"):
        asyncio.run(login(cfg, host, USER, "nope"))
    asyncio.run(login(cfg, host, USER, PASSWORD))
    assert lookup(cfg, host) == Credentials(USER, PASSWORD)
