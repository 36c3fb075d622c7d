"""State dirs, ownership locks and the reaping of what a dead owner left."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cocoon.errors import SandboxError
from cocoon.state import gc
from cocoon.state.store import ProcessRecord, SandboxDir, SandboxState, check_sandbox_id
from cocoon.util.fs import atomic_write
from cocoon.util.proc import alive, start_time


def test_atomic_write_replaces_whole(tmp_path: Path) -> None:
    p = tmp_path / "f"
    atomic_write(p, b"one")
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize("bad", ["", "../x", "A", "x/y", "-x", "a" * 65])
def test_sandbox_ids_validated(bad: str) -> None:
    with pytest.raises(SandboxError):
        check_sandbox_id(bad)


def test_ownership_is_exclusive_and_dies_with_owner(tmp_path: Path) -> None:
    d = SandboxDir(tmp_path, "sb1")
    d.create()
    d.take_ownership()
    assert d.owned()
    other = SandboxDir(tmp_path, "sb1")
    with pytest.raises(SandboxError, match="owned by another"):
        other.take_ownership()
    d.release_ownership()
    assert not d.owned()
    # a child that takes ownership and is killed releases it
    code = (
        "import sys, time; sys.path[:0] = sys.argv[2:];"
        "from cocoon.state.store import SandboxDir; from pathlib import Path;"
        "d = SandboxDir(Path(sys.argv[1]), 'sb1'); d.take_ownership(); print('ok', flush=True);"
        "time.sleep(60)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), *sys.path], stdout=subprocess.PIPE
    )
    assert p.stdout is not None and p.stdout.readline().strip() == b"ok"
    assert d.owned()
    p.kill()
    p.wait()
    assert not d.owned()


def _wait_cmdline(pid: int, text: str) -> None:
    """/proc/PID/cmdline can read empty for a moment right after exec."""
    deadline = time.monotonic() + 5
    while text.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_gc_reaps_stale_sandbox_and_its_processes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    d = SandboxDir(root, "stale1")
    d.create()
    # a recorded process and an unrecorded one naming the dir (crash before record)
    rec = subprocess.Popen(["sleep", "60"], start_new_session=True)
    unrec = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", f"{d.path}/qmp.sock"],
        start_new_session=True,
    )
    st = SandboxState(id="stale1", processes={"qemu": ProcessRecord(rec.pid, start_time(rec.pid))})
    d.write(st)
    live = SandboxDir(root, "live1")
    live.create()
    live.take_ownership()
    try:
        infos = {i.id: i for i in gc.describe(root)}
        assert infos["stale1"].owned is False and infos["live1"].owned is True
        _wait_cmdline(unrec.pid, str(d.path))
        assert gc.reap(root) == ["stale1"]
        for p in (rec, unrec):
            p.wait(timeout=5)
        assert not d.path.exists()
        assert live.path.exists()
    finally:
        live.release_ownership()
        for p in (rec, unrec):
            if p.poll() is None:
                p.kill()


def test_recycled_pid_is_not_alive() -> None:
    pid = os.getpid()
    st = start_time(pid)
    assert alive(pid, st)
    assert not alive(pid, (st or 0) + 1)
