"""`cocoon run`: one container from an image, in its own VM.

The image's read-only erofs block image goes to the VM as a virtio-blk disk; the
guest stacks an overlay on it with a tmpfs upper (bounded: the writable layer
lives in guest memory), or uses it as is with --read-only. The process comes
from the image config (Entrypoint, Cmd, Env, WorkingDir, User) with docker's
override rules; limits go to the container's cgroup in the guest and size the
VM (limit + a documented overhead), so the guest kernel and agent never
compete with the container for its own memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import CocoonError
from cocoon.hypervisor.base import Disk
from cocoon.images.manifest import ImageConfig
from cocoon.oci.spec import default_spec, merge_env, parse_user, process_args
from cocoon.runtime import volumes
from cocoon.runtime.stdio import attach, terminal_size
from cocoon.runtime.volumes import VolumeSpec
from cocoon.sandbox.sandbox import Sandbox

#: Guest kernel + agent + page cache headroom added on top of --memory.
VM_OVERHEAD_MIB = 128
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINER_ID = "main"


class UsageError(CocoonError):
    """The command line asks for something impossible (docker's exit 125)."""


@dataclass
class RunOptions:
    args: list[str] = field(default_factory=list)
    entrypoint: str | None = None
    env: list[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""
    hostname: str = ""
    memory_bytes: int = 0
    cpus: float = 0.0
    read_only: bool = False
    stdin: bool = False
    tty: bool = False
    volumes: list[VolumeSpec] = field(default_factory=list)


def build_spec(image: ImageConfig, opts: RunOptions) -> dict[str, Any]:
    args = process_args(
        image.entrypoint, image.cmd, entrypoint_override=opts.entrypoint, args=opts.args
    )
    if not args:
        raise UsageError("no command: the image has no Entrypoint/Cmd; give one after the image")
    env = merge_env(image.env or [DEFAULT_PATH], opts.env)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    user = opts.user or image.user
    uid, gid = parse_user(user)
    spec = default_spec(
        args,
        env=env,
        cwd=opts.workdir or image.working_dir or "/",
        uid=uid,
        gid=gid,
        hostname=opts.hostname or "cocoon",
        readonly_rootfs=opts.read_only,
        terminal=opts.tty,
    )
    if user:
        spec["process"]["user"]["username"] = user  # resolved by the agent in the rootfs
    res: dict[str, Any] = {}
    if opts.memory_bytes:
        res["memory"] = {"limit": opts.memory_bytes, "swap": opts.memory_bytes}
    if opts.cpus:
        res["cpu"] = {"quota": int(opts.cpus * 100_000), "period": 100_000}
    if res:
        spec["linux"]["resources"] = res
    return spec


def vm_size(cfg: Config, opts: RunOptions) -> tuple[int, int]:
    """(vcpus, memory MiB) for the VM of one container."""
    vcpus = max(cfg.hypervisor.vcpus, math.ceil(opts.cpus)) if opts.cpus else cfg.hypervisor.vcpus
    mem = cfg.hypervisor.memory_mib
    if opts.memory_bytes:
        mem = max(mem, (opts.memory_bytes >> 20) + VM_OVERHEAD_MIB)
    return vcpus, mem


async def run_container(
    cfg: Config, image_id: str, erofs: os.PathLike[str], config: ImageConfig, opts: RunOptions
) -> int:
    """Boot, run, relay stdio, forward signals, tear down; return the exit code."""
    spec = build_spec(config, opts)
    vols = volumes.prepare(cfg, opts.volumes)
    spec["mounts"] += vols.oci_mounts
    vcpus, mem = vm_size(cfg, opts)
    serial = "img-" + image_id.removeprefix("sha256:")[:16]
    sb = await Sandbox.create(
        cfg,
        vcpus=vcpus,
        memory_mib=mem,
        disks=[Disk(serial, Path(erofs))],
        shares=vols.shares,
        scratch=vols.scratch,
    )
    try:
        lower = f"/run/cocoon/images/{serial}"
        await sb.mount("block", serial, lower, fstype="erofs", readonly=True)
        if opts.read_only:
            rootfs = lower
        else:
            base = f"/run/cocoon/c/{CONTAINER_ID}"
            await sb.mount("tmpfs", "tmpfs", base, options=["size=50%", "mode=0700"])
            rootfs = f"{base}/rootfs"
            await sb.mount(
                "overlay",
                "overlay",
                rootfs,
                options=[f"lowerdir={lower}", f"upperdir={base}/upper", f"workdir={base}/work"],
            )
        await volumes.apply(sb, vols)
        rows, cols = terminal_size()
        proc = await sb.create_container(
            CONTAINER_ID, rootfs, spec, stdin=opts.stdin, tty=opts.tty, rows=rows, cols=cols
        )
        await sb.start_container(CONTAINER_ID)
        return await attach(proc, stdin=opts.stdin, tty=opts.tty)
    finally:
        await sb.destroy()
