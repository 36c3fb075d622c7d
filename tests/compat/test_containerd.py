"""containerd's runc shim (ctr --runc-binary) driving cocoon-runtime."""

from __future__ import annotations

import time

import pytest

from tests.compat.conftest import IMAGE, Containerd, assert_clean, runtime

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def test_run_and_exit_code(containerd: Containerd) -> None:
    r = containerd.ctr("run", "--rm", "--runc-binary", runtime(), IMAGE, "c1",
                       "sh", "-c", "echo from containerd; exit 5")  # fmt: skip
    assert (r.returncode, r.stdout) == (5, b"from containerd\n"), r.stderr
    assert_clean(containerd.runtime_root)


def test_exec_pause_resume_kill(containerd: Containerd) -> None:
    ctr = containerd.ctr
    r = ctr("run", "-d", "--runc-binary", runtime(), IMAGE, "c2",
            "sh", "-c", "while true; do sleep 0.2; done")  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        r = ctr("task", "exec", "--exec-id", "e1", "c2", "sh", "-c", "echo in exec; exit 6")
        assert (r.returncode, r.stdout) == (6, b"in exec\n"), r.stderr
        assert ctr("task", "pause", "c2").returncode == 0
        assert b"PAUSED" in ctr("task", "ls").stdout
        assert ctr("task", "resume", "c2").returncode == 0
        assert b"RUNNING" in ctr("task", "ls").stdout
        assert ctr("task", "kill", "-s", "SIGKILL", "c2").returncode == 0
        deadline = time.monotonic() + 30
        while b"STOPPED" not in ctr("task", "ls").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        ctr("task", "delete", "-f", "c2")
        ctr("container", "rm", "c2")
    assert_clean(containerd.runtime_root)
