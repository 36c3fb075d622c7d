"""hypervisor.cgroup.enter: a running process (a jailed VMM) moved into its
sandbox's cgroups by the host, and a move into where it is already skipped."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from cocoon.hypervisor import cgroup

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="moving a process needs root")


def test_a_running_process_is_moved_in_and_a_second_move_is_a_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sid = "test-" + uuid.uuid4().hex[:12]
    dirs = [str(d) for d in cgroup.create(sid, 64, 16)]
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert not any(cgroup._within(p.pid, Path(d)) for d in dirs)
        cgroup.enter(dirs, [p.pid])
        assert all(cgroup._within(p.pid, Path(d)) for d in dirs)
        assert cgroup.procs(sid) == [p.pid]

        def no_write(self: Path, data: str) -> int:
            raise AssertionError(f"wrote {data} to {self}")

        monkeypatch.setattr(Path, "write_text", no_write)
        cgroup.enter(dirs, [p.pid])  # already there: nothing written
        monkeypatch.undo()
    finally:
        p.kill()
        p.wait()
        cgroup.remove(sid)
    assert not any(Path(d).exists() for d in dirs)


def test_a_process_that_is_gone_is_skipped() -> None:
    sid = "test-" + uuid.uuid4().hex[:12]
    dirs = [str(d) for d in cgroup.create(sid, 64, 16)]
    p = subprocess.Popen(["true"])
    p.wait()
    try:
        cgroup.enter(dirs, [p.pid])
        assert cgroup.procs(sid) == []
    finally:
        cgroup.remove(sid)
