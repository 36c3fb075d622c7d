"""Warm pools as the front ends see them: run the server, ask it how it is."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from cocoon.config import Config
from cocoon.sandbox import pool


def serve(cfg: Config) -> None:
    """Run the pool server in the foreground until SIGTERM/SIGINT."""

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    asyncio.run(pool.PoolServer(cfg, log).serve())


def status(cfg: Config) -> dict[str, Any]:
    return pool.status(cfg)


def fill(cfg: Config) -> dict[str, Any]:
    """Resume filling (after a drain) and wait, a minute at most, until full."""
    return pool.status(cfg, "fill")


def drain(cfg: Config) -> int:
    """Destroy every ready sandbox and stop refilling until `fill`."""
    return int(pool.status(cfg, "drain").get("drained", 0))
