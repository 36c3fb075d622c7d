"""What a registry says in an error body or a token answer: hostile JSON, one line out."""

from __future__ import annotations

import json

import pytest

from cocoon.images.registry_auth import MAX_TOKEN, token_of
from cocoon.images.registry_errors import error_detail

DEEP = b'{"errors": ' + b"[" * 1000 + b"]" * 1000 + b"}"


@pytest.mark.parametrize(
    "body, detail",
    [
        (b'{"errors": [{"code": "DENIED", "message": "no"}]}', "DENIED: no"),
        (b'{"errors": [{"message": "only words"}]}', "only words"),
        (b'{"errors": [{"code": "X\\nY\\u001b[31m"}]}', "X?Y?[31m"),  # one printable line
        (b'{"errors": [{"code": {"nested": 1}, "message": 5}]}', ""),
        (b'{"errors": []}', ""),
        (b'{"errors": "x"}', ""),
        (b"[1, 2]", ""),
        (b"<html>bad gateway</html>", ""),
        (DEEP, ""),  # issue 19: RecursionError escaped json.loads here
    ],
)
def test_error_detail(body: bytes, detail: str) -> None:
    assert error_detail(body) == detail


@pytest.mark.parametrize(
    "body, token",
    [
        (b'{"token": "abc.def"}', "abc.def"),
        (b'{"access_token": "abc"}', "abc"),
        (b'{"token": "", "access_token": "xyz"}', "xyz"),
        (b'{"token": "has space"}', None),
        (b'{"token": 5}', None),
        (json.dumps({"token": "a" * (MAX_TOKEN + 1)}).encode(), None),
        (b'{"token": ' + b"[" * 1000 + b"]" * 1000 + b"}", None),  # issue 19
        (b"\xff\xfe\x00", None),
    ],
)
def test_token_of(body: bytes, token: str | None) -> None:
    assert token_of(body) == token
