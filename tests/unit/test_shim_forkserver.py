"""The shim's fork server, for real but without containerd or a VM: a pod's
shim server forked on request, serving the Task service on the socket
``start`` handed over, reaped when it goes; refusals fall back to ``start``'s
own fork; no server, no fork."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocoon.config import load
from cocoon.shim import forkserver
from cocoon.shim.proto import task_pb2
from cocoon.shim.server import SOCKET_DIR
from cocoon.shim.ttrpc import Client

ADDRESS = "/run/cocoon-test-containerd.sock"
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "shim-root"


@pytest.fixture
def server(root: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": SRC, "COCOON_SHIM_ROOT_DIR": str(root)}
    code = "import sys; from cocoon.entry import containerd_shim; containerd_shim()"
    p = subprocess.Popen([sys.executable, "-c", code, "-address", ADDRESS, "fork-server"],
                         env=env, stderr=subprocess.PIPE)  # fmt: skip
    where = forkserver.socket_for(str(root), ADDRESS)
    deadline = time.monotonic() + 30
    while not where.exists():
        assert p.poll() is None and time.monotonic() < deadline, p.stderr
        time.sleep(0.05)
    yield p
    for shim in _children(p.pid):  # a failed test's: never left behind
        os.kill(shim, signal.SIGKILL)
    p.terminate()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err.decode(errors="replace")
    assert not where.exists()


def _listening(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    return s


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def test_no_fork_server_no_fork(root: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(load(), shim=dataclasses.replace(load().shim, root_dir=str(root)))
    with socket.socket(socket.AF_UNIX) as s:
        assert not forkserver.ask(cfg, ADDRESS, "ns", "c1", s, "/nowhere", tmp_path)


def test_a_refused_request_leaves_the_fork_to_start(
    server: subprocess.Popen[bytes], root: Path, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(load(), shim=dataclasses.replace(load().shim, root_dir=str(root)))
    path = str(tmp_path / "elsewhere.sock")  # not where containerd's shims listen
    with _listening(path) as s:
        assert not forkserver.ask(cfg, ADDRESS, "ns", "c1", s, path, tmp_path)
        assert not forkserver.ask(cfg, ADDRESS, "bad ns!", "c1", s, path, tmp_path)
    assert _children(server.pid) == []


def test_a_forked_shim_serves_the_socket_and_is_reaped(
    server: subprocess.Popen[bytes], root: Path, tmp_path: Path
) -> None:
    cfg = dataclasses.replace(load(), shim=dataclasses.replace(load().shim, root_dir=str(root)))
    path = os.path.join(SOCKET_DIR, f"cocoon-test-{uuid.uuid4().hex}")
    try:
        with _listening(path) as s:
            assert forkserver.ask(cfg, ADDRESS, "ns", "c1", s, path, tmp_path)
        (shim,) = _children(server.pid)
        # its own session (once it is up), the bundle its cwd
        deadline = time.monotonic() + 10
        while os.getsid(shim) != shim:
            assert time.monotonic() < deadline, "the forked shim never made its session"
            time.sleep(0.02)
        assert os.readlink(f"/proc/{shim}/cwd") == str(tmp_path)

        async def ask_shim() -> bytes:
            c = await Client.connect(path)
            try:
                req = task_pb2.ConnectRequest(id="c1").SerializeToString()
                reply = await c.call("containerd.task.v2.Task", "Connect", req, 10)
                now = task_pb2.ShutdownRequest(id="c1", now=True).SerializeToString()
                await c.call("containerd.task.v2.Task", "Shutdown", now, 10)
                return reply
            finally:
                await c.close()

        reply = task_pb2.ConnectResponse.FromString(asyncio.run(ask_shim()))
        assert reply.shim_pid == shim and reply.task_pid == 0
        deadline = time.monotonic() + 20
        while _children(server.pid):  # gone, and reaped: no zombie under the fork server
            assert time.monotonic() < deadline, Path(f"/proc/{shim}/status").read_text()[:200]
            time.sleep(0.05)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_requests_are_checked() -> None:
    good = {"namespace": "k8s.io", "id": "c1", "path": f"{SOCKET_DIR}/x", "bundle": "/b",
            "env": {"A": "1"}}  # fmt: skip
    assert forkserver._request(json.dumps(good).encode(), [3])["id"] == "c1"
    for bad, fds in [
        ({**good, "path": "/tmp/x"}, [3]),
        ({**good, "bundle": "rel"}, [3]),
        ({**good, "namespace": "a b"}, [3]),
        ({**good, "env": {"A": 1}}, [3]),
        ({**good, "id": ""}, [3]),
        (good, []),
    ]:
        with pytest.raises(Exception, match=".") as e:
            forkserver._request(json.dumps(bad).encode(), fds)
        assert type(e.value).__name__ == "ShimError", bad
