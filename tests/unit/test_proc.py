"""util.proc.run: the one way cocoon runs a host program to completion."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cocoon.errors import HostError, NetworkError
from cocoon.util.proc import run, run_ns


def test_executable_runs_another_file_than_argv0() -> None:
    """As an OCI hook's path and args: argv[0] is only a name."""
    cp = run(["not-a-shell", "-c", 'echo "$0"'], executable="/bin/sh", timeout_s=10)
    assert cp.stdout == b"not-a-shell\n"


def test_timeout_kills_and_raises_the_callers_error() -> None:
    t = time.monotonic()
    with pytest.raises(NetworkError, match="did not finish within 0.2 s"):
        run(["sleep", "30"], timeout_s=0.2, error=NetworkError)
    assert time.monotonic() - t < 10


def test_failure_names_the_last_line_of_stderr() -> None:
    with pytest.raises(HostError, match=r"failed \(exit 3\): second"):
        run(["sh", "-c", "echo first >&2; echo second >&2; exit 3"], timeout_s=10)
    cp = run(["sh", "-c", "exit 3"], timeout_s=10, check=False)
    assert cp.returncode == 3


def test_a_missing_program_is_the_callers_error() -> None:
    with pytest.raises(HostError, match="no-such-program-x not found"):
        run(["no-such-program-x"], timeout_s=10)


def test_run_ns_counts_every_thread_exactly() -> None:
    """A template build waits for the guest to be quiet by this count: the
    CPU a second thread burns is in it, to well under a 10 ms tick."""
    burn = (
        "import threading, time\n"
        "spun = threading.Event()\n"
        "def spin():\n"
        "    end = time.thread_time() + 0.05\n"
        "    while time.thread_time() < end: pass\n"
        "    spun.set(); time.sleep(30)\n"
        "threading.Thread(target=spin, daemon=True).start(); spun.wait()\n"
        "print('done', flush=True); time.sleep(30)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "done\n"
        first = run_ns(p.pid)
        assert first is not None and first >= 50_000_000  # the second thread's 50 ms
        time.sleep(0.1)
        second = run_ns(p.pid)
        assert second is not None and second - first < 5_000_000  # asleep: nearly nothing
    finally:
        p.kill()
        p.wait()
    assert run_ns(p.pid) is None
