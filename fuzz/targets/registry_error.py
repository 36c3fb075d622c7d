"""A registry's error body (images/registry_errors.py ``error_detail``): the one line of
it a failed pull shows."""

from __future__ import annotations

from cocoon.images.registry_errors import error_detail

EXPECTED: tuple[type[BaseException], ...] = ()


def run(data: bytes) -> None:
    detail = error_detail(data)
    if "\n" in detail or len(detail) > 203:
        raise AssertionError(f"detail is not one bounded line: {detail[:80]!r}")


def seeds() -> list[bytes]:
    return [
        b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown",'
        b'"detail":{"Tag":"latest"}}]}',
        b'{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}',
        b'{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit.'
        b' You may increase the limit by authenticating and upgrading"}]}',
        b"<html><body>502 Bad Gateway</body></html>",
    ]
