"""A minimal asyncio QMP client: connect, negotiate, execute with a deadline.

QMP is QEMU's control socket; QEMU is trusted (it is our process), but replies
are still bounded by line length and every call has a timeout.
"""

from __future__ import annotations

import asyncio
import json
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
            raise HypervisorError(f"cannot talk to QEMU's QMP socket {path}: {e}") from None

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise HypervisorError("QEMU closed its QMP socket")
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise HypervisorError("QMP sent a non-object")
        return obj

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 5.0
    ) -> Any:
        msg: dict[str, Any] = {"execute": cmd}
        if args:
            msg["arguments"] = args
        async with self._lock, asyncio.timeout(timeout_s):
            self._writer.write(json.dumps(msg).encode() + b"\n")
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
