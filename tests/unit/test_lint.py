"""The code standards, enforced where CI looks: ruff (lint + format) and mypy --strict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "src", "tests", "bench", "fuzz"],
        ["ruff", "format", "--check", "src", "tests", "bench", "fuzz"],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_clean(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_host_programs_run_through_util_proc() -> None:
    """One way to run a host program to completion, always with a timeout:
    util.proc.run. (The agent spawns with posix_spawn on purpose; long-lived
    processes, a VMM or a holder, are started with Popen and supervised.)"""
    import ast

    banned = {"run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}
    src = ROOT / "src" / "cocoon"
    found = []
    for path in sorted(src.rglob("*.py")):
        if path == src / "util" / "proc.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "subprocess"
                and node.attr in banned
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: subprocess.{node.attr}")
    assert not found, "\n".join(found)
