"""What a hypervisor backend must do, and nothing more.

The cut is small on purpose (Kata's ~28-method interface is the anti-example):
a backend turns a ``VmSpec`` into running processes, tells whether and how they
ended, and can stop them; templates add saving, restoring and naming a VM, and
a pooled sandbox's disk slots take a file later. That is exactly what the
sandbox layer calls, and it is typed against this Protocol, not a backend.
Boot readiness is the agent's business (the sandbox waits for its hello).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cocoon.hypervisor.jail import Jail


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
    #: Mounts the host makes under ``path`` later must reach the VM (a pooled
    #: sandbox's hub, storage/hub.py): its file server follows the host's mounts.
    propagate: bool = False


@dataclass(frozen=True)
class Nic:
    """A virtio-net NIC on a tap (or macvtap) fd the caller opened; QEMU inherits it."""

    mac: str
    fd: int
    vhost: bool = False
    #: /dev/vhost-net opened for a jailed QEMU (it cannot open it itself).
    vhost_fd: int = -1


@dataclass(frozen=True)
class Layout:
    """A fixed set of device slots, for VMs saved as templates and their clones.

    A clone must have exactly the devices its template had, in the same
    order, and the guest keeps what it learnt of each at the template's boot
    (a disk's capacity and read-only flag, a 9p tag, a NIC's features). So
    per-sandbox parts go into slots the template already has, with only the
    backends new: disks by serial (filesystems carry their own size; QEMU
    bounds every access by the real file), shares as 9p devices with fixed
    tags, NICs on the sandbox's taps. Unused slots get empty backends.
    """

    ro_disks: int = 1
    rw_disks: int = 2
    shares: int = 4
    nics: int = 0

    def fits(self, disks: list[Disk], shares: int, nics: int) -> bool:
        ro = sum(1 for d in disks if d.readonly)
        return (
            ro <= self.ro_disks
            and len(disks) - ro <= self.rw_disks
            and (shares <= self.shares and nics == self.nics)
        )

    @staticmethod
    def share_tag(slot: int) -> str:
        return f"cocoon-s{slot}"


#: What a disk slot looks like to the guest when its template was booted: the
#: guest keeps this capacity, the clone's real file is any size up to it.
SLOT_DISK_BYTES = 1 << 40


@dataclass(frozen=True)
class TemplateMemory:
    """Guest RAM in a file: shared while the template is made, private after.

    Saving maps ``path`` shared, so the file holds the booted guest's memory;
    a clone maps it private (copy-on-write): clean pages stay shared by every
    clone of the template, a page a clone writes becomes its own.
    """

    path: Path
    saving: bool
    #: The directory unused share slots export (read-only, empty).
    empty_dir: Path


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
    #: Fixed device slots (a template or its clone); None: exactly the devices above.
    layout: Layout | None = None
    #: Guest RAM from a template file; with saving=False QEMU waits for the
    #: device state (``-incoming defer``, then the backend's ``restore``).
    template: TemplateMemory | None = None
    #: Run the VMM jailed as this uid/gid (hypervisor.jail); None: as we run.
    jail: Jail | None = None
    #: A host cgroup of the caller's (a pod's) where the jail's limits go
    #: instead of ``cocoon/<id>`` (hypervisor.cgroup); "" for none.
    cgroup: str = ""


AGENT_VSOCK_PORT = 1024


@dataclass
class Launched:
    """What a backend started: processes to record, endpoints to connect to."""

    processes: dict[str, int]
    agent_socket: Path  # the virtio-serial chardev socket (unused with vsock)
    control_socket: Path
    console_log: Path
    #: The VMM's processes being moved into the sandbox's cgroups (a jailed
    #: VM's; done in a thread, beside the VM's start): the sandbox is not
    #: handed out before this is done.
    confined: concurrent.futures.Future[None] | None = None

    async def until_confined(self) -> None:
        """Once the VM's processes are in the sandbox's cgroups (raises what
        the move raised)."""
        if self.confined is not None:
            await asyncio.wrap_future(self.confined)


class Hypervisor(Protocol):
    name: str

    def launch(self, spec: VmSpec, record: RecordFn) -> Launched:
        """Start the VM's processes; call ``record(name, pid)`` right after each spawn."""
        ...

    async def stop(self, launched: Launched, grace_s: float) -> None:
        """Ask the VM to quit, then kill whatever is left. Never raises for a dead VM."""
        ...

    def exited(self, pid: int) -> bool:
        """Whether a process of a launched VM is gone (the sandbox watches its VMM)."""
        ...

    def exit_reason(self, pid: int) -> str:
        """How a process this backend started ended ("" if running or not its own)."""
        ...

    def child(self, pid: int) -> subprocess.Popen[bytes] | None:
        """The backend's handle of a process it started: whoever keeps it must reap it."""
        ...

    # Templates (sandbox/restore.py); a pooled sandbox's disk slots.

    def machine_identity(self, spec: VmSpec) -> str:
        """Everything a saved VM of ``spec`` depends on: a template's key hashes it."""
        ...

    def machine_files(self, spec: VmSpec) -> list[str]:
        """The files a saved VM of ``spec`` was made from (a template records their stamps)."""
        ...

    async def save(self, launched: Launched, state: Path, timeout_s: float) -> None:
        """Write a template VM's device state to ``state`` (its RAM is in its memory file)."""
        ...

    async def restore(self, launched: Launched, state: Path, timeout_s: float) -> None:
        """Load ``state`` into a VM launched over its template's RAM, and let it run."""
        ...

    async def attach_disk(self, launched: Launched, slot: int, path: Path, readonly: bool) -> None:
        """Give a running VM's empty disk slot ``path`` as its backing file."""
        ...


class RecordFn(Protocol):
    def __call__(self, name: str, pid: int) -> None: ...


def file_stamp(path: str | Path) -> str:
    """Which file this is and which version of it (inode, size, mtime): a
    rebuilt kernel or image, or an upgraded QEMU, has another stamp."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
