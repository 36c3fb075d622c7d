"""Pods' shim servers forked from a warm process: the shim's fork server.

containerd runs the shim binary for each pod's first task, and a new Python
shim imports the runtime library (0.05-0.08 s here, ~130 modules) before it can
serve the Create containerd is already waiting on: after the VM itself, the
largest part of a pod's start. ``containerd-shim-cocoon-v2 -address SOCK
fork-server``, started once per containerd (as the warm pool is, under
systemd), imports all of it and waits on ``<shim.root_dir>/forks-<hash of
the address>.sock``. ``start`` hands it the pod's listening socket (an fd,
over SCM_RIGHTS) with its bundle, namespace, id and environment (containerd's
``TTRPC_ADDRESS``, the configuration's ``COCOON_*``), and it forks the pod's
shim server, which then runs exactly as one forked by ``start`` itself
(``server.run_server``): its own session, its log on the bundle's fifo, its
cwd the bundle, its environment the one containerd gave ``start``. Without
a fork server, or if it does not answer, ``start`` forks as before.

The fork server is single-threaded and runs no event loop, so a fork copies
no lock another thread holds. Each shim it forks is its child (so a pod's
host processes are still one tree, the shim's) and is reaped by it; being
the only process it forks, it may wait for any child. Its command line
carries containerd's address, as every shim's does (the forked shims keep
it). Only root may connect: the socket is 0600 in a root-only dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cocoon.errors import ShimError

if TYPE_CHECKING:
    from cocoon.config import Config
    from cocoon.shim.carrier import Carriers

#: A request (a bundle path, an id, the environment), at most.
MAX_REQUEST = 1 << 20
#: How long ``start`` waits to hand the fork server its request (else it
#: forks itself), and then for its answer.
ASK_TIMEOUT_S = 2.0
REPLY_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


def socket_for(root_dir: str, address: str) -> Path:
    """The fork server's socket for the containerd at ``address``."""
    key = hashlib.sha256(os.path.normpath(address).encode()).hexdigest()[:16]
    return Path(root_dir) / f"forks-{key}.sock"


def ask(
    cfg: Config,
    address: str,
    namespace: str,
    cid: str,
    sock: socket.socket,
    path: str,
    bundle: Path,
) -> bool:
    """Have the fork server fork the pod's shim server on ``sock``: True if
    it did (``sock`` is then the new shim's; the caller closes its copy),
    False if there is none or it refused (nothing was forked: the caller
    forks). A request it took but did not answer counts as forked: a shim
    may serve ``sock`` already, and a second one must not; if none does, the
    socket closes with the caller and containerd's connection is refused
    (one failed task, nothing left behind)."""
    where = socket_for(cfg.shim.root_dir, address)
    if not where.exists():
        return False
    req = {"namespace": namespace, "id": cid, "path": path, "bundle": str(bundle),
           "env": dict(os.environ)}  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(ASK_TIMEOUT_S)
        try:
            c.connect(str(where))
            socket.send_fds(c, [json.dumps(req).encode() + b"\n"], [sock.fileno()])
        except OSError:
            return False  # a stale socket, or a server going away: nothing taken
        try:
            c.settimeout(REPLY_TIMEOUT_S)
            reply = json.loads(c.makefile("rb").readline(4096))
        except (OSError, ValueError):
            return True
    return not (isinstance(reply, dict) and "error" in reply)


def status(cfg: Config, address: str) -> dict[str, int]:
    """The fork server's carriers (shim.carrier): how many are ready, how
    many starting; raises OSError when none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(REPLY_TIMEOUT_S)
        c.connect(str(socket_for(cfg.shim.root_dir, address)))
        c.sendall(b'{"status": true}\n')
        reply = json.loads(c.makefile("rb").readline(4096))
    got = reply.get("carriers") if isinstance(reply, dict) else None
    if not isinstance(got, dict):
        raise OSError("the fork server's status is not what it should be")
    return {k: int(v) for k, v in got.items()}


def run(address: str) -> int:
    """The fork server's life: serve ``start``'s requests until SIGTERM."""
    from cocoon import log as cocoon_log
    from cocoon.config import load
    from cocoon.shim.carrier import Carriers
    from cocoon.shim.server import run_server

    if not address:
        raise ShimError("-address is required: the containerd whose pods' shims it forks")
    cocoon_log.setup("containerd-shim-cocoon-v2", level=logging.INFO)
    _preload()
    cfg = load()
    where = socket_for(cfg.shim.root_dir, address)
    where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        where.unlink()  # a dead one's (a live one would own the name: one per containerd)
    srv.bind(str(where))
    os.chmod(where, 0o600)
    srv.listen(64)
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        srv.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    carriers = Carriers(cfg, [srv])
    log.info(f"fork server {os.getpid()} for {address} on {where}"
             + (f", {cfg.shim.pool} pods' VMs ready" if cfg.shim.pool else ""))  # fmt: skip
    try:
        while not stopping:
            carriers.tick()
            try:
                ready, _, _ = select.select([srv, *carriers.chans()], [], [], carriers.wait_s())
            except (OSError, ValueError):
                continue  # closed by stop()
            for r in ready:
                if r is not srv:
                    carriers.readable(r)
                    continue
                try:
                    conn, _ = srv.accept()
                except OSError:
                    continue  # interrupted, or closed by stop()
                with conn:
                    _serve_one(conn, [srv, *carriers.chans()], carriers, run_server)
    finally:
        with contextlib.suppress(OSError):
            where.unlink()
        carriers.stop()
    log.info("fork server done")
    return 0


def _preload() -> None:
    """What a shim server runs, imported once here instead of in every shim."""
    import asyncio  # noqa: F401
    from concurrent.futures import ThreadPoolExecutor  # noqa: F401

    from cocoon.shim import events, service, ttrpc  # noqa: F401


def _reap() -> None:
    """Collect the forked shims that ended (this process forks nothing else)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _serve_one(
    conn: socket.socket, inherited: list[socket.socket], carriers: Carriers, run_server: Any
) -> None:
    """One ``start``'s request: a carrier made its pod's shim server, or one
    forked; its pid answered. (Or the carriers' status: ``status``.)"""
    conn.settimeout(ASK_TIMEOUT_S)
    try:
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 1)
        while data and not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            more = conn.recv(MAX_REQUEST - len(data))
            if not more:
                break
            data += more
    except OSError as e:
        log.warning(f"a request failed: {e}")
        return
    if not fds and data.startswith(b'{"status"'):
        _answer(conn, {"carriers": carriers.status()})
        return
    try:
        req = _request(data, fds)
    except (ShimError, ValueError) as e:
        for fd in fds:
            os.close(fd)
        log.warning(f"refused a request: {e}")
        _answer(conn, {"error": str(e)[:500]})
        return
    lsock = socket.socket(fileno=fds[0])
    carried = carriers.hand(req, lsock.fileno())
    if carried is not None:
        lsock.close()
        _answer(conn, {"pid": carried})
        return
    try:
        pid = os.fork()
    except OSError as e:
        lsock.close()
        log.warning(f"cannot fork a shim: {e}")
        _answer(conn, {"error": f"cannot fork: {e.strerror}"})
        return
    if pid == 0:  # pragma: no cover - the pod's shim server
        try:
            conn.close()
            for inh in inherited:
                inh.close()
            for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_DFL)
            os.chdir(req["bundle"])
            os.environ.clear()
            os.environ.update(req["env"])
            from cocoon.shim.server import shim_config

            cfg = shim_config(req["namespace"])
        except BaseException as e:
            print(f"containerd-shim-cocoon-v2: cannot become the shim: {e}", file=sys.stderr)
            os._exit(1)
        run_server(cfg, req["namespace"], req["id"], lsock, req["path"], Path(req["bundle"]))
    lsock.close()
    _answer(conn, {"pid": pid})


def _answer(conn: socket.socket, reply: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(reply).encode() + b"\n")


def _request(data: bytes, fds: list[int]) -> dict[str, Any]:
    from cocoon.shim.server import SOCKET_DIR, check_namespace

    if len(fds) != 1:
        raise ShimError("no socket came with the request")
    req = json.loads(data)
    if not isinstance(req, dict):
        raise ShimError("not an object")
    for key in ("namespace", "id", "path", "bundle"):
        if not isinstance(req.get(key), str) or not req[key]:
            raise ShimError(f"{key} missing")
    check_namespace(req["namespace"])
    if os.path.dirname(req["path"]) != SOCKET_DIR or not os.path.isabs(req["bundle"]):
        raise ShimError("a socket or bundle where none may be")
    env = req.get("env")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ShimError("env must map strings to strings")
    return req
