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
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    total, todo = 0, [root_pid]
    while todo:
        p = todo.pop()
        total += pss_kib(p)
        todo += kids.get(p, [])
    return total / 1024
