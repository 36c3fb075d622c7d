"""The guest agent's threaded session against the host's asyncio session.

No VM: the two ends talk over a socketpair, which is enough to hold the
agent's framing, credit, lazy streams, error mapping and request cap to what
``cocoon.protocol.session`` (the host side) expects.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cocoon.agent.session import RemoteError, Session, SessionClosed
from cocoon.protocol import framing, messages
from cocoon.protocol.framing import Kind
from cocoon.protocol.session import RemoteError as HostRemoteError
from cocoon.protocol.session import Session as HostSession

SRC = Path(__file__).resolve().parents[2] / "src"

Handler = Callable[[Session, messages.Message], messages.Message]
DEEP_PING = b'{"type":"ping","x":' + b"[" * 1000 + b"]" * 1000 + b"}"


def _ok(_s: Session, _m: messages.Message) -> messages.Message:
    return messages.Ok()


class Agent:
    """An agent Session on one end of a socketpair, its read loop on a thread."""

    def __init__(self, handler: Handler = _ok, **kw: int | float) -> None:
        self.host_sock, b = socket.socketpair()
        fd = os.dup(b.fileno())
        b.close()
        os.set_blocking(fd, False)
        self.session = Session(fd, handler, **kw)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.session.run, daemon=True)
        self.thread.start()

    def ended(self, timeout_s: float = 5.0) -> str:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive()
        assert self.session.closed is not None
        return str(self.session.closed)


@pytest.fixture
def agent_pair() -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(handler: Handler = _ok, **kw: int | float) -> Agent:
        a = Agent(handler, **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        a.host_sock.close()
        a.thread.join(5)


async def _host(agent: Agent) -> tuple[HostSession, asyncio.Task[None]]:
    r, w = await asyncio.open_unix_connection(sock=agent.host_sock, limit=1 << 21)
    host = HostSession(r, w)
    return host, asyncio.get_running_loop().create_task(host.run())


def test_agent_imports_stay_cheap() -> None:
    """asyncio & co. cost ~1 s of guest boot under TCG: the agent must not pull them in."""
    code = (
        "import sys\n"
        "import cocoon.agent.main, cocoon.agent.containers\n"
        "bad = {'asyncio', 'logging', 'typing', 'dataclasses', 'pathlib', 'shutil',\n"
        "       'subprocess', 'inspect', 'socket', 'cocoon.protocol.session'}\n"
        "print(sorted(bad & set(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_requests_errors_and_concurrency(agent_pair: Callable[..., Agent]) -> None:
    release = threading.Event()
    blocking = threading.Semaphore(0)  # one release per request that reached the handler

    def handler(_s: Session, msg: messages.Message) -> messages.Message:
        if isinstance(msg, messages.Stats):
            if msg.container_id == "remote":
                raise RemoteError("not_found", "no such thing")
            if msg.container_id == "boom":
                raise KeyError("x")
            if msg.container_id == "block":
                blocking.release()
                release.wait(20)
                return messages.Ok()
        if isinstance(msg, messages.Ping):
            return messages.Ok()
        raise RemoteError("unsupported", msg.TYPE)

    agent = agent_pair(handler, max_inflight=4)

    async def main() -> None:
        host, _ = await _host(agent)
        assert await host.request(messages.Ping(), (messages.Ok,), 5) == messages.Ok()
        codes = []
        for cid in ("remote", "boom", "other"):
            with pytest.raises(HostRemoteError) as e:
                await host.request(messages.Stats(cid), (messages.Ok,), 5)
            codes.append((e.value.code, e.value.message))
        assert codes == [
            ("not_found", "no such thing"),
            ("internal", "KeyError: 'x'"),
            ("unsupported", "stats"),
        ]
        # Three blocked requests leave room for pings; a fifth and sixth hit the cap.
        blocked = [
            asyncio.create_task(host.request(messages.Stats("block"), (messages.Ok,), 30))
            for _ in range(3)
        ]
        await asyncio.sleep(0.2)
        t = time.monotonic()
        await host.request(messages.Ping(), (messages.Ok,), 5)
        assert time.monotonic() - t < 1 and not any(b.done() for b in blocked)
        blocked.append(
            asyncio.create_task(host.request(messages.Stats("block"), (messages.Ok,), 30))
        )
        # All four in the handler (not a sleep's guess): the next one is over the cap.
        for _ in range(4):
            assert await asyncio.to_thread(blocking.acquire, True, 10)
        with pytest.raises(HostRemoteError) as e:
            await host.request(messages.Ping(), (messages.Ok,), 5)
        assert e.value.code == "limit"
        release.set()
        assert await asyncio.gather(*blocked) == [messages.Ok()] * 4
        host.close("done")

    asyncio.run(main())
    assert agent.ended() == "peer closed the channel"


def test_streams_credit_and_lazy_stdin(agent_pair: Callable[..., Agent]) -> None:
    def handler(s: Session, msg: messages.Message) -> messages.Message:
        assert isinstance(msg, messages.ExecProcess)
        inp, out = s.in_stream(msg.stdio.stdin), s.open_out(msg.stdio.stdout)
        n = 0
        while data := inp.read():
            assert len(data) <= framing.MAX_DATA
            n += len(data)
            out.write(data)
        out.close()
        s.close_in(msg.stdio.stdin)
        return messages.ProcessStarted(n)

    agent = agent_pair(handler)

    async def main() -> None:
        host, _ = await _host(agent)
        sin, sout = host.open_out(11), host.open_in(12)
        payload = os.urandom(5 * framing.STREAM_WINDOW // 2)

        async def send() -> None:
            await sin.write(payload)
            await sin.close()

        sender = asyncio.create_task(send())
        await asyncio.sleep(0.1)  # stdin goes first: the agent opens stream 11 lazily
        spec = messages.StdioSpec(11, 12, 0, False, 0, 0)
        req = asyncio.create_task(
            host.request(messages.ExecProcess("c", "e", "{}", spec), (messages.ProcessStarted,), 60)
        )
        got = bytearray()
        while chunk := await sout.read():
            got += chunk
            if len(got) < framing.STREAM_WINDOW * 2:
                await asyncio.sleep(0.001)  # a slow reader: the agent must wait for credit
        await sender
        assert bytes(got) == payload
        assert await req == messages.ProcessStarted(len(payload))
        host.close("done")

    asyncio.run(main())
    agent.ended()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"XX" + bytes(10), "bad magic"),
        (framing.encode(Kind.REQUEST, 1, b'{"type":"nope"}'), "unknown message type"),
        # Issue 19: the agent decodes through the same bounded path as the host.
        (framing.encode(Kind.REQUEST, 1, DEEP_PING), "nested 1001 deep"),
        (framing.encode(Kind.REPLY, 1, b'{"type":"ok"}'), "reply for unknown request"),
        (framing.encode(Kind.DATA, 1, b""), "empty DATA frame"),
        (
            b"".join(framing.encode(Kind.DATA, 1, b"x" * framing.MAX_DATA) for _ in range(17)),
            "beyond its window",
        ),
        (framing.encode(Kind.REQUEST, 1, b"{}")[:13], "did not arrive within"),
    ],
)
def test_violations_end_the_session(
    agent_pair: Callable[..., Agent], raw: bytes, reason: str
) -> None:
    agent = agent_pair(frame_timeout_s=0.3)
    agent.host_sock.sendall(raw)
    assert reason in agent.ended()


def test_blocked_writer_lets_go_when_the_host_leaves(agent_pair: Callable[..., Agent]) -> None:
    """A writer stuck on a full channel must see the session end, not hang on the fd."""
    outcome: list[str] = []

    def handler(s: Session, _m: messages.Message) -> messages.Message:
        try:
            s.open_out(5).write(b"y" * (4 << 20))
        except SessionClosed as e:
            outcome.append(str(e))
        return messages.Ok()

    agent = agent_pair(handler)
    agent.host_sock.sendall(framing.encode(Kind.REQUEST, 1, messages.encode(messages.Ping())))
    time.sleep(0.3)  # the host reads nothing: the writer fills the socket and waits
    agent.host_sock.shutdown(socket.SHUT_WR)
    assert agent.ended() == "peer closed the channel"
    deadline = time.monotonic() + 2
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outcome == ["peer closed the channel"]


def test_reaper_hands_out_statuses() -> None:
    """In a child interpreter: the reaper's waitpid(-1) would reap pytest's children."""
    code = (
        "import os, time\n"
        "from cocoon.agent.reaper import Reaper, exit_code\n"
        "from cocoon.agent import spawn\n"
        "r = Reaper(); r.start()\n"
        "time.sleep(0.1)  # idle with no children (ECHILD) first\n"
        "print(spawn.run(['sh', '-c', 'echo out; echo err >&2; exit 3'], r))\n"
        "pid, ex = spawn.spawn(['sh', '-c', 'kill -9 $$'], r, (0, 1, 2))\n"
        "print(exit_code(ex.wait(10)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.splitlines() == ["(3, 'out\\nerr\\n')", "(137, 9)"], out.stderr
