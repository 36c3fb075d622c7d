"""Host memory as the benchmarks report it: PSS, so shared pages are split fairly."""

from __future__ import annotations

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
