"""Run one command in a fresh sandbox and tear it down: the shortest real path.

Boot a VM, share a root file system into it, create + start a crun container,
relay stdout/stderr live and stdin if asked, return the exit code (128+N for
signal N), destroy the VM. Signals to this process (SIGINT/SIGTERM) are
forwarded to the container's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from cocoon.config import Config
from cocoon.hypervisor.base import Share
from cocoon.oci.spec import default_spec
from cocoon.protocol.session import InStream
from cocoon.sandbox.sandbox import Process, Sandbox

ROOTFS_TAG = "cocoon-rootfs"
GUEST_ROOTFS = "/run/cocoon/rootfs"


async def _relay(stream: InStream | None, fd: int) -> None:
    if stream is None:
        return
    while data := await stream.read():
        view = memoryview(data)
        while view:
            n = await asyncio.to_thread(os.write, fd, view)
            view = view[n:]


async def _feed_stdin(proc: Process) -> None:
    loop = asyncio.get_running_loop()
    while data := await loop.run_in_executor(None, os.read, 0, 65536):
        await proc.write_stdin(data, close=False)
    await proc.write_stdin(b"", close=True)


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
) -> int:
    spec = default_spec(list(argv), env=env, cwd=cwd, readonly_rootfs=True)
    sb = await Sandbox.create(
        cfg, vcpus=vcpus, memory_mib=memory_mib, shares=[Share(ROOTFS_TAG, rootfs, readonly=True)]
    )
    try:
        await sb.mount("virtiofs" if cfg.hypervisor.shared_fs == "virtio-fs" else "9p",
                       ROOTFS_TAG, GUEST_ROOTFS, readonly=True)  # fmt: skip
        proc = await sb.create_container("main", GUEST_ROOTFS, spec, stdin=stdin)
        await sb.start_container("main")
        loop = asyncio.get_running_loop()

        def forward(sig: int) -> None:
            loop.create_task(proc.signal(sig))

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, forward, sig)
        feeder = loop.create_task(_feed_stdin(proc)) if stdin else None
        try:
            await asyncio.gather(
                _relay(proc.stdout, sys.stdout.fileno()), _relay(proc.stderr, sys.stderr.fileno())
            )
            exited = await proc.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await feeder
        return exited.exit_code
    finally:
        await sb.destroy()
