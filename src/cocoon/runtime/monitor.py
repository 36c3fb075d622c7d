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
container is not running, whatever state.json says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import AgentError, CocoonError, GuestError, SandboxError
from cocoon.hypervisor.base import Disk, Share
from cocoon.protocol import messages
from cocoon.protocol.session import OutStream, RemoteError, Session
from cocoon.runtime.containers import ContainerConfig, ContainerDir, ContainerState
from cocoon.runtime.logs import CriLogWriter
from cocoon.sandbox.sandbox import Process, Sandbox
from cocoon.storage.scratch import ScratchDisk

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
    line = _read_line(r, timeout)
    os.close(r)
    if line == "ready":
        return
    if line.startswith("error "):
        raise SandboxError(line[6:])
    raise SandboxError(
        f"the monitor of container {plan.config.id[:12]} died while starting it"
        f" (see {plan.cdir.path / 'monitor.log'})"
    )


def _read_line(fd: int, timeout_s: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout_s
    while not buf.endswith(b"\n") and len(buf) < 4096:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "error the container monitor did not report within its deadline"
        chunk = os.read(fd, 4096)
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
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}", file=sys.stderr)


class Monitor:
    def __init__(self, plan: LaunchPlan, ready_fd: int) -> None:
        self.plan = plan
        self.cdir = plan.cdir
        self.config = plan.config
        self.ready_fd = ready_fd
        self.state = ContainerState(monitor_pid=os.getpid())
        self.sb: Sandbox | None = None
        self.main: Process | None = None
        self.subscribers: dict[str, list[OutStream]] = {"stdout": [], "stderr": []}
        self.attached = asyncio.Event()
        self.exited: asyncio.Future[messages.ProcessExited] | None = None
        self.execs: dict[str, Process] = {}
        self.clients: set[Session] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.log = (
            CriLogWriter(
                self.cdir.log_path, max_bytes=plan.log_max_bytes, max_files=plan.log_max_files
            )
            if plan.log_max_bytes
            else None
        )
        self._started = False
        self._pumps: list[asyncio.Task[None]] = []
        self.shutdown_requested = asyncio.Event()

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
        self.exited = asyncio.get_running_loop().create_future()
        if not self.cdir.life.take():
            self._ready(f"error container {self.config.id[:12]} already has a monitor")
            return 1
        self.state.status = "created"
        self.cdir.write_state(self.state)
        server = None
        try:
            await self._create()
            self.cdir.ctl_socket.parent.mkdir(mode=0o700, exist_ok=True)
            server = await asyncio.start_unix_server(
                self._serve_client, path=str(self.cdir.ctl_socket), limit=1 << 21
            )
            if self.plan.start == "attach":
                self._ready("ready")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ATTACH_WAIT_S):
                        await self.attached.wait()
                await self._start()
            elif self.plan.start == "now":
                await self._start()
                self._ready("ready")
            else:
                self._ready("ready")  # `start` comes as a request, whenever it comes
        except (CocoonError, OSError) as e:
            log(f"start failed: {e}")
            await self._fail_start(str(e))
            return 1
        except BaseException:
            log(traceback.format_exc())
            await self._fail_start("internal error in the container monitor (see monitor.log)")
            raise
        await self._supervise()
        if server is not None:
            server.close()
        with contextlib.suppress(FileNotFoundError):
            self.cdir.ctl_socket.unlink()
        self.cdir.life.release()
        return 0

    async def _fail_start(self, reason: str) -> None:
        """Nothing is kept of a container that never started; an attached
        client already waiting hears the reason instead of a dropped line."""
        self._ready(f"error {reason}")
        assert self.exited is not None
        if not self.exited.done():
            self.exited.set_exception(RemoteError("start_failed", reason))
            self.exited.exception()  # retrieved here; clients get it via shield
        await self._teardown()
        if self.log is not None:
            with contextlib.suppress(OSError):
                self.log.close()
        with contextlib.suppress(FileNotFoundError):
            self.cdir.ctl_socket.unlink()
        shutil.rmtree(self.cdir.path, ignore_errors=True)
        await self._let_clients_go()
        self.cdir.life.release()

    async def _let_clients_go(self) -> None:
        deadline = time.monotonic() + CLIENT_GRACE_S
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for s in list(self.clients):
            s.close("the container exited")

    async def _create(self) -> None:
        c, cfg = self.config, self.plan.cfg
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
        )
        self.state.boot_s = self.sb.boot_s or 0.0
        self.state.accel = self.sb.state.accel
        rootfs = await self.plan.setup(self.sb)
        self.main = await self.sb.create_container(
            CONTAINER_ID,
            rootfs,
            c.spec,
            stdin=c.stdin,
            tty=c.tty,
            rows=self.plan.rows,
            cols=self.plan.cols,
        )
        self.state.pid = self.main.pid
        self.cdir.write_state(self.state)

    async def _start(self) -> None:
        assert self.sb is not None and self.main is not None
        if self.state.status != "created" or self._started:
            raise RemoteError("not_created", f"the container is {self.state.status}")
        self._started = True
        # Output is pumped from before the start: nothing the process prints is lost.
        self._pumps = [
            self._task(self._pump("stdout", self.main)),
            self._task(self._pump("stderr", self.main)),
        ]
        await self.sb.start_container(CONTAINER_ID)
        self.state.status = "running"
        self.state.started_at = time.time()
        self.cdir.write_state(self.state)

    async def _pump(self, stream: str, proc: Process) -> None:
        """Agent -> log -> attached clients, in that order, with backpressure."""
        src = proc.stdout if stream == "stdout" else proc.stderr
        if src is None:
            return
        try:
            while data := await src.read():
                if self.log is not None:
                    self.log.write(stream, data)
                for sub in list(self.subscribers[stream]):
                    try:
                        async with asyncio.timeout(SUBSCRIBER_STALL_S):
                            await sub.write(data)
                    except Exception:  # gone or stuck: it loses its copy, the log has it
                        self.subscribers[stream].remove(sub)
        except ConnectionError as e:  # the guest went away: what we have is logged
            log(f"{stream} cut off: {e}")
        finally:
            if self.log is not None:
                self.log.end(stream)
            if self.sb is not None and src is not None and self.sb.channel is not None:
                self.sb.channel.session.close_in(src.chan)
            for sub in self.subscribers[stream]:
                with contextlib.suppress(Exception):
                    await sub.close()
            self.subscribers[stream] = []

    async def _supervise(self) -> None:
        """Wait for the init process, record how it ended, tear down, answer waiters."""
        assert self.sb is not None and self.main is not None and self.exited is not None
        c = self.config
        result: messages.ProcessExited | None = None
        error = ""
        try:
            waiter = asyncio.ensure_future(self.main.wait())
            stop = asyncio.ensure_future(self.shutdown_requested.wait())
            await asyncio.wait([waiter, stop], return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                # deleted before it exited (e.g. created but never started): end it
                with contextlib.suppress(CocoonError):
                    await self.sb.call(
                        messages.SignalProcess(CONTAINER_ID, "", signal.SIGKILL, True),
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
            await asyncio.gather(*self._pumps, return_exceptions=True)
        except (GuestError, SandboxError) as e:
            error = str(e)
            log(f"container {c.id[:12]} lost its VM: {error}")
        self.state.status = "exited"
        self.state.finished_at = time.time()
        if result is not None:
            self.state.exit_code = result.exit_code
            self.state.oom_killed = result.oom_killed
        else:
            self.state.exit_code = 137
            self.state.error = error or "the VM exited"
        self.cdir.write_state(self.state)  # `stop` watches for this
        if self.log is not None:
            self.log.close()
        await self._teardown()
        self.cdir.write_state(self.state)
        if result is not None:
            self.exited.set_result(result)
        else:
            self.exited.set_exception(RemoteError("vm_exited", self.state.error))
            self.exited.exception()
        if c.auto_remove:
            shutil.rmtree(self.cdir.path, ignore_errors=True)
        # Clients collect the exit (a `cocoon run` waiting on it), then we go.
        await self._let_clients_go()

    async def _teardown(self) -> None:
        if self.sb is not None:
            with contextlib.suppress(Exception):
                await self.sb.destroy()

    # -- the control socket -------------------------------------------------

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The session must exist before its handler can name it: a one-slot holder.
        holder: list[Session] = []

        async def handler(msg: messages.Message) -> messages.Message:
            try:
                return await self._dispatch(holder[0], msg)
            except (AgentError, GuestError, SandboxError) as e:
                if self.state.status == "exited" or (self.exited and self.exited.done()):
                    # raced with the container's own exit and the VM's teardown
                    raise RemoteError("not_running", "the container has exited") from None
                raise RemoteError("failed", str(e)) from None
            except (ValueError, KeyError) as e:
                raise RemoteError("invalid", str(e)[:300]) from None

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

    async def _dispatch(self, session: Session, msg: messages.Message) -> messages.Message:
        sb, main = self.sb, self.main
        if sb is None or main is None:
            raise RemoteError("not_running", "the container is not running")
        match msg:
            case messages.Hello():
                return messages.HelloReply(messages.PROTOCOL_VERSION, "monitor", "")
            case messages.Ping():
                return messages.Ok()
            case messages.Attach():
                return await self._attach(session, msg)
            case messages.StartContainer():
                self._check_container(msg.container_id)
                await self._start()
                return messages.Ok()
            case messages.PauseContainer() | messages.ResumeContainer():
                self._check_container(msg.container_id)
                paused = isinstance(msg, messages.PauseContainer)
                if self.state.status != ("running" if paused else "paused"):
                    raise RemoteError("not_running", f"the container is {self.state.status}")
                await sb.call(msg, messages.Ok)
                self.state.status = "paused" if paused else "running"
                self.cdir.write_state(self.state)
                return messages.Ok()
            case messages.UpdateResources():
                self._check_container(msg.container_id)
                return await sb.call(msg, messages.Ok)
            case messages.Shutdown():
                self.shutdown_requested.set()
                return messages.Ok()
            case messages.ExecProcess():
                self._check_running(msg.container_id)
                return await self._exec(session, msg)
            case messages.WaitProcess(exec_id=""):
                assert self.exited is not None
                return await asyncio.shield(self.exited)
            case messages.WaitProcess():
                self._check_container(msg.container_id)
                reply: messages.Message = await sb.call(msg, messages.ProcessExited, timeout_s=None)
                proc = self.execs.pop(msg.exec_id, None)
                if proc is not None:
                    sb.release(proc)
                return reply
            case messages.ResizeTty():
                # before the start too: a terminal gets its size between create and start
                self._check_container(msg.container_id)
                return await sb.call(msg, messages.Ok)
            case messages.SignalProcess():
                self._check_container(msg.container_id)
                if self.state.status not in ("created", "running", "paused"):
                    raise RemoteError("not_running", f"the container is {self.state.status}")
                return await sb.call(msg, messages.Ok)
            case messages.Stats():
                self._check_running(msg.container_id)
                return await sb.call(msg, messages.StatsReply)
            case messages.Top():
                self._check_running(msg.container_id)
                return await sb.call(msg, messages.TopReply)
        raise RemoteError("unsupported", f"the monitor does not serve {msg.TYPE}")

    def _check_container(self, cid: str) -> None:
        if cid != CONTAINER_ID:
            raise RemoteError("not_found", f"no container {cid[:40]!r} in this sandbox")

    def _check_running(self, cid: str) -> None:
        self._check_container(cid)
        if self.state.status != "running":
            raise RemoteError("not_running", f"the container is {self.state.status}")

    async def _attach(self, session: Session, msg: messages.Attach) -> messages.Message:
        """Subscribe the client to the init process's output (and feed its stdin).

        A ``bind`` client stands for the init process on the host (cocoon-runtime's
        stand-in): if it goes away while the container lives, the container is killed.
        """
        assert self.main is not None and self.sb is not None
        stdio = msg.stdio
        if msg.bind:
            self._task(self._bound(session))
        for stream, chan in (("stdout", stdio.stdout), ("stderr", stdio.stderr)):
            if chan:
                out = session.open_out(chan)
                if self.exited is not None and self.exited.done():
                    await out.close()  # nothing more will come
                else:
                    self.subscribers[stream].append(out)
        if stdio.stdin and self.main.stdin is not None:
            self._task(self._feed(session, stdio.stdin, self.main))
        if self.config.tty and stdio.rows and stdio.cols:
            with contextlib.suppress(CocoonError):
                await self.main.resize(stdio.rows, stdio.cols)
        self.attached.set()
        return messages.ProcessStarted(self.main.pid)

    async def _bound(self, session: Session) -> None:
        await session.done
        if self.state.status in ("running", "paused", "created") and self.sb is not None:
            log("the init's stand-in went away: killing the container")
            with contextlib.suppress(CocoonError):
                await self.sb.call(
                    messages.SignalProcess(CONTAINER_ID, "", signal.SIGKILL, True), messages.Ok
                )
            if not self._started:
                self.shutdown_requested.set()

    async def _exec(self, session: Session, msg: messages.ExecProcess) -> messages.Message:
        assert self.sb is not None
        if msg.exec_id in self.execs:
            raise RemoteError("exists", f"exec id {msg.exec_id} is taken")
        process = json.loads(msg.process_json)
        if not isinstance(process, dict):
            raise ValueError("process must be a JSON object")
        st = msg.stdio
        proc = await self.sb.exec(
            CONTAINER_ID,
            msg.exec_id,
            process,
            stdin=bool(st.stdin),
            tty=st.terminal,
            rows=st.rows or 24,
            cols=st.cols or 80,
        )
        self.execs[msg.exec_id] = proc
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
            log(f"stdin relay ended: {e}")
        with contextlib.suppress(Exception):
            await proc.write_stdin(b"", close=True)
