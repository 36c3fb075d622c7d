"""ttrpc, containerd's RPC for shims: protobuf messages over a unix socket.

Every frame is a 10-byte header (payload length, stream id, both 4 bytes big
endian; a type byte, 1 request or 2 response; a flags byte) and a protobuf
payload: a request names its service and method and carries the call's
message, a response carries the reply or a google.rpc.Status (containerd's
errdefs turn its gRPC code back into ErrNotFound, ErrAlreadyExists...). A
client numbers its requests with odd stream ids and may have many in flight
on one connection (containerd's Wait blocks for a task's life while its other
calls go on), so the server answers each on its own task, in any order.

containerd 1.6 speaks ttrpc 1.1: unary calls only, no streams, no flags.
The peer is containerd (root), but the same bounds hold as for any peer:
frames over 4 MiB (ttrpc's own limit) or of an unknown type end the
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from enum import IntEnum

from google.protobuf.message import DecodeError

from cocoon.shim.proto import ttrpc_pb2
from cocoon.util.tasks import CLOSE_S, TaskSet

HEADER = struct.Struct(">IIBB")
#: ttrpc's messageLengthMax.
MAX_MESSAGE = 4 << 20
REQUEST = 1
RESPONSE = 2

log = logging.getLogger(__name__)


class Code(IntEnum):
    """gRPC status codes, the ones containerd's errdefs map."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class RpcError(Exception):
    """A call's failure as the peer sees it: a gRPC code and one line."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProtocolError(Exception):
    """The peer broke ttrpc's framing: the connection ends."""


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(stream id, type, payload); EOF between frames raises IncompleteReadError."""
    head = await reader.readexactly(HEADER.size)
    length, stream, kind, _flags = HEADER.unpack(head)
    if length > MAX_MESSAGE:
        raise ProtocolError(f"frame of {length} bytes > {MAX_MESSAGE}")
    if kind not in (REQUEST, RESPONSE):
        raise ProtocolError(f"frame of unknown type {kind}")
    return stream, kind, await reader.readexactly(length)


def frame(stream: int, kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise RpcError(Code.INTERNAL, f"reply of {len(payload)} bytes > {MAX_MESSAGE}")
    return HEADER.pack(len(payload), stream, kind, 0) + payload


#: A method: the request's payload in, the reply's payload out (or RpcError).
Handler = Callable[[bytes], Awaitable[bytes]]


class Server:
    """Serves ``methods`` ((service, method) -> handler) on a listening socket."""

    def __init__(self, methods: dict[tuple[str, str], Handler]) -> None:
        self.methods = methods
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def close(self) -> None:
        """Stop listening and drop every connection (their calls are cancelled)."""
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=CLOSE_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._conns.add(me)
        calls = TaskSet(log)
        lock = asyncio.Lock()
        try:
            while True:
                try:
                    stream, kind, payload = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if kind != REQUEST:
                    raise ProtocolError("a response frame sent to the server")
                calls.spawn(self._call(stream, payload, writer, lock), f"ttrpc call {stream}")
        except ProtocolError as e:
            log.warning(f"ttrpc connection dropped: {e}")
        finally:
            self._conns.discard(me)
            await calls.aclose(CLOSE_S)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _call(
        self, stream: int, payload: bytes, writer: asyncio.StreamWriter, lock: asyncio.Lock
    ) -> None:
        resp = ttrpc_pb2.Response()
        try:
            req = ttrpc_pb2.Request.FromString(payload)
            handler = self.methods.get((req.service, req.method))
            if handler is None:
                raise RpcError(Code.UNIMPLEMENTED, f"{req.service}/{req.method} is not served")
            resp.payload = await handler(req.payload)
        except DecodeError as e:
            resp.status.code, resp.status.message = Code.INVALID_ARGUMENT, f"bad message: {e}"
        except RpcError as e:
            resp.status.code, resp.status.message = e.code, str(e)
        except Exception as e:  # noqa: BLE001 - every failure is the caller's answer
            log.exception(f"ttrpc call on stream {stream} failed")
            resp.status.code, resp.status.message = Code.UNKNOWN, str(e) or type(e).__name__
        async with lock:  # one frame at a time on the connection
            with contextlib.suppress(ConnectionError):
                writer.write(frame(stream, RESPONSE, resp.SerializeToString()))
                await writer.drain()


class Client:
    """One connection to a ttrpc server (containerd's events service)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1, 2)
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._lock = asyncio.Lock()
        self._receiver = asyncio.get_running_loop().create_task(self._receive())

    @classmethod
    async def connect(cls, path: str) -> Client:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_MESSAGE + 64)
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self._receiver.done()

    async def call(self, service: str, method: str, payload: bytes, timeout_s: float) -> bytes:
        req = ttrpc_pb2.Request(
            service=service, method=method, payload=payload, timeout_nano=int(timeout_s * 1e9)
        )
        stream = next(self._ids)
        fut: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream] = fut
        try:
            async with asyncio.timeout(timeout_s):
                async with self._lock:
                    self._writer.write(frame(stream, REQUEST, req.SerializeToString()))
                    await self._writer.drain()
                resp = await fut
        finally:
            self._pending.pop(stream, None)
        if resp.status.code != Code.OK:
            code = resp.status.code
            raise RpcError(Code(code) if code in Code._value2member_map_ else Code.UNKNOWN,
                           resp.status.message)  # fmt: skip
        return resp.payload

    async def _receive(self) -> None:
        try:
            while True:
                stream, kind, payload = await read_frame(self._reader)
                fut = self._pending.get(stream)
                if kind != RESPONSE or fut is None or fut.done():
                    raise ProtocolError(f"unexpected frame on stream {stream}")
                fut.set_result(ttrpc_pb2.Response.FromString(payload))
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError, DecodeError) as e:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"ttrpc connection lost: {e}"))

    async def close(self) -> None:
        self._receiver.cancel()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
