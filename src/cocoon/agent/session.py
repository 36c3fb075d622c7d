"""The agent's end of one protocol session, on threads and blocking calls.

The host runs ``cocoon.protocol.session`` (asyncio); this is its twin for the
guest, where importing asyncio alone cost ~1 s of boot under TCG. The wire
behaviour is the same: request ids echoed in REPLY/ERROR, per-stream credit of
``framing.STREAM_WINDOW`` bytes, DATA no larger than ``framing.MAX_DATA``, EOF
ending a stream, and inbound streams opened lazily because stdin may race ahead
of the request that names it.

Threads: ``run()`` is the read loop (the caller's thread); every request gets
its own thread so a blocked WaitProcess never holds up a Ping; process pumps
are threads of the containers module. All writes go through one lock so frames
never interleave. The port is opened non-blocking and waited on with poll():
a blocking write to a virtio port whose host end is gone would sleep until some
*later* host connects and then hand it a frame of this dead session.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import threading
import time

from cocoon.protocol import framing, messages
from cocoon.protocol.errors import RemoteError as RemoteError  # re-exported
from cocoon.protocol.errors import SessionClosed as SessionClosed  # re-exported
from cocoon.protocol.framing import Kind

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from cocoon.agent.reaper import Exit

    Handler = Callable[["Session", messages.Message], messages.Message]
    AfterReply = Callable[[messages.Message], None]

#: How long a writer waits for room before re-checking that the session lives;
#: also bounds how long closing the session waits for a writer to let go.
WRITE_POLL_MS = 100
READ_SIZE = 1 << 16


#: Served on the reader thread: a clone's first request is answered ~15 ms
#: sooner without the hand-over to a worker (under TCG every code path a clone
#: runs first is translated anew). Only requests whose work never blocks and
#: whose reply is a few bytes: a blocked reader would stop the session.
INLINE = (messages.Hello, messages.Identity)


class Workers:
    """Threads that serve requests, started before they are needed and kept.

    Starting a thread is the costliest step of a clone's first request under
    TCG (~45 ms measured: code no clone ran yet is translated anew), and
    threads alive when a template was saved are alive in all its clones. A
    request that finds no idle worker gets a new thread, which then stays.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._jobs: collections.deque[tuple[Callable[..., None], tuple[object, ...]]] = (
            collections.deque()
        )
        self._idle = 0

    def start(self, n: int) -> None:
        for _ in range(n):
            threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        with self._cond:
            if self._idle > len(self._jobs):
                self._jobs.append((fn, args))
                self._cond.notify()
                return
        threading.Thread(target=self._first, args=(fn, args), daemon=True).start()

    def _first(self, fn: Callable[..., None], args: tuple[object, ...]) -> None:
        fn(*args)
        self._loop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._jobs:
                    self._cond.wait()
                self._idle -= 1
                fn, args = self._jobs.popleft()
            fn(*args)


WORKERS = Workers()


class InStream:
    """Bytes the host sends on one stream; reading returns credit to the host."""

    def __init__(self, session: Session, chan: int) -> None:
        self._session = session
        self.chan = chan
        # Shares the session lock: the reader thread feeds under it.
        self._cond = threading.Condition(session._lock)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._discard = False

    def _feed(self, data: bytes) -> int:
        """Queue data (lock held); return bytes to grant back at once (discarding)."""
        if self._eof:
            raise framing.FrameError(f"DATA after EOF on stream {self.chan}")
        if self._buffered + len(data) > framing.STREAM_WINDOW:
            raise framing.FrameError(f"stream {self.chan}: peer sent beyond its window")
        if self._discard:
            return len(data)
        self._chunks.append(data)
        self._buffered += len(data)
        self._cond.notify_all()
        return 0

    def _feed_eof(self) -> None:
        self._eof = True
        self._cond.notify_all()

    def _drop(self) -> int:
        """Switch to discarding (lock held); return the buffered bytes to grant."""
        self._discard = True
        n = self._buffered
        self._chunks.clear()
        self._buffered = 0
        self._cond.notify_all()
        return n

    def read(self) -> bytes:
        """Next chunk; b"" at end of stream or once the stream was dropped locally."""
        with self._cond:
            while not self._chunks:
                if self._eof or self._discard:
                    return b""
                self._session.check_alive()
                self._cond.wait()
            data = self._chunks.popleft()
            self._buffered -= len(data)
        self._session._grant(self.chan, len(data))
        return data


class OutStream:
    """Bytes we send on one stream, never beyond the credit the host granted."""

    def __init__(self, session: Session, chan: int) -> None:
        self._session = session
        self.chan = chan
        self._cond = threading.Condition(session._lock)
        self._credit = framing.STREAM_WINDOW
        self._closed = False

    def _add_credit(self, n: int) -> None:
        """Lock held (reader thread)."""
        self._credit += n
        if self._credit > framing.STREAM_WINDOW:
            raise framing.FrameError(f"stream {self.chan}: credit beyond the window")
        self._cond.notify_all()

    def write(self, data: bytes) -> None:
        """Send all of data, blocking while the window is used up."""
        session = self._session
        view = memoryview(data)
        while view:
            with self._cond:
                while self._credit <= 0:
                    session.check_alive()
                    self._cond.wait()
                session.check_alive()
                n = min(len(view), self._credit, framing.MAX_DATA)
                self._credit -= n
            session._send(Kind.DATA, self.chan, bytes(view[:n]))
            view = view[n:]

    def close(self) -> None:
        """Send EOF (if the session still lives) and forget the stream."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(SessionClosed):
            self._session._send(Kind.EOF, self.chan)
        with self._session._lock:
            self._session._out.pop(self.chan, None)


class Session:
    """One connection of the host to the port ``fd`` (owned: closed when it ends)."""

    def __init__(
        self,
        fd: int,
        handler: Handler,
        *,
        after_reply: AfterReply | None = None,
        frame_timeout_s: float = 10.0,
        max_streams: int = 1024,
        max_inflight: int = 256,
    ) -> None:
        self._fd = fd
        self._handler = handler
        self._after_reply = after_reply
        self._frame_timeout_s = frame_timeout_s
        self._max_streams = max_streams
        self._max_inflight = max_inflight
        # _lock guards the stream tables, credit, the in-flight count and _closed
        # transitions; _wlock serializes whole frames onto the port.
        self._lock = threading.Lock()
        self._wlock = threading.Lock()
        self._in: dict[int, InStream] = {}
        self._out: dict[int, OutStream] = {}
        self._inflight = 0
        self._wakers: set[threading.Event] = set()
        self._closed: SessionClosed | None = None
        self._wpoll = select.poll()
        self._wpoll.register(fd, select.POLLOUT)

    # -- public API ---------------------------------------------------------

    @property
    def closed(self) -> SessionClosed | None:
        return self._closed

    def open_in(self, chan: int) -> InStream:
        with self._lock:
            return self._open_in_locked(chan)

    def in_stream(self, chan: int) -> InStream:
        """The inbound stream ``chan``, opening it if DATA has not done so yet."""
        with self._lock:
            return self._in.get(chan) or self._open_in_locked(chan)

    def close_in(self, chan: int) -> None:
        """Stop reading ``chan``: what is buffered or still in flight is dropped
        (and credited) until the host's EOF, and its reader sees the end."""
        with self._lock:
            s = self._in.get(chan)
            if s is None:
                return
            if s._eof:
                del self._in[chan]
                return
            n = s._drop()
        self._grant(chan, n)

    def open_out(self, chan: int) -> OutStream:
        with self._lock:
            if chan in self._out:
                raise ValueError(f"stream {chan} already open")
            s = OutStream(self, chan)
            self._out[chan] = s
            return s

    def wait_exit(self, ex: Exit) -> int:
        """Raw wait status of ``ex``'s pid; SessionClosed if the session ends first,
        so a WaitProcess thread does not outlive the host that asked."""
        ev = threading.Event()
        with self._lock:
            self.check_alive()
            self._wakers.add(ev)
        ex.wake(ev)
        try:
            ev.wait()
        finally:
            ex.forget(ev)
            with self._lock:
                self._wakers.discard(ev)
        if ex.status is None:
            raise self._closed or SessionClosed("session closed")
        return ex.status

    def run(self) -> None:
        """Read frames until EOF or a violation; then fail everything and close the fd."""
        try:
            self._read_loop()
        except framing.FrameError as e:
            self._fail(f"protocol violation: {e}")
        except ValueError as e:
            self._fail(f"invalid message: {e}")
        except SessionClosed as e:
            self._fail(str(e))
        except OSError as e:
            self._fail(f"channel error: {e.__class__.__name__}: {e}")
        except Exception as e:
            # A decoder that breaks on what the host sent ends this session, not the agent.
            self._fail(f"cannot read the host's frames: {e.__class__.__name__}: {str(e)[:200]}")
        except BaseException:
            self._fail("session closed")
            raise
        finally:
            self._fail("session closed")
            # Writers re-check _closed under _wlock at least every WRITE_POLL_MS,
            # so once we hold it nobody can write to the fd (or its reused number).
            with self._wlock:
                os.close(self._fd)

    # -- reading ------------------------------------------------------------

    def _read_loop(self) -> None:
        fd = self._fd
        rpoll = select.poll()
        rpoll.register(fd, select.POLLIN)
        buf = bytearray()
        need = framing.HEADER_SIZE  # bytes buf must hold before the next parse step
        header: tuple[Kind, int, int] | None = None
        frame_deadline = 0.0
        while True:
            if len(buf) < need:
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    # Read first, poll only when dry: one syscall less per chunk.
                    timeout_ms = None
                    if buf:
                        left = frame_deadline - time.monotonic()
                        if left <= 0:
                            raise framing.FrameError(
                                f"frame did not arrive within {self._frame_timeout_s:g} s"
                            ) from None
                        timeout_ms = left * 1000 + 1
                    rpoll.poll(timeout_ms)
                    continue
                if not data:
                    if buf:
                        raise framing.FrameError("stream ended inside a frame")
                    raise SessionClosed("peer closed the channel")
                if not buf:
                    frame_deadline = time.monotonic() + self._frame_timeout_s
                buf += data
                continue
            if header is None:
                header = framing.decode_header(bytes(buf[: framing.HEADER_SIZE]))
                need = framing.HEADER_SIZE + header[2]
                continue
            kind, chan, _ = header
            payload = bytes(buf[framing.HEADER_SIZE : need])
            del buf[:need]
            header = None
            need = framing.HEADER_SIZE
            frame_deadline = time.monotonic() + self._frame_timeout_s
            self._dispatch(kind, chan, payload)

    def _dispatch(self, kind: Kind, chan: int, payload: bytes) -> None:
        if kind is Kind.DATA:
            if not payload:
                raise framing.FrameError("empty DATA frame")
            with self._lock:
                s = self._in.get(chan) or self._open_in_locked(chan)
                grant = s._feed(payload)
            self._grant(chan, grant)
        elif kind is Kind.REQUEST:
            self._start_request(chan, messages.decode(payload))
        elif kind is Kind.CREDIT:
            n = framing.decode_credit(payload)
            with self._lock:
                o = self._out.get(chan)
                if o is not None:  # credit for a stream we already closed is harmless
                    o._add_credit(n)
        elif kind is Kind.EOF:
            with self._lock:
                s = self._in.get(chan) or self._open_in_locked(chan)
                s._feed_eof()
                if s._discard:
                    del self._in[chan]
        else:  # REPLY/ERROR: the agent never sends requests
            raise framing.FrameError(f"reply for unknown request {chan}")

    def _open_in_locked(self, chan: int) -> InStream:
        if chan in self._in:
            raise ValueError(f"stream {chan} already open")
        if len(self._in) >= self._max_streams:
            raise SessionClosed("too many open streams")
        s = InStream(self, chan)
        self._in[chan] = s
        return s

    # -- requests -----------------------------------------------------------

    def _start_request(self, rid: int, msg: messages.Message) -> None:
        with self._lock:
            busy = self._inflight >= self._max_inflight
            if not busy:
                self._inflight += 1
        if busy:
            self._reply_error(rid, "limit", "too many concurrent requests")
            return
        if isinstance(msg, INLINE):
            self._serve(rid, msg)
            return
        try:
            WORKERS.submit(self._serve, rid, msg)
        except RuntimeError as e:  # no thread to be had: refuse this one request
            with self._lock:
                self._inflight -= 1
            self._reply_error(rid, "internal", f"RuntimeError: {e}")

    def _serve(self, rid: int, msg: messages.Message) -> None:
        try:
            try:
                reply = self._handler(self, msg)
                body, kind = messages.encode(reply), Kind.REPLY
            except RemoteError as e:
                body = messages.encode(messages.ErrorReply(e.code, e.message))
                kind = Kind.ERROR
            except Exception as e:  # every failure becomes an ERROR frame, never a dead agent
                text = f"{e.__class__.__name__}: {e}"[:2000]
                body, kind = messages.encode(messages.ErrorReply("internal", text)), Kind.ERROR
            with contextlib.suppress(SessionClosed):
                self._send(kind, rid, body)
            if self._after_reply is not None:
                self._after_reply(msg)
        finally:
            with self._lock:
                self._inflight -= 1

    def _reply_error(self, rid: int, code: str, text: str) -> None:
        with contextlib.suppress(SessionClosed):
            self._send(Kind.ERROR, rid, messages.encode(messages.ErrorReply(code, text)))

    # -- writing ------------------------------------------------------------

    def _grant(self, chan: int, n: int) -> None:
        if n and self._closed is None:
            with contextlib.suppress(SessionClosed):
                self._send(Kind.CREDIT, chan, framing.CREDIT.pack(n))

    def _send(self, kind: Kind, chan: int, payload: bytes = b"") -> None:
        frame = framing.encode(kind, chan, payload)
        with self._wlock:
            self.check_alive()
            try:
                self._write_all(frame)
            except OSError as e:
                self._fail(f"channel error: {e}")
                raise self._closed or SessionClosed(str(e)) from e

    def _write_all(self, frame: bytes) -> None:
        """Write a whole frame (the port takes at most 32 KiB per write); _wlock held."""
        view = memoryview(frame)
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                # Full queue, or no host right now: wait for room, but keep
                # noticing when the reader has declared the session dead.
                self._wpoll.poll(WRITE_POLL_MS)
                self.check_alive()
                continue
            view = view[n:]

    # -- ending -------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise SessionClosed if the session has ended."""
        if self._closed is not None:
            raise self._closed

    def _fail(self, reason: str) -> None:
        """Mark the session dead and wake everyone waiting on it."""
        with self._lock:
            if self._closed is not None:
                return
            self._closed = SessionClosed(reason)
            for s in self._in.values():
                s._cond.notify_all()
            for o in self._out.values():
                o._cond.notify_all()
            wakers = list(self._wakers)
        for ev in wakers:
            ev.set()
