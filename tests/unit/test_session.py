"""The host session against a fake agent that misbehaves (our own interface, no VM)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from cocoon.errors import GuestError
from cocoon.protocol import framing, messages
from cocoon.protocol.framing import Kind
from cocoon.protocol.session import RemoteError, Session, SessionClosed
from cocoon.sandbox.channel import AgentChannel

Peer = Callable[[socket.socket], Awaitable[None]]


async def _host_with_peer(
    peer: Peer, frame_timeout_s: float = 1.0
) -> tuple[Session, asyncio.Task[None]]:
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    b.setblocking(False)
    asyncio.get_running_loop().create_task(peer(b))
    s = Session(reader, writer, frame_timeout_s=frame_timeout_s)
    return s, asyncio.get_running_loop().create_task(s.run())


async def _send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def _recv_frame(sock: socket.socket) -> tuple[Kind, int, bytes]:
    loop = asyncio.get_running_loop()
    head = b""
    while len(head) < framing.HEADER_SIZE:
        head += await loop.sock_recv(sock, framing.HEADER_SIZE - len(head))
    kind, chan, n = framing.decode_header(head)
    body = b""
    while len(body) < n:
        body += await loop.sock_recv(sock, n - len(body))
    return kind, chan, body


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payload, reason",
    [
        (framing.HEADER.pack(b"CO", 2, 0, 1, framing.MAX_FRAME * 8), "exceeds"),
        (b"garbage garbage garbage!", "bad magic"),
        (framing.encode(Kind.REPLY, 4242, messages.encode(messages.Ok())), "unknown request"),
        (framing.encode(Kind.REQUEST, 1, messages.encode(messages.Ping())), "serves none"),
        (framing.encode(Kind.DATA, 9, b"x"), "unknown stream"),
        (framing.HEADER.pack(b"CO", 2, 0, 1, 1000) + b"short", "did not arrive"),
    ],
)
def test_hostile_peer_closes_session(payload: bytes, reason: str) -> None:
    async def body() -> None:
        async def peer(sock: socket.socket) -> None:
            await _send(sock, payload)
            await asyncio.sleep(5)

        s, task = await _host_with_peer(peer, frame_timeout_s=0.3)
        with pytest.raises(SessionClosed, match=reason):
            await s.request(messages.Ping(), (messages.Ok,), 5)
        await task
        assert reason in str(s.closed)

    run(body())


def test_silent_peer_times_out() -> None:
    async def body() -> None:
        async def peer(sock: socket.socket) -> None:
            await asyncio.sleep(5)

        s, _ = await _host_with_peer(peer)
        with pytest.raises(TimeoutError, match="no reply to ping"):
            await s.request(messages.Ping(), (messages.Ok,), 0.2)

    run(body())


def test_reply_error_and_streams_with_credit() -> None:
    async def body() -> None:
        async def peer(sock: socket.socket) -> None:
            kind, rid, _ = await _recv_frame(sock)
            assert kind is Kind.REQUEST
            await _send(sock, framing.encode(Kind.ERROR, rid, messages.encode(
                messages.ErrorReply("nope", "refused"))))  # fmt: skip
            # exactly one window of data, then EOF: legal
            chunk = b"y" * framing.MAX_DATA
            for _ in range(framing.STREAM_WINDOW // framing.MAX_DATA):
                await _send(sock, framing.encode(Kind.DATA, 5, chunk))
            await _send(sock, framing.encode(Kind.EOF, 5))
            await asyncio.sleep(5)

        s, _ = await _host_with_peer(peer)
        stream = s.open_in(5)
        with pytest.raises(RemoteError, match="refused"):
            await s.request(messages.Ping(), (messages.Ok,), 2)
        total = 0
        while data := await stream.read():
            total += len(data)
        assert total == framing.STREAM_WINDOW

    run(body())


def test_data_beyond_window_is_a_violation() -> None:
    async def body() -> None:
        async def peer(sock: socket.socket) -> None:
            chunk = b"z" * framing.MAX_DATA
            for _ in range(framing.STREAM_WINDOW // framing.MAX_DATA + 1):
                await _send(sock, framing.encode(Kind.DATA, 3, chunk))
            await asyncio.sleep(5)

        s, task = await _host_with_peer(peer)
        s.open_in(3)  # never read: no credit goes back
        await task
        assert "beyond its window" in str(s.closed)

    run(body())


@pytest.mark.parametrize("kind", [Kind.REPLY, Kind.ERROR])
def test_deeply_nested_reply_fails_every_waiter_at_once(kind: Kind) -> None:
    """Issue 19: a REPLY/ERROR nested 1,000 deep raised RecursionError in the reader,
    which left the session open: calls ended at their deadline as "did not answer",
    and a process wait (no deadline) hung on. Now the session fails at once."""
    deep = b'{"type":"ok","x":' + b"[" * 1000 + b"]" * 1000 + b"}"

    async def body() -> None:
        async def peer(sock: socket.socket) -> None:
            _, rid, _ = await _recv_frame(sock)
            await _recv_frame(sock)
            await _send(sock, framing.encode(kind, rid, deep))
            await asyncio.sleep(5)

        s, task = await _host_with_peer(peer)
        channel = AgentChannel(s, agent_timeout_s=30)
        wait = asyncio.create_task(
            channel.call(messages.WaitProcess("c1", ""), messages.ProcessExited, timeout_s=None)
        )
        ping = asyncio.create_task(s.request(messages.Ping(), (messages.Ok,), 30))
        t0 = time.monotonic()
        with pytest.raises(GuestError, match="nested 1001 deep"):
            await wait
        with pytest.raises(SessionClosed, match="invalid message: .*nested"):
            await ping
        assert time.monotonic() - t0 < 2
        await task
        assert "nested" in str(s.closed)

    run(body())


def test_a_cancelled_requests_late_reply_is_dropped_and_the_session_lives() -> None:
    """A caller cancelled mid-request (a pool stopping mid-warm-up) leaves a
    reply on its way: that is no violation, and the next request is answered."""

    async def body() -> None:
        got_first, cancelled = asyncio.Event(), asyncio.Event()

        async def peer(sock: socket.socket) -> None:
            for _ in range(2):
                _, rid, _ = await _recv_frame(sock)
                got_first.set()
                await cancelled.wait()  # the first caller is gone before its reply
                await _send(sock, framing.encode(Kind.REPLY, rid, messages.encode(messages.Ok())))
            await asyncio.sleep(5)

        s, _ = await _host_with_peer(peer)
        first = asyncio.create_task(s.request(messages.Ping(), (messages.Ok,), 5))
        await got_first.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        cancelled.set()
        assert isinstance(await s.request(messages.Ping(), (messages.Ok,), 5), messages.Ok)
        assert s.closed is None

    run(body())
