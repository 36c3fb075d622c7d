"""Making cocoon-runtime's containers from OCI bundles: runc's create and run.

A container is recorded first (so `delete` can undo whatever happens next),
then its host binds are made, then its monitor is forked to boot its VM
(runtime.monitor) and a stand-in to hold its init for the caller
(runtime.standin); any failure on the way destroys what was made. A pod's
further container (CRI's annotations, runtime.pods) is created in the running
VM of its pod's sandbox container instead of a VM of its own. A front end
that holds the container's stdio itself (containerd's shim v2) makes it with
``create_task``: the same, without the stand-in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import CocoonError, OciError
from cocoon.hypervisor.base import Share
from cocoon.log import teardown_step
from cocoon.network import NetworkPlan
from cocoon.runtime import bundle as bundles
from cocoon.runtime import pods, standin
from cocoon.runtime.monitor import spawn
from cocoon.runtime.ocicontainer import Handoff, OciContainer
from cocoon.runtime.ocirecords import OciRecord, OciStore, now_rfc3339, record, require
from cocoon.runtime.records import ContainerConfig, ContainerDir
from cocoon.runtime.status import Op
from cocoon.runtime.supervisor import LaunchPlan
from cocoon.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)


def create(cfg: Config, cid: str, bundle: Path, handoff: Handoff) -> int:
    """runc create: the container's VM boots, its process waits for `start`.
    Returns the pid of its stand-in, which the caller reaps."""
    c, terminal = _create(cfg, cid, bundle, handoff)
    try:
        return c.stand_in(handoff, terminal)
    except BaseException:
        c.destroy()
        raise


def create_task(
    cfg: Config, cid: str, bundle: Path, reap: Callable[[int], None] | None = None
) -> OciContainer:
    """containerd's shim v2 Create: the container's VM boots (or, for a pod's
    further container, it joins the pod's VM) and its process waits for
    `start`. No stand-in: the caller is a long-lived front end that attaches
    to the container itself (``Container.connect``) and holds its stdio. The
    creation hooks run here, on the host, as with ``create``. With ``reap``,
    a monitor forked for it stays the caller's child (``monitor.spawn``)."""
    c, _ = _create(cfg, cid, bundle, None, reap)
    try:
        c.run_creation_hooks()
    except BaseException:
        c.destroy()
        raise
    return c


def _create(
    cfg: Config,
    cid: str,
    bundle: Path,
    handoff: Handoff | None,
    reap: Callable[[int], None] | None = None,
) -> tuple[OciContainer, bool]:
    """The container recorded, its binds made and its monitor ready (its VM
    up, its process created): the container and whether it has a terminal.
    ``handoff`` None: the caller attaches itself (no console socket needed)."""
    spec = bundles.load(bundle)
    p = bundles.plan(
        bundle,
        spec,
        binds_dir=pods.binds_dir(cfg, cid),
        default_vcpus=cfg.hypervisor.vcpus,
        default_mib=cfg.hypervisor.memory_mib,
    )
    _accept(p, handoff)
    config = container_config(cid, p)
    annotations = annotations_of(spec)
    kind, sandbox_ref = pods.role(annotations)
    if kind == "container" and sandbox_ref:
        return _join(cfg, cid, bundle, spec, sandbox_ref, handoff)
    rec = OciRecord(
        str(p.bundle), now_rfc3339(), annotations, spec.get("hooks") or {},
        binds=[str(b.target) for b in p.binds], host_cgroup=p.host_cgroup,
    )  # fmt: skip
    if kind == "sandbox":
        pdir = pods.pod_dir(cfg, cid)
        rec.pod_dir = str(pdir)
        # Members' roots are bound under it later: its file server must follow.
        p.shares.append(Share("pod", pdir, readonly=False, propagate=True))
        p.guest_mounts.append(("pod", bundles.POD_GUEST, False))
    d = OciStore(cfg).create(config, rec)
    c = OciContainer(cfg, d)
    try:
        if rec.pod_dir:
            pods.make_pod_dir(Path(rec.pod_dir))
        for b in p.binds:  # recorded above: delete undoes them, whatever happens now
            pods.bind(b.source, b.target, b.readonly, b.recursive)
        spawn(_launch_plan(cfg, d, config, p), reap)
    except BaseException:
        c.destroy()
        raise
    return c, p.terminal


def run(cfg: Config, cid: str, bundle: Path, handoff: Handoff, *, detach: bool) -> int | None:
    """runc run: create and start; unless ``detach``, wait for the container's
    end, delete it, and return its exit status."""
    pid = create(cfg, cid, bundle, handoff)
    c = OciContainer.load(cfg, cid)
    asyncio.run(c.container.start())
    c.run_hooks("poststart", strict=False)
    if detach:
        return None
    code = standin.wait(pid)
    left = "its record and whatever of its VM remains: `delete` removes them"
    with teardown_step(log, f"deleting container {c.id}", left, errors=(CocoonError,)):
        c.destroy()
    return code


def container_config(cid: str, p: bundles.BundlePlan, *, own_vm: bool = True) -> ContainerConfig:
    """The container record of a planned bundle (its spec as ``bundles.load``
    checked it); a pod's further container (not ``own_vm``) sizes no VM."""
    proc = p.spec.get("process") or {}
    config = ContainerConfig(
        id=cid,
        name=cid,
        image="",
        image_id="",
        command=list(proc.get("args") or []),
        spec=p.spec,
        tty=p.terminal,
        stdin=True,
        read_only=p.readonly_rootfs,
    )
    if own_vm:
        res = (p.spec.get("linux") or {}).get("resources") or {}
        config.memory_bytes = int((res.get("memory") or {}).get("limit") or 0)
        config.vcpus = p.vcpus
        config.vm_memory_mib = p.memory_mib
    return config


def annotations_of(spec: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (spec.get("annotations") or {}).items()}


def _accept(p: bundles.BundlePlan, handoff: Handoff | None) -> None:
    """The plan's process can be handed over as asked; what it left out is logged."""
    if p.terminal and handoff is not None and not handoff.console_socket:
        raise OciError("process.terminal is true: --console-socket is required")
    for w in p.warnings:
        log.warning(w)


def _mounts_dev(spec: dict[str, Any]) -> bool:
    mounts = spec.get("mounts") or []
    return any(isinstance(m, dict) and m.get("destination") in ("/dev", "/dev/") for m in mounts)


def _launch_plan(
    cfg: Config, d: ContainerDir, config: ContainerConfig, p: bundles.BundlePlan
) -> LaunchPlan:
    fs = cfg.hypervisor.shared_fs

    async def setup(sb: Sandbox) -> str:
        return await p.setup(sb, fs)

    return LaunchPlan(
        cfg=cfg,
        cdir=d,
        config=config,
        setup=setup,
        shares=p.shares,
        start="request",
        log_max_bytes=0,
        annotations={"cocoon.oci.bundle": str(p.bundle)},
        # A template clone serves the rootfs over 9p, where QEMU 7.2 fails to
        # make device nodes (ENXIO): a bundle without its own /dev (podman and
        # containerd always mount one) gets crun's nodes in its rootfs, and
        # so a cold boot with virtio-fs.
        template=None if _mounts_dev(p.spec) else False,
        host_cgroup=p.host_cgroup,
        # The caller's namespace (CNI, podman, containerd) is plumbed to the
        # VM's NICs; the caller keeps its own hosts/resolv.conf files.
        network=NetworkPlan(
            networks=[f"ns:{p.netns_path}"],
            model=cfg.network.model,
            files=False,
            allow_empty=True,
            sysctls=p.net_sysctls,
        )
        if p.netns_path
        else None,
    )


def _join(
    cfg: Config,
    cid: str,
    bundle: Path,
    spec: dict[str, Any],
    sandbox_ref: str,
    handoff: Handoff | None,
) -> tuple[OciContainer, bool]:
    """A further container of a pod, created in the pod's running VM."""
    store = OciStore(cfg)
    sandbox = store.get(sandbox_ref)
    srec = record(sandbox)
    if not srec.pod_dir:
        raise OciError(f"container {sandbox_ref} is not a pod sandbox")
    require(sandbox, Op.JOIN)
    k = pods.key(cid)
    mp = bundles.plan_member(bundle, spec, Path(srec.pod_dir), k)
    _accept(mp.plan, handoff)
    config = container_config(cid, mp.plan, own_vm=False)
    rec = OciRecord(
        str(mp.plan.bundle), now_rfc3339(), annotations_of(spec), spec.get("hooks") or {},
        pod_sandbox=sandbox_ref, binds=[str(b.target) for b in mp.binds],
    )  # fmt: skip
    d = store.create(config, rec)
    c = OciContainer(cfg, d)
    try:
        for b in mp.binds:
            pods.bind(b.source, b.target, b.readonly, b.recursive)
        pod = OciContainer(cfg, sandbox).container
        asyncio.run(pod.add(d, f"c-{k}", mp.rootfs_guest, mp.plan.terminal))
    except BaseException:
        c.destroy()
        raise
    return c, mp.plan.terminal
