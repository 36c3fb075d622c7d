"""Pods' shims that wait with their VM: the shim fork server's warm pool.

A warm pool's VM is started by the pool server and stays its child: Linux
re-parents a process only to init or to a subreaper above it, never to
another living process. A pod that takes one (`cocoon pool serve` on the
namespace's root) has its host processes in several trees: the shim's, and
the VM's under the pool server, which kubelet's view of a pod, and a reader
of the process table, cannot tie together.

A carrier is the pod's shim before its pod exists. The fork server forks
``shim.pool`` of them ahead of need; each starts a one-VM pool of its own as
its child (`cocoon pool serve --size 1 --once` on a socket of its own), so
the VM's processes are the carrier's grandchildren. When a pod's `start`
comes, the fork server hands the request to a carrier whose VM is ready
instead of forking a shim, and the carrier becomes that pod's shim server
(server.run_server) with its configuration pointing the pod's monitor at its
own pool. The pod's shim, monitor, VM and pool process are then one tree,
with the pooled start's speed. Once the pod's first task is created, the
carrier drains its pool (a VM the pod's spec did not fit is destroyed, not
kept), and the pool process, having handed its VM out, is only a bare
reaper for it.

Carriers serve one containerd namespace (``shim.pool_namespace``) and the
configuration the fork server has: a request from another namespace, or
whose environment sets other ``COCOON_*`` values, is forked as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cocoon.config import Config

#: Seconds between a hand-out (or a carrier's death) and the next carrier:
#: its VM's restore would share the cores with the start that took one.
REFILL_AFTER_S = 1.0
RETRY_AFTER_S = 5.0
#: How long the fork server waits for a carrier to take a request.
TAKE_TIMEOUT_S = 5.0
#: How long a carrier's pool may take to have its VM ready before it gives up.
READY_TIMEOUT_S = 300.0
#: A carrier's own messages to the fork server ("ready", "ok").
MAX_LINE = 64

log = logging.getLogger(__name__)


@dataclass
class Carrier:
    pid: int
    chan: socket.socket  # the fork server's end of a socketpair
    ready: bool = False


def _pods_part(cfg: Config) -> Config:
    """What of a configuration the pod's VM and shim depend on (the fork
    server's own settings and the pools' are not)."""
    from cocoon.config import PoolConfig, ShimConfig

    return dataclasses.replace(cfg, shim=ShimConfig(), pool=PoolConfig())


def _same_config(cfg: Config, env: dict[str, str]) -> bool:
    from cocoon.config import load
    from cocoon.errors import CocoonError

    try:
        theirs = load(env=env)
    except CocoonError:
        return False
    return _pods_part(theirs) == _pods_part(cfg)


class Carriers:
    """The fork server's carriers: forked, watched, handed requests."""

    def __init__(self, cfg: Config, inherited: list[socket.socket]) -> None:
        self.cfg = cfg
        #: The fork server's sockets, closed in each carrier it forks.
        self.inherited = inherited
        self.items: list[Carrier] = []
        self.next_at = 0.0

    # -- the fork server's loop --------------------------------------------------

    def chans(self) -> list[socket.socket]:
        return [c.chan for c in self.items]

    def wait_s(self) -> float | None:
        """How long the fork server may sleep before ``tick`` has work."""
        if len(self.items) >= self.cfg.shim.pool:
            return None
        return max(0.0, self.next_at - time.monotonic())

    def tick(self) -> None:
        while len(self.items) < self.cfg.shim.pool and time.monotonic() >= self.next_at:
            try:
                self.items.append(self._fork())
            except OSError as e:
                log.warning(f"cannot fork a carrier: {e}")
                self.next_at = time.monotonic() + RETRY_AFTER_S

    def readable(self, chan: socket.socket) -> None:
        c = next(c for c in self.items if c.chan is chan)
        try:
            data = chan.recv(MAX_LINE)
        except OSError:
            data = b""
        if not data:
            log.warning(f"carrier {c.pid} ended before any pod took it")
            self._forget(c, RETRY_AFTER_S)
        elif data.startswith(b"ready"):
            c.ready = True

    def status(self) -> dict[str, int]:
        ready = sum(c.ready for c in self.items)
        return {"ready": ready, "starting": len(self.items) - ready}

    def hand(self, req: dict[str, Any], fd: int) -> int | None:
        """Give ``start``'s request (and its listening socket ``fd``) to a
        ready carrier: the pid of the pod's shim, or None (none could take
        it: the fork server forks one). A carrier that took the request but
        did not say so in time counts as the shim (a second one must not
        serve the socket)."""
        if req["namespace"] != self.cfg.shim.pool_namespace:
            return None
        c = next((c for c in self.items if c.ready), None)
        if c is None or not _same_config(self.cfg, req["env"]):
            return None
        try:
            socket.send_fds(c.chan, [json.dumps(req).encode() + b"\n"], [fd])
            c.chan.settimeout(TAKE_TIMEOUT_S)
            answer = c.chan.recv(MAX_LINE)
        except TimeoutError:
            log.warning(f"carrier {c.pid} did not confirm its pod in {TAKE_TIMEOUT_S:.0f} s")
            answer = b"ok"
        except OSError:
            answer = b""
        self._forget(c, REFILL_AFTER_S)
        return c.pid if answer.startswith(b"ok") else None

    def _forget(self, c: Carrier, after_s: float) -> None:
        self.items.remove(c)
        c.chan.close()
        self.next_at = max(self.next_at, time.monotonic() + after_s)

    def stop(self) -> None:
        """End the carriers no pod took (each destroys its VM), and wait for
        them: each one's end closes its socket."""
        for c in self.items:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGTERM)
        deadline = time.monotonic() + 90
        for c in self.items:
            c.chan.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                while c.chan.recv(MAX_LINE):
                    pass
            c.chan.close()
        self.items.clear()

    def _fork(self) -> Carrier:
        mine, theirs = socket.socketpair()
        try:
            pid = os.fork()
        except OSError:
            mine.close()
            theirs.close()
            raise
        if pid == 0:  # pragma: no cover - the carrier
            code = 1
            try:
                mine.close()
                for s in [*self.inherited, *self.chans()]:
                    s.close()
                code = _live(self.cfg, theirs)
            except BaseException:
                log.exception("the carrier failed")
            finally:
                os._exit(code)
        theirs.close()
        return Carrier(pid, mine)


# -- the carrier itself --------------------------------------------------------


class _Stop(Exception):
    pass


def _stop(*_: Any) -> None:
    raise _Stop


def _die_with_parent() -> None:  # pragma: no cover - runs between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


class OwnPool:
    """A carrier's one-VM pool, as its pod's shim sees it."""

    def __init__(self, cfg: Config, proc: subprocess.Popen[bytes]) -> None:
        self.cfg = cfg
        self.proc = proc

    def drain(self) -> None:
        """Its VM destroyed if the pod did not take it; its server gone either way."""
        from cocoon.errors import CocoonError
        from cocoon.runtime import pools

        with contextlib.suppress(CocoonError):
            pools.drain(self.cfg)

    def close(self) -> None:
        """At the shim's end: a server still serving stops (its VM destroyed);
        a reaper ignores this and ends with the VM's last process."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)


def _pool_config(cfg: Config) -> Config:
    from cocoon.shim.server import shim_config

    base = shim_config(cfg.shim.pool_namespace)
    sock = base.root / f"pool-{os.getpid()}.sock"
    pool = dataclasses.replace(
        base.pool, size=1, nics=cfg.shim.pool_nics, classes=[], socket=str(sock)
    )
    return dataclasses.replace(base, pool=pool)


def _ready(pcfg: Config) -> bool:
    from cocoon.errors import CocoonError
    from cocoon.runtime import pools

    try:
        classes = pools.status(pcfg).get("classes", {})
    except CocoonError:
        return False
    return isinstance(classes, dict) and any(classes.values())


def _live(cfg: Config, chan: socket.socket) -> int:
    """The carrier's life before its pod: its pool started, ready reported,
    then the one request it gets, whose shim it becomes (never returning)."""
    for s in (signal.SIGCHLD, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, _stop)
    pcfg = _pool_config(cfg)
    argv = [sys.executable, "-m", "cocoon.cli", "--root", str(pcfg.root), "pool", "serve",
            "--size", "1", "--nics", str(pcfg.pool.nics), "--once"]  # fmt: skip
    env = {**os.environ, "COCOON_POOL_SOCKET": pcfg.pool.socket, "COCOON_POOL_CLASSES": ""}
    pool = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    own = OwnPool(pcfg, pool)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(pcfg):
            if pool.poll() is not None or time.monotonic() > deadline:
                log.warning("a carrier's pool did not get its VM ready")
                return 1
            time.sleep(0.1)
        chan.sendall(b"ready\n")
        data, fds, _, _ = socket.recv_fds(chan, 1 << 20, 1)
        if not data or len(fds) != 1:
            return 0  # the fork server ended
        req = json.loads(data)
        lsock = socket.socket(fileno=fds[0])
        _become(cfg, req, lsock, chan, own)  # never returns
    except _Stop:
        return 0
    finally:
        own.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            pool.wait(timeout=60)
    return 1


def _become(
    cfg: Config, req: dict[str, Any], lsock: socket.socket, chan: socket.socket, own: OwnPool
) -> None:
    """The pod's shim, as one forked for it would be (shim.forkserver), but
    with its pool's VM waiting."""
    from cocoon.shim.server import run_server, shim_config

    os.chdir(req["bundle"])
    os.environ.clear()
    os.environ.update(req["env"])
    pcfg = shim_config(req["namespace"])
    pool = dataclasses.replace(pcfg.pool, socket=own.cfg.pool.socket)
    pcfg = dataclasses.replace(pcfg, pool=pool)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    chan.sendall(b"ok\n")
    chan.close()
    run_server(pcfg, req["namespace"], req["id"], lsock, req["path"], Path(req["bundle"]), own)
