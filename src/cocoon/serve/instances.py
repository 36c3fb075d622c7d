"""Warm instances: where invocations run.

An instance serves one version of one function and nothing else, ever. It is
one long-lived container, started through runtime/ exactly as `cocoon run -d`
starts one: the runtime's image (busybox for the shell runtime), the
version's memory and vCPUs as the container's limits (the VM sized from them),
no network, the version's code bound read-only at ``/code``, and an idle init.
With `cocoon pool serve` running on the same state root, the start takes a
pooled sandbox, restored and agent-ready, and the code reaches it through the
sandbox's hub (a bind on the host, no copy, no reboot, no hot-plug). Without
a pool it is a template clone. Faster still, with a pool and
``serve.prewarm``: a blank instance, the runtime's container already started
in a pooled sandbox with an empty /code (serve/prewarm.py), taken by the
version and given its code by a read-only bind on the host over that /code's
hub slot (runtime/latemount.py): no container start on the request's path,
the seeds' "pre-warmed sandbox, code mounted in" (start kind ``prewarmed``).
(``serve.start_path`` switches to the other two starts, to measure them: the
code copied into the container, or a VM booted cold.)

An invocation of a shell function is one process, the handler: the request
body on its stdin, the result from its stdout, its stderr kept as logs.
The instance's shell loop forks it (``ShellSession``, serve/shloop.py: one
exec for the instance's life); without a loop (serve.shell_loop off, or one
that did not start) it is one exec in the instance (runtime.lifecycle.Exec),
`crun exec` in the guest each time. A Python instance runs the runtime's
handler loop (``LoopSession``, images/pyloop.py), and an invocation is a
framed request to it.

One invocation at a time per instance; a version gets up to
``max_concurrency`` instances, then requests wait (at most
``serve.queue_per_function`` of them, else 429). A released instance is warm:
the next invocation of the same version reuses it; one idle past the
version's keep-alive is removed. An invocation past its timeout is killed and
its instance removed with it (whatever the handler left running goes too);
so is an instance whose VM or container died. The caller always gets an
answer.

Instances are started in helper processes (``Launcher``): starting a
container forks its monitor, and a fork from this multi-threaded server (the
event loop, its executor threads, uvicorn's) could copy a lock some other
thread holds; the helpers are single-threaded processes started fresh
(``spawn``) and die with the service (``PR_SET_PDEATHSIG``). Every instance
carries the service's label and is recorded in the database, so a restart
after a crash removes what the dead service left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import json
import logging
import math
import multiprocessing
import os
import signal
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import CocoonError, SandboxError
from cocoon.errors import FunctionBusy as Busy
from cocoon.errors import FunctionGone as Gone
from cocoon.runtime import latemount, pools
from cocoon.runtime import run as runner
from cocoon.runtime.lifecycle import Exec, remove
from cocoon.runtime.records import ContainerDir, ContainerStore
from cocoon.runtime.status import Status
from cocoon.runtime.volumes import VolumeSpec
from cocoon.serve import store as st
from cocoon.serve.prewarm import Blank, Prewarmer, Shape, shape_of
from cocoon.serve.runtimes import RUNTIMES
from cocoon.serve.shloop import HandlerLoop, ShellBroken, ShellSession
from cocoon.serve.store import Store, Version

log = logging.getLogger(__name__)

#: Labels of an instance's container.
SERVICE_LABEL = "io.cocoon.serve"
FUNCTION_LABEL = "io.cocoon.serve.function"
#: A pre-warmed blank's (serve/prewarm.py): the runtime it waits with.
BLANK_LABEL = "io.cocoon.serve.blank"
#: The init of an instance: idle until removed.
IDLE = ["tail", "-f", "/dev/null"]
#: Billing granularity.
BILL_UNIT_MS = 100
#: How long a request may wait for a free instance of its version.
QUEUE_WAIT_S = 300.0


# -- helper processes --------------------------------------------------------


def _worker_init(service: int) -> None:  # pragma: no cover - runs in the helper process
    """A helper dies with the service (no orphan starting containers for
    nobody) and leaves Ctrl-C to it. A service that died before the signal
    was asked for has already left it an orphan: it goes at once."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != service:
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ready() -> None:  # pragma: no cover - runs in the helper process
    """Nothing: importing this module (to find this function) was the work."""


def _launch(cfg: Config, image: str, args: list[str], env: list[str], memory_bytes: int,
            cpus: float, code: str, labels: dict[str, str]) -> str:  # fmt: skip
    """In a helper: one instance's container, as `cocoon run -d` makes it,
    by ``serve.start_path`` (see START_PATHS)."""
    path = cfg.serve.start_path
    net, _ = runner.networking(
        cfg, networks=["none"], rate="", hostname="", dns=[], dns_search=[], add_hosts=[],
        publish=[],
    )  # fmt: skip
    code_volume = [VolumeSpec("bind", "/code", source=Path(code), readonly=True)]
    opts = runner.RunOptions(
        args=args, env=env, workdir="/" if path == "copy" else "/code",
        memory_bytes=memory_bytes, cpus=cpus, labels=labels, detach=True, network=net,
        volumes=[] if path == "copy" else code_volume,
        template=False if path == "cold" else None,
    )  # fmt: skip
    return runner.launch(cfg, image, opts, pull="never", platform=None).id


def _launch_blank(cfg: Config, shape: Shape, empty: str, labels: dict[str, str]) -> tuple[str, str]:
    """In a helper: a pre-warmed blank's container (serve/prewarm.py), and
    the hub slot at its /code. One that did not land in a pooled sandbox is
    removed: without a hub its /code could never receive a mount."""
    net, _ = runner.networking(
        cfg, networks=["none"], rate="", hostname="", dns=[], dns_search=[], add_hosts=[],
        publish=[],
    )  # fmt: skip
    opts = runner.RunOptions(
        args=list(IDLE), env=[], workdir="/code", memory_bytes=shape.memory_mib << 20,
        cpus=float(shape.vcpus), labels=labels, detach=True, network=net,
        volumes=[VolumeSpec("bind", "/code", source=Path(empty), readonly=True)],
    )  # fmt: skip
    cid = runner.launch(cfg, RUNTIMES[shape.runtime].image, opts, pull="never", platform=None).id
    slot = latemount.first_volume_slot(cfg, cid)
    if slot is None:
        remove_container(cfg, cid)
        raise SandboxError("no pooled sandbox was ready (a blank needs one's hub)")
    return cid, str(slot)


def remove_container(cfg: Config, cid: str) -> None:
    """An instance's container, running or not, and its VM (blocking)."""

    store = ContainerStore(cfg)
    cdir = ContainerDir(store.root, cid)
    if not cdir.path.exists():
        return
    try:
        remove(cfg, cdir, force=True)
    except CocoonError as e:
        log.warning("removing instance %s: %s", cid[:12], e)


def containers_of(cfg: Config, service_id: str) -> list[str]:
    """Every container this service started (by its label), live or not."""

    return [d.id for d, c in ContainerStore(cfg).all() if c.labels.get(SERVICE_LABEL) == service_id]


class Launcher:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.cfg.serve.launch_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(os.getpid(),),
        )

    def warm_up(self) -> None:
        """Start the helpers now (each imports runtime/ once), so that the
        first cold start does not wait for an interpreter. Called from the
        event loop's thread (see ``start``)."""
        for _ in range(self.cfg.serve.launch_workers):
            self._pool.submit(_ready)

    async def start(self, *args: Any) -> str:
        """A new instance's container id."""
        cid: str = await self.run(_launch, *args)
        return cid

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(cfg, *args)`` in a helper. Submitted from the event loop's
        thread, which lives as long as the service: a helper's parent-death
        signal follows the thread that made it. A helper that died (killed,
        out of memory) breaks its pool: a new pool, and the call once more."""
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = self._pool
            try:
                return await loop.run_in_executor(pool, fn, self.cfg, *args)
            except BrokenProcessPool:
                if pool is self._pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
                if attempt == 2:
                    raise SandboxError("the helper starting the instance died twice") from None
        raise AssertionError("unreachable")

    async def remove(self, cid: str) -> None:
        await asyncio.to_thread(remove_container, self.cfg, cid)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# -- instances -----------------------------------------------------------------


@dataclass(eq=False)
class VersionPool:
    version: Version
    instances: list[Instance] = field(default_factory=list)
    starting: int = 0
    waiting: int = 0
    retired: bool = False
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)


@dataclass(eq=False)
class Instance:
    cid: str
    version: Version
    #: The pool it belongs to (a removed function's is no longer in ``pools``).
    pool: VersionPool | None = None
    busy: bool = True
    last_used: float = field(default_factory=time.monotonic)
    calls: int = 0
    #: A loop runtime's process (or the shell loop), serving every
    #: invocation of this instance.
    session: LoopSession | ShellSession | None = None


@dataclass
class Outcome:
    status: str
    result: bytes = b""
    logs: bytes = b""
    error: str = ""
    exit_code: int | None = None
    start_kind: str = ""
    instance: str = ""
    #: From the request to an instance ready for it: a cold start's whole
    #: cost (a warm one's is ~0), and any wait in the queue.
    start_ms: float = 0.0
    duration_ms: float = 0.0
    billed_ms: int = 0

    def record(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "result": self.result,
            "logs": self.logs,
            "error": self.error,
            "exit_code": self.exit_code,
            "duration_ms": round(self.duration_ms, 3),
            "billed_ms": self.billed_ms,
            "finished_at": time.time(),
        }


def version_key(v: Version) -> tuple[str, str, int]:
    return (v.namespace, v.name, v.version)


class Instances:
    """Every instance of every version, and the invocations run in them."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        launcher: Launcher,
        service_id: str,
        code_dir: Callable[[Version], Path],
        blank_dir: Path,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.launcher = launcher
        self.service_id = service_id
        self.code_dir = code_dir
        #: An empty directory: a blank's /code until it is taken.
        self.blank_dir = blank_dir
        self.pools: dict[tuple[str, str, int], VersionPool] = {}
        self._removals: set[asyncio.Task[None]] = set()
        self._closed = False
        self.prewarm: Prewarmer | None = None
        self._prewarming: asyncio.Task[None] | None = None
        if cfg.serve.start_path == "mount" and cfg.serve.prewarm > 0:
            self.prewarm = Prewarmer(cfg, self.start_blank, self.pool_ready)

    def start_prewarming(self) -> None:
        if self.prewarm is not None:
            self.blank_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            if any(self.blank_dir.iterdir()):
                log.warning("%s is not empty: no pre-warmed instances", self.blank_dir)
                self.prewarm = None
                return
            loop = asyncio.get_running_loop()
            self._prewarming = loop.create_task(self.prewarm.run(), name="prewarm")

    def want(self, runtime: str) -> None:
        """A function of ``runtime`` exists: keep blanks of it."""
        if self.prewarm is not None:
            self.prewarm.want(runtime)

    def pool_ready(self, shape: Shape) -> bool:
        """Whether a blank of ``shape`` would get a pooled sandbox now (blocking)."""
        opts = runner.RunOptions(memory_bytes=shape.memory_mib << 20, cpus=float(shape.vcpus))
        return pools.has_ready(self.cfg, *runner.vm_size(self.cfg, opts))

    async def start_blank(self, shape: Shape) -> Blank:
        labels = {SERVICE_LABEL: self.service_id, BLANK_LABEL: shape.runtime}
        # Cancelled (the service stops), the helper still finishes the start:
        # the service's sweep after its helpers are done removes it by label.
        cid, slot = await self.launcher.run(_launch_blank, shape, str(self.blank_dir), labels)
        session: LoopSession | ShellSession | None = None
        try:
            if self._shell_loop(shape.runtime):
                session = await self._shell(cid)
            if session is None:
                await self._exec_once(cid)
            if loop := RUNTIMES[shape.runtime].loop:
                argv = [a.replace("{handler}", "-") for a in loop]
                session = await LoopSession.waiting(_cdir(self.cfg, cid), argv, self.cfg)
        except BaseException:
            await asyncio.shield(self.launcher.remove(cid))
            raise
        return Blank(cid, shape, Path(slot), session)

    def _shell_loop(self, runtime: str) -> bool:
        return self.cfg.serve.shell_loop and RUNTIMES[runtime].shell_loop

    async def _shell(self, cid: str) -> ShellSession | None:
        """The shell loop started in a new instance; None if it did not
        start (then each invocation is an exec, the fallback)."""
        try:
            return await ShellSession.start(_cdir(self.cfg, cid), self.cfg, 60.0)
        except (CocoonError, OSError, TimeoutError) as e:
            log.warning("instance %s: no shell loop (%s): an exec per invocation", cid[:12], e)
            return None

    async def _exec_once(self, cid: str) -> None:
        """One exec in a new blank, as an invocation's (stdin in, both outputs
        drained, in /code), of nothing of anyone's: its VM is a fresh QEMU
        whose TCG has translated none of the guest's exec path yet, and the
        first exec in a container pays that (~35 ms here). Paid now, not by
        the first call."""
        argv = ["/bin/sh", "-c", "cat >/dev/null"]
        ex = await Exec.start(_cdir(self.cfg, cid), argv, env=[], workdir="/code")
        out = _Output(1 << 10, 1 << 10)
        try:
            exited = await asyncio.wait_for(_io(ex, b"", out), 60)
        finally:
            with contextlib.suppress(CocoonError, OSError):
                await ex.close()
        if exited.exit_code != 0:
            raise SandboxError(f"a blank's first exec exited with {exited.exit_code}")

    # -- instances ---------------------------------------------------------------

    def _pool(self, v: Version) -> VersionPool:
        key = version_key(v)
        if key not in self.pools:
            self.pools[key] = VersionPool(v)
        return self.pools[key]

    async def acquire(self, v: Version) -> tuple[Instance, str]:
        """A free instance of ``v`` (warm), or a new one (cold) while under its
        max concurrency; else wait for one (Busy past the queue's bound)."""
        pool = self._pool(v)
        deadline = time.monotonic() + QUEUE_WAIT_S
        async with pool.cond:
            while True:
                if pool.retired or self._closed:
                    raise Gone(f"function {v.name} was removed")
                idle = next((i for i in pool.instances if not i.busy), None)
                if idle is not None:
                    idle.busy = True
                    return idle, "warm"
                if len(pool.instances) + pool.starting < v.spec["max_concurrency"]:
                    pool.starting += 1
                    break
                if pool.waiting >= self.cfg.serve.queue_per_function:
                    raise Busy(
                        f"function {v.name}: all {v.spec['max_concurrency']} instances are busy "
                        f"and {pool.waiting} requests wait already; try again later"
                    )
                pool.waiting += 1
                try:
                    await asyncio.wait_for(pool.cond.wait(), deadline - time.monotonic())
                except TimeoutError:
                    raise Busy(f"function {v.name}: no instance became free in time") from None
                finally:
                    pool.waiting -= 1
        try:
            cid, session, kind = await self._start(v)
        except BaseException:
            async with pool.cond:
                pool.starting -= 1
                pool.cond.notify()
            raise
        inst = Instance(cid, v, pool, session=session)
        async with pool.cond:
            pool.starting -= 1
            if pool.retired or self._closed:
                self._remove_later(inst)
                raise Gone(f"function {v.name} was removed")
            pool.instances.append(inst)
        return inst, kind

    async def _start(self, v: Version) -> tuple[str, LoopSession | ShellSession | None, str]:
        """A new instance of ``v``: (its container, its loop session, its start kind)."""
        blank = await self._take_blank(v)
        if blank is not None and blank.session is None:
            return blank.cid, await self._begin(blank.cid, v, shell=False), st.PREWARMED
        if blank is not None:
            session: LoopSession | ShellSession = blank.session
            spec = v.spec
            try:
                if isinstance(session, ShellSession):
                    await session.begin(RUNTIMES[spec["runtime"]].argv(spec["handler"]),
                                        base_env(v))  # fmt: skip
                else:
                    await session.begin(spec["handler"], base_env(v), max(30.0, spec["timeout_s"]))
            except BaseException:
                self._remove_later(Instance(blank.cid, v))
                raise
            return blank.cid, session, st.PREWARMED
        self.want(v.spec["runtime"])
        spec = v.spec
        runtime = RUNTIMES[spec["runtime"]]
        labels = {
            SERVICE_LABEL: self.service_id,
            FUNCTION_LABEL: f"{v.namespace}/{v.name}@{v.version}",
        }
        launch = asyncio.ensure_future(self.launcher.start(
            runtime.image, list(IDLE), base_env(v), spec["memory_mib"] << 20,
            float(spec["vcpus"]), str(self.code_dir(v)), labels,
        ))  # fmt: skip
        try:
            cid = await asyncio.shield(launch)
        except asyncio.CancelledError:
            # The request went away (or the service stops): the helper still
            # finishes the start, and its instance is removed then.
            def drop(f: asyncio.Future[str]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self._remove_later(Instance(f.result(), v))

            launch.add_done_callback(drop)
            raise
        self.store.add_instance(cid, v, durable=False)
        return cid, await self._begin(cid, v), st.COLD

    async def _take_blank(self, v: Version) -> Blank | None:
        """A pre-warmed blank with ``v``'s code bound at its /code, now
        ``v``'s for good (None = none to be had). One whose container died
        while it waited is removed, and the next one tried."""
        while self.prewarm is not None and (blank := self.prewarm.take(shape_of(v.spec))):
            self.store.add_instance(blank.cid, v, durable=False)
            try:
                if _cdir(self.cfg, blank.cid).status() != Status.RUNNING:
                    raise SandboxError("its container is no longer running")
                await asyncio.to_thread(latemount.cover, blank.slot, self.code_dir(v))
            except (CocoonError, OSError) as e:
                log.warning("pre-warmed instance %s: %s; removed", blank.cid[:12], e)
                self._remove_later(Instance(blank.cid, v, session=blank.session))
                continue
            except BaseException:  # the request went away: the instance with it
                self._remove_later(Instance(blank.cid, v, session=blank.session))
                raise
            return blank
        return None

    async def _begin(
        self, cid: str, v: Version, *, shell: bool = True
    ) -> LoopSession | ShellSession | None:
        """A new instance's code in place (copied, for the copy path) and
        its handler loop started (for a loop runtime; the shell loop unless
        not ``shell``); the instance is removed if either fails."""
        spec = v.spec
        runtime = RUNTIMES[spec["runtime"]]
        session: LoopSession | ShellSession | None = None
        try:
            if self.cfg.serve.start_path == "copy":
                await self._copy_code(cid, self.code_dir(v))
            if runtime.loop:
                session = await LoopSession.start(
                    _cdir(self.cfg, cid), runtime.argv(spec["handler"], loop=True),
                    base_env(v), self.cfg, max(30.0, spec["timeout_s"]),
                )  # fmt: skip
            elif shell and self._shell_loop(spec["runtime"]):
                session = await self._shell(cid)
                if session is not None:
                    await session.begin(runtime.argv(spec["handler"]), base_env(v))
        except BaseException:
            self._remove_later(Instance(cid, v))
            raise
        return session

    async def _copy_code(self, cid: str, code: Path) -> None:
        """The "pre-warmed + copy" start: the code copied into the container
        (its overlay, in guest memory) by a tar over an exec's stdin."""
        data = await asyncio.to_thread(_tar_of, code, self.cfg.serve.max_unpacked_bytes)
        argv = ["/bin/sh", "-c", "mkdir -p /code && tar -xf - -C /code"]
        ex = await Exec.start(_cdir(self.cfg, cid), argv, env=[])
        try:
            await ex.process.write_stdin(data, close=True)
            _, err = await asyncio.wait_for(ex.process.output(1 << 16), 120)
            exited = await ex.process.wait()
        finally:
            with contextlib.suppress(CocoonError, OSError):
                await ex.close()
        if exited.exit_code != 0:
            text = err.decode(errors="replace")[:200]
            raise SandboxError(f"copying the code in failed ({exited.exit_code}): {text}")

    async def release(self, inst: Instance, healthy: bool) -> None:
        pool = inst.pool or self._pool(inst.version)
        async with pool.cond:
            inst.busy = False
            inst.last_used = time.monotonic()
            if not healthy or pool.retired or self._closed:
                if inst in pool.instances:
                    pool.instances.remove(inst)
                self._remove_later(inst)
            pool.cond.notify()

    async def _drop_blank(self, b: Blank) -> None:
        if b.session is not None:
            await b.session.close()
        await self.launcher.remove(b.cid)

    def _remove_later(self, inst: Instance) -> None:
        async def remove() -> None:
            if inst.session is not None:
                await inst.session.close()
            await self.launcher.remove(inst.cid)
            self.store.remove_instance(inst.cid)

        t = asyncio.get_running_loop().create_task(remove(), name=f"remove {inst.cid[:12]}")
        self._removals.add(t)
        t.add_done_callback(self._removals.discard)

    async def retire(self, namespace: str, name: str) -> None:
        """A removed function: its idle instances go now, busy ones when released."""
        for key, pool in list(self.pools.items()):
            if key[:2] != (namespace, name):
                continue
            async with pool.cond:
                pool.retired = True
                for inst in [i for i in pool.instances if not i.busy]:
                    pool.instances.remove(inst)
                    self._remove_later(inst)
                pool.cond.notify_all()
            del self.pools[key]

    async def reap_idle(self) -> None:
        """Instances idle past their version's keep-alive are removed (each second)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for key, pool in list(self.pools.items()):
                keep = pool.version.spec["keep_alive_s"]
                async with pool.cond:
                    for inst in [i for i in pool.instances if not i.busy]:
                        if now - inst.last_used >= keep:
                            pool.instances.remove(inst)
                            self._remove_later(inst)
                    if not pool.instances and not pool.starting and not pool.waiting:
                        del self.pools[key]

    def live(self) -> list[Instance]:
        return [i for p in self.pools.values() for i in p.instances]

    async def close(self) -> None:
        """Every instance removed (busy ones too: their invocations were
        cancelled), and every blank."""
        self._closed = True
        if self._prewarming is not None:
            self._prewarming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prewarming
        if self.prewarm is not None:
            for b in self.prewarm.drain():
                t = asyncio.get_running_loop().create_task(self._drop_blank(b))
                self._removals.add(t)
                t.add_done_callback(self._removals.discard)
        for pool in self.pools.values():
            for inst in pool.instances:
                self._remove_later(inst)
            pool.instances.clear()
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    # -- invocations -------------------------------------------------------------

    async def invoke(
        self, v: Version, payload: bytes, iid: str, env: list[str] | None = None
    ) -> Outcome:
        """Run one invocation to its end; never raises but Busy/Gone (no
        instance could be had) and cancellation."""
        t0 = time.monotonic()
        inst, kind = await self.acquire(v)
        start_ms = (time.monotonic() - t0) * 1000
        self.store.update_invocation(
            iid, status=st.RUNNING, start_kind=kind, instance=inst.cid, started_at=time.time(),
            start_ms=round(start_ms, 3), durable=False,
        )  # fmt: skip
        healthy = False
        try:
            out, healthy = await self._run(inst, payload, iid, env or [])
        except CocoonError as e:
            out = Outcome(st.FAILED, error=f"the instance failed: {e}")
        finally:
            inst.calls += 1
            await asyncio.shield(self.release(inst, healthy))
        out.start_kind, out.instance, out.start_ms = kind, inst.cid, start_ms
        return out

    async def _run(
        self, inst: Instance, payload: bytes, iid: str, extra: list[str]
    ) -> tuple[Outcome, bool]:
        v = inst.version
        spec = v.spec
        if isinstance(inst.session, LoopSession):
            return await self._call(inst, inst.session, payload, iid, extra)
        if isinstance(inst.session, ShellSession):
            return await self._shell_call(inst, inst.session, payload, iid, extra)
        env = [*base_env(v), *extra, f"COCOON_FN_INVOCATION_ID={iid}"]
        argv = RUNTIMES[spec["runtime"]].argv(spec["handler"])
        t0 = time.monotonic()
        ex = await Exec.start(_cdir(self.cfg, inst.cid), argv, env=env, workdir="/code")
        out = _Output(self.cfg.serve.max_result_bytes, self.cfg.serve.max_log_bytes)
        exited: Any = None
        try:
            try:
                exited = await asyncio.wait_for(_io(ex, payload, out), spec["timeout_s"])
            except TimeoutError:
                with contextlib.suppress(CocoonError, OSError, TimeoutError):
                    await asyncio.wait_for(ex.process.signal(signal.SIGKILL), 5.0)
        finally:
            with contextlib.suppress(CocoonError, OSError):
                await ex.close()
        ms = (time.monotonic() - t0) * 1000
        if exited is None:
            return _timed_out(spec, out, ms), False
        return _ended(spec, out, ms, exited.exit_code, exited.oom_killed)

    async def _shell_call(
        self, inst: Instance, session: ShellSession, payload: bytes, iid: str, extra: list[str]
    ) -> tuple[Outcome, bool]:
        """One invocation through the instance's shell loop: the same
        outcomes as an exec's (the loop reports the handler's exit and OOM
        kill as the agent reports an exec's)."""
        spec = inst.version.spec
        out = _Output(self.cfg.serve.max_result_bytes, self.cfg.serve.max_log_bytes)
        out.add_err(session.take_stray())
        env = [*extra, f"COCOON_FN_INVOCATION_ID={iid}"]
        t0 = time.monotonic()
        try:
            res = await asyncio.wait_for(
                session.call(env, payload, out.add_out, out.add_err), spec["timeout_s"]
            )
        except TimeoutError:
            await session.kill()
            return _timed_out(spec, out, (time.monotonic() - t0) * 1000), False
        except ShellBroken as e:
            # The loop died (out of memory, killed by its handler) or broke its output.
            exited = await session.exited()
            ms = (time.monotonic() - t0) * 1000
            if exited is not None and exited.oom_killed:
                err = f"out of memory: killed at its {spec['memory_mib']} MiB limit"
            elif exited is not None:
                err = f"the shell loop exited with code {exited.exit_code}"
            else:
                err = f"the shell loop broke off: {e}"
            return Outcome(st.FAILED, error=err, logs=out.logs(), duration_ms=ms,
                           billed_ms=_billed(ms)), False  # fmt: skip
        ms = (time.monotonic() - t0) * 1000
        return _ended(spec, out, ms, res.exit_code, res.oom_killed)

    async def _call(
        self, inst: Instance, session: LoopSession, payload: bytes, iid: str, extra: list[str]
    ) -> tuple[Outcome, bool]:
        """One invocation through the instance's handler loop."""
        spec = inst.version.spec
        env = dict(e.partition("=")[::2] for e in [*extra, f"COCOON_FN_INVOCATION_ID={iid}"])
        t0 = time.monotonic()
        try:
            ok, error, result, logs = await asyncio.wait_for(
                session.call(env, payload), spec["timeout_s"]
            )
        except TimeoutError:
            await session.kill()
            ms = (time.monotonic() - t0) * 1000
            err = f"timed out after {spec['timeout_s']:g} s: killed"
            return Outcome(st.TIMEOUT, error=err, logs=session.take_stray(), duration_ms=ms,
                           billed_ms=_billed(ms)), False  # fmt: skip
        except (EOFError, ValueError, KeyError, TypeError, CocoonError) as e:
            # The loop died (out of memory, os._exit, a crash) or broke its frames.
            exited = await session.exited()
            ms = (time.monotonic() - t0) * 1000
            common: dict[str, Any] = {"logs": session.take_stray(), "duration_ms": ms,
                                      "billed_ms": _billed(ms)}  # fmt: skip
            if exited is not None and exited.oom_killed:
                err = f"out of memory: killed at its {spec['memory_mib']} MiB limit"
            elif exited is not None:
                err = f"the runtime exited with code {exited.exit_code}"
                common["exit_code"] = exited.exit_code
            else:
                err = f"the runtime broke off: {e or e.__class__.__name__}"
            return Outcome(st.FAILED, error=err, **common), False
        ms = (time.monotonic() - t0) * 1000
        common = {"logs": logs, "duration_ms": ms, "billed_ms": _billed(ms)}
        if not ok:
            return Outcome(st.FAILED, result=result, error=f"the handler raised {error}",
                           exit_code=1, **common), True  # fmt: skip
        return Outcome(st.SUCCEEDED, result=result, exit_code=0, **common), True


def _billed(ms: float) -> int:
    return math.ceil(ms / BILL_UNIT_MS) * BILL_UNIT_MS


def _timed_out(spec: dict[str, Any], out: _Output, ms: float) -> Outcome:
    err = f"timed out after {spec['timeout_s']:g} s: killed"
    return Outcome(st.TIMEOUT, result=out.result(), error=err, logs=out.logs(), duration_ms=ms,
                   billed_ms=_billed(ms))  # fmt: skip


def _ended(
    spec: dict[str, Any], out: _Output, ms: float, exit_code: int, oom_killed: bool
) -> tuple[Outcome, bool]:
    """A handler process's end as the invocation's outcome, and whether its
    instance may serve again."""
    common: dict[str, Any] = {"logs": out.logs(), "duration_ms": ms, "billed_ms": _billed(ms),
                              "exit_code": exit_code}  # fmt: skip
    if oom_killed:
        err = f"out of memory: killed at its {spec['memory_mib']} MiB limit"
        return Outcome(st.FAILED, error=err, **common), False
    if out.result_over:
        err = f"the result is over {out.max_result} B (serve.max_result_bytes)"
        return Outcome(st.FAILED, error=err, **common), True
    if exit_code != 0:
        err = f"the handler exited with code {exit_code}"
        return Outcome(st.FAILED, result=out.result(), error=err, **common), True
    return Outcome(st.SUCCEEDED, result=out.result(), **common), True


class LoopSession(HandlerLoop):
    """A loop runtime's process in one instance (images/pyloop.py): started
    with the instance, it imports the handler once, then answers framed
    requests on its stdin with framed answers on its stdout. Its stderr
    (what escapes the handler's redirected prints: its children's output)
    is drained all along and given to the invocation it came during.

    Everything it writes is untrusted: frames are bounded (the result by
    serve.max_result_bytes, the rest by serve.max_log_bytes), a header must
    be a JSON object, and any violation ends the instance."""

    def __init__(self, ex: Exec, cfg: Config) -> None:
        self.ex = ex
        self.max_result = cfg.serve.max_result_bytes
        self.max_logs = cfg.serve.max_log_bytes
        self._buf = bytearray()
        self._stray = bytearray()
        self._drain = asyncio.get_running_loop().create_task(self._drain_stderr())

    @classmethod
    async def start(
        cls, cdir: ContainerDir, argv: list[str], env: list[str], cfg: Config, timeout_s: float
    ) -> LoopSession:
        ex = await Exec.start(cdir, argv, env=env, workdir="/code")
        session = cls(ex, cfg)
        await session._ready(timeout_s)
        return session

    @classmethod
    async def waiting(cls, cdir: ContainerDir, argv: list[str], cfg: Config) -> LoopSession:
        """A loop started with no handler yet (``-``: a pre-warmed blank's),
        its interpreter up and waiting for ``begin``."""
        ex = await Exec.start(cdir, argv, env=[], workdir="/code")
        return cls(ex, cfg)

    async def begin(self, handler: str, env: list[str], timeout_s: float) -> None:
        """A waiting loop's handler, and the version's environment, once its
        code is in place; then it imports the handler and says ready."""
        first = {"handler": handler, "env": dict(e.partition("=")[::2] for e in env)}
        data = json.dumps(first).encode()
        try:
            await self.ex.process.write_stdin(len(data).to_bytes(4, "big") + data, close=False)
        except BaseException:
            await self.close()
            raise
        await self._ready(timeout_s)

    async def _ready(self, timeout_s: float) -> None:
        """The loop's first answer: ready, or why not (then it is closed)."""
        try:
            hello = await asyncio.wait_for(self._header(), timeout_s)
            if hello.get("ready") is not True:
                lines = str(hello.get("error", "")).strip().splitlines() or ["?"]
                raise SandboxError(f"the handler could not be loaded: {lines[-1][:500]}")
        except (EOFError, ValueError, TimeoutError) as e:
            await self.close()
            raise SandboxError(f"the runtime did not start: {e or e.__class__.__name__}") from None
        except BaseException:
            await self.close()
            raise

    async def _drain_stderr(self) -> None:
        stream = self.ex.process.stderr
        if stream is None:
            return
        with contextlib.suppress(CocoonError, ConnectionError):
            while chunk := await stream.read():
                room = self.max_logs - len(self._stray)
                if room > 0:
                    self._stray += chunk[:room]

    def take_stray(self) -> bytes:
        out = bytes(self._stray)
        self._stray.clear()
        return out

    async def _exact(self, n: int) -> bytes:
        stream = self.ex.process.stdout
        assert stream is not None
        while len(self._buf) < n:
            chunk = await stream.read()
            if not chunk:
                raise EOFError("the runtime's output ended")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _frame(self, cap: int) -> bytes:
        n = int.from_bytes(await self._exact(4), "big")
        if n > cap:
            raise ValueError(f"a frame of {n} B from the runtime, over {cap}")
        return await self._exact(n)

    async def _header(self) -> dict[str, Any]:
        header = json.loads(await self._frame(1 << 20))
        if not isinstance(header, dict):
            raise ValueError("the runtime's header is not an object")
        return header

    async def call(self, env: dict[str, str], payload: bytes) -> tuple[bool, str, bytes, bytes]:
        """(ok, error, result, logs) of one invocation."""
        head = json.dumps({"env": env}).encode()
        frames = b"".join(len(x).to_bytes(4, "big") + x for x in (head, payload))
        await self.ex.process.write_stdin(frames, close=False)
        header = await self._header()
        result = await self._frame(self.max_result)
        logs = await self._frame(self.max_logs) + self.take_stray()
        return bool(header["ok"]), str(header.get("error", ""))[:1000], result, logs

    async def close(self) -> None:
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain
        with contextlib.suppress(CocoonError, OSError):
            await self.ex.close()


class _Output:
    """What a handler wrote, bounded, kept as it arrives (so a handler that
    is killed still has its output up to then)."""

    def __init__(self, max_result: int, max_logs: int) -> None:
        self.max_result = max_result
        self.max_logs = max_logs
        self.out = bytearray()
        self.err = bytearray()
        self.result_over = False
        self.logs_over = False

    def add_out(self, chunk: bytes) -> None:
        if len(self.out) + len(chunk) > self.max_result:
            self.result_over = True
        if len(self.out) <= self.max_result:
            self.out += chunk[: self.max_result + 1 - len(self.out)]

    def add_err(self, chunk: bytes) -> None:
        if len(self.err) + len(chunk) > self.max_logs:
            self.logs_over = True
        if len(self.err) <= self.max_logs:
            self.err += chunk[: self.max_logs + 1 - len(self.err)]

    def result(self) -> bytes:
        return bytes(self.out[: self.max_result])

    def logs(self) -> bytes:
        tail = b"\n[logs cut at serve.max_log_bytes]\n" if self.logs_over else b""
        return bytes(self.err[: self.max_logs]) + tail


async def _io(ex: Exec, payload: bytes, out: _Output) -> Any:
    """Body in, stdout and stderr out, then the exit (ProcessExited)."""
    proc = ex.process

    async def feed() -> None:
        # A handler that exits without reading its input is no error.
        with contextlib.suppress(CocoonError, ConnectionError):
            await proc.write_stdin(payload, close=True)

    async def drain(stream: Any, add: Callable[[bytes], None]) -> None:
        while chunk := await stream.read():
            add(chunk)

    await asyncio.gather(feed(), drain(proc.stdout, out.add_out), drain(proc.stderr, out.add_err))
    return await proc.wait()


def _tar_of(tree: Path, cap: int) -> bytes:
    """``tree`` as a tar (links as links), at most ``cap`` bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for child in sorted(tree.iterdir()):
            tf.add(child, arcname=child.name)
            if buf.tell() > cap:
                raise SandboxError(f"the code is over {cap} B to copy")
    return buf.getvalue()


def _cdir(cfg: Config, cid: str) -> ContainerDir:
    return ContainerDir(ContainerStore(cfg).root, cid)


def base_env(v: Version) -> list[str]:
    env = [f"{k}={val}" for k, val in sorted(v.spec.get("env", {}).items())]
    return [
        *env,
        f"COCOON_FN_NAMESPACE={v.namespace}",
        f"COCOON_FN_NAME={v.name}",
        f"COCOON_FN_VERSION={v.version}",
        f"COCOON_FN_MEMORY_MIB={v.spec['memory_mib']}",
        f"COCOON_FN_TIMEOUT_S={v.spec['timeout_s']}",
    ]
