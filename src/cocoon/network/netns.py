"""Reaching into a network namespace named by a path.

CNI, podman and containerd hand us a namespace as a path (``/run/netns/x``,
``/proc/PID/ns/net``), not a name, so ``ip -n NAME`` does not do: commands run
under ``nsenter --net=PATH`` and file descriptors that must be born inside the
namespace (a tap's) are opened by a short-lived thread that enters it with
setns(2). setns of a network namespace changes only the calling thread, so the
rest of the process (the monitor's event loop) never leaves the host's.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cocoon.errors import NetworkError
from cocoon.util import nsfs
from cocoon.util.proc import run

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
CMD_TIMEOUT_S = 15.0
#: Where ``ip netns`` keeps named namespaces (``ip -n NAME`` and ``tc -n NAME`` find them).
NAMED_DIRS = ("/run/netns", "/var/run/netns")
_libc = ctypes.CDLL(None, use_errno=True)


def check_path(path: str) -> str:
    """A namespace path must exist and be a network namespace."""
    try:
        kind = nsfs.kind_of(path)
    except OSError as e:
        raise NetworkError(f"network namespace {path}: {e.strerror}") from e
    if kind != "network":
        raise NetworkError(f"{path} is not a network namespace")
    return path


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """``fn()`` run by a thread inside the namespace at ``path``."""

    def enter() -> None:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise NetworkError(f"network namespace {path}: {e.strerror}") from e
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetworkError(f"cannot enter network namespace {path}: {os.strerror(err)}")
        finally:
            os.close(target)

    return _on_own_thread(enter, fn)


def in_new_netns(fn: Callable[[], T]) -> T:
    """``fn()`` run by a thread in a network namespace made for it (it lives on
    only as long as something made in it, a tap's fd say, holds it)."""

    def enter() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetworkError(f"cannot make a network namespace: {os.strerror(err)}")

    return _on_own_thread(enter, fn)


def _on_own_thread(enter: Callable[[], None], fn: Callable[[], T]) -> T:
    """``enter()`` then ``fn()`` on a short-lived thread, which goes back to the
    host's namespace before it ends; the result or error is handed back."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            out["error"] = NetworkError(f"cannot open this thread's namespace: {e.strerror}")
            return
        try:
            enter()
            out["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                # A thread stuck in a foreign namespace must not live on.
                os._exit(70)
            os.close(home)

    t = threading.Thread(target=body, name="netns")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


@dataclass
class Link:
    name: str
    index: int
    kind: str  # "veth", "tun", "bridge", "" (plain), ...
    mac: str
    mtu: int
    up: bool
    addresses: list[str] = field(default_factory=list)  # global-scope CIDRs


@dataclass(frozen=True)
class Route:
    dest: str  # "default" or a CIDR
    gateway: str
    device: str
    family: int  # 4 or 6


@dataclass(frozen=True)
class Neighbor:
    address: str
    mac: str
    device: str


class NetNs:
    """One network namespace, by path ("" = the host's own)."""

    def __init__(self, path: str = "") -> None:
        self.path = path

    def _argv(self, tool: str) -> list[str]:
        """``tool`` run in the namespace: by name (``-n``, one exec) for one
        ``ip netns`` named (CNI's, containerd's: /run/netns/NAME), else under
        ``nsenter`` (two execs: ~3 ms more each, and a pod's start runs ~9)."""
        if not self.path:
            return [tool]
        head, name = os.path.split(self.path)
        if head in NAMED_DIRS and name and not name.startswith(("-", ".")):
            return [tool, "-n", name]
        return ["nsenter", f"--net={self.path}", "--", tool]

    def ip(self, *args: str, check: bool = True) -> str:
        cp = run(
            [*self._argv("ip"), *args], timeout_s=CMD_TIMEOUT_S, error=NetworkError, check=check
        )
        return cp.stdout.decode(errors="replace")

    def tc(self, *args: str, check: bool = True) -> None:
        run([*self._argv("tc"), *args], timeout_s=CMD_TIMEOUT_S, error=NetworkError, check=check)

    def batch(self, tool: str, lines: Sequence[str], check: bool = True) -> None:
        """Many ``ip``/``tc`` commands in one process (``-batch``), stopping at the first error."""
        if not lines:
            return
        run(
            [*self._argv(tool), "-batch", "-"],
            timeout_s=CMD_TIMEOUT_S,
            error=NetworkError,
            input=("\n".join(lines) + "\n").encode(),
            check=check,
        )

    def _json(self, *args: str) -> list[dict[str, Any]]:
        text = self.ip("-j", *args)
        try:
            data = json.loads(text or "[]")
        except ValueError as e:
            raise NetworkError(f"ip -j {' '.join(args)}: unreadable output") from e
        return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []

    def links(self) -> list[Link]:
        out = []
        for d in self._json("-d", "addr", "show"):
            info = d.get("linkinfo") or {}
            addrs = [
                f"{a['local']}/{a['prefixlen']}"
                for a in d.get("addr_info", [])
                if a.get("scope") == "global" and "local" in a and "prefixlen" in a
            ]
            out.append(
                Link(
                    name=str(d.get("ifname", "")),
                    index=int(d.get("ifindex", 0)),
                    kind=str(info.get("info_kind", "")),
                    mac=str(d.get("address", "")),
                    mtu=int(d.get("mtu", 1500)),
                    up="UP" in (d.get("flags") or []),
                    addresses=addrs,
                )
            )
        return out

    def routes(self) -> list[Route]:
        out = []
        for fam in (4, 6):
            for d in self._json(f"-{fam}", "route", "show", "table", "main"):
                if d.get("protocol") == "kernel" or d.get("type", "unicast") != "unicast":
                    continue
                dest = str(d.get("dst", ""))
                if not dest or dest.startswith("fe80:") or "dev" not in d:
                    continue
                out.append(Route(dest, str(d.get("gateway", "")), str(d["dev"]), fam))
        return out

    def neighbors(self) -> list[Neighbor]:
        return [
            Neighbor(str(d["dst"]), str(d["lladdr"]), str(d["dev"]))
            for d in self._json("neigh", "show", "nud", "permanent")
            if "dst" in d and "lladdr" in d and "dev" in d
        ]
