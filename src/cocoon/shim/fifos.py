"""A task's stdio: the fifos containerd (ctr, the CRI plugin) names in Create
and Exec, relayed to and from the guest process's streams.

stdout and stderr are opened read-write and non-blocking: the open returns at
once whether or not containerd's reader has opened its end yet, what is
written meanwhile waits in the pipe, and a reader that is slow only makes us
wait for room (on the event loop, never in a thread). Holding a read end
ourselves is what runc's shim does too: the writer never gets EPIPE when the
reader goes and comes back (containerd restarting). The reader sees EOF when
we close our end, once the process's output has ended.

stdin is opened for reading, which blocks until containerd opens the writing
end: that open runs in a thread of its own, so an stdin nobody ever writes
costs a parked thread, not the event loop. Its EOF closes the process's stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading

from cocoon.errors import ShimError
from cocoon.runtime.container import InStream, Process

CHUNK = 65536


def open_output(path: str) -> int:
    """A fifo (or a regular file, as `ctr run --log-uri file://`) to write output to."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ShimError(f"cannot open {path}: {e.strerror}") from e
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.set_blocking(fd, True)
    return fd


async def _ready(fd: int, *, write: bool) -> None:
    """Until ``fd`` can be written (or read), on the event loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def write_all(fd: int, data: bytes) -> None:
    """``data`` to a non-blocking fd, waiting on the loop while the pipe is full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _ready(fd, write=True)
            continue
        view = view[n:]


async def copy_out(src: InStream | None, fd: int) -> None:
    """A guest stream to ``fd`` until its end; then ``fd`` is closed. A reader
    that went for good (EPIPE on a file) ends the copy, not the process."""
    try:
        if src is None:
            return
        while data := await src.read():
            try:
                await write_all(fd, data)
            except OSError:
                src.discard()
                return
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


async def open_input(path: str) -> int:
    """The stdin fifo, once containerd has opened its writing end."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def opener() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            err = ShimError(f"cannot open {path}: {e.strerror}")

            def fail() -> None:
                if not done.done():
                    done.set_exception(err)

            loop.call_soon_threadsafe(fail)
            return

        def give() -> None:
            if done.done():  # nobody waits any more
                os.close(fd)
            else:
                done.set_result(fd)

        loop.call_soon_threadsafe(give)

    threading.Thread(target=opener, name=f"open {path}", daemon=True).start()
    return await done


async def copy_in(path: str, proc: Process) -> None:
    """The stdin fifo to the guest process, until EOF; then its stdin is closed."""
    fd = await open_input(path)
    try:
        os.set_blocking(fd, False)
        while True:
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                await _ready(fd, write=False)
                continue
            if not data:
                break
            await proc.write_stdin(data, close=False)
        await proc.write_stdin(b"", close=True)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
