"""A token server's answer (images/registry_auth.py ``token_of``) and the
``WWW-Authenticate`` challenge that sent us there (``parse_challenge``): the
input's first line is the header, the rest the token body."""

from __future__ import annotations

from cocoon.images.registry_auth import MAX_TOKEN, parse_challenge, token_of

EXPECTED: tuple[type[BaseException], ...] = ()


def run(data: bytes) -> None:
    header, _, body = data.partition(b"\n")
    parse_challenge(header.decode("latin-1"))  # how httpx hands header values over
    token = token_of(body)
    if token is not None and (len(token) > MAX_TOKEN or not token.isascii()):
        raise AssertionError("token_of let an unusable token through")


def seeds() -> list[bytes]:
    return [
        b'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        b'scope="repository:library/busybox:pull"\n'
        b'{"token":"eyJhbGciOiJSUzI1NiJ9.e30.sig","access_token":"eyJhbGciOiJSUzI1NiJ9.e30.sig",'
        b'"expires_in":300,"issued_at":"2024-01-01T00:00:00Z"}',
        b'Basic realm="Registry Realm"\n{"access_token":"abc"}',
        b'Bearer realm="http://127.0.0.1:5001/auth",scope="a:b:pull,push",error="x\\"y"\n{}',
    ]
