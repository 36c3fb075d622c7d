"""Run one command in a fresh sandbox and tear it down: the shortest real path.

Boot a VM, share a root file system into it, create + start a crun container,
relay stdout/stderr live and stdin if asked, return the exit code (128+N for
signal N), destroy the VM. Signals to this process (SIGINT/SIGTERM) are
forwarded to the container's process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cocoon.config import Config
from cocoon.hypervisor.base import Share
from cocoon.oci.spec import default_spec
from cocoon.runtime.stdio import attach
from cocoon.sandbox.admission import start_slot
from cocoon.sandbox.sandbox import Sandbox
from cocoon.sandbox.spec import SandboxSpec

ROOTFS_TAG = "cocoon-rootfs"
GUEST_ROOTFS = "/run/cocoon/rootfs"


async def run_in_sandbox(
    cfg: Config,
    rootfs: Path,
    argv: Sequence[str],
    *,
    env: list[str] | None = None,
    cwd: str = "/",
    stdin: bool = False,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    template: bool | None = None,
) -> int:
    spec = default_spec(list(argv), env=env, cwd=cwd, readonly_rootfs=True)
    sb: Sandbox | None = None
    try:
        async with start_slot(cfg):  # the VM's start and the container's: the CPU-bound part
            sb = await Sandbox.create(
                cfg,
                SandboxSpec(
                    vcpus=vcpus,
                    memory_mib=memory_mib,
                    shares=[Share(ROOTFS_TAG, rootfs, readonly=True)],
                    template=template,
                ),
            )
            await sb.mount("virtiofs" if cfg.hypervisor.shared_fs == "virtio-fs" else "9p",
                           ROOTFS_TAG, GUEST_ROOTFS, readonly=True)  # fmt: skip
            proc = await sb.create_container("main", GUEST_ROOTFS, spec, stdin=stdin)
            await sb.start_container("main")
        return await attach(proc, stdin=stdin)
    finally:
        if sb is not None:
            await sb.destroy()
