"""Warm pools as the front ends see them: run the server, ask it how it is."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from cocoon.config import Config
from cocoon.errors import CocoonError
from cocoon.sandbox import poolclient


def serve(cfg: Config, say: Callable[[str], None], *, once: bool = False) -> None:
    """Run the pool server in the foreground until SIGTERM/SIGINT; what it has
    to say goes to ``say``, one line at a time (the front end shows it). With
    ``once``, until its first hand-out or drain, and then it stays the
    parent of the VM it handed out until that ends (shim.carrier)."""
    # Only the server needs the sandbox's imports; status, fill and drain are a socket.
    from cocoon.sandbox.pool import PoolServer

    server = PoolServer(cfg, say, once=once)
    asyncio.run(server.serve())
    if once:
        server.wait_for_handed()


def status(cfg: Config) -> dict[str, Any]:
    return poolclient.status(cfg)


def fill(cfg: Config) -> dict[str, Any]:
    """Resume filling (after a drain) and wait, a minute at most, until full."""
    return poolclient.status(cfg, "fill")


def drain(cfg: Config) -> int:
    """Destroy every ready sandbox and stop refilling until `fill`."""
    return int(poolclient.status(cfg, "drain").get("drained", 0))


def has_ready(cfg: Config, vcpus: int, memory_mib: int) -> bool:
    """Whether a pool server runs and has a sandbox of this VM size ready (a
    start of that size would get one)."""
    if not poolclient.socket_path(cfg).exists():
        return False
    try:
        ready = poolclient.status(cfg).get("classes", {})
    except CocoonError:
        return False
    return isinstance(ready, dict) and bool(ready.get(poolclient.SizeClass(vcpus, memory_mib).name))
