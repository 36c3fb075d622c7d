"""What a caller asks of a new sandbox: one value for ``Sandbox.create``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cocoon import network as net
from cocoon.hypervisor.base import Disk, Share
from cocoon.storage.scratch import ScratchDisk


@dataclass(frozen=True)
class SandboxSpec:
    """A sandbox to start; every field left out takes the configuration's value."""

    #: Its id (default: a new one); a container's monitor names it in advance.
    sandbox_id: str | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    #: Host directories (virtio-fs or 9p, ``hypervisor.shared_fs``).
    shares: Sequence[Share] = ()
    disks: Sequence[Disk] = ()
    #: Empty disks made for it, recorded first (gc finds them after a crash)
    #: and deleted with it.
    scratch: Sequence[ScratchDisk] = ()
    #: The guest's init in place of cocoon's agent (failure tests).
    init: list[str] | None = None
    boot_timeout_s: float | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    network: net.NetworkPlan | None = None
    #: Clone a template where the request fits one (default: ``sandbox.templates``).
    template: bool | None = None
    #: A warm pool's own sandbox (a hub for host directories, never taken from a pool).
    pooled: bool = False
    #: A pooled sandbox's NICs: taps in the pool's own namespace, moved into
    #: the taker's (network.plumb.PoolTaps).
    pool_nics: int = 0
    #: The caller's host cgroup for the VM's processes (a pod's, from the OCI
    #: spec's cgroupsPath): the jail's limits go there (hypervisor.cgroup).
    host_cgroup: str = ""
