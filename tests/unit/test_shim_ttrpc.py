"""ttrpc as containerd speaks it, over a real unix socket: our server and client.

The frames are checked byte for byte against the layout containerd's ttrpc
writes (10-byte header, big endian), and the server against what containerd
needs of it: calls answered out of order on one connection (a task's Wait
blocks while its Kill goes through), failures as gRPC codes, and a peer that
breaks the framing dropped.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocoon.runtime import pods
from cocoon.shim import events
from cocoon.shim.main import GROUP_ANNOTATIONS, group_of, parse, socket_path
from cocoon.shim.proto import events_pb2, ttrpc_pb2
from cocoon.shim.ttrpc import MAX_MESSAGE, Client, Code, RpcError, Server, frame


def test_frame_layout() -> None:
    assert frame(3, 1, b"ab") == struct.pack(">IIBB", 2, 3, 1, 0) + b"ab"


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "s")


async def _server(path: str) -> tuple[Server, asyncio.Event]:
    release = asyncio.Event()

    async def echo(payload: bytes) -> bytes:
        return payload[::-1]

    async def slow(payload: bytes) -> bytes:
        await release.wait()
        return b"slow"

    async def refuse(payload: bytes) -> bytes:
        raise RpcError(Code.NOT_FOUND, "process already finished")

    async def crash(payload: bytes) -> bytes:
        raise ValueError("a bug")

    server = Server({("t.S", "Echo"): echo, ("t.S", "Slow"): slow, ("t.S", "Refuse"): refuse,
                     ("t.S", "Crash"): crash})  # fmt: skip
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen()
    await server.start(s)
    return server, release


def test_calls_errors_and_order(sock_path: str) -> None:
    async def main() -> None:
        server, release = await _server(sock_path)
        client = await Client.connect(sock_path)
        try:
            slow = asyncio.ensure_future(client.call("t.S", "Slow", b"", 5))
            # a call behind a blocked one on the same connection is answered first
            assert await client.call("t.S", "Echo", b"abc", 5) == b"cba"
            assert not slow.done()
            release.set()
            assert await slow == b"slow"
            with pytest.raises(RpcError) as e:
                await client.call("t.S", "Refuse", b"", 5)
            assert (e.value.code, str(e.value)) == (Code.NOT_FOUND, "process already finished")
            with pytest.raises(RpcError) as e:
                await client.call("t.S", "Nope", b"", 5)
            assert e.value.code == Code.UNIMPLEMENTED
            with pytest.raises(RpcError) as e:
                await client.call("t.S", "Crash", b"", 5)
            assert (e.value.code, str(e.value)) == (Code.UNKNOWN, "a bug")
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())


def test_a_frame_over_the_limit_ends_the_connection(sock_path: str) -> None:
    async def main() -> None:
        server, _ = await _server(sock_path)
        reader, writer = await asyncio.open_unix_connection(sock_path)
        try:
            writer.write(struct.pack(">IIBB", MAX_MESSAGE + 1, 1, 1, 0))
            await writer.drain()
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed, nothing answered
            # and a request that is not a Request message is refused, not fatal
            reader, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(frame(1, 1, b"\xff\xff\xff"))
            await writer.drain()
            head = await reader.readexactly(10)
            length, stream, kind, _ = struct.unpack(">IIBB", head)
            resp = ttrpc_pb2.Response.FromString(await reader.readexactly(length))
            assert (stream, kind, resp.status.code) == (1, 2, Code.INVALID_ARGUMENT)
        finally:
            writer.close()
            await server.close()

    asyncio.run(main())


def test_events_reach_the_events_service_in_order(sock_path: str) -> None:
    """The publisher forwards envelopes as containerd's Events/Forward takes
    them, in order, and retries one the service refused."""

    async def main() -> None:
        got: list[events_pb2.Envelope] = []
        refused = [True]

        async def forward(payload: bytes) -> bytes:
            if refused[0]:
                refused[0] = False
                raise RpcError(Code.UNAVAILABLE, "not yet")
            got.append(events_pb2.ForwardRequest.FromString(payload).envelope)
            return b""

        server = Server({(events.SERVICE, "Forward"): forward})
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(sock_path)
        s.listen()
        await server.start(s)
        pub = events.Publisher("unix://" + sock_path, "ns1")
        pub.publish(events_pb2.TaskStart(container_id="c1", pid=7))
        pub.publish(events_pb2.TaskExit(container_id="c1", id="c1", exit_status=3))
        await pub.flush(10)
        await server.close()
        assert [(e.namespace, e.topic, e.event.type_url) for e in got] == [
            ("ns1", "/tasks/start", "containerd.events.TaskStart"),
            ("ns1", "/tasks/exit", "containerd.events.TaskExit"),
        ]
        assert events_pb2.TaskExit.FromString(got[1].event.value).exit_status == 3
        assert abs(got[0].timestamp.ToNanoseconds() / 1e9 - time.time()) < 30

    asyncio.run(main())


def test_containerds_command_line() -> None:
    argv = ["-namespace", "k8s.io", "-address", "/run/containerd/containerd.sock",
            "-publish-binary", "/usr/bin/containerd", "-id=abc", "-debug", "start"]  # fmt: skip
    args = parse(argv)
    assert (args.namespace, args.id, args.debug, args.action) == ("k8s.io", "abc", True, "start")


def test_one_socket_per_pod(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"annotations": {"io.kubernetes.cri.sandbox-id": "pod9"}}'
    )
    assert group_of(tmp_path, "c1") == "pod9"
    assert pods.SANDBOX_ID in GROUP_ANNOTATIONS  # (written out: `start` imports no library)
    (tmp_path / "config.json").write_text("{}")
    assert group_of(tmp_path, "c1") == "c1"
    a = socket_path("/run/containerd/containerd.sock", "k8s.io", "pod9")
    assert a == socket_path("/run/containerd/containerd.sock", "k8s.io", "pod9")
    assert a != socket_path("/run/containerd/containerd.sock", "default", "pod9")
    assert a.startswith("/run/containerd/s/") and len(a) < 108
