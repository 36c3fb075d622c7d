"""The host process that stands for one container process in the guest.

podman's conmon, containerd's runc shim and docker expect what runc gives: the
container's process is a real host pid, a child they reap (as subreaper) when
it dies, whose exit status is the container's, which holds the stdio they
passed to `create`/`exec`, and which receives the signals they send it. Ours
is that process: a fork of `cocoon-runtime create|exec` that connects to the
container's monitor, relays its inherited stdio (or a pty it hands to
--console-socket) to the guest process, forwards every catchable signal, and
exits with the guest process's status, dying by the same signal when it died
by one. It is bound to the guest process both ways: SIGKILL it and the monitor
kills what it stood for.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import sys
import termios
import time
import tty as tty_mod
from typing import Any

from cocoon.errors import CocoonError, error_line, from_error_line
from cocoon.runtime.container import Container
from cocoon.runtime.records import ContainerDir
from cocoon.runtime.stdio import relay
from cocoon.sandbox.process import Process
from cocoon.util.tasks import CLOSE_S, TaskSet

#: Signals a stand-in passes on (not the ones the kernel keeps for itself, nor
#: the job-control and terminal ones that concern the stand-in's own tty).
NOT_FORWARDED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGWINCH,
                 signal.SIGPIPE, signal.SIGTTIN, signal.SIGTTOU}  # fmt: skip

log = logging.getLogger(__name__)


def send_console(socket_path: str, master: int) -> None:
    """Hand the pty master to whoever listens on --console-socket (SCM_RIGHTS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socket_path)
        fds = array.array("i", [master])
        s.sendmsg([b"/dev/ptmx"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])


def spawn(
    cdir: ContainerDir,
    *,
    process: dict[str, Any] | None,
    console_socket: str | None,
    tty: bool,
    new_session: bool = False,
) -> int:
    """Fork a stand-in (init when ``process`` is None, else an exec); return its
    pid once it is attached to the guest process, or raise its error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            for fd in range(3, 1024):
                if fd != w:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if new_session:
                os.setsid()
            code = asyncio.run(_main(cdir, process, console_socket, tty, w))
        except BaseException as e:  # noqa: BLE001 - the child must never return
            with contextlib.suppress(Exception):
                os.write(w, (error_line(e) + "\n").encode())
        finally:
            os._exit(code)
    os.close(w)
    line = _read_line(r, 120.0)
    os.close(r)
    if line.startswith("ready"):
        return pid
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    if line.startswith("error"):
        raise from_error_line(line, CocoonError)
    raise CocoonError("the stand-in process died")


def wait(pid: int) -> int:
    """A stand-in's status (it is our child) the shell's way: 128+N for signal N."""
    while True:
        try:
            _, st = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0
    return os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)


def _read_line(fd: int, timeout_s: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout_s
    while not buf.endswith(b"\n") and len(buf) < 4096:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "error the stand-in did not attach in time"
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


async def _main(
    cdir: ContainerDir,
    process: dict[str, Any] | None,
    console_socket: str | None,
    tty: bool,
    ready_fd: int,
) -> int:
    master = slave = -1
    if tty:
        master, slave = os.openpty()
    client = await Container(cdir).connect()
    if process is None:
        proc = await client.attach(stdin=True, tty=tty, bind=True)
    else:
        proc = await client.exec(process, stdin=True, tty=tty)
    if tty:
        _take_terminal(master, slave, console_socket)
    os.write(ready_fd, f"ready {proc.pid}\n".encode())
    os.close(ready_fd)
    # A signal for a process that has just ended has nowhere to go: not an error.
    tasks = TaskSet(log, level=logging.DEBUG)
    _forward_signals(proc, tasks, slave)
    out_fd = slave if tty else 1
    in_fd = slave if tty else 0
    tasks.spawn(_feed(proc, in_fd), "relaying stdin")
    with contextlib.suppress(OSError):  # our stdout's reader went away: keep the exit
        await asyncio.gather(relay(proc.stdout, out_fd), relay(proc.stderr, 2))
    try:
        exited = await proc.wait()
    except CocoonError:
        return 137
    finally:
        await tasks.aclose(CLOSE_S)
        await client.close()
    if exited.signal:
        _die_by(exited.signal)
    return exited.exit_code


def _take_terminal(master: int, slave: int, console_socket: str | None) -> None:
    """The pty's master to the caller, its slave our raw, controlling tty."""
    if console_socket:
        send_console(console_socket, master)
    os.close(master)
    # Raw: the guest's pty does the line discipline, ours must pass bytes as
    # they are (no second \r, no local echo, no line buffering).
    tty_mod.setraw(slave)
    # The slave becomes our controlling tty: its size changes reach us as SIGWINCH.
    try:
        if os.getsid(0) != os.getpid():
            os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    except OSError as e:
        log.warning("stand-in: no controlling tty, so no resizes: %s", e)


def _forward_signals(proc: Process, tasks: TaskSet, tty_fd: int) -> None:
    """Every catchable signal sent to us, to the guest process; with a tty
    (``tty_fd`` >= 0), its size too, now and on every change."""
    loop = asyncio.get_running_loop()

    def forward(sig: int) -> None:
        tasks.spawn(proc.signal(sig), f"forwarding signal {sig}")

    for s in signal.valid_signals():
        if isinstance(s, signal.Signals) and s not in NOT_FORWARDED:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                loop.add_signal_handler(s, forward, int(s))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if tty_fd < 0:
        return

    def resized() -> None:
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(tty_fd, termios.TIOCGWINSZ, b"\0" * 8)
            rows, cols = struct.unpack("HHHH", size)[:2]
            if rows and cols:
                tasks.spawn(proc.resize(rows, cols), "passing on the terminal size")

    loop.add_signal_handler(signal.SIGWINCH, resized)
    resized()


def _die_by(sig: int) -> None:
    """End as the guest process did: by its signal, so our caller reaps that."""
    with contextlib.suppress(OSError, ValueError):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those have no handler to reset
            asyncio.get_running_loop().remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        sys.stdout.flush()
        os.kill(os.getpid(), sig)
        time.sleep(1)


async def _feed(proc: Process, fd: int) -> None:
    """Our stdin (or the pty) to the process; EOF closes its stdin."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            ready: asyncio.Future[None] = loop.create_future()

            def wake(f: asyncio.Future[None] = ready) -> None:
                if not f.done():
                    f.set_result(None)

            try:
                loop.add_reader(fd, wake)
            except PermissionError:  # a regular file: epoll refuses it, read it plainly
                data = await asyncio.to_thread(os.read, fd, 65536)
            else:
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                data = os.read(fd, 65536)
            if not data:
                break
            await proc.write_stdin(data, close=False)
    except (OSError, CocoonError):
        pass
    with contextlib.suppress(Exception):
        await proc.write_stdin(b"", close=True)
