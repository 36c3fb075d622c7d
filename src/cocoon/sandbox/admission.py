"""How many sandboxes may be starting at once on this host.

Starting a VM is CPU-bound (a restore, the guest's crun, a cold boot's kernel
and Python), and under TCG every start shares the same few cores. Thirty
starts let loose together each got a thirtieth of the CPU and timed out
against the wall clock. So starts take one of a bounded number of slots,
host-wide, and the rest queue (for ``sandbox.start_queue_s`` at most); a start
only races its clock once it holds a slot.

A slot is an flock on ``<root>/admission/<n>``: held by the process starting
the sandbox, released by its exit whatever the cause, so a crashed start never
keeps one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator

from cocoon.config import Config
from cocoon.errors import SandboxError

POLL_S = 0.02


def slots(cfg: Config) -> int:
    return cfg.sandbox.max_starting or max(2, 2 * (os.cpu_count() or 1))


@contextlib.asynccontextmanager
async def start_slot(cfg: Config) -> AsyncIterator[None]:
    """Hold one start slot for the block; wait for one at most start_queue_s."""
    d = cfg.root / "admission"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    n = slots(cfg)
    deadline = time.monotonic() + cfg.sandbox.start_queue_s
    fd = -1
    while fd < 0:
        for i in range(n):
            cand = os.open(d / str(i), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(cand, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(cand)
                continue
            fd = cand
            break
        else:
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"the host is busy: {n} sandboxes were starting for "
                    f"{cfg.sandbox.start_queue_s:g} s; retry later"
                )
            await asyncio.sleep(POLL_S)
    try:
        yield
    finally:
        os.close(fd)
