"""Child reaping for PID 1.

As the guest's init the agent inherits every orphan, including each container
init and exec'd process once crun exits, so it owns ``waitpid(-1)``. Nothing
else in the agent may wait on a pid; callers ask the reaper for a future.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal


class Reaper:
    #: Exit statuses of pids nobody asked for yet (the race between spawn and
    #: ``expect``), bounded so unrelated orphans cannot grow it forever.
    MAX_UNCLAIMED = 4096

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: collections.OrderedDict[int, int] = collections.OrderedDict()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def expect(self, pid: int) -> asyncio.Future[int]:
        """Future of pid's raw wait status. Call right after spawning pid."""
        fut = self._waiters.get(pid)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            status = self._unclaimed.pop(pid, None)
            if status is not None:
                fut.set_result(status)
            else:
                self._waiters[pid] = fut
        return fut

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fut = self._waiters.pop(pid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(status)
            else:
                self._unclaimed[pid] = status
                while len(self._unclaimed) > self.MAX_UNCLAIMED:
                    self._unclaimed.popitem(last=False)


def exit_code(status: int) -> tuple[int, int]:
    """(shell-style exit code, signal) from a raw wait status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.WEXITSTATUS(status), 0
