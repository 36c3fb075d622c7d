"""The other ways to boot: Debian's cloud kernel (+ initramfs), the q35 machine, 9p."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.hypervisor.base import Share
from cocoon.sandbox.sandbox import Sandbox
from cocoon.sandbox.spec import SandboxSpec
from tests.vm.conftest import GUEST_ROOTFS, ROOTFS_TAG, Runner, spec

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def _boot_and_run(cfg: Config, run: Runner, rootfs: Path, fs_kind: str) -> tuple[str, bytes]:
    async def body() -> tuple[str, bytes]:
        sb = await Sandbox.create(
            cfg, SandboxSpec(shares=[Share(ROOTFS_TAG, rootfs, readonly=True)])
        )
        try:
            release = (await sb.details()).kernel_release
            await sb.mount(fs_kind, ROOTFS_TAG, GUEST_ROOTFS, readonly=True)
            p = await sb.create_container(
                "v", GUEST_ROOTFS, spec(["sh", "-c", "echo ok; ls /sys/bus"])
            )
            await sb.start_container("v")
            out, _ = await p.output()
            assert (await p.wait()).exit_code == 0
            return release, out
        finally:
            await sb.destroy()

    return run(body())


def test_debian_cloud_kernel(cfg: Config, run: Runner, rootfs: Path) -> None:
    c = copy.deepcopy(cfg)
    c.guest.kernel_source = "debian-cloud"
    release, out = _boot_and_run(c, run, rootfs, "virtiofs")
    assert release.endswith("-cloud-amd64")
    assert out.startswith(b"ok\n")


def test_q35_machine_with_9p(cfg: Config, run: Runner, rootfs: Path) -> None:
    c = copy.deepcopy(cfg)
    c.hypervisor.machine = "q35"
    c.hypervisor.shared_fs = "9p"
    release, out = _boot_and_run(c, run, rootfs, "9p")
    assert release.startswith("6.1.")
    assert b"pci" in out.split()
