"""Pre-warmed instances: blank containers started before anyone needs them.

The seeds' fast start is a sandbox already running whose code arrives by a
mount. A blank instance is the runtime's container already started in a
pooled sandbox, idle, its ``/code`` a bind of an empty, read-only host
directory through the sandbox's hub (storage/hub.py). A version that needs a
new instance takes one (``take``): its code is bound read-only over the
hub's slot on the host (``hub.cover``), which the guest sees at the
container's /code from the next lookup on (9p resolves paths on the host
each time), then the handler runs. No container is created on the request's
path, and the guest is not even asked.

A blank is taken once, by one version, and becomes that version's instance
for its life; it never returns here. Nothing of a tenant is in it before:
the empty directory, the runtime's image, an idle init, no environment of
any function (each exec brings its own). A shell blank also has its shell
loop started (serve/shloop.py), waiting for a handler, and a loop runtime's
(Python) its handler loop with no handler (images/pyloop.py's ``-``): the
interpreter's start, most of a Python instance's, is paid ahead; the take
sends the loop the handler and the version's environment once the code is
in, and only then does a Python loop import.

Only a pooled sandbox has a hub (a plain template clone's shares are fixed
when QEMU starts, its file server holding the directory itself), so blanks
are made only while `cocoon pool serve` has a sandbox ready, and a blank
that did not get one is removed at once. Blanks are of the default function
size (models.DEFAULTS): a container's memory and CPU limits are set at its
creation, so a version of another size starts its own instance. A runtime
is kept pre-warmed once a function of it was deployed or started since the
service started (the shell runtime always).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.serve.models import DEFAULTS

log = logging.getLogger(__name__)

#: After a take, the refill waits this long: the taker's first call runs meanwhile.
REFILL_AFTER_S = 1.0
#: Pause after a failed fill, or while no pool server has a sandbox ready.
RETRY_S = 3.0
#: Failed starts back off, doubling up to this: a start that fails after it
#: took a pooled sandbox costs the pool a refill.
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class Shape:
    runtime: str
    memory_mib: int
    vcpus: int


def shape_of(spec: dict[str, Any]) -> Shape:
    return Shape(spec["runtime"], int(spec["memory_mib"]), int(spec["vcpus"]))


def default_shape(runtime: str) -> Shape:
    return Shape(runtime, int(DEFAULTS["memory_mib"]), int(DEFAULTS["vcpus"]))


@dataclass(frozen=True)
class Blank:
    cid: str
    shape: Shape
    #: The hub's slot bound at the container's /code (on the host).
    slot: Path
    #: A loop runtime's handler loop, started with no handler, waiting
    #: (instances.LoopSession): the interpreter's start paid ahead too.
    session: Any = None


class Prewarmer:
    """The blanks, per shape, and the task that keeps ``serve.prewarm`` of each."""

    def __init__(
        self,
        cfg: Config,
        start: Callable[[Shape], Awaitable[Blank]],
        pool_ready: Callable[[Shape], bool],
    ) -> None:
        self.cfg = cfg
        #: Starts one blank (instances.Instances.start_blank).
        self.start = start
        #: Whether the warm pool has a sandbox for a blank of this shape (blocking).
        self.pool_ready = pool_ready
        self.ready: dict[Shape, list[Blank]] = {}
        self.wanted: list[Shape] = []
        self._wake = asyncio.Event()
        self._last_take = 0.0
        self._complained = ""
        self._backoff = RETRY_S
        self.want("shell")

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.ready.values())

    def want(self, runtime: str) -> None:
        """Keep ``runtime`` pre-warmed from now on."""
        shape = default_shape(runtime)
        if shape not in self.wanted:
            self.wanted.append(shape)
            self.ready.setdefault(shape, [])
            self._wake.set()

    def take(self, shape: Shape) -> Blank | None:
        """A blank of ``shape``, now its taker's alone; None if there is none."""
        if shape == default_shape(shape.runtime):
            self.want(shape.runtime)
        blanks = self.ready.get(shape)
        if not blanks:
            return None
        self._last_take = time.monotonic()
        self._wake.set()
        return blanks.pop(0)

    def _missing(self) -> Shape | None:
        return next((s for s in self.wanted if len(self.ready[s]) < self.cfg.serve.prewarm), None)

    async def run(self) -> None:
        """Refill, one blank at a time (each a container start: CPU)."""
        while True:
            shape = self._missing()
            quiet = self._last_take + REFILL_AFTER_S - time.monotonic()
            if shape is None or quiet > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(quiet, 0.05) if shape else 5.0):
                        await self._wake.wait()
                continue
            if not await asyncio.to_thread(self.pool_ready, shape):
                await asyncio.sleep(RETRY_S)
                continue
            try:
                blank = await self.start(shape)
            except Exception as e:  # noqa: BLE001 - a failed start backs off; this task never ends
                why = str(e) or e.__class__.__name__
                if why != self._complained:
                    log.warning("pre-warming a %s instance: %s", shape.runtime, why)
                    self._complained = why
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
                continue
            self._complained = ""
            self._backoff = RETRY_S
            self.ready[shape].append(blank)

    def drain(self) -> list[Blank]:
        """Every blank, no longer kept (the service removes them)."""
        out = [b for bs in self.ready.values() for b in bs]
        for bs in self.ready.values():
            bs.clear()
        return out
