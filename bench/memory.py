"""Host memory as the benchmarks report it: PSS, so shared pages are split fairly."""

from __future__ import annotations

import os
from pathlib import Path


def pss_kib(pid: int) -> int:
    """Proportional set size of one process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mib(root_pid: int) -> float:
    """PSS of a process and all its descendants, in MiB."""
    return sum(pss_kib(p) for p in descendants(root_pid)) / 1024


def descendants(root_pid: int) -> list[int]:
    """A process and all its descendants."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    found, todo = [], [root_pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += kids.get(p, [])
    return found


def tree_parts_mib(root_pid: int) -> dict[str, float]:
    """A container's host PSS (its monitor's process tree) by part: QEMU's
    (``qemu_parts_mib``) and ``processes``, every other one (the monitor,
    tini, a file server)."""
    parts = {"code cache": 0.0, "guest RAM": 0.0, "rest": 0.0, "processes": 0.0}
    for p in descendants(root_pid):
        try:
            exe = os.readlink(f"/proc/{p}/exe")
        except OSError:
            continue
        if "qemu-system" in exe:
            for k, v in qemu_parts_mib(p).items():
                parts[k] += v
        else:
            parts["processes"] += pss_kib(p) / 1024
    return parts


def qemu_parts_mib(pid: int) -> dict[str, float]:
    """One QEMU's PSS by what it is, in MiB: ``code cache`` (TCG's translated
    code: the one anonymous read-write-execute mapping, which a KVM VM does
    not have), ``guest RAM`` (its memory backend: a template's memfd or file
    for a clone, whose clean pages the clones split, or one big anonymous
    mapping for a cold boot) and ``rest`` (QEMU's own heap, device state, TCG's metadata)."""
    parts = {"code cache": 0.0, "guest RAM": 0.0, "rest": 0.0}
    kind = "rest"
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return parts
    for line in text.splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0] and len(head) >= 5:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            name = head[5] if len(head) > 5 else ""
            if head[1] == "rwxp" and not name:
                kind = "code cache"
            elif (name.startswith("/memfd:") or "/templates/" in name) or (
                not name and hi - lo >= 64 << 20
            ):
                kind = "guest RAM"
            else:
                kind = "rest"
        elif line.startswith("Pss:"):
            parts[kind] += int(line.split()[1]) / 1024
    return parts
