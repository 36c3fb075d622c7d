"""A container monitor's supervisor: the one owner of the sandbox (the VM) and
of the status of every container in it.

It boots the VM and creates the container, starts it as the launch plan says,
creates a pod's further containers in the same VM, and carries out what the
control endpoint (runtime.endpoint) asks, every request checked against the
status table (runtime.status) and every change of status made by it. It waits
for each container's end, records how it ended and answers whoever waits for
it; the first container's end is the VM's. Output goes through
runtime.fanout; every task it starts belongs to the monitor's one owner
(runtime.monitor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cocoon import log as cocoon_log
from cocoon.config import Config
from cocoon.errors import (
    CocoonError,
    GuestError,
    IllegalTransition,
    NetworkError,
    SandboxError,
    error_line,
)
from cocoon.hypervisor.base import Disk, Share
from cocoon.network import NetworkPlan
from cocoon.network.ports import PortSpec, Publisher
from cocoon.protocol import ids, messages
from cocoon.protocol.errors import RemoteError
from cocoon.protocol.session import InStream, OutStream
from cocoon.runtime import fanout, hostcgroup
from cocoon.runtime.fanout import Fanout
from cocoon.runtime.logs import CriLogWriter
from cocoon.runtime.records import CONTAINER_ID, ContainerConfig, ContainerDir, ContainerState
from cocoon.runtime.status import Op, allows, check
from cocoon.sandbox.admission import start_slot
from cocoon.sandbox.process import Process
from cocoon.sandbox.sandbox import Sandbox
from cocoon.sandbox.spec import SandboxSpec
from cocoon.storage.scratch import ScratchDisk
from cocoon.util.tasks import TaskSet

#: The monitor's log names one logger, whichever of its modules writes.
log = logging.getLogger("cocoon.runtime.monitor")

#: An attached `cocoon run` connects right after the ready line; if it never
#: does (killed meanwhile), the container starts anyway, like docker's.
ATTACH_WAIT_S = 30.0
#: How long a container that was deleted before it exited gets to die.
KILL_WAIT_S = 10.0

#: How the container is started once created: at the first client's Attach
#: (an attached `cocoon run`), at once (`run -d`), or on a StartContainer
#: request (`cocoon-runtime start`).
START_MODES = ("attach", "now", "request")


@dataclass
class LaunchPlan:
    """What a monitor is forked to do (runtime.monitor.spawn)."""

    cfg: Config
    cdir: ContainerDir
    config: ContainerConfig
    #: Mounts what the container needs in the booted guest; returns its rootfs path.
    setup: Callable[[Sandbox], Awaitable[str]]
    disks: list[Disk] = field(default_factory=list)
    shares: list[Share] = field(default_factory=list)
    scratch: list[ScratchDisk] = field(default_factory=list)
    start: str = "attach"
    rows: int = 24
    cols: int = 80
    log_max_bytes: int = 10 << 20  # 0: no log (the OCI runtime's caller keeps it)
    log_max_files: int = 3
    #: Added to the sandbox's own (what made it: a bundle's path).
    annotations: dict[str, str] = field(default_factory=dict)
    #: None: no NIC, no network files (an OCI caller without a netns path).
    network: NetworkPlan | None = None
    publish: list[PortSpec] = field(default_factory=list)
    #: Start from a VM template: None = as configured (sandbox.templates).
    template: bool | None = None
    #: The host cgroup the monitor and the VM's processes live in (a pod's:
    #: runtime.hostcgroup); "" for none.
    host_cgroup: str = ""


class ReadyPipe:
    """The pipe to whoever forked the monitor: warnings while the container
    starts, then one line, ``ready`` or its ``error``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def warn(self, text: str) -> None:
        """A warning for whoever started us (and our log)."""
        log.warning(text)
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.fd, ("warn " + text.replace("\n", " ")[:4000] + "\n").encode())

    def report(self, line: str) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, (line.replace("\n", " ")[:4000] + "\n").encode())
            os.close(self.fd)
        self.fd = -1


class Member:
    """One container of the sandbox, as its monitor tracks it: the first is the
    one the monitor was started for; a pod's further containers join later.
    Each has its own record dir (state.json, life lock) and control socket."""

    def __init__(
        self, cdir: ContainerDir, config: ContainerConfig, guest_id: str, log: CriLogWriter | None
    ) -> None:
        self.cdir = cdir
        self.config = config
        self.guest_id = guest_id
        self.state = ContainerState(monitor_pid=os.getpid())
        self.proc: Process | None = None
        self.output = Fanout(log)
        self.attached = asyncio.Event()
        self.exited: asyncio.Future[messages.ProcessExited] = (
            asyncio.get_running_loop().create_future()
        )
        self.started = False
        self.pumps: list[asyncio.Task[None]] = []
        self.shutdown_requested = asyncio.Event()

    def write_state(self) -> None:
        with contextlib.suppress(OSError):
            self.cdir.write_state(self.state)


class Endpoint(Protocol):
    """What the supervisor needs of whoever serves its containers' control
    sockets (runtime.endpoint): its cut is here so that the supervisor holds
    no client and the endpoint no container."""

    async def open(self, m: Member) -> None:
        """Serve ``m``'s control socket."""

    def close(self, m: Member) -> None:
        """Stop serving ``m``'s control socket."""

    async def let_clients_go(self) -> None:
        """Give the clients a moment to collect an exit, then drop them."""


class Supervisor:
    def __init__(self, plan: LaunchPlan, ready: ReadyPipe, tasks: TaskSet) -> None:
        self.plan = plan
        self.ready = ready
        self.tasks = tasks
        self.endpoint: Endpoint | None = None
        self.sb: Sandbox | None = None
        self.publisher = Publisher()
        self.members: dict[str, Member] = {}
        self.execs: dict[tuple[str, str], Process] = {}

    @property
    def main(self) -> Member:
        return self.members[CONTAINER_ID]

    def _endpoint(self) -> Endpoint:
        assert self.endpoint is not None
        return self.endpoint

    async def run(self) -> int:
        """The container's life, from the VM's boot to its teardown: 0, or 1
        when it could not be started (its error went to the ready pipe)."""
        plan = self.plan
        log_writer = (
            CriLogWriter(
                plan.cdir.log_path, max_bytes=plan.log_max_bytes, max_files=plan.log_max_files
            )
            if plan.log_max_bytes
            else None
        )
        m = Member(plan.cdir, plan.config, CONTAINER_ID, log_writer)
        self.members[CONTAINER_ID] = m
        if not m.cdir.life.take():
            self.ready.report(f"error container {m.config.id[:12]} already has a monitor")
            return 1
        m.write_state()
        try:
            # One of the host's start slots from the VM's start to the
            # container's (or, for `cocoon-runtime create`, to its creation).
            async with start_slot(plan.cfg):
                await self._boot()
                await self._endpoint().open(m)
                if plan.start == "attach":
                    self.ready.report("ready")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(ATTACH_WAIT_S):
                            await m.attached.wait()
                    await self.start(m)
                elif plan.start == "now":
                    await self.start(m)
                    self.ready.report("ready")
                else:
                    self.ready.report("ready")  # `start` comes as a request, whenever it comes
        except (CocoonError, OSError) as e:
            log.error(f"start failed: {e}")
            await self._fail_start(e)
            return 1
        except BaseException:
            log.exception("internal error while starting the container")
            why = "internal error in the container monitor (see monitor.log)"
            await self._fail_start(SandboxError(why))
            raise
        await self._supervise(m)
        return 0

    def _close(self, m: Member) -> None:
        """Stop serving a member and let go of its life lock: it is not running."""
        self._endpoint().close(m)
        m.cdir.life.release()

    async def _fail_start(self, e: BaseException) -> None:
        """Nothing is kept of a container that never started; an attached
        client already waiting hears the reason instead of a dropped line."""
        self.ready.report(error_line(e))
        m = self.main
        if not m.exited.done():
            m.exited.set_exception(RemoteError("start_failed", str(e)))
            m.exited.exception()  # retrieved here; clients get it via shield
        await self._teardown()
        with contextlib.suppress(OSError):
            m.output.close_log()
        shutil.rmtree(m.cdir.path, ignore_errors=True)
        await self._endpoint().let_clients_go()
        self._close(m)

    async def _boot(self) -> None:
        m, cfg = self.main, self.plan.cfg
        c = m.config
        joining = None
        if rel := self.plan.host_cgroup:  # what this process starts is born there (Sandbox.create)
            joining = asyncio.ensure_future(asyncio.to_thread(hostcgroup.enter, rel))
        self.sb = await Sandbox.create(
            cfg,
            SandboxSpec(
                sandbox_id=c.sandbox_id,
                vcpus=c.vcpus,
                memory_mib=c.vm_memory_mib or None,
                disks=self.plan.disks,
                shares=self.plan.shares,
                scratch=self.plan.scratch,
                annotations={
                    "cocoon.container": c.id,
                    "cocoon.container.name": c.name,
                    **self.plan.annotations,
                },
                network=self.plan.network,
                template=self.plan.template,
                host_cgroup=self.plan.host_cgroup,
            ),
            warn=self.ready.warn,
            host_join=joining,
        )
        m.state.addresses = list(self.sb.addresses)
        if self.plan.publish:
            ips = [a.split("/")[0] for a in self.sb.addresses if "." in a.split("/")[0]]
            if not ips:
                raise NetworkError(
                    "-p needs an IPv4 address on the container: use --network bridge"
                )
            await self.publisher.publish(self.plan.publish, ips[0])
            m.state.ports = [str(p) for p in self.publisher.bound]
        m.state.boot_s = self.sb.boot_s or 0.0
        m.state.accel = self.sb.state.accel
        m.state.template = self.sb.state.template
        m.state.jail_uid = self.sb.state.jail_uid
        m.state.sandbox_id = self.sb.id
        how = f"from template {m.state.template}" if m.state.template else "cold"
        log.info(f"sandbox {self.sb.id} up in {m.state.boot_s:.2f} s ({how}, {m.state.accel})")
        rootfs = await self.plan.setup(self.sb)
        m.proc = await self.sb.create_container(
            CONTAINER_ID,
            rootfs,
            c.spec,
            stdin=c.stdin,
            tty=c.tty,
            rows=self.plan.rows,
            cols=self.plan.cols,
        )
        m.state.pid = m.proc.pid
        m.write_state()

    # -- requests (the control endpoint's calls) --------------------------------

    def _sandbox(self) -> Sandbox:
        assert self.sb is not None
        return self.sb

    async def add(self, record_dir: str, guest_id: str, rootfs: str, tty: bool) -> None:
        """A pod's further container, created in this VM (Baidu's "start the pod
        first, insert the container later"); it gets its own control socket."""
        sb = self._sandbox()
        main_dir = self.main.cdir
        cid = Path(record_dir).name
        if Path(record_dir) != main_dir.path.parent / cid or guest_id in self.members:
            raise RemoteError("invalid", "not a container of this runtime, or taken")
        cdir = ContainerDir(main_dir.path.parent, cid, ids.OCI_RECORD_DIR)
        config = cdir.config()
        m = Member(cdir, config, guest_id, None)
        if not cdir.life.take():
            raise RemoteError("exists", f"container {cid} already has a monitor")
        try:
            m.proc = await sb.create_container(guest_id, rootfs, config.spec, stdin=True, tty=tty)
        except BaseException:
            cdir.life.release()
            raise
        m.state.pid = m.proc.pid
        m.state.accel = self.main.state.accel
        m.write_state()
        self.members[guest_id] = m
        await self._endpoint().open(m)
        self.tasks.spawn(self._supervise(m), f"supervising container {cid}")

    async def start(self, m: Member) -> None:
        sb = self._sandbox()
        assert m.proc is not None
        running = check(m.state.status, Op.START)
        if m.started:  # one start per container, even one that failed
            raise IllegalTransition(f"the container is {m.state.status}", m.state.status, Op.START)
        m.started = True
        # Output is pumped from before the start: nothing the process prints is lost.
        m.pumps = [self._pump(m, s) for s in fanout.STREAMS]
        await sb.start_container(m.guest_id)
        m.state.status = running
        m.state.started_at = time.time()
        m.write_state()
        log.info(f"container {m.config.id[:12]} started")

    def _pump(self, m: Member, stream: str) -> asyncio.Task[None]:
        assert m.proc is not None
        src = m.proc.stdout if stream == "stdout" else m.proc.stderr
        return self.tasks.spawn(self._pumped(m, stream, src), f"{stream} of {m.config.id[:12]}")

    async def _pumped(self, m: Member, stream: str, src: InStream | None) -> None:
        if src is not None:
            await m.output.pump(stream, src, self._release)

    def _release(self, src: InStream) -> None:
        """A process's output stream that ended: the agent channel forgets it."""
        if self.sb is not None and self.sb.channel is not None:
            self.sb.channel.session.close_in(src.chan)

    async def attach(
        self,
        m: Member,
        *,
        outs: dict[str, OutStream],
        stdin: Callable[[], InStream] | None,
        rows: int,
        cols: int,
        bound: Awaitable[Any] | None,
    ) -> int:
        """A client's copy of the init's output from now on (``outs``, by
        stream), its stdin to the init; the init's pid.

        ``bound``: the client stands for the init on the host (cocoon-runtime's
        stand-in), and when it ends while the container lives, the container is
        killed.
        """
        assert m.proc is not None and self.sb is not None
        if bound is not None:
            self.tasks.spawn(self._bound(m, bound), f"stand-in of {m.config.id[:12]}")
        for stream, out in outs.items():
            await m.output.subscribe(stream, out, ended=m.exited.done())
        if stdin is not None and m.proc.stdin is not None:
            self.tasks.spawn(fanout.feed(stdin, m.proc), f"stdin of {m.config.id[:12]}")
        if m.config.tty and rows and cols:
            with contextlib.suppress(CocoonError):
                await m.proc.resize(rows, cols)
        m.attached.set()
        return m.proc.pid

    async def _bound(self, m: Member, bound: Awaitable[Any]) -> None:
        await bound
        if allows(m.state.status, Op.SIGNAL) and self.sb is not None:
            log.warning(f"the stand-in of {m.config.id[:12]} went away: killing the container")
            with cocoon_log.teardown_step(
                log, f"killing container {m.config.id[:12]}", "the container, running",
                errors=(CocoonError,),
            ):  # fmt: skip
                await self.sb.call(
                    messages.SignalProcess(m.guest_id, "", signal.SIGKILL, True), messages.Ok
                )
            if not m.started:
                m.shutdown_requested.set()

    async def pause(self, m: Member) -> None:
        await self._freeze(m, Op.PAUSE, messages.PauseContainer(m.guest_id))

    async def resume(self, m: Member) -> None:
        await self._freeze(m, Op.RESUME, messages.ResumeContainer(m.guest_id))

    async def _freeze(self, m: Member, op: Op, msg: messages.Message) -> None:
        after = check(m.state.status, op)
        await self._sandbox().call(msg, messages.Ok)
        m.state.status = after
        m.write_state()

    async def update(self, m: Member, resources_json: str) -> messages.Ok:
        msg = messages.UpdateResources(m.guest_id, resources_json)
        return await self._sandbox().call(msg, messages.Ok)

    def shutdown(self, m: Member) -> None:
        """End the container: killed if it runs, then the VM torn down (for a
        pod's sandbox container, with every container of the pod)."""
        m.shutdown_requested.set()

    async def exec(
        self,
        m: Member,
        exec_id: str,
        process_json: str,
        *,
        stdin: bool,
        tty: bool,
        rows: int,
        cols: int,
    ) -> Process:
        """A further process in the container (``process_json``: its OCI
        process, as the protocol and the agent carry it)."""
        check(m.state.status, Op.EXEC)
        key = (m.guest_id, exec_id)
        if key in self.execs:
            raise RemoteError("exists", f"exec id {exec_id} is taken")
        process = json.loads(process_json)
        if not isinstance(process, dict):
            raise ValueError("process must be a JSON object")
        proc = await self._sandbox().exec(
            m.guest_id, exec_id, process, stdin=stdin, tty=tty, rows=rows, cols=cols
        )
        self.execs[key] = proc
        return proc

    async def wait(self, m: Member) -> messages.ProcessExited:
        """The init's end, once recorded and (for the first container) once
        the VM is torn down."""
        return await asyncio.shield(m.exited)

    async def wait_exec(self, m: Member, exec_id: str) -> messages.ProcessExited:
        sb = self._sandbox()
        reply = await sb.call(
            messages.WaitProcess(m.guest_id, exec_id), messages.ProcessExited, timeout_s=None
        )
        proc = self.execs.pop((m.guest_id, exec_id), None)
        if proc is not None:
            sb.release(proc)
        return reply

    async def resize(self, m: Member, exec_id: str, rows: int, cols: int) -> messages.Ok:
        # before the start too: a terminal gets its size between create and start
        msg = messages.ResizeTty(m.guest_id, exec_id, rows, cols)
        return await self._sandbox().call(msg, messages.Ok)

    async def signal(self, m: Member, exec_id: str, sig: int, all_processes: bool) -> messages.Ok:
        check(m.state.status, Op.SIGNAL)
        msg = messages.SignalProcess(m.guest_id, exec_id, sig, all_processes)
        return await self._sandbox().call(msg, messages.Ok)

    async def stats(self, m: Member) -> messages.StatsReply:
        check(m.state.status, Op.STATS)
        return await self._sandbox().call(messages.Stats(m.guest_id), messages.StatsReply)

    async def top(self, m: Member) -> messages.TopReply:
        check(m.state.status, Op.TOP)
        return await self._sandbox().call(messages.Top(m.guest_id), messages.TopReply)

    # -- each container's end ----------------------------------------------------

    async def _supervise(self, m: Member) -> None:
        """Wait for a member's init, record how it ended, answer its waiters. The
        first member's end is the sandbox's: every other member ends with it."""
        assert self.sb is not None and m.proc is not None
        result, error = await self._ended(m)
        self._record_exit(m, result, error)
        if m.guest_id != CONTAINER_ID:
            with cocoon_log.teardown_step(
                log, f"deleting pod member {m.config.id[:12]} in the guest",
                "its crun state in the VM", level=logging.INFO, errors=(CocoonError,),
            ):  # fmt: skip
                await self.sb.call(messages.DeleteContainer(m.guest_id), messages.Ok)
            self._answer(m, result)
            self._close(m)
            self.members.pop(m.guest_id, None)
            return
        for other in list(self.members.values()):
            if other is not m:
                other.shutdown_requested.set()
        # The exit is reported as soon as the container's writes to host
        # directories are on the host, as runc reports it before `delete`: the
        # VM's teardown (~20-50 ms) is then not between a process's end and
        # its caller (a stand-in, conmon, a shim) seeing it. Whoever removes
        # the container waits for the teardown (its life lock) all the same.
        if self.sb is not None:
            await self.sb.sync_host_dirs()  # a failure is logged, never raised
        self._answer(m, result)
        await self._teardown()
        m.write_state()
        if m.config.auto_remove:
            shutil.rmtree(m.cdir.path, ignore_errors=True)
        # Clients collect the exit (a `cocoon run` waiting on it), then we go.
        await self._endpoint().let_clients_go()
        for other in list(self.members.values()):
            self._close(other)

    async def _ended(self, m: Member) -> tuple[messages.ProcessExited | None, str]:
        """How the init ended, or why it has no exit: asked to end before it
        did (killed), or its VM died under it."""
        assert self.sb is not None and m.proc is not None
        c = m.config
        result: messages.ProcessExited | None = None
        error = ""
        try:
            waiter = asyncio.ensure_future(m.proc.wait())
            stop = asyncio.ensure_future(m.shutdown_requested.wait())
            await asyncio.wait([waiter, stop], return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                # deleted before it exited (e.g. created but never started): end it
                with cocoon_log.teardown_step(
                    log, f"killing container {c.id[:12]}", "its processes, until the VM goes",
                    level=logging.INFO, errors=(CocoonError,),
                ):  # fmt: skip
                    await self.sb.call(
                        messages.SignalProcess(m.guest_id, "", signal.SIGKILL, True),
                        messages.Ok,
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(KILL_WAIT_S):
                        await asyncio.shield(waiter)
            stop.cancel()
            result = waiter.result() if waiter.done() else None
            if result is None:
                waiter.cancel()
                error = "deleted before it exited"
            await asyncio.gather(*m.pumps, return_exceptions=True)
        except (GuestError, SandboxError) as e:
            error = str(e)
            log.error(f"container {c.id[:12]} lost its VM: {error}")
        return result, error

    def _record_exit(self, m: Member, result: messages.ProcessExited | None, error: str) -> None:
        m.state.status = check(m.state.status, Op.EXIT)
        m.state.finished_at = time.time()
        if result is not None:
            m.state.exit_code = result.exit_code
            m.state.oom_killed = result.oom_killed
        else:
            m.state.exit_code = 137
            m.state.error = error or "the VM exited"
        m.write_state()  # `stop` watches for this
        oom = ", out of memory" if m.state.oom_killed else ""
        why = f" ({m.state.error})" if m.state.error else ""
        log.info(f"container {m.config.id[:12]} exited with code {m.state.exit_code}{oom}{why}")
        m.output.close_log()

    def _answer(self, m: Member, result: messages.ProcessExited | None) -> None:
        if m.exited.done():
            return
        if result is not None:
            m.exited.set_result(result)
        else:
            m.exited.set_exception(RemoteError("vm_exited", m.state.error))
            m.exited.exception()

    async def _teardown(self) -> None:
        self.publisher.close()
        if self.sb is not None:
            left = f"sandbox {self.sb.id} (its VM, dir, network): `cocoon gc` reaps it"
            with cocoon_log.teardown_step(log, f"destroying sandbox {self.sb.id}", left):
                await self.sb.destroy()
                log.info(f"sandbox {self.sb.id} torn down")
