"""The shim's monitors: its own children, each reaped by its pid.

The shim forks each pod's monitor once (``runtime.monitor.spawn`` with
``reap``), so a pod's host processes are one tree below its shim, as under
containerd's own shims. Their exits are collected here through a pidfd
watched by the event loop, by pid: nothing waits for any child (-1), so the
exits ``subprocess`` and asyncio wait for (hooks, ``ip``, ``tc``) stay
theirs, and no thread is parked per monitor. The shim is not a child
subreaper: a monitor's own children (QEMU, its file servers) are its to reap,
and a monitor that dies first leaves them to init and to the task's delete,
as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

log = logging.getLogger(__name__)


class Children:
    """The monitors this shim forked, until each one's exit is collected."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._fds: dict[int, int] = {}

    def reap(self, pid: int) -> None:
        """Collect ``pid``'s exit when it comes (called from any thread: the
        library forks in the shim's worker threads)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the shim is going
            self.loop.call_soon_threadsafe(self._watch, pid)

    def _watch(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone already (cannot be, for a child not yet reaped)
            self._collect(pid, os.WNOHANG)
            return
        self._fds[pid] = fd
        self.loop.add_reader(fd, self._exited, pid)

    def _exited(self, pid: int) -> None:
        fd = self._fds.pop(pid, -1)
        if fd >= 0:
            self.loop.remove_reader(fd)
            os.close(fd)
        self._collect(pid, 0)  # readable: it has exited, the wait is immediate

    @staticmethod
    def _collect(pid: int, flags: int) -> None:
        with contextlib.suppress(ChildProcessError):
            got, status = os.waitpid(pid, flags)
            if got:
                log.info(f"monitor {pid} exited ({os.waitstatus_to_exitcode(status)})")

    def close(self) -> None:
        """Stop watching; monitors still tearing their VM down outlive the
        shim, and init collects them."""
        for pid, fd in self._fds.items():
            self.loop.remove_reader(fd)
            os.close(fd)
            log.info(f"monitor {pid} outlives the shim")
        self._fds.clear()
