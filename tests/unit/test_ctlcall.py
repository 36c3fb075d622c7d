"""runtime.ctlcall, the blocking one-request client of a container's monitor,
against a peer speaking the protocol's frames on the container's real control
socket path: replies, refusals mapped as the async client maps them, and a
peer that lies or stalls. (The real monitor answers it in tests/vm/test_ocicli.)"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cocoon.errors import AgentError, NotRunning, StateError, VmExited
from cocoon.protocol import framing, messages
from cocoon.protocol.framing import Kind
from cocoon.runtime import ctlcall
from cocoon.runtime.records import CONTAINER_ID, ContainerDir

Peer = Callable[[socket.socket], None]


def _read_frame(c: socket.socket) -> tuple[Kind, int, bytes]:
    head = c.recv(framing.HEADER_SIZE, socket.MSG_WAITALL)
    kind, chan, n = framing.decode_header(head)
    return kind, chan, c.recv(n, socket.MSG_WAITALL) if n else b""


def _answer(c: socket.socket, kind: Kind, msg: messages.Message) -> None:
    _, chan, _ = _read_frame(c)
    c.sendall(framing.encode(kind, chan, messages.encode(msg)))


def _hello(c: socket.socket) -> None:
    _answer(c, Kind.REPLY, messages.HelloReply(messages.PROTOCOL_VERSION, "test", "6.1"))


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[ContainerDir, Callable[[Peer], None]]]:
    """A container dir whose life lock is held (a monitor is there) and whose
    control socket is served by the peer a test gives, once."""
    d = ContainerDir(tmp_path / "containers", "c" * 64)
    d.path.mkdir(parents=True)
    assert d.life.take()
    d.ctl_socket.parent.mkdir(parents=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(d.ctl_socket))
    srv.listen(1)
    threads: list[threading.Thread] = []

    def serve(peer: Peer) -> None:
        def run() -> None:
            c, _ = srv.accept()
            with c:
                peer(c)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)

    yield d, serve
    srv.close()
    d.life.release()
    for t in threads:
        t.join(5)


def test_a_request_gets_its_reply_after_hello(
    container: tuple[ContainerDir, Callable[[Peer], None]],
) -> None:
    d, serve = container
    seen: list[messages.Message] = []

    def peer(c: socket.socket) -> None:
        _hello(c)
        kind, chan, body = _read_frame(c)
        seen.append(messages.decode(body))
        # An unrelated frame first (a keepalive ping), then the reply.
        c.sendall(framing.encode(Kind.REQUEST, 99, messages.encode(messages.Ping())))
        c.sendall(framing.encode(Kind.REPLY, chan, messages.encode(messages.Ok())))

    serve(peer)
    reply = ctlcall.request(d, messages.StartContainer(CONTAINER_ID), messages.Ok)
    assert isinstance(reply, messages.Ok)
    assert seen == [messages.StartContainer(CONTAINER_ID)]


@pytest.mark.parametrize(
    ("code", "raised"),
    [("not_running", NotRunning), ("vm_exited", VmExited), ("crun_failed", AgentError)],
)
def test_refusals_are_the_async_clients_errors(
    container: tuple[ContainerDir, Callable[[Peer], None]], code: str, raised: type[Exception]
) -> None:
    d, serve = container

    def peer(c: socket.socket) -> None:
        _hello(c)
        _answer(c, Kind.ERROR, messages.ErrorReply(code, "it said no"))

    serve(peer)
    with pytest.raises(raised, match="it said no"):
        ctlcall.request(d, messages.StartContainer(CONTAINER_ID), messages.Ok)


def test_a_lying_peer_is_a_lost_monitor(
    container: tuple[ContainerDir, Callable[[Peer], None]],
) -> None:
    d, serve = container

    def peer(c: socket.socket) -> None:
        _read_frame(c)
        c.sendall(b"XX" + bytes(10))  # not our magic

    serve(peer)
    with pytest.raises(StateError, match="lost the monitor"):
        ctlcall.request(d, messages.StartContainer(CONTAINER_ID), messages.Ok)


def test_a_stalled_peer_times_out(
    container: tuple[ContainerDir, Callable[[Peer], None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, serve = container
    monkeypatch.setattr(ctlcall, "TIMEOUT_S", 0.3)
    done = threading.Event()

    def peer(c: socket.socket) -> None:
        _hello(c)
        done.wait(5)  # never answers the request

    serve(peer)
    with pytest.raises(StateError, match="did not answer"):
        ctlcall.request(d, messages.StartContainer(CONTAINER_ID), messages.Ok)
    done.set()


def test_no_monitor_is_not_running(tmp_path: Path) -> None:
    d = ContainerDir(tmp_path, "d" * 64)
    d.path.mkdir()
    with pytest.raises(NotRunning, match="is not running"):
        ctlcall.request(d, messages.StartContainer(CONTAINER_ID), messages.Ok)


def test_runcs_quick_verbs_need_no_asyncio() -> None:
    """What this client is for: the verbs runc's callers exec for every
    container load no asyncio (~20 ms of each process)."""
    code = (
        "import sys\n"
        "from cocoon.ocicli import main, start, kill, state, delete\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'asyncio'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
