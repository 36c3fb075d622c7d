"""Child reaping for PID 1.

As the guest's init the agent inherits every orphan, including each container
init and exec'd process once crun exits, so it owns ``waitpid(-1)``: one
thread blocks in it for the agent's whole life. Nothing else in the agent may
wait on a pid; callers ask the reaper for an ``Exit`` instead.
"""

from __future__ import annotations

import os
import threading

# One lock for every Exit and the reaper's tables: exits are rare, contention nil.
_LOCK = threading.Lock()


class Exit:
    """The raw wait status of one pid, filled in once by the reaper thread."""

    __slots__ = ("pid", "status", "_events")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None
        self._events: list[threading.Event] = []

    def done(self) -> bool:
        return self.status is not None

    def wake(self, ev: threading.Event) -> None:
        """Set ``ev`` when the pid has exited (at once if it already has).

        Events rather than a condition so a waiter can also be woken by
        something else (its session ending) while it waits on one event.
        """
        with _LOCK:
            if self.status is None:
                self._events.append(ev)
                return
        ev.set()

    def forget(self, ev: threading.Event) -> None:
        with _LOCK:
            if ev in self._events:
                self._events.remove(ev)

    def wait(self, timeout_s: float | None = None) -> int | None:
        """The status, or None if the pid is still running after ``timeout_s``."""
        if self.status is None:
            ev = threading.Event()
            self.wake(ev)
            ev.wait(timeout_s)
            self.forget(ev)
        return self.status

    def _set(self, status: int) -> None:
        """Reaper thread, _LOCK held."""
        self.status = status
        for ev in self._events:
            ev.set()
        self._events.clear()


class Reaper:
    #: Exit statuses of pids nobody asked for yet (the race between spawn and
    #: ``expect``), bounded so unrelated orphans cannot grow it forever.
    MAX_UNCLAIMED = 4096

    def __init__(self) -> None:
        self._waiters: dict[int, Exit] = {}
        self._unclaimed: dict[int, int] = {}  # insertion order = age
        self._children = threading.Condition(_LOCK)
        self._spawns = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def spawned(self) -> None:
        """Tell the reaper a child now exists (it may be idle after ECHILD).

        Call after the fork/spawn returned, so the child is already there when
        the reaper retries waitpid.
        """
        with _LOCK:
            self._spawns += 1
            self._children.notify()

    def expect(self, pid: int) -> Exit:
        """pid's Exit. Call right after spawning pid (or learning it from a pid file)."""
        with _LOCK:
            ex = self._waiters.get(pid)
            if ex is None:
                ex = Exit(pid)
                status = self._unclaimed.pop(pid, None)
                if status is not None:
                    ex._set(status)
                else:
                    self._waiters[pid] = ex
            return ex

    def _run(self) -> None:
        while True:
            with _LOCK:
                spawns = self._spawns
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # No children at all, hence no descendants that could orphan
                # onto us either: sleep until the next spawn. The count catches
                # a spawn between waitpid failing and us getting here.
                with _LOCK:
                    if self._spawns == spawns:
                        self._children.wait(5.0)
                continue
            with _LOCK:
                ex = self._waiters.pop(pid, None)
                if ex is not None:
                    ex._set(status)
                else:
                    self._unclaimed[pid] = status
                    while len(self._unclaimed) > self.MAX_UNCLAIMED:
                        del self._unclaimed[next(iter(self._unclaimed))]


def exit_code(status: int) -> tuple[int, int]:
    """(shell-style exit code, signal) from a raw wait status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.WEXITSTATUS(status), 0
