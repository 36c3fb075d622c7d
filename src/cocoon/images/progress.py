"""Pull progress: one rich bar per layer, on stderr, only on a terminal (STYLE: never stdout)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported only for a terminal (Bars)
    from rich.progress import Progress, TaskID


class Bars:
    """The bars of one pull; without a terminal every call does nothing."""

    def __init__(self, enabled: bool) -> None:
        self._p: Progress | None = None
        if enabled and sys.stderr.isatty():
            # rich only here: ~30 ms of imports that a pull without a terminal never needs.
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            self._p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> Bars:
        if self._p:
            self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p:
            self._p.stop()

    def add(self, label: str, total: int, completed: int = 0) -> TaskID | None:
        return self._p.add_task(label, total=total, completed=completed) if self._p else None

    def set(self, task: TaskID | None, completed: int) -> None:
        if self._p and task is not None:
            self._p.update(task, completed=completed)
