"""A whole host ``Session`` (protocol/session.py) reading what a guest wrote.

The host has a request in flight (id 1), an inbound stream (5) and an
outbound one (7) open, as during a ``cocoon exec``; the guest's bytes arrive,
then its end closes. Whatever they hold, the session must end by itself,
fail the pending request with ``SessionClosed`` (or answer it), and let no
exception out of ``run()``. A finding here that ``host_frames`` lacks is a
bug in the session's own handling (streams, credit, ids), not in decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from cocoon.protocol import messages
from cocoon.protocol.session import RemoteError, Session, SessionClosed
from targets._frames import mutate_frames
from targets.host_frames import seeds as frame_seeds

#: run() must swallow everything: no exception is expected of it.
EXPECTED: tuple[type[BaseException], ...] = ()
MAX_INPUT = 256 << 10

mutate = mutate_frames
_loop: asyncio.AbstractEventLoop | None = None


def seeds() -> list[bytes]:
    return frame_seeds()


async def _session(data: bytes) -> None:
    ours, theirs = socket.socketpair()
    try:
        reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 21)
        s = Session(reader, writer, frame_timeout_s=0.5)
        s.open_in(5)
        s.open_out(7)
        call = asyncio.ensure_future(s.request(messages.Ping(), (messages.Ok,), 2.0))
        await asyncio.sleep(0)  # the request is written: its id is 1
        reading = asyncio.ensure_future(s.run())
        theirs.setblocking(False)
        await asyncio.get_running_loop().sock_sendall(theirs, data)
        theirs.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(reading, 3.0)
        if s.closed is None:
            raise AssertionError("run() returned with the session open")
        with contextlib.suppress(SessionClosed, RemoteError):
            await asyncio.wait_for(call, 1.0)
        writer.close()
    finally:
        theirs.close()
        ours.close()


def run(data: bytes) -> None:
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    _loop.run_until_complete(_session(data))
