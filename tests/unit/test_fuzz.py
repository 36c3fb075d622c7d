"""Every fuzz target (fuzz/targets) for a few seconds, seeds included: a finding fails.

The same runner developers leave on for hours (``python3 fuzz/run.py --seconds
36000 --target NAME``), here with a short budget per target so the whole test
stays near a minute on two cores. A failure names the target and the cause;
the input is in fuzz/crashes/<target>/ for ``fuzz/run.py --reproduce``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
TARGETS = sorted(
    p.stem for p in (FUZZ / "targets").glob("*.py") if not p.stem.startswith("_")
)  # fmt: skip
#: The whole test's budget, split among the targets (3-8 s each).
BUDGET_S = 60.0
SECONDS = max(3.0, min(8.0, BUDGET_S / max(1, len(TARGETS))))


def test_targets_found() -> None:
    assert {"host_frames", "host_session", "agent_session", "oci_bundle"} <= set(TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target(target: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(
        [sys.executable, str(FUZZ / "run.py"), "--seconds", f"{SECONDS:g}", "--target", target],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=SECONDS * 4 + 60,
    )  # fmt: skip
    findings = [ln for ln in r.stdout.splitlines() if ln.startswith("FINDING")]
    assert r.returncode == 0 and not findings, (
        "\n".join(findings) or f"exit {r.returncode}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
    )
