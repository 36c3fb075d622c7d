"""Image references are completed and validated as docker does, before any network."""

from __future__ import annotations

import pytest

from cocoon.errors import ImageError
from cocoon.images.reference import Reference, parse, registry_host

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "domain", "repo", "tag", "digest", "canonical", "familiar"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None,
         "docker.io/library/busybox:latest", "busybox:latest"),
        ("user/app:1", "docker.io", "user/app", "1", None,
         "docker.io/user/app:1", "user/app:1"),
        ("docker.io/library/alpine:3.19", "docker.io", "library/alpine", "3.19", None,
         "docker.io/library/alpine:3.19", "alpine:3.19"),
        ("index.docker.io/library/alpine", "docker.io", "library/alpine", "latest", None,
         "docker.io/library/alpine:latest", "alpine:latest"),
        (f"ghcr.io/o/r@{D}", "ghcr.io", "o/r", None, D, f"ghcr.io/o/r@{D}", f"ghcr.io/o/r@{D}"),
        ("localhost:5000/x:y", "localhost:5000", "x", "y", None,
         "localhost:5000/x:y", "localhost:5000/x:y"),
        ("localhost/x", "localhost", "x", "latest", None,
         "localhost/x:latest", "localhost/x:latest"),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest", None,
         "127.0.0.1:5000/a/b:latest", "127.0.0.1:5000/a/b:latest"),
        (f"reg.example.com/a/b/c:v1.2_3@{D}", "reg.example.com", "a/b/c", "v1.2_3", D,
         f"reg.example.com/a/b/c:v1.2_3@{D}", f"reg.example.com/a/b/c:v1.2_3@{D}"),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None,
         "[::1]:5000/x:latest", "[::1]:5000/x:latest"),
        ("my-org/my__app.x", "docker.io", "my-org/my__app.x", "latest", None,
         "docker.io/my-org/my__app.x:latest", "my-org/my__app.x:latest"),
    ],
)  # fmt: skip
def test_parse(
    text: str,
    domain: str,
    repo: str,
    tag: str | None,
    digest: str | None,
    canonical: str,
    familiar: str,
) -> None:
    r = parse(text)
    assert r == Reference(domain, repo, tag, digest)
    assert r.canonical == canonical and str(r) == canonical
    assert r.familiar == familiar
    assert parse(r.canonical) == r


def test_api_host_and_manifest_reference() -> None:
    assert parse("busybox").api_host == "registry-1.docker.io"
    assert parse("localhost:5000/x").api_host == "localhost:5000"
    assert parse("x:1").reference == "1"
    assert parse(f"x:1@{D}").reference == D  # digest wins, as in docker


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        (" busybox", "spaces"),
        ("Busybox", "lowercase"),
        ("ghcr.io/Owner/r", "lowercase"),
        ("a//b", "bad repository component"),
        ("a/-b", "bad repository component"),
        ("a/b_", "bad repository component"),
        ("a/../b", "bad repository component"),
        ("x:-tag", "tag must match"),
        ("x:" + "t" * 129, "tag must match"),
        ("x:a/b", "not a valid host"),
        ("x@sha256:abc", "digest must be"),
        ("x@md5:" + "a" * 32, "digest must be"),
        ("x@" + D.upper(), "digest must be"),
        ("bad_host.io:x/y", "not a valid host"),
        ("a.io:99999999/y", "not a valid host"),
        ("x/" + "a" * 300, "longer than 255"),
        ("x?y", "bad repository component"),
        ("x\n", "spaces"),
    ],
)
def test_invalid(text: str, why: str) -> None:
    with pytest.raises(ImageError, match="invalid image reference") as e:
        parse(text)
    assert why in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("GHCR.io", "ghcr.io"),
        ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
        ("localhost:5000", "localhost:5000"),
    ],
)
def test_registry_host(text: str, host: str) -> None:
    assert registry_host(text) == host


def test_registry_host_invalid() -> None:
    with pytest.raises(ImageError, match="invalid registry"):
        registry_host("https://")
