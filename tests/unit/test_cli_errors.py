"""`cocoon`'s failures: one line on stderr (text or JSON) and docker's exit codes;
an exception that is no CocoonError is still one line, exit 125."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from cocoon.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"


def test_an_unexpected_exception_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(**_kw: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(main.cli, "main", broken)
    monkeypatch.setattr(sys, "argv", ["cocoon", "pull", "x"])
    with pytest.raises(SystemExit) as e:
        main.main()
    assert e.value.code == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("cocoon: internal error: RecursionError: maximum recursion depth")


def cocoon(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> CompletedProcess[str]:
    """The real command line, in a process of its own (no VM is reached)."""
    full = {**os.environ, "PYTHONPATH": str(SRC), "COCOON_CONFIG": "", "HOME": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "cocoon.cli", "--root", str(tmp_path / "root"), *args],
        env={**full, **(env or {})}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("argv", [["run", "--bogus", "busybox"], ["--bogus", "ps"], ["ps", "-z"]])
def test_a_bad_flag_exits_125_with_the_usage(tmp_path: Path, argv: list[str]) -> None:
    """docker's code for a command line it refuses is 125 (click's is 2)."""
    r = cocoon(tmp_path, *argv)
    assert r.returncode == 125, r.stderr
    assert r.stderr.startswith("Usage: ") and "No such option" in r.stderr
    assert cocoon(tmp_path, "run", "--help").returncode == 0


def test_the_error_line_in_text_json_and_with_debug(tmp_path: Path) -> None:
    r = cocoon(tmp_path, "inspect", "nosuch")
    assert (r.returncode, r.stderr) == (1, "cocoon: no such container: nosuch\n")
    r = cocoon(tmp_path, "--log-format", "json", "inspect", "nosuch")
    (line,) = r.stderr.splitlines()
    rec = json.loads(line)
    assert r.returncode == 1 and rec["level"] == "error" and rec["time"]
    assert rec["msg"] == "no such container: nosuch"
    assert (rec["exit_code"], rec["error"]) == (1, "NoSuchContainer")
    r = cocoon(tmp_path, "--debug", "inspect", "nosuch")
    assert r.returncode == 1 and r.stderr.startswith("Traceback (most recent call last):")
    assert r.stderr.endswith("\ncocoon: no such container: nosuch\n")
