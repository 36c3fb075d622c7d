"""containerd's runc shim (ctr --runc-binary) driving cocoon-runtime."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cocoon.state import gc
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


def test_a_pod_shares_one_vm(containerd: Containerd) -> None:
    """CRI's annotations: the pod's second container joins the sandbox's VM."""
    ctr = containerd.ctr
    pod = ["--annotation", "io.kubernetes.cri.sandbox-id=pod1"]
    r = ctr("run", "-d", "--runc-binary", runtime(), *pod,
            "--annotation", "io.kubernetes.cri.container-type=sandbox",
            IMAGE, "pod1", "sleep", "1000")  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        r = ctr("run", "-d", "--runc-binary", runtime(), *pod,
                "--annotation", "io.kubernetes.cri.container-type=container",
                IMAGE, "app1", "sleep", "1000")  # fmt: skip
        assert r.returncode == 0, r.stderr
        boot = "cat /proc/sys/kernel/random/boot_id"
        ids = [ctr("task", "exec", "--exec-id", f"b{i}", name, "sh", "-c", boot).stdout
               for i, name in enumerate(("pod1", "app1"))]  # fmt: skip
        assert ids[0] == ids[1] and len(ids[0]) == 37, ids
        vms = gc.processes_naming(containerd.runtime_root)
        qemus = [p for p in vms if Path(f"/proc/{p}/comm").read_text().startswith("qemu")]
        assert len(qemus) == 1
        # the member's own lifecycle, inside the pod's VM
        assert ctr("task", "kill", "-s", "SIGKILL", "app1").returncode == 0
        deadline = time.monotonic() + 30
        while b"STOPPED" not in ctr("task", "ls").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert ctr("task", "delete", "app1").returncode == 0
        assert b"RUNNING" in ctr("task", "ls").stdout  # the sandbox lives on
    finally:
        for name in ("app1", "pod1"):
            ctr("task", "delete", "-f", name)
            ctr("container", "rm", name)
    assert_clean(containerd.runtime_root)


def test_the_given_network_namespace_reaches_the_vm(containerd: Containerd, make_pair) -> None:  # type: ignore[no-untyped-def]
    """ctr --with-ns network:PATH (as the CRI plugin does with CNI's netns)."""
    pair = make_pair(237)
    r = containerd.ctr("run", "--rm", "--runc-binary", runtime(),
                       "--with-ns", f"network:{pair.ctr}", IMAGE, "n1", "sh", "-c",
                       f"ping -c1 -W10 {pair.peer_ip} >/dev/null && echo PEER-OK")  # fmt: skip
    assert (r.returncode, r.stdout) == (0, b"PEER-OK\n"), r.stderr
    assert_clean(containerd.runtime_root)
