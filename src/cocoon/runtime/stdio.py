"""Attaching this terminal-less process to a container process in a guest.

stdout/stderr relayed as they arrive (kept apart), stdin pumped if asked,
SIGINT/SIGTERM/SIGHUP forwarded to the container's process, and the exit
code (128+N for signal N) returned once output is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from cocoon.protocol.session import InStream
from cocoon.sandbox.sandbox import Process

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def relay(stream: InStream | None, fd: int) -> None:
    if stream is None:
        return
    while data := await stream.read():
        view = memoryview(data)
        while view:
            n = await asyncio.to_thread(os.write, fd, view)
            view = view[n:]


async def feed_stdin(proc: Process) -> None:
    loop = asyncio.get_running_loop()
    while data := await loop.run_in_executor(None, os.read, 0, 65536):
        await proc.write_stdin(data, close=False)
    await proc.write_stdin(b"", close=True)


async def attach(proc: Process, *, stdin: bool) -> int:
    loop = asyncio.get_running_loop()

    def forward(sig: int) -> None:
        loop.create_task(proc.signal(sig))

    for s in FORWARDED:
        loop.add_signal_handler(s, forward, s)
    feeder = loop.create_task(feed_stdin(proc)) if stdin else None
    try:
        await asyncio.gather(
            relay(proc.stdout, sys.stdout.fileno()), relay(proc.stderr, sys.stderr.fileno())
        )
        exited = await proc.wait()
    finally:
        for s in FORWARDED:
            loop.remove_signal_handler(s)
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
    return exited.exit_code
