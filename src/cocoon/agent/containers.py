"""Containers inside the guest, driven through crun.

crun does the namespace, cgroup and seccomp work; the agent keeps the table of
containers and processes, wires their stdio to protocol streams (one pump
thread per direction, blocking reads and writes) and turns wait statuses (and
cgroup OOM counters) into exit reports.
"""

from __future__ import annotations

import _socket  # not `socket`: its enum set-up costs ~30 ms of boot under TCG
import contextlib
import fcntl
import json
import os
import select
import stat
import struct
import termios
import threading
import time

from cocoon.agent import spawn, system
from cocoon.agent.reaper import Exit, Reaper, exit_code
from cocoon.agent.session import InStream, OutStream, RemoteError, Session, SessionClosed
from cocoon.protocol import framing, messages

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

CRUN = "crun"
CRUN_ROOT = "/run/crun"
BUNDLES = "/run/cocoon/containers"
MAX_CONTAINERS = 256
MAX_EXECS = 1024
CRUN_TIMEOUT_S = 60.0
#: Bound on holding back an exit report for output still being forwarded.
OUTPUT_DRAIN_S = 5.0
SIGKILL = 9  # not from `signal`: that module's enum set-up costs boot time


class Process:
    """A process crun started: pid, exit, terminal and the threads forwarding its stdio."""

    def __init__(self, pid: int, exit: Exit, master_fd: int = -1) -> None:
        self.pid = pid
        self.exit = exit
        self.master_fd = master_fd
        #: stdout/stderr pumps: the exit report waits for them (bounded).
        self.output_pumps: list[threading.Thread] = []
        #: The session and stream feeding stdin, dropped when the container goes.
        self.stdin: tuple[Session, int] | None = None
        self.oom_before = 0


class Container:
    def __init__(self, cid: str, bundle: str, rootfs: str = "") -> None:
        self.id = cid
        self.bundle = bundle
        self.rootfs = rootfs
        self.init: Process | None = None
        self.execs: dict[str, Process] = {}
        #: Exec ids being launched: reserved so two requests cannot both take one.
        self.pending: set[str] = set()

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
    """The container table. Requests run on parallel threads, so every check
    and update of the table happens under one lock; crun runs outside it."""

    def __init__(self, reaper: Reaper) -> None:
        self._reaper = reaper
        self._containers: dict[str, Container] = {}
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------

    def create(self, session: Session, req: messages.CreateContainer) -> messages.ProcessStarted:
        try:
            spec = json.loads(req.spec_json)
        except json.JSONDecodeError as e:
            raise RemoteError("invalid", f"spec is not JSON: {e}") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
            raise RemoteError("invalid", "spec must be an object with a process")
        spec["process"]["terminal"] = req.stdio.terminal
        # Hooks name host programs: the host runs them (cocoon-runtime), never
        # the guest; and `start` below skips crun, which would run poststart ones.
        spec.pop("hooks", None)
        system.resolve_user(req.rootfs, spec["process"])
        root = spec.get("root")
        if not isinstance(root, dict):
            root = {}
        spec["root"] = {"path": req.rootfs, "readonly": bool(root.get("readonly", False))}
        linux = spec.setdefault("linux", {})
        if not isinstance(linux, dict):
            raise RemoteError("invalid", "spec.linux must be an object")
        linux["cgroupsPath"] = f"/{system.CONTAINERS_CGROUP}/{req.container_id}"
        # crun runs without address-space randomisation (spawn's fixed_layout);
        # an explicit personality makes crun reset the persona, randomisation
        # included, for the container's processes, execs too.
        linux.setdefault("personality", {"domain": "LINUX"})
        bundle = os.path.join(BUNDLES, req.container_id)
        c = Container(req.container_id, bundle, req.rootfs)
        with self._lock:
            if c.id in self._containers:
                raise RemoteError("exists", f"container {c.id} already exists")
            if len(self._containers) >= MAX_CONTAINERS:
                raise RemoteError("limit", "too many containers in this sandbox")
            self._containers[c.id] = c
        try:
            rmtree(bundle)
            os.makedirs(bundle)
            _write(os.path.join(bundle, "config.json"), json.dumps(spec))
            argv = ["create", "--bundle", bundle, "--pid-file", c.path("init.pid")]
            c.init = self._launch(session, c, argv, req.stdio, "init")
        except BaseException:
            with contextlib.suppress(Exception):
                self._crun(["delete", "--force", c.id], check=False)
            with self._lock:
                self._containers.pop(c.id, None)
            rmtree(bundle)
            raise
        return messages.ProcessStarted(c.init.pid)

    def start(self, req: messages.StartContainer) -> messages.Ok:
        c = self._get(req.container_id)
        if not _release_init(c.id):
            self._crun(["start", c.id])  # crun's own checks and wording
        return messages.Ok()

    def exec(self, session: Session, req: messages.ExecProcess) -> messages.ProcessStarted:
        c = self._get(req.container_id)
        try:
            proc = json.loads(req.process_json)
        except json.JSONDecodeError as e:
            raise RemoteError("invalid", f"process is not JSON: {e}") from None
        if not isinstance(proc, dict) or not isinstance(proc.get("args"), list):
            raise RemoteError("invalid", "process must be an object with args")
        proc["terminal"] = req.stdio.terminal
        system.resolve_user(c.rootfs, proc)
        with self._lock:
            if req.exec_id in c.execs or req.exec_id in c.pending:
                raise RemoteError("exists", f"exec {req.exec_id} already exists")
            if len(c.execs) + len(c.pending) >= MAX_EXECS:
                raise RemoteError("limit", "too many exec processes")
            c.pending.add(req.exec_id)
        try:
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
            p = self._launch(session, c, argv, req.stdio, req.exec_id)
            with self._lock:
                c.execs[req.exec_id] = p
        finally:
            with self._lock:
                c.pending.discard(req.exec_id)
        return messages.ProcessStarted(p.pid)

    def signal(self, req: messages.SignalProcess) -> messages.Ok:
        c = self._get(req.container_id)
        if req.all:
            self._crun(["kill", "--all", c.id, str(req.signal)])
            return messages.Ok()
        p = self._proc(c, req.exec_id)
        if not p.exit.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, req.signal)
        return messages.Ok()

    def wait(self, session: Session, req: messages.WaitProcess) -> messages.ProcessExited:
        c = self._get(req.container_id)
        p = self._proc(c, req.exec_id)
        status = session.wait_exit(p.exit)
        code, sig = exit_code(status)
        oom = sig == SIGKILL and system.oom_kills(c.id) > p.oom_before
        # Output first, then the exit report: the host sees complete stdout.
        deadline = time.monotonic() + OUTPUT_DRAIN_S
        for t in p.output_pumps:
            t.join(max(0.0, deadline - time.monotonic()))
        return messages.ProcessExited(exit_code=min(code, 255), signal=sig, oom_killed=oom)

    def resize(self, req: messages.ResizeTty) -> messages.Ok:
        p = self._proc(self._get(req.container_id), req.exec_id)
        if p.master_fd < 0:
            raise RemoteError("invalid", "process has no terminal")
        _set_winsize(p.master_fd, req.rows, req.cols)
        return messages.Ok()

    def delete(self, req: messages.DeleteContainer) -> messages.Ok:
        c = self._get(req.container_id)
        self._crun(["delete", "--force", c.id], check=False)
        for p in [c.init, *c.execs.values()]:
            if p is not None:
                _close_process(p)
        with self._lock:
            self._containers.pop(c.id, None)
        rmtree(c.bundle)
        return messages.Ok()

    def list_processes(self, req: messages.ListProcesses) -> messages.ProcessList:
        self._get(req.container_id)
        return messages.ProcessList(system.cgroup_pids(req.container_id))

    def stats(self, req: messages.Stats) -> messages.StatsReply:
        self._get(req.container_id)
        return system.stats(req.container_id)

    def pause(self, req: messages.PauseContainer) -> messages.Ok:
        self._crun(["pause", self._get(req.container_id).id])
        return messages.Ok()

    def resume(self, req: messages.ResumeContainer) -> messages.Ok:
        self._crun(["resume", self._get(req.container_id).id])
        return messages.Ok()

    def update(self, req: messages.UpdateResources) -> messages.Ok:
        c = self._get(req.container_id)
        try:
            resources = json.loads(req.resources_json)
        except ValueError:
            raise RemoteError("invalid", "resources are not JSON") from None
        if not isinstance(resources, dict):
            raise RemoteError("invalid", "resources must be an object")
        path = c.path("resources.json")
        _write(path, json.dumps(resources))
        self._crun(["update", "--resources", path, c.id])
        return messages.Ok()

    def top(self, req: messages.Top) -> messages.TopReply:
        c = self._get(req.container_id)
        return messages.TopReply(system.process_table(req.container_id, c.rootfs))

    # -- internals ----------------------------------------------------------

    def _get(self, cid: str) -> Container:
        with self._lock:
            c = self._containers.get(cid)
        if c is None:
            raise RemoteError("not_found", f"no container {cid}")
        return c

    def _proc(self, c: Container, exec_id: str) -> Process:
        with self._lock:
            p = c.execs.get(exec_id) if exec_id else c.init
        if p is None:
            raise RemoteError("not_found", f"no process {exec_id or 'init'} in {c.id}")
        return p

    def _crun(self, args: list[str], check: bool = True) -> str:
        code, out = spawn.run([CRUN, "--root", CRUN_ROOT, *args], self._reaper)
        if check and code != 0:
            raise RemoteError("crun_failed", _last_error(out) or f"crun {args[0]} exited {code}")
        return out

    def _launch(
        self,
        session: Session,
        c: Container,
        verb_args: list[str],
        stdio: messages.StdioSpec,
        tag: str,
    ) -> Process:
        """Run ``crun create|exec`` with the process's stdio and collect its pid."""
        session.check_alive()
        child_fds: list[int] = []
        ours: list[int] = []
        master = -1
        console: _socket.socket | None = None
        sock_path = c.path(f"console-{tag}.sock")
        try:
            if stdio.terminal:
                console = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                console.bind(sock_path)
                console.listen(1)
                console.settimeout(0.1)
                verb_args = [*verb_args, "--console-socket", sock_path]
                null = os.open("/dev/null", os.O_RDWR)
                child_fds = [null, null, null]
            else:
                child_fds, ours = _pipes(stdio)
            pidfile = verb_args[verb_args.index("--pid-file") + 1]
            argv = [CRUN, "--root", CRUN_ROOT, "--log", c.path("crun.log")]
            argv += [*verb_args, c.id]
            _, crun_exit = spawn.spawn(
                argv, self._reaper, (child_fds[0], child_fds[1], child_fds[2]), fixed_layout=True
            )
            for fd in set(child_fds):
                os.close(fd)
            child_fds = []
            if console is not None:
                master = _receive_pty(console, crun_exit)
            status = crun_exit.wait(CRUN_TIMEOUT_S)
            if status is None:
                raise TimeoutError(f"crun did not finish within {CRUN_TIMEOUT_S:g} s")
            code, _ = exit_code(status)
            if code != 0:
                raise RemoteError("crun_failed", _crun_log_error(c.bundle) or f"crun exited {code}")
            with open(pidfile) as f:
                pid = int(f.read().strip())
            p = Process(pid=pid, exit=self._reaper.expect(pid), master_fd=master)
            p.oom_before = system.oom_kills(c.id)
            if master >= 0:
                master = -1  # the process owns it now
                _pump_tty(session, p, stdio)
            else:
                _pump_pipes(session, p, ours, stdio)
            ours = []
            return p
        finally:
            for fd in set(child_fds) | {x for x in ours if x >= 0}:
                os.close(fd)
            if master >= 0:
                os.close(master)
            if console is not None:
                console.close()
                with contextlib.suppress(OSError):
                    os.unlink(sock_path)


def _release_init(cid: str) -> bool:
    """Start a created container as `crun start` does, without running crun.

    A created container's init is blocked reading the exec fifo in crun's
    state dir; `crun start` opens it, unlinks it and writes one byte, and the
    fifo's absence is what later marks the container started. Under TCG,
    exec'ing crun (ten shared libraries) costs 65-150 ms in the guest, most
    of a start. No hooks reach the guest (create drops them), so nothing of
    crun's start is skipped. False when the fifo is not there to release (an
    init that died, or a crun that keeps its state elsewhere): the caller
    then runs `crun start`, whose checks and errors are the reference.
    """
    path = f"{CRUN_ROOT}/{cid}/exec.fifo"
    try:
        # Non-blocking: with no reader left (the init died) this fails with
        # ENXIO at once instead of waiting for ever.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        os.unlink(path)
        os.write(fd, b"\0")
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _close_process(p: Process) -> None:
    """Let go of a process whose container is being deleted."""
    if p.stdin is not None:
        session, chan = p.stdin
        session.close_in(chan)  # its pump sees the end and closes the pipe
        p.stdin = None
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


def _receive_pty(console: _socket.socket, crun_exit: Exit) -> int:
    """The terminal master crun passes over the console socket; -1 if crun exits
    without connecting (it failed, and its log says why)."""
    deadline = time.monotonic() + CRUN_TIMEOUT_S
    while True:
        # Sampled before accepting: if crun had already exited then, an empty
        # backlog means it never will connect.
        finished = crun_exit.done()
        try:
            # The C socket's accept (socket.py wraps it): returns the new fd.
            fd, _ = console._accept()  # type: ignore[attr-defined]
            break
        except TimeoutError:
            if finished:
                return -1
            if time.monotonic() > deadline:
                raise TimeoutError(f"crun sent no terminal within {CRUN_TIMEOUT_S:g} s") from None
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
    try:
        conn.settimeout(10)
        _, ancillary, _, _ = conn.recvmsg(4096, _socket.CMSG_SPACE(4), _socket.MSG_CMSG_CLOEXEC)
    finally:
        conn.close()
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            n = len(data) // 4
            fds += struct.unpack(f"{n}i", data[: n * 4])
    if not fds:
        raise RemoteError("crun_failed", "crun sent no terminal")
    for extra in fds[1:]:
        os.close(extra)
    os.set_blocking(fds[0], True)  # the pumps use blocking reads and writes
    return fds[0]


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _start(target: Callable[..., None], *args: object) -> threading.Thread:
    """A daemon pump thread: it must never keep PID 1 from powering off."""
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def _pump_pipes(session: Session, p: Process, ours: list[int], stdio: messages.StdioSpec) -> None:
    stdin_w, out_r, err_r = ours
    # Streams first: opening one can fail, and then no pump owns an fd yet.
    out = session.open_out(stdio.stdout) if out_r >= 0 else None
    err = session.open_out(stdio.stderr) if err_r >= 0 else None
    sin = session.in_stream(stdio.stdin) if stdin_w >= 0 else None
    if out is not None:
        p.output_pumps.append(_start(_fd_to_stream, out_r, out))
    if err is not None:
        p.output_pumps.append(_start(_fd_to_stream, err_r, err))
    if sin is not None:
        p.stdin = (session, stdio.stdin)
        _start(_stdin_to_fd, session, sin, stdin_w)


def _pump_tty(session: Session, p: Process, stdio: messages.StdioSpec) -> None:
    if stdio.rows and stdio.cols:
        _set_winsize(p.master_fd, stdio.rows, stdio.cols)
    out = session.open_out(stdio.stdout)
    sin = session.in_stream(stdio.stdin) if stdio.stdin else None
    p.output_pumps.append(_start(_fd_to_stream, os.dup(p.master_fd), out))
    if sin is not None:
        p.stdin = (session, stdio.stdin)
        _start(_stdin_to_fd, session, sin, os.dup(p.master_fd))


#: How long a short read waits for more output before it is sent, once the
#: stream is busy (something was sent less than this long ago). Programs
#: writing 4 KiB at a time otherwise cost one frame (and one pass through the
#: agent under TCG) per 4 KiB: measured 3-4 s of agent time per 20 MB. The
#: first output after a quiet spell goes at once: a line a handler prints, a
#: prompt, an exit's last words wait for nothing (a function's answer waited
#: 2 ms per chunk).
COALESCE_S = 0.002


def _coalesce(fd: int, first: bytes) -> tuple[bytes, bool]:
    """``first`` plus whatever arrives within COALESCE_S, up to MAX_DATA; (data, eof)."""
    buf = bytearray(first)
    deadline = time.monotonic() + COALESCE_S
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    while len(buf) < framing.MAX_DATA:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms < 0 or not poller.poll(max(left_ms, 0)):
            break
        try:
            more = os.read(fd, framing.MAX_DATA - len(buf))
        except OSError:
            return bytes(buf), True
        if not more:
            return bytes(buf), True
        buf += more
    return bytes(buf), False


def _fd_to_stream(fd: int, out: OutStream) -> None:
    """Forward a process's output until it closes (EOF, or EIO on a pty master
    once the last slave is gone) or the session dies; then EOF the stream."""
    try:
        eof = False
        sent = -COALESCE_S
        while not eof:
            try:
                data = os.read(fd, framing.MAX_DATA)
            except OSError:
                break
            if not data:
                break
            if len(data) < framing.MAX_DATA and time.monotonic() - sent < COALESCE_S:
                data, eof = _coalesce(fd, data)
            out.write(data)
            sent = time.monotonic()
    except SessionClosed:
        pass
    finally:
        os.close(fd)
        out.close()


def _stdin_to_fd(session: Session, stream: InStream, fd: int) -> None:
    """Forward the host's stdin into the process until EOF; credit goes back as
    we read, so a process that stops reading stalls the host, not our memory."""
    try:
        while data := stream.read():
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    except OSError:  # the process closed its end; SessionClosed too
        pass
    finally:
        session.close_in(stream.chan)
        os.close(fd)


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
