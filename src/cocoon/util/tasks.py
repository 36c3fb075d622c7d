"""An owner for asyncio tasks: every task cocoon starts belongs to one.

asyncio holds a running task only weakly, so a task nobody keeps can be
collected mid-flight; and one that fails unwatched reports itself, if ever, as
a "Task exception was never retrieved" traceback whenever it happens to be
collected. A ``TaskSet`` keeps its tasks, logs each failure once in its
owner's words, and when the owner's work is over cancels what is left and
waits for it, up to a deadline, so nothing outlives the work it served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

#: How long a closing owner waits for its cancelled tasks: a cancelled task
#: only has to unwind (close a stream, drop a socket).
CLOSE_S = 5.0


class TaskSet:
    """The tasks of one owner (a monitor, an attached client, a port relay)."""

    def __init__(self, log: logging.Logger, *, level: int = logging.ERROR) -> None:
        self._log = log
        #: How a failed task is logged: ERROR where it is a bug of ours (a
        #: monitor's), lower where failing is expected (a signal forwarded to a
        #: process that has just exited).
        self._level = level
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._done)
        return t

    def _done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if t.cancelled():
            return
        e = t.exception()
        if e is not None:
            self._log.log(
                self._level, "%s failed: %s", t.get_name(), str(e) or type(e).__name__,
                exc_info=e if self._level >= logging.ERROR else None,
            )  # fmt: skip

    def cancel(self) -> None:
        """Cancel every task (for an owner that closes synchronously)."""
        for t in list(self._tasks):
            t.cancel()

    async def aclose(self, timeout_s: float) -> None:
        """Cancel what is left and wait for it to finish, ``timeout_s`` at most."""
        pending = list(self._tasks)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    def __len__(self) -> int:
        return len(self._tasks)

    async def __aenter__(self) -> TaskSet:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(CLOSE_S)
