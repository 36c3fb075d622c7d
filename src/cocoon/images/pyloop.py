"""The Python runtime's handler loop, copied into the runtime image as
/opt/cocoon/loop.py and run in a function's instance (standard library only).

One process per instance, started once: it imports the handler
(``module.function``, the module from /code) and then serves invocations
until its stdin closes, so an invocation costs a call, not an interpreter's
start. Frames on its original stdin and stdout: a 4-byte big-endian length,
then the bytes.

- At start it writes ``{"ready": true}``, or ``{"ready": false, "error":
  <traceback>}`` and exits 1 when the handler cannot be imported.
- Started with ``-`` for the handler (a pre-warmed instance, before any
  function's code is there), it first waits for one frame, ``{"handler":
  "module.function", "env": {...}}`` (variables for the process's life), and
  only then imports: the interpreter's start is paid before the request.
- Each request is two frames: a JSON header (``{"env": {...}}``: variables
  set for this call only) and the body. Each answer is three: a JSON header
  (``{"ok": bool, "error": <last line of the traceback>}``), the result (what
  the handler returned: bytes, str as UTF-8, None as nothing, anything else
  as JSON) and the call's logs (what it printed, and its traceback).

The frames' descriptors are private: fd 0 is /dev/null and fd 1 is stderr,
so nothing a handler or its children write or read can break the stream.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import struct
import sys
import traceback
from typing import Any, BinaryIO


def _exact(f: BinaryIO, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def read_frame(f: BinaryIO) -> bytes:
    (n,) = struct.unpack(">I", _exact(f, 4))
    return _exact(f, n)


def write_frame(f: BinaryIO, data: bytes) -> None:
    f.write(struct.pack(">I", len(data)) + data)
    f.flush()


def encode(out: Any) -> bytes:
    if out is None:
        return b""
    if isinstance(out, bytes | bytearray):
        return bytes(out)
    if isinstance(out, str):
        return out.encode()
    return json.dumps(out).encode()


def main() -> int:
    frames_in = os.fdopen(os.dup(0), "rb", buffering=0)
    frames_out = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    spec = sys.argv[1]
    if spec == "-":
        try:
            first = json.loads(read_frame(frames_in))
        except EOFError:
            return 0
        spec = str(first["handler"])
        os.environ.update({str(k): str(v) for k, v in first.get("env", {}).items()})
        os.chdir("/code")
        importlib.invalidate_caches()
    module, _, name = spec.rpartition(".")
    sys.path.insert(0, "/code")
    try:
        handler = getattr(importlib.import_module(module), name)
    except BaseException:
        failure = {"ready": False, "error": traceback.format_exc()}
        write_frame(frames_out, json.dumps(failure).encode())
        return 1
    write_frame(frames_out, b'{"ready": true}')
    while True:
        try:
            header = json.loads(read_frame(frames_in))
            body = read_frame(frames_in)
        except EOFError:
            return 0
        saved = dict(os.environ)
        os.environ.update({str(k): str(v) for k, v in header.get("env", {}).items()})
        logs = io.StringIO()
        ok, error, out = True, "", b""
        try:
            with contextlib.redirect_stdout(logs), contextlib.redirect_stderr(logs):
                out = encode(handler(body))
        except BaseException:
            ok = False
            text = traceback.format_exc()
            logs.write(text)
            error = text.strip().splitlines()[-1]
        finally:
            os.environ.clear()
            os.environ.update(saved)
        write_frame(frames_out, json.dumps({"ok": ok, "error": error}).encode())
        write_frame(frames_out, out)
        write_frame(frames_out, logs.getvalue().encode())


if __name__ == "__main__":
    sys.exit(main())
