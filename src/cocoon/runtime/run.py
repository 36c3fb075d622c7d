"""`cocoon run`: one container from an image, in its own VM.

The container is recorded first (runtime.records), then a monitor process
is forked to own its VM (runtime.monitor); an attached run talks to that
monitor like any other command would (runtime.control). The image's read-only
erofs block image goes to the VM as a virtio-blk disk; the guest stacks an
overlay on it with a tmpfs upper (bounded: the writable layer lives in guest
memory), or uses it as is with --read-only. The process comes
from the image config (Entrypoint, Cmd, Env, WorkingDir, User) with docker's
override rules; limits go to the container's cgroup in the guest and size the
VM (limit + a documented overhead), so the guest kernel and agent never
compete with the container for its own memory.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import UsageError
from cocoon.hypervisor.base import Disk
from cocoon.images import service
from cocoon.images.manifest import ImageConfig
from cocoon.images.store import ImageStore
from cocoon.network import GUEST_FILES, NetworkPlan
from cocoon.network.ports import PortSpec
from cocoon.network.ports import parse as parse_port
from cocoon.oci.spec import default_spec, merge_env, parse_user, process_args
from cocoon.runtime import volumes
from cocoon.runtime.control import MonitorClient
from cocoon.runtime.logs import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES
from cocoon.runtime.monitor import spawn
from cocoon.runtime.records import CONTAINER_ID, ContainerConfig, ContainerDir, ContainerStore
from cocoon.runtime.stdio import attach, terminal_size
from cocoon.runtime.supervisor import LaunchPlan
from cocoon.runtime.volumes import VolumeSpec
from cocoon.sandbox.sandbox import Sandbox

#: Guest kernel + agent + page cache headroom added on top of --memory.
VM_OVERHEAD_MIB = 128
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    auto_remove: bool = False
    detach: bool = False
    log_max_bytes: int = DEFAULT_MAX_BYTES
    log_max_files: int = DEFAULT_MAX_FILES
    volumes: list[VolumeSpec] = field(default_factory=list)
    network: NetworkPlan = field(default_factory=NetworkPlan)
    publish: list[PortSpec] = field(default_factory=list)
    #: Start from a VM template: None = as configured (sandbox.templates).
    template: bool | None = None


def networking(
    cfg: Config,
    *,
    networks: list[str],
    rate: str,
    hostname: str,
    dns: list[str],
    dns_search: list[str],
    add_hosts: list[str],
    publish: list[str],
) -> tuple[NetworkPlan, list[PortSpec]]:
    """docker's networking flags checked, before any pull: a typo costs nothing.
    No ``networks``: network.default; ``hostname`` "": the container's short id."""
    plan = NetworkPlan(
        networks=networks or [cfg.network.default],
        model=cfg.network.model,
        rate=rate,
        hostname=hostname,
        dns=dns,
        dns_search=dns_search,
        add_hosts=add_hosts,
    )
    plan.check()
    ports = [parse_port(p) for p in publish]
    if ports and "bridge" not in plan.networks:
        raise UsageError("-p needs --network bridge (the host reaches the container there)")
    return plan, ports


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
    if opts.network.files and not opts.read_only:
        # The agent writes these in the guest from the network's addresses; a
        # read-only image root may lack the mount points, so it keeps its own.
        for name in ("hosts", "resolv.conf", "hostname"):
            spec["mounts"].append(
                {
                    "destination": f"/etc/{name}",
                    "type": "bind",
                    "source": f"{GUEST_FILES}/{name}",
                    "options": ["rbind", "rw"],
                }
            )
    return spec


def vm_size(cfg: Config, opts: RunOptions) -> tuple[int, int]:
    """(vcpus, memory MiB) for the VM of one container."""
    vcpus = max(cfg.hypervisor.vcpus, math.ceil(opts.cpus)) if opts.cpus else cfg.hypervisor.vcpus
    mem = cfg.hypervisor.memory_mib
    if opts.memory_bytes:
        mem = max(mem, (opts.memory_bytes >> 20) + VM_OVERHEAD_MIB)
    return vcpus, mem


async def mount_rootfs(sb: Sandbox, serial: str, overlay: bool) -> str:
    """The image's erofs, read-only, with a tmpfs-backed overlay on it if ``overlay``.

    The writable layer lives in guest memory (bounded by the VM), never on the host.
    """
    lower = f"/run/cocoon/images/{serial}"
    await sb.mount("block", serial, lower, fstype="erofs", readonly=True)
    if not overlay:
        return lower
    base = f"/run/cocoon/c/{CONTAINER_ID}"
    await sb.mount("tmpfs", "tmpfs", base, options=["size=50%", "mode=0700"])
    rootfs = f"{base}/rootfs"
    await sb.mount(
        "overlay",
        "overlay",
        rootfs,
        options=[f"lowerdir={lower}", f"upperdir={base}/upper", f"workdir={base}/work"],
    )
    return rootfs


def describe(v: VolumeSpec) -> str:
    """One volume as inspect's HostConfig.Binds shows it."""
    text = f"{v.source}:{v.target}" if v.source else f"{v.kind}:{v.target}"
    if v.size_bytes:
        text += f":size={v.size_bytes}"
    return text + (":ro" if v.readonly else "")


def launch(
    cfg: Config, image_ref: str, opts: RunOptions, *, pull: str, platform: str | None
) -> ContainerDir:
    """docker run up to the monitor's ready line: the image (pulled as ``pull``
    says: missing, always, never), the container recorded, its VM booted and
    the container created (attached) or started (detached)."""
    img = asyncio.run(service.get(cfg, image_ref, policy=pull, platform=platform))
    config = ImageStore(cfg).inspect(img.id).config
    cdir, cconf, vplan = create(cfg, image_ref, img.id, config, opts)
    start(cfg, cdir, cconf, Path(img.erofs), opts, vplan)
    return cdir


def create(
    cfg: Config, image_ref: str, image_id: str, image: ImageConfig, opts: RunOptions
) -> tuple[ContainerDir, ContainerConfig, volumes.VolumePlan]:
    """Record a new container (name reserved, nothing running yet)."""
    spec = build_spec(image, opts)
    plan = volumes.prepare(cfg, opts.volumes)
    spec["mounts"] += plan.oci_mounts
    vcpus, mem = vm_size(cfg, opts)
    store = ContainerStore(cfg)
    cid = store.new_id()
    if not opts.hostname:
        # docker's default: the short id, so every container (and every clone
        # of a template) answers to a name of its own.
        spec["hostname"] = cid[:12]
        opts.network.hostname = cid[:12]
    config = ContainerConfig(
        id=cid,
        name=opts.name,
        image=image_ref,
        image_id=image_id,
        command=list(spec["process"]["args"]),
        spec=spec,
        labels=dict(opts.labels),
        auto_remove=opts.auto_remove,
        tty=opts.tty,
        stdin=opts.stdin,
        read_only=opts.read_only,
        memory_bytes=opts.memory_bytes,
        cpus=opts.cpus,
        vcpus=vcpus,
        vm_memory_mib=mem,
        stop_signal=image.stop_signal or "SIGTERM",
        volumes=[describe(v) for v in opts.volumes],
        network=opts.network.to_dict(),
        ports=[str(p) for p in opts.publish],
    )
    return store.create(config), config, plan


def start(
    cfg: Config,
    cdir: ContainerDir,
    config: ContainerConfig,
    erofs: Path,
    opts: RunOptions,
    vols: volumes.VolumePlan,
) -> None:
    """Fork the monitor; back once the container is created (attached run) or
    running (-d). A container that could not start is not kept."""
    rows, cols = terminal_size()
    serial = "img-" + config.image_id.removeprefix("sha256:")[:16]

    # --read-only with volumes gets the overlay too: crun makes each volume's
    # mount point in the root, then makes the root read-only (root.readonly),
    # as runc does on docker's overlay. The bare erofs has no room for a mount
    # point the image lacks; without volumes it is the cheaper root.
    overlay = not config.read_only or bool(vols.oci_mounts)

    async def setup(sb: Sandbox) -> str:
        rootfs = await mount_rootfs(sb, serial, overlay)
        await volumes.apply(sb, vols)
        return rootfs

    plan = LaunchPlan(
        cfg=cfg,
        cdir=cdir,
        config=config,
        setup=setup,
        disks=[Disk(serial, erofs)],
        shares=vols.shares,
        scratch=vols.scratch,
        start="now" if opts.detach else "attach",
        rows=rows,
        cols=cols,
        log_max_bytes=opts.log_max_bytes,
        network=opts.network,
        publish=list(opts.publish),
        log_max_files=opts.log_max_files,
        template=opts.template,
    )
    try:
        spawn(plan)
    except BaseException:
        # The monitor removes what it made; wait for it so nothing outlives us.
        cdir.life.wait_released(30.0)
        ContainerStore(cfg).remove(cdir)
        raise


async def attach_run(cdir: ContainerDir, opts: RunOptions) -> int:
    """Attach to a container the monitor holds for us, relay until it exits,
    and return its exit code once the monitor has torn its VM down."""
    rows, cols = terminal_size()
    client = await MonitorClient.connect(cdir)
    try:
        proc = await client.attach(stdin=opts.stdin, tty=opts.tty, rows=rows, cols=cols)
        code = await attach(proc, stdin=opts.stdin, tty=opts.tty)
    finally:
        await client.close()
    # --rm and the leak-free promise: the monitor is gone before we are.
    await asyncio.to_thread(cdir.life.wait_released, 30.0)
    return code
