"""Containers inside the guest, driven through crun.

crun does the namespace, cgroup and seccomp work; the agent keeps the table of
containers and processes, wires their stdio to protocol streams and turns wait
statuses (and cgroup OOM counters) into exit reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import termios

from cocoon.agent import spawn, system
from cocoon.agent.reaper import Reaper, exit_code
from cocoon.protocol import framing, messages
from cocoon.protocol.session import RemoteError, Session

CRUN = "crun"
CRUN_ROOT = "/run/crun"
BUNDLES = "/run/cocoon/containers"
MAX_CONTAINERS = 256
MAX_EXECS = 1024


class Process:
    def __init__(self, pid: int, exit: asyncio.Future[int], master_fd: int = -1) -> None:
        self.pid = pid
        self.exit = exit
        self.master_fd = master_fd
        self.tasks: list[asyncio.Task[None]] = []
        self.oom_before = 0


class Container:
    def __init__(self, cid: str, bundle: str) -> None:
        self.id = cid
        self.bundle = bundle
        self.init: Process | None = None
        self.execs: dict[str, Process] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.bundle, name)


def rmtree(path: str) -> None:
    """shutil.rmtree without importing shutil (and, through it, lzma/bz2) at boot."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        os.unlink(path)
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            rmtree(e.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class Containers:
    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._containers: dict[str, Container] = {}
        self.session: Session | None = None

    # -- lifecycle ----------------------------------------------------------

    async def create(self, req: messages.CreateContainer) -> messages.ProcessStarted:
        if req.container_id in self._containers:
            raise RemoteError("exists", f"container {req.container_id} already exists")
        if len(self._containers) >= MAX_CONTAINERS:
            raise RemoteError("limit", "too many containers in this sandbox")
        try:
            spec = json.loads(req.spec_json)
        except json.JSONDecodeError as e:
            raise RemoteError("invalid", f"spec is not JSON: {e}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
            raise RemoteError("invalid", "spec must be an object with a process")
        spec["process"]["terminal"] = req.stdio.terminal
        root = spec.get("root") if isinstance(spec.get("root"), dict) else {}
        spec["root"] = {"path": req.rootfs, "readonly": bool(root.get("readonly", False))}
        linux = spec.setdefault("linux", {})
        if not isinstance(linux, dict):
            raise RemoteError("invalid", "spec.linux must be an object")
        linux["cgroupsPath"] = f"/{system.CONTAINERS_CGROUP}/{req.container_id}"
        bundle = os.path.join(BUNDLES, req.container_id)
        rmtree(bundle)
        os.makedirs(bundle)
        _write(os.path.join(bundle, "config.json"), json.dumps(spec))
        c = Container(req.container_id, bundle)
        self._containers[c.id] = c
        try:
            argv = ["create", "--bundle", bundle, "--pid-file", c.path("init.pid")]
            c.init = await self._launch(c, argv, req.stdio, "init")
        except BaseException:
            await self._crun(["delete", "--force", c.id], check=False)
            self._containers.pop(c.id, None)
            rmtree(bundle)
            raise
        return messages.ProcessStarted(c.init.pid)

    async def start(self, req: messages.StartContainer) -> messages.Ok:
        self._get(req.container_id)
        await self._crun(["start", req.container_id])
        return messages.Ok()

    async def exec(self, req: messages.ExecProcess) -> messages.ProcessStarted:
        c = self._get(req.container_id)
        if req.exec_id in c.execs:
            raise RemoteError("exists", f"exec {req.exec_id} already exists")
        if len(c.execs) >= MAX_EXECS:
            raise RemoteError("limit", "too many exec processes")
        try:
            proc = json.loads(req.process_json)
        except json.JSONDecodeError as e:
            raise RemoteError("invalid", f"process is not JSON: {e}") from None
        if not isinstance(proc, dict) or not isinstance(proc.get("args"), list):
            raise RemoteError("invalid", "process must be an object with args")
        proc["terminal"] = req.stdio.terminal
        pfile = c.path(f"exec-{req.exec_id}.json")
        _write(pfile, json.dumps(proc))
        argv = [
            "exec",
            "--detach",
            "--process",
            pfile,
            "--pid-file",
            c.path(f"exec-{req.exec_id}.pid"),
        ]
        p = await self._launch(c, argv, req.stdio, req.exec_id)
        c.execs[req.exec_id] = p
        return messages.ProcessStarted(p.pid)

    async def signal(self, req: messages.SignalProcess) -> messages.Ok:
        c = self._get(req.container_id)
        if req.all:
            await self._crun(["kill", "--all", c.id, str(req.signal)])
            return messages.Ok()
        p = self._proc(c, req.exec_id)
        if not p.exit.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, req.signal)
        return messages.Ok()

    async def wait(self, req: messages.WaitProcess) -> messages.ProcessExited:
        c = self._get(req.container_id)
        p = self._proc(c, req.exec_id)
        status = await asyncio.shield(p.exit)
        code, sig = exit_code(status)
        oom = sig == signal.SIGKILL and system.oom_kills(c.id) > p.oom_before
        # Output first, then the exit report: the host sees complete stdout.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*p.tasks, return_exceptions=True), 5.0)
        return messages.ProcessExited(exit_code=min(code, 255), signal=sig, oom_killed=oom)

    async def resize(self, req: messages.ResizeTty) -> messages.Ok:
        p = self._proc(self._get(req.container_id), req.exec_id)
        if p.master_fd < 0:
            raise RemoteError("invalid", "process has no terminal")
        fcntl.ioctl(p.master_fd, termios.TIOCSWINSZ, struct.pack("HHHH", req.rows, req.cols, 0, 0))
        return messages.Ok()

    async def delete(self, req: messages.DeleteContainer) -> messages.Ok:
        c = self._get(req.container_id)
        await self._crun(["delete", "--force", c.id], check=False)
        for p in [c.init, *c.execs.values()]:
            if p is not None:
                self._close_process(p)
        self._containers.pop(c.id, None)
        rmtree(c.bundle)
        return messages.Ok()

    async def list_processes(self, req: messages.ListProcesses) -> messages.ProcessList:
        self._get(req.container_id)
        return messages.ProcessList(system.cgroup_pids(req.container_id))

    async def stats(self, req: messages.Stats) -> messages.StatsReply:
        self._get(req.container_id)
        return system.stats(req.container_id)

    # -- internals ----------------------------------------------------------

    def _get(self, cid: str) -> Container:
        c = self._containers.get(cid)
        if c is None:
            raise RemoteError("not_found", f"no container {cid}")
        return c

    def _proc(self, c: Container, exec_id: str) -> Process:
        p = c.execs.get(exec_id) if exec_id else c.init
        if p is None:
            raise RemoteError("not_found", f"no process {exec_id or 'init'} in {c.id}")
        return p

    async def _crun(self, args: list[str], check: bool = True) -> str:
        code, out = await spawn.run([CRUN, "--root", CRUN_ROOT, *args], self._reaper)
        if check and code != 0:
            raise RemoteError("crun_failed", _last_error(out) or f"crun {args[0]} exited {code}")
        return out

    async def _launch(
        self, c: Container, verb_args: list[str], stdio: messages.StdioSpec, tag: str
    ) -> Process:
        """Run ``crun create|exec`` with the process's stdio and collect its pid."""
        session = self.session
        if session is None:
            raise RemoteError("no_session", "no host session")
        child_fds: list[int] = []
        ours: list[int] = []
        console: socket.socket | None = None
        sock_path = c.path(f"console-{tag}.sock")
        try:
            if stdio.terminal:
                console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                console.bind(sock_path)
                console.listen(1)
                console.setblocking(False)
                verb_args = [*verb_args, "--console-socket", sock_path]
                null = os.open("/dev/null", os.O_RDWR)
                child_fds = [null, null, null]
            else:
                child_fds, ours = _pipes(stdio)
            pidfile = verb_args[verb_args.index("--pid-file") + 1]
            argv = [CRUN, "--root", CRUN_ROOT, "--log", c.path("crun.log")]
            argv += [*verb_args, c.id]
            _, crun_exit = spawn.spawn(
                argv, self._reaper, (child_fds[0], child_fds[1], child_fds[2])
            )
            for fd in set(child_fds):
                os.close(fd)
            child_fds = []
            master = -1
            if console is not None:
                master = await _receive_pty(console, crun_exit)
            async with asyncio.timeout(60):
                status = await crun_exit
            code, _ = exit_code(status)
            if code != 0:
                if master >= 0:
                    os.close(master)
                raise RemoteError("crun_failed", _crun_log_error(c.bundle) or f"crun exited {code}")
            with open(pidfile) as f:
                pid = int(f.read().strip())
            p = Process(pid=pid, exit=self._reaper.expect(pid), master_fd=master)
            p.oom_before = system.oom_kills(c.id)
            if master >= 0:
                p.tasks = _pump_tty(session, master, stdio)
            else:
                p.tasks = _pump_pipes(session, ours, stdio)
            ours = []
            return p
        finally:
            for fd in set(child_fds) | set(x for x in ours if x >= 0):
                os.close(fd)
            if console is not None:
                console.close()
                with contextlib.suppress(OSError):
                    os.unlink(sock_path)

    def _close_process(self, p: Process) -> None:
        for t in p.tasks:
            t.cancel()
        if p.master_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(p.master_fd)
            p.master_fd = -1


def _pipes(stdio: messages.StdioSpec) -> tuple[list[int], list[int]]:
    """(child fds 0/1/2, our ends [stdin writer, stdout reader, stderr reader])."""
    child: list[int] = []
    ours: list[int] = []
    if stdio.stdin:
        r, w = os.pipe()
        child.append(r)
        ours.append(w)
    else:
        child.append(os.open("/dev/null", os.O_RDONLY))
        ours.append(-1)
    for chan in (stdio.stdout, stdio.stderr):
        if chan:
            r, w = os.pipe()
            child.append(w)
            ours.append(r)
        else:
            child.append(os.open("/dev/null", os.O_WRONLY))
            ours.append(-1)
    return child, ours


async def _receive_pty(console: socket.socket, crun_exit: asyncio.Future[int]) -> int:
    loop = asyncio.get_running_loop()
    accept = asyncio.ensure_future(loop.sock_accept(console))
    async with asyncio.timeout(60):
        done, _ = await asyncio.wait({accept, crun_exit}, return_when=asyncio.FIRST_COMPLETED)
    if accept not in done:
        accept.cancel()
        return -1
    conn, _ = accept.result()
    with conn:
        conn.setblocking(True)
        conn.settimeout(10)
        _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    if not fds:
        raise RemoteError("crun_failed", "crun sent no terminal")
    return fds[0]


def _pump_pipes(
    session: Session, ours: list[int], stdio: messages.StdioSpec
) -> list[asyncio.Task[None]]:
    stdin_w, out_r, err_r = ours
    tasks = []
    loop = asyncio.get_running_loop()
    if stdin_w >= 0:
        tasks.append(loop.create_task(_stdin_to_fd(session, stdio.stdin, stdin_w)))
    if out_r >= 0:
        tasks.append(loop.create_task(_fd_to_stream(session, out_r, stdio.stdout)))
    if err_r >= 0:
        tasks.append(loop.create_task(_fd_to_stream(session, err_r, stdio.stderr)))
    return tasks


def _pump_tty(session: Session, master: int, stdio: messages.StdioSpec) -> list[asyncio.Task[None]]:
    if stdio.rows and stdio.cols:
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", stdio.rows, stdio.cols, 0, 0))
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(_fd_to_stream(session, os.dup(master), stdio.stdout))]
    if stdio.stdin:
        tasks.append(loop.create_task(_stdin_to_fd(session, stdio.stdin, os.dup(master))))
    return tasks


async def _fd_to_stream(session: Session, fd: int, chan: int) -> None:
    loop = asyncio.get_running_loop()
    out = session.open_out(chan)
    reader = asyncio.StreamReader(limit=framing.MAX_DATA)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        while True:
            try:
                data = await reader.read(framing.MAX_DATA)
            except OSError:  # EIO on a pty master once the last slave closes
                break
            if not data:
                break
            await out.write(data)
    finally:
        transport.close()
        await out.close()


async def _stdin_to_fd(session: Session, chan: int, fd: int) -> None:
    loop = asyncio.get_running_loop()
    stream = session.in_stream(chan)
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.streams.FlowControlMixin(), os.fdopen(fd, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    try:
        while data := await stream.read():
            writer.write(data)
            await writer.drain()
    except (OSError, ConnectionError):
        pass
    finally:
        session.close_in(chan)
        transport.close()


def _crun_log_error(bundle: str) -> str:
    try:
        with open(os.path.join(bundle, "crun.log"), errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return _last_error(text)


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""
