"""The jails entered in a forked child before its exec (jail.Plan.child_setup
for QEMU, sharejail.child_setup for a file server): a jail that cannot be
set up ends the child with one line and status 125, the program never runs,
and nothing is left mounted on the host."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cocoon.errors import HypervisorError
from cocoon.hypervisor import jail
from cocoon.hypervisor.qemu import sharejail

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and mounts need root")


def mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


def test_a_jail_that_cannot_be_built_never_runs_the_vmm(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    marker = tmp_path / "ran"
    plan = jail.Plan(65000, 65000, tmp_path / "root", ro=[str(tmp_path / "missing")])
    before = mounts()
    p = subprocess.run(["/bin/sh", "-c", f"touch {marker}"], preexec_fn=plan.child_setup(),
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 125, p
    assert p.stderr.startswith("cocoon jailer: ") and "missing" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1
    assert not marker.exists()
    assert mounts() == before


def test_a_file_servers_jail_refuses_in_the_parent_or_fails_in_the_child(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="absolute"):
        sharejail.child_setup("relative/dir")
    with pytest.raises(HypervisorError, match="unknown capability"):
        sharejail.child_setup(str(tmp_path), caps={"sys_admin_please"})
    marker = tmp_path / "ran"
    setup = sharejail.child_setup(str(tmp_path / "gone"), readonly=True)
    p = subprocess.run(["/bin/sh", "-c", f"touch {marker}"], preexec_fn=setup,
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 125, p
    assert p.stderr.startswith("cocoon sharejail: ") and p.stderr.count("\n") == 1, p.stderr
    assert not marker.exists()


def test_a_jail_that_works_runs_the_program_as_the_jails_uid(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    plan = jail.Plan(65000, 65000, tmp_path / "root")
    p = subprocess.run(["/usr/bin/id", "-u"], preexec_fn=plan.child_setup(),
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "65000"
