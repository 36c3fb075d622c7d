"""One multiplexed protocol session over an asyncio byte stream.

This is the host's side (the agent runs a threaded twin, ``cocoon.agent.session``,
because asyncio costs ~0.5 s of guest boot under TCG); request ids, stream
credit and frame limits behave identically on both, and
``tests/unit/test_agent_session.py`` holds the two together. This copy is the one
that defends the host against a hostile guest: it bounds every frame, refuses
replies nobody asked for, data beyond the granted window, and a frame whose
payload does not arrive in time.

A session dies as a whole: the first protocol violation or EOF fails every
pending request and stream with ``SessionClosed`` carrying the reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable

from cocoon.protocol import framing, messages
from cocoon.protocol.errors import RemoteError as RemoteError  # re-exported
from cocoon.protocol.errors import SessionClosed as SessionClosed  # re-exported
from cocoon.protocol.framing import Kind

Handler = Callable[[messages.Message], Awaitable[messages.Message]]


class InStream:
    """Bytes the peer sends on one stream; reading returns credit to the peer."""

    def __init__(self, session: Session, chan: int) -> None:
        self._session = session
        self.chan = chan
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self._discard = False

    def _feed(self, data: bytes) -> None:
        if self._eof:
            raise framing.FrameError(f"DATA after EOF on stream {self.chan}")
        if self._buffered + len(data) > framing.STREAM_WINDOW:
            raise framing.FrameError(f"stream {self.chan}: peer sent beyond its window")
        if self._discard:
            self._session._grant(self.chan, len(data))
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._event.set()

    def _feed_eof(self) -> None:
        self._eof = True
        self._event.set()

    def _fail(self, exc: BaseException) -> None:
        if not self._eof:
            self._error = exc
        self._event.set()

    async def read(self) -> bytes:
        """Next chunk, or b"" at end of stream."""
        while not self._chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            self._event.clear()
            await self._event.wait()
        data = self._chunks.popleft()
        self._buffered -= len(data)
        self._session._grant(self.chan, len(data))
        return data

    def discard(self) -> None:
        """Stop caring about this stream: drain it without buffering."""
        self._discard = True
        while self._chunks:
            data = self._chunks.popleft()
            self._buffered -= len(data)
            self._session._grant(self.chan, len(data))


class OutStream:
    """Bytes we send on one stream, never beyond the credit the peer granted."""

    def __init__(self, session: Session, chan: int) -> None:
        self._session = session
        self.chan = chan
        self._credit = framing.STREAM_WINDOW
        self._event = asyncio.Event()
        self._closed = False

    def _add_credit(self, n: int) -> None:
        self._credit += n
        if self._credit > framing.STREAM_WINDOW:
            raise framing.FrameError(f"stream {self.chan}: credit beyond the window")
        self._event.set()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            while self._credit <= 0:
                self._session._check_alive()
                self._event.clear()
                await self._event.wait()
            self._session._check_alive()
            n = min(len(view), self._credit, framing.MAX_DATA)
            self._credit -= n
            await self._session._send(Kind.DATA, self.chan, bytes(view[:n]))
            view = view[n:]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(SessionClosed):
            await self._session._send(Kind.EOF, self.chan)
        self._session._out.pop(self.chan, None)


class Session:
    """Frames in, frames out. ``run()`` is the read loop; ``request()`` calls the peer.

    ``handler`` serves incoming requests (the agent sets it; the host does not,
    and then any REQUEST from the peer is a violation). ``lazy_streams`` lets
    DATA open an inbound stream (the agent's side: stdin may race ahead of the
    request that names it); the host keeps it off so every stream it accepts
    was registered first.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        handler: Handler | None = None,
        lazy_streams: bool = False,
        frame_timeout_s: float = 10.0,
        max_streams: int = 1024,
        max_inflight: int = 256,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._lazy = lazy_streams
        self._frame_timeout_s = frame_timeout_s
        self._max_streams = max_streams
        self._max_inflight = max_inflight
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[messages.Message]] = {}
        # Requests we gave up on: their late replies are dropped, not violations.
        self._abandoned: collections.deque[int] = collections.deque(maxlen=1024)
        self._in: dict[int, InStream] = {}
        self._out: dict[int, OutStream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed: SessionClosed | None = None
        self._write_lock = asyncio.Lock()
        self.done = asyncio.get_running_loop().create_future()

    # -- public API ---------------------------------------------------------

    @property
    def closed(self) -> SessionClosed | None:
        return self._closed

    async def request(
        self,
        msg: messages.Message,
        expect: tuple[type[messages.Message], ...],
        timeout_s: float | None,
    ) -> messages.Message:
        """Send a request and wait (bounded) for a reply of one of the expected types."""
        self._check_alive()
        if len(self._pending) >= self._max_inflight:
            raise SessionClosed("too many requests in flight")
        rid = self._next_id
        self._next_id = rid + 1 if rid < framing.MAX_CHAN else 1
        fut: asyncio.Future[messages.Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._send(Kind.REQUEST, rid, messages.encode(msg))
            async with asyncio.timeout(timeout_s):
                reply = await fut
        except TimeoutError:
            raise TimeoutError(f"no reply to {msg.TYPE} within {timeout_s:g} s") from None
        finally:
            self._pending.pop(rid, None)
            if not fut.done() or fut.cancelled():  # given up on: a reply may still come
                self._abandoned.append(rid)
        if not isinstance(reply, expect):
            self._fail(f"reply to {msg.TYPE} was {reply.TYPE}")
            raise self._closed or SessionClosed("protocol violation")
        return reply

    def open_in(self, chan: int) -> InStream:
        if chan in self._in:
            raise ValueError(f"stream {chan} already open")
        if len(self._in) >= self._max_streams:
            raise SessionClosed("too many open streams")
        s = InStream(self, chan)
        self._in[chan] = s
        if self._closed:
            s._fail(self._closed)
        return s

    def in_stream(self, chan: int) -> InStream:
        """The inbound stream ``chan``, opening it if DATA has not done so yet."""
        return self._in.get(chan) or self.open_in(chan)

    def close_in(self, chan: int) -> None:
        """Forget an inbound stream once its EOF was seen (or the process is gone)."""
        s = self._in.pop(chan, None)
        if s is not None and not s._eof:
            # Keep accepting (and dropping) what is in flight until EOF.
            s.discard()
            self._in[chan] = s

    def open_out(self, chan: int) -> OutStream:
        if chan in self._out:
            raise ValueError(f"stream {chan} already open")
        s = OutStream(self, chan)
        self._out[chan] = s
        return s

    async def run(self) -> None:
        """Read frames until EOF or a violation; then fail everything pending."""
        try:
            while True:
                try:
                    header = await self._reader.readexactly(framing.HEADER_SIZE)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        raise framing.FrameError("stream ended inside a frame header") from None
                    raise SessionClosed("peer closed the channel") from None
                kind, chan, length = framing.decode_header(header)
                payload = b""
                if length:
                    try:
                        async with asyncio.timeout(self._frame_timeout_s):
                            payload = await self._reader.readexactly(length)
                    except TimeoutError:
                        raise framing.FrameError(
                            f"frame announced {length} B but they did not arrive within "
                            f"{self._frame_timeout_s:g} s"
                        ) from None
                    except asyncio.IncompleteReadError:
                        raise framing.FrameError("stream ended inside a frame") from None
                self._dispatch(kind, chan, payload)
        except framing.FrameError as e:
            self._fail(f"protocol violation: {e}")
        except ValueError as e:
            self._fail(f"invalid message: {e}")
        except SessionClosed as e:
            self._fail(str(e))
        except (ConnectionError, OSError) as e:
            self._fail(f"channel error: {e.__class__.__name__}: {e}")
        except asyncio.CancelledError:
            self._fail("session closed")
            raise
        except Exception as e:
            # A decoder that breaks on hostile input must still end the session
            # now: left alive, its callers would wait for their deadlines (or,
            # like Process.wait, for the keepalive) and blame a silent guest.
            self._fail(f"cannot read the peer's frames: {e.__class__.__name__}: {str(e)[:200]}")
        finally:
            if not self.done.done():
                self.done.set_result(None)

    def busy(self) -> bool:
        """Requests of ours unanswered, or streams open: not a moment to hand over."""
        return bool(self._pending or self._out or self._in)

    def fileno(self) -> int:
        sock = self._writer.get_extra_info("socket")
        return int(sock.fileno())

    def close(self, reason: str = "session closed") -> None:
        self._fail(reason)
        with contextlib.suppress(Exception):
            self._writer.close()

    # -- internals ----------------------------------------------------------

    def _dispatch(self, kind: Kind, chan: int, payload: bytes) -> None:
        if kind is Kind.REPLY or kind is Kind.ERROR:
            fut = self._pending.get(chan)
            if fut is None and chan in self._abandoned:
                self._abandoned.remove(chan)
                return
            if fut is None or fut.done():
                raise framing.FrameError(f"reply for unknown request {chan}")
            if kind is Kind.ERROR:
                err = messages.decode(payload, (messages.ErrorReply,))
                assert isinstance(err, messages.ErrorReply)
                fut.set_exception(RemoteError(err.code[:64], err.message[:2000]))
            else:
                fut.set_result(messages.decode(payload))
        elif kind is Kind.REQUEST:
            if self._handler is None:
                raise framing.FrameError("peer sent a request; this side serves none")
            if len(self._tasks) >= self._max_inflight:
                raise framing.FrameError("too many concurrent requests")
            msg = messages.decode(payload)
            t = asyncio.get_running_loop().create_task(self._serve(chan, msg))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        elif kind is Kind.DATA:
            if not payload:
                raise framing.FrameError("empty DATA frame")
            s = self._in.get(chan)
            if s is None:
                if not self._lazy:
                    raise framing.FrameError(f"DATA on unknown stream {chan}")
                s = self.open_in(chan)
            s._feed(payload)
        elif kind is Kind.EOF:
            s = self._in.get(chan)
            if s is None:
                if not self._lazy:
                    raise framing.FrameError(f"EOF on unknown stream {chan}")
                s = self.open_in(chan)
            s._feed_eof()
            if s._discard:
                self._in.pop(chan, None)
        elif kind is Kind.CREDIT:
            o = self._out.get(chan)
            if o is not None:  # credit for a stream we already closed is harmless
                o._add_credit(framing.decode_credit(payload))

    async def _serve(self, rid: int, msg: messages.Message) -> None:
        assert self._handler is not None
        try:
            reply = await self._handler(msg)
            body, kind = messages.encode(reply), Kind.REPLY
        except RemoteError as e:
            body, kind = messages.encode(messages.ErrorReply(e.code, e.message)), Kind.ERROR
        except asyncio.CancelledError:
            return
        except Exception as e:  # every failure becomes an ERROR frame, never a dead agent
            text = f"{e.__class__.__name__}: {e}"[:2000]
            body, kind = messages.encode(messages.ErrorReply("internal", text)), Kind.ERROR
        with contextlib.suppress(SessionClosed, ConnectionError):
            await self._send(kind, rid, body)

    def _grant(self, chan: int, n: int) -> None:
        if self._closed is None and n:
            frame = framing.encode_credit(chan, n)
            with contextlib.suppress(Exception):
                self._writer.write(frame)

    async def _send(self, kind: Kind, chan: int, payload: bytes = b"") -> None:
        self._check_alive()
        frame = framing.encode(kind, chan, payload)
        async with self._write_lock:
            self._check_alive()
            try:
                self._writer.write(frame)
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                self._fail(f"channel error: {e}")
                raise self._closed or SessionClosed(str(e)) from e

    def _check_alive(self) -> None:
        if self._closed is not None:
            raise self._closed

    def _fail(self, reason: str) -> None:
        if self._closed is not None:
            return
        self._closed = SessionClosed(reason)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(self._closed)
        for s in self._in.values():
            s._fail(self._closed)
        for o in self._out.values():
            o._event.set()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()
        if not self.done.done():
            self.done.set_result(None)
