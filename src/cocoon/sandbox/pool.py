"""Warm pools: sandboxes restored ahead of need, handed out once each.

`cocoon pool serve` keeps ``pool.size`` sandboxes per size class restored
from their template and agent-ready, with no tenant in them: no disk in their
slots, no network (``pool.nics`` taps in a namespace of the pool's own, joined
to nothing), nothing of anyone's. A start that fits a class (disks within the
slots, as many links to connect in namespaces given by path as the class has
NICs) asks the server on ``<root>/pool.sock`` for one and gets its id and, over
SCM_RIGHTS, the fd that holds the sandbox's owner lock (and the fd of its
taps' namespace, which the taker moves them out of): ownership moves without
ever lapsing, so
``cocoon gc`` never sees it unowned. The server lets go of the sandbox's agent
channel first, and the taker connects its own. A sandbox is handed out once
and never comes back; the server starts another in its place.

A pooled sandbox whose VM died, whose agent stopped answering pings, or whose
template is no longer the one its class would be cloned from is destroyed,
not handed out. Without the server (or with an empty pool) a start simply
restores from the template itself: slower, never failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import CocoonError, SandboxError
from cocoon.hypervisor.base import Layout
from cocoon.sandbox import admission
from cocoon.sandbox import template as templates
from cocoon.sandbox.poolclient import (
    MAX_LINE,
    TAKE_TIMEOUT_S,
    SizeClass,
    classes,
    close_fds,
    socket_path,
)
from cocoon.sandbox.sandbox import Sandbox
from cocoon.sandbox.spec import SandboxSpec
from cocoon.sandbox.warmup import hub_warm_up, warm_up

#: The reaper a ``once`` server becomes (``wait_for_handed``).
_REAPER = (
    "import os, signal\n"
    "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
    "    signal.signal(s, signal.SIG_IGN)\n"
    "try:\n"
    "    while True:\n"
    "        os.wait()\n"
    "except ChildProcessError:\n"
    "    pass\n"
)
#: Seconds after a hand-out before the pool starts its replacement.
REFILL_AFTER_S = 1.0
#: Pause before retrying after a failed fill (a broken template, a full host).
RETRY_S = 2.0


def _still_stopping() -> None:
    """A cleanup that failed while the filler was being cancelled (the
    server stopping) raises its own error in place of the cancellation:
    swallowing that would keep the filler, and the server, alive for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class PoolServer:
    """The long-lived owner of the pooled sandboxes (one per state root)."""

    def __init__(self, cfg: Config, log: Any = print, *, once: bool = False) -> None:
        self.cfg = cfg
        self.log = log
        #: Serve one hand-out (or one drain), then stop: a pod's own pool
        #: (shim.carrier), whose one VM is that pod's or nobody's.
        self.once = once
        self._sandbox = Sandbox
        self.ready: dict[str, list[Sandbox]] = {c.name: [] for c in classes(cfg)}
        self.filling = cfg.pool.size > 0
        self.handed: list[subprocess.Popen[bytes]] = []
        self._wake = asyncio.Event()
        self.last_take = 0.0
        self._stop = asyncio.Event()

    async def serve(self) -> None:
        path = socket_path(self.cfg)
        self.cfg.root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self._server_alive(path):
                raise SandboxError(f"a pool server is already running on {path}")
            path.unlink()
        server = await asyncio.start_unix_server(self._client, path=str(path), limit=MAX_LINE)
        os.chmod(path, 0o600)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.log(f"pool: serving on {path}, {self.cfg.pool.size} per class "
                 f"({', '.join(self.ready)})")  # fmt: skip
        try:
            async with asyncio.TaskGroup() as tg:
                fillers = [tg.create_task(self._fill(c)) for c in classes(self.cfg)]
                reaper = tg.create_task(self._reap())
                await self._stop.wait()
                for t in [*fillers, reaper]:
                    t.cancel()
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            await self.drain()
            self.log("pool: stopped")

    @staticmethod
    def _server_alive(path: Path) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def wait_for_handed(self) -> None:
        """After a ``once`` server's end: stay the parent of the VM processes
        it handed out until they end (their taker's tree is this process's
        parent's), as a reaper that holds none of the server's memory: the
        interpreter is replaced by a bare one. SIGTERM (the parent's end) does
        not end it: the processes are the taker's to end."""
        if not any(p.poll() is None for p in self.handed):
            return
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", _REAPER])

    async def drain(self) -> int:
        n = 0
        for sbs in self.ready.values():
            while sbs:
                await sbs.pop().destroy()
                n += 1
        return n

    def _usable(self, sb: Sandbox, c: SizeClass) -> str:
        """Why a pooled sandbox must not be handed out ("" = it may)."""
        if sb.channel is None or sb.channel.session.closed is not None:
            return "its agent channel failed"
        if sb.launched is None or sb.backend.exited(sb.launched.processes["qemu"]):
            return "its VM died"
        key = sb.state.template
        try:
            if not key or templates.read(self.cfg, key) is None:
                return "its template is gone"
        except CocoonError:
            return "its template is no longer usable"
        return ""

    async def _fill(self, c: SizeClass) -> None:
        sbs = self.ready[c.name]
        while True:
            for sb in list(sbs):
                why = self._usable(sb, c)
                if why:
                    self.log(f"pool: discarding {sb.id} ({why})")
                    sbs.remove(sb)
                    await sb.destroy()
            if not self.filling or len(sbs) >= self.cfg.pool.size:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
                continue
            # Refill once the start that took one is likely through its
            # CPU-bound part: the two would share the same cores.
            quiet = self.last_take + REFILL_AFTER_S - time.monotonic()
            if quiet > 0:
                await asyncio.sleep(quiet)
                continue
            try:
                async with admission.start_slot(self.cfg):
                    sb = await self._sandbox.create(
                        self.cfg,
                        SandboxSpec(
                            vcpus=c.vcpus,
                            memory_mib=c.memory_mib,
                            template=True,
                            pooled=True,
                            pool_nics=c.nics,
                            annotations={"cocoon.pool": c.name},
                        ),
                    )
            except CocoonError as e:
                _still_stopping()
                self.log(f"pool: could not start a {c.name} sandbox: {e}")
                await asyncio.sleep(RETRY_S)
                continue
            if not sb.state.template:  # booted cold: nothing to gain over a start's own
                self.log("pool: no template to clone from; not pooling cold boots")
                await sb.destroy()
                await asyncio.sleep(RETRY_S)
                continue
            try:
                assert sb.channel is not None
                await warm_up(sb.channel, engine_spec=True)
                if sb.state.hub:
                    tag, work = Layout.share_tag(0), sb.dir.path / "warm"
                    await hub_warm_up(sb.channel, Path(sb.state.hub), tag, work)
            except CocoonError as e:
                await asyncio.shield(sb.destroy())
                _still_stopping()
                self.log(f"pool: discarding {sb.id} (its warm-up failed: {e})")
                await asyncio.sleep(RETRY_S)
                continue
            except BaseException:  # stopped mid-warm-up: it is in no list yet
                await asyncio.shield(sb.destroy())
                raise
            sbs.append(sb)

    async def _reap(self) -> None:
        """The VM processes of handed-out sandboxes are still our children: collect their exits."""
        while True:
            await asyncio.sleep(0.5)
            self.handed = [p for p in self.handed if p.poll() is None]

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(TAKE_TIMEOUT_S * 30):
                line = await r.readline()
                req = json.loads(line) if line else {}
                if not isinstance(req, dict):
                    raise ValueError("not an object")
                if "take" in req:
                    await self._hand_out(str(req["take"]), w)
                    return
                if req.get("drain"):
                    self.filling = False
                    n = await self.drain()
                    reply: dict[str, Any] = {"drained": n}
                    if self.once:
                        self._stop.set()
                elif req.get("fill"):
                    self.filling = True
                    self._wake.set()
                    deadline = time.monotonic() + 55
                    while time.monotonic() < deadline and any(
                        len(v) < self.cfg.pool.size for v in self.ready.values()
                    ):
                        await asyncio.sleep(0.1)
                    reply = self._status()
                else:
                    reply = self._status()
                w.write(json.dumps(reply).encode() + b"\n")
                await w.drain()
        except (ValueError, OSError, TimeoutError) as e:
            self.log(f"pool: bad request: {e}")
        finally:
            w.close()

    def _status(self) -> dict[str, Any]:
        return {
            "size": self.cfg.pool.size,
            "filling": self.filling,
            "classes": {k: [sb.id for sb in v] for k, v in self.ready.items()},
        }

    async def _hand_out(self, name: str, w: asyncio.StreamWriter) -> None:
        sbs = self.ready.get(name, [])
        c = next((c for c in classes(self.cfg) if c.name == name), None)
        sock: socket.socket = w.get_extra_info("socket")
        while sbs and c is not None:
            sb = sbs.pop(0)
            self._wake.set()
            self.last_take = time.monotonic()
            why = self._usable(sb, c)
            if why:
                self.log(f"pool: discarding {sb.id} ({why})")
                await sb.destroy()
                continue
            try:
                fds = await sb.let_go()
            except CocoonError as e:
                self.log(f"pool: discarding {sb.id} ({e})")
                await sb.destroy()
                continue
            assert sb.launched is not None  # _usable() saw its VM
            # Ours to reap: QEMU, or a jailed one's tini and its file servers' tinis.
            kids = [sb.backend.child(pid) for pid in sb.launched.processes.values()]
            self.handed += [p for p in kids if p is not None]
            try:
                # asyncio's transport socket has no sendmsg: a plain one on a dup
                # (non-blocking, the flag is shared, but a fresh connection's
                # buffer always has room for one line).
                with socket.socket(fileno=os.dup(sock.fileno())) as plain:
                    socket.send_fds(plain, [json.dumps({"sandbox": sb.id}).encode() + b"\n"],
                                    fds)  # fmt: skip
            except Exception as e:
                # Nobody has it, and a half-taken sandbox is never pooled again: end it.
                self.log(f"pool: hand-out of {sb.id} failed ({e}); destroying it")
                close_fds(fds[1:])
                sb.reclaim(fds[0])
                await sb.destroy()
                return
            close_fds(fds)
            self.log(f"pool: handed out {sb.id}")
            if self.once:
                self.filling = False
                self._stop.set()
            return
        w.write(b'{"sandbox": ""}\n')
        await w.drain()
