"""How a registry's failures read: one printable line each, naming the cause.

A registry and the network between are untrusted: whatever they say is cut to
one printable line before it reaches a terminal, and a connection failure is
named by its cause (a timeout, TLS, DNS, an errno), not by an exception chain.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Iterator

import httpx

from cocoon.errors import ImageError
from cocoon.util import boundedjson

#: A registry that accepts no TCP connection in this long is down, not slow.
CONNECT_TIMEOUT_S = 15.0
#: Longest silence inside one response (a stalled CDN); the whole layer may take longer.
READ_TIMEOUT_S = 60.0
#: Registry error bodies are small; a huge one is hostile.
MAX_ERROR_BODY = 64 << 10


def printable(text: str, limit: int = 200) -> str:
    """A registry's words, made safe for one line of a terminal."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean[:limit] + ("..." if len(clean) > limit else "")


def reason(e: BaseException) -> str:
    """Why a connection failed, in a few words (the exception chain holds the OSError)."""
    if isinstance(e, httpx.ConnectTimeout):
        return f"no connection within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(e, httpx.ReadTimeout):
        return f"no data for {READ_TIMEOUT_S:g} s"
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({printable(x.verify_message or str(x), 120)})"
        if isinstance(x, ssl.SSLError):
            return f"TLS handshake failed ({printable(x.reason or str(x), 120)})"
        if isinstance(x, socket.gaierror):
            return "host name not found"
        if isinstance(x, OSError) and x.errno:
            return os.strerror(x.errno).lower()
        x = x.__cause__ or x.__context__
    if isinstance(e, httpx.RemoteProtocolError):
        return "the registry closed the connection"
    return printable(str(e), 120) or type(e).__name__


def is_tls(e: BaseException) -> bool:
    x: BaseException | None = e
    for _ in range(10):
        if x is None:
            return False
        if isinstance(x, ssl.SSLError):
            return True
        x = x.__cause__ or x.__context__
    return False


def first_image_error(group: BaseExceptionGroup[BaseException]) -> ImageError | None:
    for e in group.exceptions:
        if isinstance(e, ImageError):
            return e
        if isinstance(e, BaseExceptionGroup):
            inner = first_image_error(e)
            if inner:
                return inner
    return None


@contextlib.contextmanager
def about(prefix: str) -> Iterator[None]:
    """Say which pull and which blob an error from the store or the parser is about."""
    try:
        yield
    except ImageError as e:
        raise ImageError(f"{prefix}: {e}") from None


def error_detail(body: bytes) -> str:
    """``CODE: message`` of a distribution error body (one line, printable), or ""."""
    try:
        doc = boundedjson.loads(body, max_bytes=MAX_ERROR_BODY)
    except boundedjson.JSONError:
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, dict):
        return ""
    code, message = first.get("code", ""), first.get("message", "")
    words = [x for x in (code, message) if isinstance(x, str) and x]
    return printable(": ".join(words))
