"""Pre-warmed blanks' bookkeeping: each taken once, by shape, and refilled."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cocoon.config import Config
from cocoon.serve.prewarm import Blank, Prewarmer, Shape, default_shape


def test_each_blank_is_taken_once_and_only_for_its_shape() -> None:
    cfg = Config()
    cfg.serve.prewarm = 2
    made: list[Shape] = []

    async def start(shape: Shape) -> Blank:
        made.append(shape)
        return Blank(f"c{len(made)}", shape, Path("/nowhere"))

    async def scenario() -> None:
        p = Prewarmer(cfg, start, lambda shape: True)
        p.ready[default_shape("shell")] += [await start(default_shape("shell"))]
        shell = default_shape("shell")
        assert p.take(Shape("shell", 512, 1)) is None  # another size: its own start
        first = p.take(shell)
        assert first is not None and first.cid == "c1"
        assert p.take(shell) is None  # gone for good
        assert p.count == 0
        p.want("python")
        assert p._missing() == shell

    asyncio.run(scenario())
