"""What a hypervisor backend must do, and nothing more.

The cut is small on purpose (Kata's ~28-method interface is the anti-example):
a backend turns a ``VmSpec`` into running processes and can stop them. Boot
readiness is the agent's business (the sandbox layer waits for its hello), so
backends for Firecracker or Cloud Hypervisor only need these two calls plus a
name to be chosen by ``hypervisor.backend`` in the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Disk:
    """A raw image handed to the guest as virtio-blk; found there by ``serial``."""

    serial: str
    path: Path
    readonly: bool = True


@dataclass(frozen=True)
class Share:
    """A host directory shared into the guest under ``tag`` (virtio-fs or 9p)."""

    tag: str
    path: Path
    readonly: bool = False


@dataclass(frozen=True)
class Nic:
    """A virtio-net NIC on a tap (or macvtap) fd the caller opened; QEMU inherits it."""

    mac: str
    fd: int
    vhost: bool = False


@dataclass
class VmSpec:
    id: str
    workdir: Path
    kernel: Path
    image: Path
    vcpus: int
    memory_mib: int
    accel: str
    kernel_params: list[str] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    shares: list[Share] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    shared_fs: str = "virtio-fs"
    initrd: Path | None = None
    free_page_reporting: bool = True
    #: "virtio-serial" or "vsock" (then the guest is reachable at vsock_cid:AGENT_VSOCK_PORT).
    channel: str = "virtio-serial"
    vsock_cid: int = 0
    #: Replace the guest's /sbin/init (tests use it to put a hostile "agent" in).
    init: list[str] | None = None


AGENT_VSOCK_PORT = 1024


@dataclass
class Launched:
    """What a backend started: processes to record, endpoints to connect to."""

    processes: dict[str, int]
    agent_socket: Path  # the virtio-serial chardev socket (unused with vsock)
    control_socket: Path
    console_log: Path


class Hypervisor(Protocol):
    name: str

    def launch(self, spec: VmSpec, record: RecordFn) -> Launched:
        """Start the VM's processes; call ``record(name, pid)`` right after each spawn."""
        ...

    async def stop(self, launched: Launched, grace_s: float) -> None:
        """Ask the VM to quit, then kill whatever is left. Never raises for a dead VM."""
        ...


class RecordFn(Protocol):
    def __call__(self, name: str, pid: int) -> None: ...
