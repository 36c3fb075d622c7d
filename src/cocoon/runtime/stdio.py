"""Attaching this terminal-less process to a container process in a guest.

stdout/stderr relayed as they arrive (kept apart), stdin pumped if asked,
SIGINT/SIGTERM/SIGHUP forwarded to the container's process, and the exit
code (128+N for signal N) returned once output is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import termios
import tty as ttymod

from cocoon.protocol.session import InStream
from cocoon.sandbox.process import Process
from cocoon.util.tasks import CLOSE_S, TaskSet

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

log = logging.getLogger(__name__)


async def relay(stream: InStream | None, fd: int) -> None:
    if stream is None:
        return
    while data := await stream.read():
        view = memoryview(data)
        while view:
            n = await asyncio.to_thread(os.write, fd, view)
            view = view[n:]


async def feed_stdin(proc: Process) -> None:
    """Pump our stdin to the process until EOF.

    Readiness comes from the event loop (no thread parked in read(): after the
    container exits, a terminal that never sends EOF must not keep us alive);
    regular files, which epoll refuses, are read in a thread (they hit EOF).
    """
    loop = asyncio.get_running_loop()
    try:
        while True:
            ready: asyncio.Future[None] = loop.create_future()

            def wake(fut: asyncio.Future[None] = ready) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(0, wake)
            try:
                await ready
            finally:
                loop.remove_reader(0)
            data = os.read(0, 65536)
            if not data:
                break
            await proc.write_stdin(data, close=False)
    except PermissionError:
        while data := await loop.run_in_executor(None, os.read, 0, 65536):
            await proc.write_stdin(data, close=False)
    await proc.write_stdin(b"", close=True)


def terminal_size() -> tuple[int, int]:
    """(rows, cols) of our terminal, docker's 24x80 when there is none."""
    for fd in (1, 0, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    return 24, 80


async def attach(proc: Process, *, stdin: bool, tty: bool = False) -> int:
    """Relay, forward signals (and window size changes with a TTY), return the exit code.

    With a TTY and a terminal on stdin, that terminal is put in raw mode for the
    container's life (Ctrl-C then reaches the container as a byte, as with
    docker -it) and restored however we leave.
    """
    loop = asyncio.get_running_loop()
    # A signal or a size for a process that has just ended, or stdin it no
    # longer reads, fails as expected: said with --debug only.
    tasks = TaskSet(log, level=logging.DEBUG)

    def forward(sig: int) -> None:
        tasks.spawn(proc.signal(sig), f"forwarding signal {sig}")

    def resized() -> None:
        tasks.spawn(proc.resize(*terminal_size()), "passing on the terminal size")

    saved = None
    if tty and stdin and os.isatty(0):
        saved = termios.tcgetattr(0)
        ttymod.setraw(0)
    for s in FORWARDED:
        loop.add_signal_handler(s, forward, s)
    if tty:
        loop.add_signal_handler(signal.SIGWINCH, resized)
    if stdin:
        tasks.spawn(feed_stdin(proc), "relaying stdin")
    try:
        await asyncio.gather(
            relay(proc.stdout, sys.stdout.fileno()), relay(proc.stderr, sys.stderr.fileno())
        )
        exited = await proc.wait()
    finally:
        for s in FORWARDED:
            loop.remove_signal_handler(s)
        if tty:
            loop.remove_signal_handler(signal.SIGWINCH)
        await tasks.aclose(CLOSE_S)
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
    return exited.exit_code
