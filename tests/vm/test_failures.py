"""A hostile or dead guest, a killed QEMU, a killed owner: clear errors, nothing left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.errors import GuestError
from cocoon.hypervisor.base import Share
from cocoon.sandbox.sandbox import Sandbox
from cocoon.sandbox.spec import SandboxSpec
from cocoon.state import gc
from cocoon.state.store import list_ids
from tests.vm.conftest import GUEST_ROOTFS, ROOTFS_TAG, Runner, spec

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

# Guest "agents" that are not ours: busybox sh as PID 1 doing something hostile
# on the agent port. They arrive as the kernel's init, so the host meets them
# exactly where it would meet a compromised guest.
PORT = "for p in /dev/vport*; do :; done; "
HOSTILE = {
    "garbage": (PORT + "echo garbage-from-a-hostile-guest > $p; sleep 60", "bad magic"),
    "flood": (PORT + "cat /dev/zero > $p", "bad magic"),
    "oversize": (
        PORT + r"printf '\103\117\002\000\000\000\000\001\177\377\377\377' > $p; sleep 60",
        "exceeds",
    ),
    "lies-about-size": (
        PORT + r"printf '\103\117\002\000\000\000\000\001\000\000\003\350short' > $p; sleep 60",
        "did not arrive|did not answer",
    ),
    "silence": ("sleep 60", "did not answer boot"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_agent_gives_clear_error_and_full_cleanup(
    case: str, cfg: Config, run: Runner
) -> None:
    script, why = HOSTILE[case]
    before = set(list_ids(cfg.root))  # the session's shared sandbox may be up
    t0 = time.monotonic()
    with pytest.raises(GuestError, match=why) as ei:
        run(Sandbox.create(cfg, SandboxSpec(init=["/bin/sh", "-c", script], boot_timeout_s=6)))
    assert "failed to boot" in str(ei.value)
    assert "\n" not in str(ei.value)  # one line
    assert time.monotonic() - t0 < 20
    # The no_leaks fixture also checks processes.
    assert set(list_ids(cfg.root)) == before


def test_qemu_killed_mid_run(cfg: Config, run: Runner, rootfs: Path) -> None:
    async def body() -> None:
        sb = await Sandbox.create(
            cfg, SandboxSpec(shares=[Share(ROOTFS_TAG, rootfs, readonly=True)])
        )
        await sb.mount("virtiofs", ROOTFS_TAG, GUEST_ROOTFS, readonly=True)
        proc = await sb.create_container("c", GUEST_ROOTFS, spec(["sleep", "1000"]))
        await sb.start_container("c")
        assert sb.launched is not None
        os.kill(sb.launched.processes["qemu"], signal.SIGKILL)
        with pytest.raises(GuestError, match="VM exited|channel") as ei:
            await proc.wait()
        assert "torn down" in str(ei.value)
        assert not sb.dir.path.exists()

    run(body())


def test_owner_killed_leaves_nothing_gc_cannot_clean(cfg: Config) -> None:
    cli = [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root)]
    before = {i.id for i in gc.describe(cfg.root)}  # the session's shared sandbox may be up

    def mine() -> list[gc.SandboxInfo]:
        return [i for i in gc.describe(cfg.root) if i.id not in before]

    p = subprocess.Popen([*cli, "sandbox", "run", "--", "sleep", "1000"], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            infos = mine()
            if infos and infos[0].status == "running":
                break
            assert time.monotonic() < deadline, "sandbox never came up"
            assert p.poll() is None
            time.sleep(0.1)
        os.killpg(p.pid, signal.SIGKILL)  # the owner dies; QEMU (own session) lives on
        p.wait()
        info = mine()[0]
        assert info.owned is False and info.live.get("qemu") is True
        ls = subprocess.run([*cli, "sandbox", "ls"], capture_output=True, text=True, check=True)
        assert info.id in ls.stdout and "dead" in ls.stdout
        out = subprocess.run([*cli, "gc"], capture_output=True, text=True, check=True)
        # The sandbox, and maybe templates gone stale (16 hex digits: built for
        # another guest image, as other trees on a shared host leave them).
        words = out.stdout.split()
        assert info.id in words, out.stdout
        assert all(w == info.id or re.fullmatch(r"[0-9a-f]{16}", w) for w in words), out.stdout
        assert mine() == []
        assert set(gc.processes_naming(cfg.root).values()) <= before
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
