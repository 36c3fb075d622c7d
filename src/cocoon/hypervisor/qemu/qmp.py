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
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
                q = cls(reader, writer)
                greeting = await q._read()
                if "QMP" not in greeting:
                    raise HypervisorError("QMP socket sent no greeting")
                await q.execute("qmp_capabilities", timeout_s=timeout_s)
                return q
        except (OSError, TimeoutError) as e:
            raise HypervisorError(f"cannot talk to QEMU's QMP socket {path}: {e}") from e

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
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        line = json.dumps(msg).encode() + b"\n"
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
            while True:
                obj = await self._read()
                if "event" in obj:
                    continue
                if "error" in obj:
                    err = obj["error"]
                    raise HypervisorError(f"QMP {cmd}: {err.get('desc', err)}")
                return obj.get("return")

    def close(self) -> None:
        self._writer.close()
