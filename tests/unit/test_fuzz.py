"""Every fuzz target (fuzz/targets) for a few seconds, seeds included: a finding fails.

The same runner developers leave on for hours (``python3 fuzz/run.py --seconds
36000 --target NAME``), here with a short budget per target so the whole test
stays near a minute on two cores. A failure names the target and the cause;
the input is in fuzz/crashes/<target>/ for ``fuzz/run.py --reproduce``.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import types
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


BROKEN = """
import os, time
def run(data):
    if data == b"hang":
        time.sleep(60)
    if data == b"memory":
        x = bytearray(300 << 20)
        x[::4096] = b"\\x01" * len(x[::4096])
    if data == b"exception":
        raise KeyError("boom")
    if data == b"died":
        os._exit(3)
    if data == b"fine":
        raise ValueError("the decoder's own error")
"""


def test_the_runner_reports_every_kind_of_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target that hangs, eats memory, raises or dies on cue: each is one finding,
    saved; its own error (ValueError here) and clean inputs are not."""
    monkeypatch.syspath_prepend(str(FUZZ))
    import run  # fuzz/run.py

    module = types.ModuleType("broken")
    exec(BROKEN, module.__dict__)
    module.seeds = lambda: [b"fine", b"hang", b"memory", b"exception", b"died", b"ok"]  # type: ignore[attr-defined]
    target = run.Target("broken", module, (ValueError,), 1.0, 100, 1024, (str(FUZZ),))
    monkeypatch.setattr(run, "CRASHES", tmp_path)
    stats = run.Fuzzer(target, random.Random(0), 0.0, keep_going=True).run(0.0)
    kinds = sorted(f.split(": ")[1] for f in stats.findings)
    assert kinds == ["died", "exception", "hang", "memory"], stats.findings
    assert "KeyError: 'boom'" in "\n".join(stats.findings)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "broken").glob("*.txt")) == kinds
