"""Start slots: a bounded number of starts at once per state root, the rest queue."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.errors import SandboxError
from cocoon.sandbox.admission import slots, start_slot


def config(tmp_path: Path, n: int, queue_s: float = 30.0) -> Config:
    c = Config(root_dir=str(tmp_path))
    c.sandbox.max_starting = n
    c.sandbox.start_queue_s = queue_s
    return c


def test_starts_beyond_the_slots_wait_their_turn(tmp_path: Path) -> None:
    cfg = config(tmp_path, 2)
    running = 0
    peak = 0
    order: list[int] = []

    async def start(i: int) -> None:
        nonlocal running, peak
        async with start_slot(cfg):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.1)
            order.append(i)
            running -= 1

    async def main() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(start(i) for i in range(6)))
        return time.monotonic() - t0

    took = asyncio.run(main())
    assert peak == 2 and sorted(order) == list(range(6))
    assert took >= 0.3  # three rounds of two


def test_a_full_queue_fails_with_one_line(tmp_path: Path) -> None:
    cfg = config(tmp_path, 1, queue_s=0.2)

    async def main() -> None:
        async with start_slot(cfg), start_slot(cfg):
            pass

    with pytest.raises(SandboxError, match="the host is busy: 1 sandboxes were starting"):
        asyncio.run(main())


def test_default_slots_follow_the_cpus(tmp_path: Path) -> None:
    import os

    assert slots(config(tmp_path, 0)) == max(2, 2 * (os.cpu_count() or 1))
