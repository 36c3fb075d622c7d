"""The HTTP trigger's contract with a handler: CGI (RFC 3875).

A request reaches the handler as CGI's meta-variables in its environment
(``REQUEST_METHOD``, ``PATH_INFO``, ``QUERY_STRING``, ``CONTENT_TYPE``,
``CONTENT_LENGTH``, ``HTTP_<NAME>`` per header) and its body on stdin; the
handler answers as a CGI script does: header lines (``Status: 201 Created``,
``Content-Type: ...``, any other), a blank line, the body. A shell script
needs nothing to speak it, and so does any language's CGI library.

The caller's ``Authorization`` header is the service's bearer token: it is
never passed on. Hop-by-hop headers of the answer are dropped (the server
frames the response itself).
"""

from __future__ import annotations

import re

#: Request headers the handler never sees.
WITHHELD = {"authorization", "proxy-authorization", "connection", "keep-alive", "te", "upgrade"}
#: Answer headers the server sets itself.
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te"}
#: A header block larger than this is no CGI answer.
MAX_HEAD = 64 << 10
_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def request_env(
    method: str, path: str, query: str, headers: list[tuple[str, str]], length: int, remote: str
) -> list[str]:
    env = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_METHOD": method,
        "PATH_INFO": path or "/",
        "QUERY_STRING": query,
        "CONTENT_LENGTH": str(length),
        "REMOTE_ADDR": remote,
    }
    for name, value in headers:
        low = name.lower()
        if low in WITHHELD or not _NAME.match(name) or "\0" in value:
            continue
        if low == "content-type":
            env["CONTENT_TYPE"] = value
            continue
        if low == "content-length":
            continue
        key = "HTTP_" + name.upper().replace("-", "_")
        env[key] = f"{env[key]}, {value}" if key in env else value
    return [f"{k}={v}" for k, v in env.items()]


class NotCgi(ValueError):
    """The handler's output is not a CGI answer."""


def parse_response(out: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) of a CGI answer."""
    head, sep, body = out.partition(b"\r\n\r\n")
    alt_head, alt_sep, alt_body = out.partition(b"\n\n")
    if not sep or (alt_sep and len(alt_head) < len(head)):
        head, sep, body = alt_head, alt_sep, alt_body
    if not sep or len(head) > MAX_HEAD:
        raise NotCgi("the handler's output is no CGI answer: header lines, a blank line, a body")
    status = 200
    headers: list[tuple[str, str]] = []
    for raw in head.decode("latin-1").splitlines():
        name, colon, value = raw.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not _NAME.match(name):
            raise NotCgi(f"the handler's output has a bad header line: {raw[:80]!r}")
        if name.lower() == "status":
            code = value.split(" ", 1)[0]
            if not (code.isdigit() and len(code) == 3 and 100 <= int(code) <= 599):
                raise NotCgi(f"the handler's Status is not an HTTP status: {value[:40]!r}")
            status = int(code)
        elif any(c < " " and c != "\t" or c == "\x7f" for c in value):
            raise NotCgi(f"the handler's header {name[:40]} holds a control character")
        elif name.lower() not in HOP_BY_HOP:
            headers.append((name, value))
    return status, headers, body
