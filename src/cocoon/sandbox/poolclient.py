"""Taking a sandbox from the warm pool: the client side of ``<root>/pool.sock``.

Apart from the server (``pool.py``) because every start asks it, from inside
``Sandbox.create``, while the server itself creates sandboxes: the sandbox
imports this module, the server imports the sandbox, and neither imports the
other's importer. See ``pool.py`` for what a pool is.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import CocoonError, SandboxError
from cocoon.state.store import check_sandbox_id

TAKE_TIMEOUT_S = 2.0
MAX_LINE = 4096


@dataclass(frozen=True)
class SizeClass:
    vcpus: int
    memory_mib: int
    #: NICs on taps in the pool's own namespace (``pool.nics``).
    nics: int = 0

    @property
    def name(self) -> str:
        return f"{self.vcpus}x{self.memory_mib}" + (f"+{self.nics}nic" if self.nics else "")


def classes(cfg: Config) -> list[SizeClass]:
    n = cfg.pool.nics
    out = [SizeClass(cfg.hypervisor.vcpus, cfg.hypervisor.memory_mib, n)]
    for c in cfg.pool.classes:
        v, _, m = c.partition("x")
        sc = SizeClass(int(v), int(m), n)
        if sc not in out:
            out.append(sc)
    return out


def socket_path(cfg: Config) -> Path:
    return Path(cfg.pool.socket) if cfg.pool.socket else cfg.root / "pool.sock"


@dataclass(frozen=True)
class Taken:
    """A pooled sandbox as it reaches its new owner."""

    sandbox_id: str
    owner_fd: int  # holds the sandbox's owner lock
    channel_fd: int  # the agent channel, connected and quiet
    #: The pool's network namespace holding its NICs' taps (-1: no NIC).
    netns_fd: int = -1


def _ask(
    cfg: Config, request: dict[str, Any], timeout_s: float
) -> tuple[dict[str, Any], list[int]]:
    """One request to the pool server: (its reply, the fds it sent)."""
    path = socket_path(cfg)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        data, fds, _, _ = socket.recv_fds(s, MAX_LINE, 3)
    finally:
        s.close()
    try:
        reply = json.loads(data)
        if not isinstance(reply, dict):
            raise ValueError("not an object")
    except ValueError:
        close_fds(fds)
        raise SandboxError("the pool server sent a reply that is not JSON") from None
    return reply, fds


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def serving(cfg: Config) -> bool:
    """Whether a pool server may be there to ask (its socket exists)."""
    return socket_path(cfg).exists()


def take(cfg: Config, vcpus: int, memory_mib: int, nics: int = 0) -> Taken | None:
    """A pooled sandbox of this size and NIC count, or None when there is no
    server or no sandbox ready (the caller then starts one itself)."""
    if not serving(cfg):
        return None
    try:
        reply, fds = _ask(cfg, {"take": SizeClass(vcpus, memory_mib, nics).name}, TAKE_TIMEOUT_S)
    except (OSError, SandboxError):
        return None
    sid = reply.get("sandbox")
    if len(fds) != (3 if nics else 2) or not isinstance(sid, str) or not sid:
        close_fds(fds)
        return None
    try:
        check_sandbox_id(sid)
    except CocoonError:
        close_fds(fds)
        return None
    return Taken(sid, fds[0], fds[1], fds[2] if nics else -1)


def status(cfg: Config, request: str = "status") -> dict[str, Any]:
    """The server's view (ready sandboxes per class); raises SandboxError without one."""
    try:
        reply, fds = _ask(cfg, {request: True}, 60.0 if request == "fill" else 10.0)
    except OSError as e:
        raise SandboxError(
            f"no pool server on {socket_path(cfg)} ({e.strerror or e}): start `cocoon pool serve`"
        ) from None
    close_fds(fds)
    return reply
