"""A host cgroup per jailed VMM: a runaway QEMU hurts only its own sandbox.

The guest's memory is bounded by the VM's size, but QEMU's own (device
buffers, the TCG code cache, I/O bounce buffers) is not, and a compromised
QEMU could allocate until the host's OOM killer picks someone else. Its cgroup
caps its memory at the guest's size plus ``OVERHEAD_MIB`` and its processes
and threads at the jail's limit; past it the kernel kills within the cgroup.

cgroup v2 (``/sys/fs/cgroup/cocoon/<id>``, memory.max and pids.max) where the
host has it, else v1's memory and pids hierarchies (``.../memory/cocoon/<id>``,
``.../pids/cocoon/<id>``). The jailer joins them before it becomes QEMU.

A sandbox given a host cgroup of its caller's (``under``: a pod's, from the
OCI spec's ``linux.cgroupsPath``, which kubelet sizes and reads) is capped
there instead, in that same cgroup: its QEMU then sits with the processes
that serve it (monitor, file servers, shim), all counted in the pod's cgroup.
That cgroup is its caller's to make and remove (``runtime.hostcgroup``).
Pages of a template's sealed RAM are charged to its holder (they are shared),
so a clone is charged for what it wrote, not for what every clone reads.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from cocoon.errors import HypervisorError

ROOT = Path("/sys/fs/cgroup")
#: QEMU beyond guest RAM: the TCG code cache (32 MiB), its softmmu TLBs,
#: device and I/O buffers, libraries; measured ~70 MiB idle under TCG.
OVERHEAD_MIB = 256
#: gc leaves younger cgroups alone (see sweep).
SWEEP_AGE_S = 60.0


def _v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def paths(sandbox_id: str, under: str = "") -> list[Path]:
    """The sandbox's jail cgroups: ``cocoon/<id>``, or the host cgroup ``under``
    (a path below the hierarchies' roots)."""
    rel = under.strip("/") or f"cocoon/{sandbox_id}"
    if _v2():
        return [ROOT / rel]
    return [ROOT / "memory" / rel, ROOT / "pids" / rel]


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise HypervisorError(f"cannot set {path}: {e.strerror}") from e


def create(sandbox_id: str, guest_mib: int, pids: int, under: str = "") -> list[Path]:
    """The sandbox's cgroups, made and limited; the jailer joins them."""
    limit = (guest_mib + OVERHEAD_MIB) << 20
    made = paths(sandbox_id, under)
    try:
        if _v2():
            top = ROOT
            for part in made[0].relative_to(ROOT).parts[:-1]:  # each ancestor delegates
                _write(top / "cgroup.subtree_control", "+memory +pids")
                top = top / part
                top.mkdir(exist_ok=True)
            _write(top / "cgroup.subtree_control", "+memory +pids")
            made[0].mkdir(exist_ok=True)
            _write(made[0] / "memory.max", str(limit))
            _write(made[0] / "memory.swap.max", "0")
            _write(made[0] / "pids.max", str(pids))
        else:
            mem, pid = made
            for p in made:
                p.mkdir(parents=True, exist_ok=True)
            _write(mem / "memory.limit_in_bytes", str(limit))
            _write(pid / "pids.max", str(pids))
    except (OSError, HypervisorError) as e:
        if not under:  # a host cgroup is its maker's to remove
            remove(sandbox_id)
        why = str(e) if isinstance(e, HypervisorError) else f"{e.filename}: {e.strerror}"
        raise HypervisorError(
            f"the jail needs a host cgroup and cannot make one ({why}): give cocoon a "
            "writable cgroup v2 (or v1 memory and pids) hierarchy, or set security.jail = false"
        ) from e
    return made


def hierarchies() -> list[Path]:
    """Every mounted hierarchy's root: v2's, or each v1 one (with v2's
    ``unified`` beside them on a hybrid host)."""
    if _v2():
        return [ROOT]
    with contextlib.suppress(OSError):
        return sorted(d for d in ROOT.iterdir() if (d / "cgroup.procs").exists())
    return []


def enter(dirs: list[str], pids: list[int]) -> None:
    """Move each of ``pids`` (all its threads) into each cgroup of ``dirs``;
    one gone already is skipped (its watcher reports the VM's end), and so is
    a move into the cgroup a process is in (a pod's VM is born in it): on v1
    even that write waits for an RCU grace period."""
    for d in dirs:
        for pid in pids:
            try:
                if _within(pid, Path(d)):
                    continue
                Path(d, "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                continue
            except OSError as e:
                raise HypervisorError(f"cannot move process {pid} into {d}: {e.strerror}") from e


def _within(pid: int, d: Path) -> bool:
    """Whether ``pid`` is in cgroup dir ``d`` (of the v2 hierarchy, or of
    the v1 one ``d`` is under)."""
    try:
        parts = d.relative_to(ROOT).parts
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except (ValueError, OSError):
        return False
    if _v2():
        return f"0::/{'/'.join(parts)}" in lines
    want = "/" + "/".join(parts[1:])
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if parts and parts[0] in controllers.split(",") and path == want:
            return True
    return False


def move_into(under: str, sandbox_id: str, pids: list[int], *, jailed: bool, guest_mib: int,
              nproc: int) -> None:  # fmt: skip
    """A running VM's processes (a warm pool's, taken by a pod) into the host
    cgroup ``under`` in every hierarchy, with the jail's caps there when it
    is jailed; its own ``cocoon/<id>`` cgroups, empty then, removed. Pages it
    touched before stay charged where they were (v1 moves no charges)."""
    if jailed:
        create(sandbox_id, guest_mib, nproc, under)
    for top in hierarchies():
        d = top / under.strip("/")
        for pid in pids:
            try:
                d.mkdir(parents=True, exist_ok=True)
                (d / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                continue  # gone: its watcher reports the VM's end
            except OSError as e:
                raise HypervisorError(f"cannot move process {pid} into {d}: {e.strerror}") from e
    remove(sandbox_id)


def remove(sandbox_id: str) -> None:
    """Remove the sandbox's cgroups (empty once its QEMU is gone)."""
    for p in paths(sandbox_id):
        with contextlib.suppress(OSError):
            p.rmdir()


def sweep(live: set[str]) -> list[str]:
    """Remove the empty cgroups of sandboxes that no longer exist.

    The cgroups are the host's, shared by every state root: only empty ones
    go (rmdir refuses the others), and only those a minute old, never one
    made an instant ago for a start whose jailer has not joined it yet."""
    gone = []
    for top in {p.parent for p in paths("x")}:
        if not top.is_dir():
            continue
        for d in top.iterdir():
            with contextlib.suppress(OSError):
                if time.time() - d.stat().st_mtime < SWEEP_AGE_S:
                    continue
            if d.is_dir() and d.name not in live:
                with contextlib.suppress(OSError):
                    d.rmdir()
                    gone.append(d.name)
    return gone


def memory_limit(sandbox_id: str) -> int:
    """The sandbox's memory cap in bytes, as the kernel has it (0: none)."""
    p = paths(sandbox_id)[0]
    name = "memory.max" if _v2() else "memory.limit_in_bytes"
    with contextlib.suppress(OSError, ValueError):
        return int((p / name).read_text())
    return 0


def procs(sandbox_id: str) -> list[int]:
    out: list[int] = []
    for p in paths(sandbox_id):
        with contextlib.suppress(OSError, ValueError):
            out += [int(x) for x in (p / "cgroup.procs").read_text().split()]
    return sorted(set(out))
