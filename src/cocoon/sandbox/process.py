"""A process in the guest as the host sees it, apart from the Sandbox that
starts it: the command lines that only talk to a container's monitor (start,
kill, state, delete, the stand-in) import this, not the sandbox's whole stack
of hypervisor, network and storage modules (~20 ms of every such call)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, TypeVar

from cocoon.errors import GuestError, SandboxError
from cocoon.protocol import messages
from cocoon.protocol.session import InStream, OutStream
from cocoon.sandbox.channel import Timeout

M = TypeVar("M", bound=messages.Message)


class Caller(Protocol):
    """What a Process needs to reach its guest: a Sandbox, or a container's
    monitor relaying for another cocoon command (runtime.control)."""

    async def call(
        self,
        msg: messages.Message,
        expect: type[M],
        *,
        timeout_s: float | None | Timeout = Timeout.AGENT,
    ) -> M: ...


@dataclass
class Process:
    """A process in the guest with its stdio streams, as the host sees it."""

    sandbox: Caller
    container_id: str
    exec_id: str
    pid: int
    stdin: OutStream | None
    stdout: InStream | None
    stderr: InStream | None

    async def wait(self) -> messages.ProcessExited:
        return await self.sandbox.call(
            messages.WaitProcess(self.container_id, self.exec_id),
            messages.ProcessExited,
            timeout_s=None,
        )

    async def signal(self, sig: int) -> None:
        await self.sandbox.call(
            messages.SignalProcess(self.container_id, self.exec_id, sig, False), messages.Ok
        )

    async def resize(self, rows: int, cols: int) -> None:
        await self.sandbox.call(
            messages.ResizeTty(self.container_id, self.exec_id, rows, cols), messages.Ok
        )

    async def write_stdin(self, data: bytes, close: bool = True) -> None:
        if self.stdin is None:
            raise SandboxError("process has no stdin")
        try:
            if data:
                await self.stdin.write(data)
            if close:
                await self.stdin.close()
        except ConnectionError as e:
            raise GuestError(f"stdin of process {self.pid} failed: {e}") from e

    async def output(self, limit: int = 256 << 20) -> tuple[bytes, bytes]:
        """All of stdout and stderr (bounded by ``limit`` each)."""

        async def drain(s: InStream | None) -> bytes:
            buf = bytearray()
            if s is None:
                return b""
            try:
                while chunk := await s.read():
                    if len(buf) + len(chunk) > limit:
                        raise SandboxError(f"process output exceeded {limit} bytes")
                    buf += chunk
            except ConnectionError as e:
                raise GuestError(f"output of process {self.pid} cut off: {e}") from e
            return bytes(buf)

        out, err = await asyncio.gather(drain(self.stdout), drain(self.stderr))
        return out, err
