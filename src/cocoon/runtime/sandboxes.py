"""Sandboxes as `cocoon sandbox ls|rm` and `cocoon gc` see them: every
sandbox dir of the state root, a dead owner's included, and reaping what
crashed processes left (state.gc does the work, for owners' teardowns too)."""

from __future__ import annotations

from cocoon.config import Config
from cocoon.state import gc
from cocoon.state.gc import SandboxInfo

__all__ = ["SandboxInfo", "ls", "reap", "rm"]


def ls(cfg: Config) -> list[SandboxInfo]:
    return gc.describe(cfg.root)


def rm(cfg: Config, sid: str, *, force: bool) -> bool:
    """Kill one sandbox's VM processes and remove its state; False when there
    is no such sandbox, or its owner lives and not ``force``."""
    return bool(gc.reap(cfg.root, only=sid, force=force))


def reap(cfg: Config) -> list[str]:
    """Every sandbox whose owner died, and what it left on the host: their ids."""
    return gc.reap(cfg.root, data=cfg.data)
