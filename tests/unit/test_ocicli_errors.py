"""cocoon-runtime's failures as runc's: one line on stderr, the same in --log, exit 1.

containerd's shim and conmon show only what --log holds; a traceback there is
lost, and one on stderr is many lines of noise where one line was wanted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cocoon.ocicli import main
from cocoon.runtime import bundle

SRC = Path(__file__).resolve().parents[2] / "src"


def runtime(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "COCOON_CONFIG": "", "HOME": str(tmp_path)}
    code = "from cocoon.ocicli.main import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, "--root", str(tmp_path / "root"), *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def hostile_bundle(tmp_path: Path, text: str) -> Path:
    b = tmp_path / "bundle"
    (b / "rootfs").mkdir(parents=True)
    (b / "config.json").write_text(text)
    return b


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_hostile_bundle_is_one_line_and_logged(tmp_path: Path, fmt: str) -> None:
    """Issue 19: `"linux": []` was an AttributeError traceback, exit 1, nothing in --log."""
    b = hostile_bundle(tmp_path, json.dumps({"process": {"args": ["true"]}, "linux": []}))
    log = tmp_path / "log"
    r = runtime(tmp_path, "--log", str(log), f"--log-format={fmt}", "create", "-b", str(b), "c1")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "linux must be an object" in r.stderr
    (line,) = log.read_text().splitlines()
    if fmt == "json":
        rec = json.loads(line)
        assert rec["level"] == "error" and "linux must be an object" in rec["msg"]
    else:
        assert " level=error msg=" in line and "linux must be an object" in line


def test_newlines_in_an_error_stay_on_one_line(tmp_path: Path) -> None:
    b = tmp_path / "bun\ndle"
    (b / "rootfs").mkdir(parents=True)
    (b / "config.json").write_text("{")
    log = tmp_path / "log"
    r = runtime(tmp_path, "--log", str(log), "create", "--bundle", str(b), "c1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "bun\\ndle" in r.stderr
    assert len(log.read_text().splitlines()) == 1


def test_an_unexpected_exception_is_still_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last resort for a bug of ours: no traceback, the class named, --log written."""

    def broken(_bundle: Path) -> dict[str, object]:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(bundle, "load", broken)
    monkeypatch.setenv("COCOON_CONFIG", "")
    log = tmp_path / "log"
    monkeypatch.setattr(
        sys, "argv",
        ["cocoon-runtime", "--root", str(tmp_path), "--log", str(log), "create", "c1"],
    )  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main.main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert (
        err == "cocoon-runtime: internal error: RecursionError: maximum recursion depth exceeded\n"
    )  # noqa: E501
    assert "internal error: RecursionError" in log.read_text()
