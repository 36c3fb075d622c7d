"""A minimal asyncio QMP client: connect, negotiate, execute with a deadline.

QMP is QEMU's control socket; QEMU is trusted (it is our process), but replies
are still bounded by line length and every call has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

from cocoon.errors import HypervisorError

MAX_LINE = 1 << 20


class Qmp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: Path, timeout_s: float = 5.0) -> Qmp:
        q: Qmp | None = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
                q = cls(reader, writer)
                greeting = await q._read()
                if "QMP" not in greeting:
                    raise HypervisorError("QMP socket sent no greeting")
                await q.execute("qmp_capabilities", timeout_s=timeout_s)
                return q
        except BaseException as e:
            _hang_up(q)
            if isinstance(e, (OSError, TimeoutError)):
                raise HypervisorError(f"cannot talk to QEMU's QMP socket {path}: {e}") from e
            raise

    @classmethod
    async def pipelined(
        cls,
        path: Path,
        commands: list[tuple[str, dict[str, Any] | None, list[int]]],
        timeout_s: float = 5.0,
    ) -> tuple[Qmp, list[Any]]:
        """Connect and run ``commands`` (name, arguments, fds) sent at once,
        not each after the last one's reply: on a socket QEMU listens on
        before its main loop runs (a jailed VM's, made by the host), they
        wait there and run as soon as it does. Raises for the first that
        failed; the rest of the replies are read all the same."""
        q: Qmp | None = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
                q = cls(reader, writer)
                sock = writer.get_extra_info("socket")
                with socket.socket(fileno=os.dup(sock.fileno())) as plain:
                    # Each command's fds go with its own line: QEMU takes a
                    # command's fds from the bytes that carried them.
                    for cmd, args, fds in [("qmp_capabilities", None, []), *commands]:
                        line = _line(cmd, args)
                        if fds:
                            socket.send_fds(plain, [line], fds)
                        else:
                            plain.sendall(line)
                greeting = await q._read()
                if "QMP" not in greeting:
                    raise HypervisorError("QMP socket sent no greeting")
                replies: list[Any] = []
                failed = ""
                for cmd, _, _ in [("qmp_capabilities", None, []), *commands]:
                    obj = await q._reply()
                    if "error" in obj and not failed:
                        err = obj["error"]
                        failed = f"QMP {cmd}: {err.get('desc', err)}"
                    replies.append(obj.get("return"))
        except BaseException as e:
            _hang_up(q)
            if isinstance(e, (OSError, TimeoutError)):
                raise HypervisorError(f"cannot talk to QEMU's QMP socket {path}: {e}") from e
            raise
        if failed:
            q.close()
            raise HypervisorError(failed)
        return q, replies[1:]

    async def _reply(self) -> dict[str, Any]:
        """The next reply, events skipped."""
        while True:
            obj = await self._read()
            if "event" not in obj:
                return obj

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise HypervisorError("QEMU closed its QMP socket")
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise HypervisorError("QMP sent a non-object")
        return obj

    async def execute(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        timeout_s: float = 5.0,
        fds: list[int] | None = None,
    ) -> Any:
        """Run ``cmd``; ``fds`` go with it over SCM_RIGHTS (getfd, add-fd)."""
        line = _line(cmd, args)
        async with self._lock, asyncio.timeout(timeout_s):
            if fds:
                await self._writer.drain()  # nothing of ours queued ahead of it
                # asyncio's transport socket has no sendmsg: a plain one on a dup
                # (a fresh line always fits the socket's buffer).
                sock = self._writer.get_extra_info("socket")
                with socket.socket(fileno=os.dup(sock.fileno())) as plain:
                    socket.send_fds(plain, [line], fds)
            else:
                self._writer.write(line)
                await self._writer.drain()
            obj = await self._reply()
            if "error" in obj:
                err = obj["error"]
                raise HypervisorError(f"QMP {cmd}: {err.get('desc', err)}")
            return obj.get("return")

    def close(self) -> None:
        self._writer.close()


def _line(cmd: str, args: dict[str, Any] | None) -> bytes:
    msg: dict[str, Any] = {"execute": cmd}
    if args:
        msg["arguments"] = args
    return json.dumps(msg).encode() + b"\n"


def _hang_up(q: Qmp | None) -> None:
    """A connection given up on (failed, timed out, cancelled) is closed at
    once: QEMU's monitor serves one client at a time, and a stop's `quit`
    would otherwise wait behind it."""
    if q is not None:
        q.close()
