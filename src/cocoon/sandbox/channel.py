"""The host's end of the agent channel: connect, handshake, call, keep alive.

Everything that crosses from the guest is untrusted: the session underneath
bounds frames and refuses what was not asked for; this layer adds deadlines to
every call and turns each failure into a ``GuestError`` (the guest broke or
died) or an ``AgentError`` (the agent refused a valid request; typed here,
once, when it means the container's command could not be run).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import time
from pathlib import Path
from typing import TypeVar

from cocoon.errors import GuestError, agent_error
from cocoon.protocol import messages
from cocoon.protocol.session import InStream, OutStream, RemoteError, Session, SessionClosed

M = TypeVar("M", bound=messages.Message)


class Timeout(enum.Enum):
    """A call's ``timeout_s`` left to the channel: a number is seconds, None is no
    deadline (asyncio's convention: waits on processes, which the keepalive
    still guards), and ``AGENT`` is the channel's own ``agent_timeout_s``."""

    AGENT = "agent_timeout_s"


class AgentChannel:
    def __init__(self, session: Session, agent_timeout_s: float) -> None:
        self.session = session
        self.agent_timeout_s = agent_timeout_s
        self._reader_task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._next_stream = 1
        self.hello: messages.HelloReply | None = None

    @classmethod
    async def connect(cls, path: Path, *, deadline: float, agent_timeout_s: float) -> AgentChannel:
        """Connect to the VM's channel socket (created by the hypervisor) before ``deadline``."""
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 21)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise GuestError(f"agent socket {path.name} never appeared") from None
                await asyncio.sleep(0.005)
        ch = cls(Session(reader, writer), agent_timeout_s)
        ch._reader_task = asyncio.get_running_loop().create_task(ch.session.run())
        return ch

    @classmethod
    async def from_fd(cls, fd: int, *, agent_timeout_s: float) -> AgentChannel:
        """A channel on a connected socket another process handed over (``detach``)."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 21)
        ch = cls(Session(reader, writer), agent_timeout_s)
        ch._reader_task = asyncio.get_running_loop().create_task(ch.session.run())
        return ch

    async def detach(self, quiet_s: float = 2.0) -> int:
        """Stop using the channel without closing the connection: returns a
        dup of its socket for another process to go on with (``from_fd``).

        The agent must see nothing but a pause: no request of ours may be left
        unanswered (its reply would reach the next owner as a stray), so the
        keepalive stops and in-flight requests get ``quiet_s`` to finish.
        """
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keepalive_task
        deadline = time.monotonic() + quiet_s
        while self.session.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self.session.busy():
            raise GuestError("the agent channel did not go quiet; not handing it over")
        fd = os.dup(self.session.fileno())
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self.session.close("handed over")
        return fd

    @classmethod
    async def connect_vsock(
        cls, cid: int, port: int, *, deadline: float, agent_timeout_s: float
    ) -> AgentChannel:
        """Connect to the agent's vsock listener; it appears only once the guest booted."""
        while True:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (cid, port))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"agent never listened on vsock {cid}:{port}") from None
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 21)
        ch = cls(Session(reader, writer), agent_timeout_s)
        ch._reader_task = asyncio.get_running_loop().create_task(ch.session.run())
        return ch

    async def handshake(self, deadline: float) -> messages.HelloReply:
        """Hello with versions and the host clock; bounded by the boot deadline."""
        remaining = max(0.1, deadline - time.monotonic())
        reply = await self.call(
            messages.Hello(messages.PROTOCOL_VERSION, time.time_ns()),
            messages.HelloReply,
            timeout_s=remaining,
            what="boot",
        )
        if reply.protocol_version != messages.PROTOCOL_VERSION:
            raise GuestError(
                f"agent speaks protocol {reply.protocol_version}, "
                f"host {messages.PROTOCOL_VERSION}: rebuild the guest image (`cocoon guest build`)"
            )
        self.hello = reply
        return reply

    def start_keepalive(self, interval_s: float) -> None:
        """Ping while idle so a hung guest is noticed even when nobody calls it."""

        async def loop() -> None:
            while self.session.closed is None:
                await asyncio.sleep(interval_s)
                try:
                    await self.session.request(
                        messages.Ping(), (messages.Ok,), self.agent_timeout_s
                    )
                except TimeoutError:
                    self.session.close(
                        f"agent did not answer a ping within {self.agent_timeout_s:g} s"
                    )
                except (SessionClosed, RemoteError):
                    return

        self._keepalive_task = asyncio.get_running_loop().create_task(loop())

    async def call(
        self,
        msg: messages.Message,
        expect: type[M],
        *,
        timeout_s: float | None | Timeout = Timeout.AGENT,
        what: str = "",
    ) -> M:
        """One request with a deadline (see ``Timeout``)."""
        t = self.agent_timeout_s if timeout_s is Timeout.AGENT else timeout_s
        try:
            reply = await self.session.request(msg, (expect,), t)
        except TimeoutError:
            self.session.close(f"agent did not answer {msg.TYPE} within {t:g} s")
            raise GuestError(
                f"guest agent did not answer {what or msg.TYPE} within {t:g} s"
            ) from None
        except SessionClosed as e:
            raise GuestError(f"guest agent channel failed during {what or msg.TYPE}: {e}") from e
        except RemoteError as e:
            raise agent_error(f"{msg.TYPE}: {e.message}", e.code) from e
        assert isinstance(reply, expect)
        return reply

    def new_stream_id(self) -> int:
        sid = self._next_stream
        self._next_stream += 1
        return sid

    def open_in(self) -> InStream:
        return self.session.open_in(self.new_stream_id())

    def open_out(self) -> OutStream:
        return self.session.open_out(self.new_stream_id())

    def open_stdio(
        self, stdin: bool, tty: bool, rows: int, cols: int
    ) -> tuple[messages.StdioSpec, OutStream | None, InStream, InStream | None]:
        """A process's streams, registered before its request goes out (the host
        refuses DATA on streams it does not know): its StdioSpec, stdin, stdout,
        stderr (none with a terminal, which merges it into stdout)."""
        sin = self.open_out() if stdin else None
        sout = self.open_in()
        serr = None if tty else self.open_in()
        spec = messages.StdioSpec(
            stdin=sin.chan if sin else 0,
            stdout=sout.chan,
            stderr=serr.chan if serr else 0,
            terminal=tty,
            rows=rows,
            cols=cols,
        )
        return spec, sin, sout, serr

    async def close(self) -> None:
        self.session.close("host closed the channel")
        for t in (self._keepalive_task, self._reader_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
