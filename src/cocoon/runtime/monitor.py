"""The container monitor: one host process per container that owns its VM.

`cocoon run` forks it (no re-exec: it inherits the loaded modules, so it costs
no Python start-up) and it detaches into its own session. From then on it is
the only holder of the agent channel: it boots the sandbox, creates and starts
the container, writes every byte of output to the CRI log (before any client
sees it, so the log is complete even if the VM dies), and serves the other
cocoon commands (attach, exec, signals, stats, top) on ``ctl.sock`` with the
same framed protocol the agent speaks. When the container's init exits it
records the exit (code, OOM, or why the VM died), tears the VM down, and with
--rm removes the container.

``monitor.lock`` is held for the monitor's life: nobody holding it means the
container is not running, whatever state.json says. The monitor's own log,
``monitor.log`` in the container's dir, is JSON lines (cocoon.log): its start,
the container's start and end, and every teardown step that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon import log as cocoon_log
from cocoon.config import Config
from cocoon.errors import (
    AgentError,
    CocoonError,
    CommandError,
    GuestError,
    IllegalTransition,
    NetworkError,
    SandboxError,
    error_line,
    from_error_line,
)
from cocoon.hypervisor.base import Disk, Share
from cocoon.network import NetworkPlan
from cocoon.network.ports import PortSpec, Publisher
from cocoon.protocol import ids, messages
from cocoon.protocol.session import OutStream, RemoteError, Session
from cocoon.runtime.logs import CriLogWriter
from cocoon.runtime.records import ContainerConfig, ContainerDir, ContainerState
from cocoon.runtime.status import Op, Status, allows, check
from cocoon.sandbox.admission import start_slot
from cocoon.sandbox.sandbox import Process, Sandbox
from cocoon.storage.scratch import ScratchDisk

log = logging.getLogger(__name__)

#: The container's id inside its VM (one container per VM on this path).
CONTAINER_ID = "main"
#: An attached `cocoon run` connects right after the ready line; if it never
#: does (killed meanwhile), the container starts anyway, like docker's.
ATTACH_WAIT_S = 30.0
#: After the exit is known, how long clients get to collect it before we go.
CLIENT_GRACE_S = 5.0
#: A client that takes no output for this long is dropped (the log keeps it all),
#: so a stuck `cocoon run` cannot stall the container for ever.
SUBSCRIBER_STALL_S = 60.0


#: How the container is started once created: at the first client's Attach
#: (an attached `cocoon run`), at once (`run -d`), or on a StartContainer
#: request (`cocoon-runtime start`).
START_MODES = ("attach", "now", "request")


@dataclass
class LaunchPlan:
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
    #: Tear the VM down when the init exits (else only on Shutdown: pods).
    annotations: dict[str, str] = field(default_factory=dict)
    #: None: no NIC, no network files (an OCI caller without a netns path).
    network: NetworkPlan | None = None
    publish: list[PortSpec] = field(default_factory=list)
    #: Start from a VM template: None = as configured (sandbox.templates).
    template: bool | None = None


def spawn(plan: LaunchPlan) -> None:
    """Fork the monitor and return once the container is created (attach) or
    started (detached); raise its one-line error if it could not get there."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                _detach_stdio(w, plan.cdir.path / "monitor.log")
                code = asyncio.run(Monitor(plan, w).run())
            else:
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    timeout = plan.cfg.hypervisor.boot_timeout_s + plan.cfg.hypervisor.agent_timeout_s + 60
    timeout += plan.cfg.sandbox.template_wait_s if plan.cfg.sandbox.templates else 0
    timeout += plan.cfg.sandbox.start_queue_s
    deadline = time.monotonic() + timeout
    while (line := _read_line(r, deadline)).startswith("warn "):
        log.warning(line[5:])
    os.close(r)
    if line == "ready":
        return
    if line.startswith("error"):
        raise from_error_line(line, SandboxError)
    raise SandboxError(
        f"the monitor of container {plan.config.id[:12]} died while starting it"
        f" (see {plan.cdir.path / 'monitor.log'})"
    )


def _read_line(fd: int, deadline: float) -> str:
    """One line from the monitor, read a byte at a time (a few short lines:
    no buffer may swallow the next one)."""
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < 4096:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "error the container monitor did not report within its deadline"
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def _detach_stdio(keep: int, log: Path) -> None:
    """No terminal, no inherited fds (a pty kept open here would keep a test's
    reader or a user's shell waiting): stdio to /dev/null and our own log."""
    null = os.open(os.devnull, os.O_RDWR)
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(logfd, 2)
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    sys.stderr = os.fdopen(2, "w", buffering=1)
    cocoon_log.setup_process_log(sys.stderr)
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)


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
        self.subscribers: dict[str, list[OutStream]] = {"stdout": [], "stderr": []}
        self.attached = asyncio.Event()
        self.exited: asyncio.Future[messages.ProcessExited] = (
            asyncio.get_running_loop().create_future()
        )
        self.started = False
        self.pumps: list[asyncio.Task[None]] = []
        self.log = log
        self.server: asyncio.AbstractServer | None = None
        self.shutdown_requested = asyncio.Event()

    def write_state(self) -> None:
        with contextlib.suppress(OSError):
            self.cdir.write_state(self.state)


class Monitor:
    def __init__(self, plan: LaunchPlan, ready_fd: int) -> None:
        self.plan = plan
        self.ready_fd = ready_fd
        self.sb: Sandbox | None = None
        self.publisher = Publisher()
        self.members: dict[str, Member] = {}
        self.execs: dict[tuple[str, str], Process] = {}
        self.clients: set[Session] = set()
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def main(self) -> Member:
        return self.members[CONTAINER_ID]

    def _warn(self, text: str) -> None:
        """A warning for whoever started us (and our log)."""
        log.warning(text)
        if self.ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, ("warn " + text.replace("\n", " ")[:4000] + "\n").encode())

    def _ready(self, line: str) -> None:
        if self.ready_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, (line.replace("\n", " ")[:4000] + "\n").encode())
            os.close(self.ready_fd)
        self.ready_fd = -1

    def _task(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    async def run(self) -> int:
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
            self._ready(f"error container {m.config.id[:12]} already has a monitor")
            return 1
        m.write_state()
        try:
            # One of the host's start slots from the VM's start to the
            # container's (or, for `cocoon-runtime create`, to its creation).
            async with start_slot(plan.cfg):
                await self._create()
                await self._serve(m)
                if plan.start == "attach":
                    self._ready("ready")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(ATTACH_WAIT_S):
                            await m.attached.wait()
                    await self._start(m)
                elif plan.start == "now":
                    await self._start(m)
                    self._ready("ready")
                else:
                    self._ready("ready")  # `start` comes as a request, whenever it comes
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

    async def _serve(self, m: Member) -> None:
        m.cdir.ctl_socket.parent.mkdir(mode=0o700, exist_ok=True)

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self._serve_client(m, r, w)

        m.server = await asyncio.start_unix_server(
            serve, path=str(m.cdir.ctl_socket), limit=1 << 21
        )

    def _close(self, m: Member) -> None:
        """Stop serving a member and let go of its life lock: it is not running."""
        if m.server is not None:
            m.server.close()
            m.server = None
        with contextlib.suppress(FileNotFoundError):
            m.cdir.ctl_socket.unlink()
        m.cdir.life.release()

    async def _fail_start(self, e: BaseException) -> None:
        """Nothing is kept of a container that never started; an attached
        client already waiting hears the reason instead of a dropped line."""
        self._ready(error_line(e))
        m = self.main
        if not m.exited.done():
            m.exited.set_exception(RemoteError("start_failed", str(e)))
            m.exited.exception()  # retrieved here; clients get it via shield
        await self._teardown()
        if m.log is not None:
            with contextlib.suppress(OSError):
                m.log.close()
        shutil.rmtree(m.cdir.path, ignore_errors=True)
        await self._let_clients_go()
        self._close(m)

    async def _let_clients_go(self) -> None:
        deadline = time.monotonic() + CLIENT_GRACE_S
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for s in list(self.clients):
            s.close("the container exited")

    async def _create(self) -> None:
        m, cfg = self.main, self.plan.cfg
        c = m.config
        self.sb = await Sandbox.create(
            cfg,
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
            warn=self._warn,
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

    async def _add(self, msg: messages.AddContainer) -> messages.Message:
        """A pod's further container, created in this VM (Baidu's "start the pod
        first, insert the container later"); it gets its own control socket."""
        assert self.sb is not None
        main_dir = self.main.cdir
        cid = Path(msg.record_dir).name
        if Path(msg.record_dir) != main_dir.path.parent / cid or msg.container_id in self.members:
            raise RemoteError("invalid", "not a container of this runtime, or taken")
        cdir = ContainerDir(main_dir.path.parent, cid, ids.OCI_RECORD_DIR)
        config = cdir.config()
        m = Member(cdir, config, msg.container_id, None)
        if not cdir.life.take():
            raise RemoteError("exists", f"container {cid} already has a monitor")
        try:
            m.proc = await self.sb.create_container(
                msg.container_id, msg.rootfs, config.spec, stdin=True, tty=msg.tty
            )
        except BaseException:
            cdir.life.release()
            raise
        m.state.pid = m.proc.pid
        m.state.accel = self.main.state.accel
        m.write_state()
        self.members[msg.container_id] = m
        await self._serve(m)
        self._task(self._supervise(m))
        return messages.Ok()

    async def _start(self, m: Member) -> None:
        assert self.sb is not None and m.proc is not None
        running = check(m.state.status, Op.START)
        if m.started:  # one start per container, even one that failed
            raise IllegalTransition(f"the container is {m.state.status}", m.state.status, Op.START)
        m.started = True
        # Output is pumped from before the start: nothing the process prints is lost.
        m.pumps = [
            self._task(self._pump(m, "stdout")),
            self._task(self._pump(m, "stderr")),
        ]
        await self.sb.start_container(m.guest_id)
        m.state.status = running
        m.state.started_at = time.time()
        m.write_state()
        log.info(f"container {m.config.id[:12]} started")

    async def _pump(self, m: Member, stream: str) -> None:
        """Agent -> log -> attached clients, in that order, with backpressure."""
        assert m.proc is not None
        src = m.proc.stdout if stream == "stdout" else m.proc.stderr
        if src is None:
            return
        try:
            while data := await src.read():
                if m.log is not None:
                    m.log.write(stream, data)
                for sub in list(m.subscribers[stream]):
                    try:
                        async with asyncio.timeout(SUBSCRIBER_STALL_S):
                            await sub.write(data)
                    except Exception:  # gone or stuck: it loses its copy, the log has it
                        m.subscribers[stream].remove(sub)
        except ConnectionError as e:  # the guest went away: what we have is logged
            log.warning(f"{stream} cut off: {e}")
        finally:
            if m.log is not None:
                m.log.end(stream)
            if self.sb is not None and self.sb.channel is not None:
                self.sb.channel.session.close_in(src.chan)
            for sub in m.subscribers[stream]:
                with contextlib.suppress(Exception):
                    await sub.close()
            m.subscribers[stream] = []

    async def _supervise(self, m: Member) -> None:
        """Wait for a member's init, record how it ended, answer its waiters. The
        first member's end is the sandbox's: every other member ends with it."""
        assert self.sb is not None and m.proc is not None
        c = m.config
        is_main = m.guest_id == CONTAINER_ID
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
                    async with asyncio.timeout(10):
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
        log.info(f"container {c.id[:12]} exited with code {m.state.exit_code}{oom}{why}")
        if m.log is not None:
            m.log.close()
        if not is_main:
            with cocoon_log.teardown_step(
                log, f"deleting pod member {c.id[:12]} in the guest", "its crun state in the VM",
                level=logging.INFO, errors=(CocoonError,),
            ):  # fmt: skip
                await self.sb.call(messages.DeleteContainer(m.guest_id), messages.Ok)
            self._answer(m, result)
            self._close(m)
            self.members.pop(m.guest_id, None)
            return
        for other in list(self.members.values()):
            if other is not m:
                other.shutdown_requested.set()
        await self._teardown()
        m.write_state()
        self._answer(m, result)
        if c.auto_remove:
            shutil.rmtree(m.cdir.path, ignore_errors=True)
        # Clients collect the exit (a `cocoon run` waiting on it), then we go.
        await self._let_clients_go()
        for other in list(self.members.values()):
            self._close(other)

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

    # -- the control sockets ------------------------------------------------

    async def _serve_client(
        self, m: Member, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The session must exist before its handler can name it: a one-slot holder.
        holder: list[Session] = []

        async def handler(msg: messages.Message) -> messages.Message:
            try:
                return await self._dispatch(m, holder[0], msg)
            except IllegalTransition as e:
                # The words older clients know: a start is refused as not_created.
                code = "not_created" if e.op == Op.START else "not_running"
                raise RemoteError(code, str(e)) from e
            except (AgentError, GuestError, SandboxError) as e:
                if m.state.status == Status.EXITED or m.exited.done():
                    # raced with the container's own exit and the VM's teardown
                    raise RemoteError("not_running", "the container has exited") from e
                # A command that could not be run keeps its type for the client.
                code = e.code if isinstance(e, CommandError) else "failed"
                raise RemoteError(code, str(e)) from e
            except (ValueError, KeyError, CocoonError) as e:
                raise RemoteError("invalid", str(e)[:300]) from e

        # The peer is another root cocoon command, but a confused one must not
        # hurt the container: same bounds as with a guest.
        session = Session(reader, writer, handler=handler, lazy_streams=True)
        holder.append(session)
        self.clients.add(session)
        try:
            await session.run()
        finally:
            self.clients.discard(session)
            with contextlib.suppress(Exception):
                writer.close()

    async def _dispatch(
        self, m: Member, session: Session, msg: messages.Message
    ) -> messages.Message:
        """Requests name the container "main": the socket they came on says which."""
        sb = self.sb
        if sb is None or m.proc is None:
            raise RemoteError("not_running", "the container is not running")
        cid = getattr(msg, "container_id", CONTAINER_ID)
        if not isinstance(msg, messages.AddContainer) and cid != CONTAINER_ID:
            raise RemoteError("not_found", f"no container {str(cid)[:40]!r} on this socket")
        gid = m.guest_id
        match msg:
            case messages.Hello():
                return messages.HelloReply(messages.PROTOCOL_VERSION, "monitor", "")
            case messages.Ping():
                return messages.Ok()
            case messages.Attach():
                return await self._attach(m, session, msg)
            case messages.AddContainer():
                if m.guest_id != CONTAINER_ID:
                    raise RemoteError("invalid", "add containers through the pod's sandbox")
                return await self._add(msg)
            case messages.StartContainer():
                await self._start(m)
                return messages.Ok()
            case messages.PauseContainer() | messages.ResumeContainer():
                op = Op.PAUSE if isinstance(msg, messages.PauseContainer) else Op.RESUME
                after = check(m.state.status, op)
                await sb.call(type(msg)(gid), messages.Ok)
                m.state.status = after
                m.write_state()
                return messages.Ok()
            case messages.UpdateResources():
                return await sb.call(messages.UpdateResources(gid, msg.resources_json), messages.Ok)
            case messages.Shutdown():
                m.shutdown_requested.set()
                return messages.Ok()
            case messages.ExecProcess():
                check(m.state.status, Op.EXEC)
                return await self._exec(m, session, msg)
            case messages.WaitProcess(exec_id=""):
                return await asyncio.shield(m.exited)
            case messages.WaitProcess():
                reply: messages.Message = await sb.call(
                    messages.WaitProcess(gid, msg.exec_id), messages.ProcessExited, timeout_s=None
                )
                proc = self.execs.pop((gid, msg.exec_id), None)
                if proc is not None:
                    sb.release(proc)
                return reply
            case messages.ResizeTty():
                # before the start too: a terminal gets its size between create and start
                return await sb.call(
                    messages.ResizeTty(gid, msg.exec_id, msg.rows, msg.cols), messages.Ok
                )
            case messages.SignalProcess():
                check(m.state.status, Op.SIGNAL)
                return await sb.call(
                    messages.SignalProcess(gid, msg.exec_id, msg.signal, msg.all), messages.Ok
                )
            case messages.Stats():
                check(m.state.status, Op.STATS)
                return await sb.call(messages.Stats(gid), messages.StatsReply)
            case messages.Top():
                check(m.state.status, Op.TOP)
                return await sb.call(messages.Top(gid), messages.TopReply)
        raise RemoteError("unsupported", f"the monitor does not serve {msg.TYPE}")

    async def _attach(self, m: Member, session: Session, msg: messages.Attach) -> messages.Message:
        """Subscribe the client to the init process's output (and feed its stdin).

        A ``bind`` client stands for the init process on the host (cocoon-runtime's
        stand-in): if it goes away while the container lives, the container is killed.
        """
        assert m.proc is not None and self.sb is not None
        stdio = msg.stdio
        if msg.bind:
            self._task(self._bound(m, session))
        for stream, chan in (("stdout", stdio.stdout), ("stderr", stdio.stderr)):
            if chan:
                out = session.open_out(chan)
                if m.exited.done():
                    await out.close()  # nothing more will come
                else:
                    m.subscribers[stream].append(out)
        if stdio.stdin and m.proc.stdin is not None:
            self._task(self._feed(session, stdio.stdin, m.proc))
        if m.config.tty and stdio.rows and stdio.cols:
            with contextlib.suppress(CocoonError):
                await m.proc.resize(stdio.rows, stdio.cols)
        m.attached.set()
        return messages.ProcessStarted(m.proc.pid)

    async def _bound(self, m: Member, session: Session) -> None:
        await session.done
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

    async def _exec(
        self, m: Member, session: Session, msg: messages.ExecProcess
    ) -> messages.Message:
        assert self.sb is not None
        key = (m.guest_id, msg.exec_id)
        if key in self.execs:
            raise RemoteError("exists", f"exec id {msg.exec_id} is taken")
        process = json.loads(msg.process_json)
        if not isinstance(process, dict):
            raise ValueError("process must be a JSON object")
        st = msg.stdio
        proc = await self.sb.exec(
            m.guest_id,
            msg.exec_id,
            process,
            stdin=bool(st.stdin),
            tty=st.terminal,
            rows=st.rows or 24,
            cols=st.cols or 80,
        )
        self.execs[key] = proc
        for src, chan in ((proc.stdout, st.stdout), (proc.stderr, st.stderr)):
            if src is None:
                continue
            if not chan:
                src.discard()
                continue
            self._task(self._copy(src, session.open_out(chan)))
        if st.stdin:
            self._task(self._feed(session, st.stdin, proc))
        return messages.ProcessStarted(proc.pid)

    async def _copy(self, src: Any, dst: OutStream) -> None:
        """An exec's output to its client; a gone client only drops its copy."""
        try:
            while data := await src.read():
                try:
                    await dst.write(data)
                except Exception:
                    src.discard()
                    return
        except ConnectionError:
            pass
        with contextlib.suppress(Exception):
            await dst.close()

    async def _feed(self, session: Session, chan: int, proc: Process) -> None:
        """A client's stdin to a process; the client's EOF closes the process's stdin."""
        src = session.in_stream(chan)
        try:
            while data := await src.read():
                await proc.write_stdin(data, close=False)
        except Exception as e:
            log.info(f"stdin relay ended: {e}")
        with contextlib.suppress(Exception):
            await proc.write_stdin(b"", close=True)
