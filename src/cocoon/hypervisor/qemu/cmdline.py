"""QEMU argv from typed objects.

Each device is a small object that renders its own options, so the rules that
tie options together (virtio-fs needs a shared memfd backend and modern
virtio-mmio; microvm has no PCI) live in one place: ``build``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cocoon.hypervisor.base import SLOT_DISK_BYTES, Disk, Layout, VmSpec


def opts(head: str, raw: dict[str, object] | None = None, **kv: object) -> str:
    """``head,k=v,...`` with QEMU's comma escaping for values.

    Keyword names map ``_`` to ``-`` (most QEMU options); the few QEMU spells
    with underscores (fsdev's security_model, mount_tag) go in ``raw`` as-is.
    """
    items = {k.rstrip("_").replace("_", "-"): v for k, v in kv.items()}
    items.update(raw or {})
    parts = [head]
    for k, v in items.items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = "on" if v else "off"
        parts.append(f"{k}={str(v).replace(',', ',,')}")
    return ",".join(parts)


@dataclass(frozen=True)
class Machine:
    kind: str  # microvm | q35

    def bus_suffix(self) -> str:
        return "device" if self.kind == "microvm" else "pci"

    def argv(self, memfd: bool) -> list[str]:
        if self.kind == "microvm":
            m = opts(
                "microvm",
                x_option_roms=False,
                isa_serial=True,
                rtc=True,
                memory_backend="mem" if memfd else None,
            )
        else:
            m = opts("q35", memory_backend="mem" if memfd else None)
        return ["-machine", m]


def _disk(i: int, d: Disk, bus: str) -> list[str]:
    return [
        "-drive",
        opts("", id=f"disk{i}", file=d.path, format="raw", if_="none", readonly=d.readonly)[1:],
        "-device",
        opts(f"virtio-blk-{bus}", drive=f"disk{i}", serial=d.serial),
    ]


def _slot_disk(i: int, d: Disk | None, readonly: bool, bus: str) -> list[str]:
    """A disk slot: a raw node over the disk's file, or over an empty placeholder
    (reads zeros, drops writes, the slot's capacity) whose file a pooled
    sandbox swaps for its disk's at hand-out (``QemuBackend.attach_disk``)."""
    node = f"disk{i}"
    if d is not None:
        proto = opts("", driver="file", node_name=f"{node}-file", filename=d.path,
                     read_only=readonly)  # fmt: skip
    else:
        proto = opts("", driver="null-co", node_name=f"{node}-file", size=SLOT_DISK_BYTES,
                     read_zeroes=True, read_only=readonly)  # fmt: skip
    return [
        "-blockdev",
        proto[1:],
        "-blockdev",
        opts("", driver="raw", node_name=node, file=f"{node}-file", read_only=readonly)[1:],
        "-device",
        opts(f"virtio-blk-{bus}", drive=node, serial=d.serial if d else slot_serial(i)),
    ]


def slot_serial(i: int) -> str:
    return f"cocoon-slot{i}"


def _slot_disks(spec: VmSpec, layout: Layout, bus: str) -> Iterable[list[str]]:
    """Read-only slots first, then read-write ones; disks in the order given."""
    ro = [d for d in spec.disks if d.readonly]
    rw = [d for d in spec.disks if not d.readonly]
    i = 0
    for group, count, readonly in ((ro, layout.ro_disks, True), (rw, layout.rw_disks, False)):
        for n in range(count):
            yield _slot_disk(i, group[n] if n < len(group) else None, readonly, bus)
            i += 1


def _9p(
    i: int, tag: str, path: Path, readonly: bool, bus: str, proxy_fd: int | None = None
) -> list[str]:
    """A 9p share: served by QEMU itself, or, for a jailed QEMU that cannot
    reach the host's files, by a virtfs-proxy-helper on ``proxy_fd``."""
    fsdev = (
        opts("proxy", {"sock_fd": proxy_fd}, id=f"fs{i}", readonly=readonly or None)
        if proxy_fd is not None
        else opts(
            "local",
            {"security_model": "passthrough"},
            id=f"fs{i}",
            path=path,
            readonly=readonly or None,
            multidevs="remap",
        )  # fmt: skip
    )
    return [
        "-fsdev",
        fsdev,
        "-device",
        opts(f"virtio-9p-{bus}", {"mount_tag": tag}, fsdev=f"fs{i}"),
    ]


def _devices(
    spec: VmSpec, machine: Machine, sockets: dict[str, Path], fds: dict[str, int]
) -> Iterable[list[str]]:
    bus = machine.bus_suffix()
    layout = spec.layout
    yield [
        "-drive",
        opts("", id="root", file=spec.image, format="raw", if_="none", readonly=True)[1:],
        "-device",
        opts(f"virtio-blk-{bus}", drive="root", serial="cocoon-root"),
    ]
    if layout is not None:
        yield from _slot_disks(spec, layout, bus)
    else:
        for i, d in enumerate(spec.disks):
            yield _disk(i, d, bus)
    if spec.channel == "vsock":
        yield ["-device", opts(f"vhost-vsock-{bus}", guest_cid=spec.vsock_cid,
                               vhostfd=fds.get("vsock"))]  # fmt: skip
    else:
        yield [
            "-device",
            # Two ports (0 reserved, 1 the agent): the default 31 fill ~8 MiB of guest
            # memory with receive buffers.
            opts(f"virtio-serial-{bus}", {"max_ports": 2}),
            "-chardev",
            opts("socket", id="agent", server=True, wait=False, fd=fds["agent"])
            if "agent" in fds
            else opts("socket", id="agent", path=sockets["agent"], server=True, wait=False),
            "-device",
            opts("virtserialport", chardev="agent", name="cocoon.agent"),
        ]
    for i, nic in enumerate(spec.nics):
        yield [
            "-netdev",
            opts(
                "tap",
                id=f"net{i}",
                fd=nic.fd,
                vhost=nic.vhost,
                vhostfd=nic.vhost_fd if nic.vhost_fd >= 0 else None,
            ),  # fmt: skip
            "-device",
            opts(f"virtio-net-{bus}", netdev=f"net{i}", mac=nic.mac),
        ]
    if spec.free_page_reporting and spec.template is None:
        # The guest hands pages it freed (boot-time decompression, exited
        # processes) back to the host: lower PSS per idle sandbox. Never over a
        # template's RAM: QEMU 7.2 discards pages of a private file mapping by
        # punching holes in the file itself, which would zero them in the
        # template under every other clone.
        yield ["-device", opts(f"virtio-balloon-{bus}", free_page_reporting=True)]
    if layout is not None:
        assert spec.template is not None, "slots are for templates and their clones"
        for i in range(layout.shares):
            if i < len(spec.shares):
                sh = spec.shares[i]
                yield _9p(i, Layout.share_tag(i), sh.path, sh.readonly, bus, fds.get(f"9p{i}"))
            else:
                yield _9p(i, Layout.share_tag(i), spec.template.empty_dir, True, bus)
        return
    for i, s in enumerate(spec.shares):
        if spec.shared_fs == "virtio-fs":
            yield [
                "-chardev",
                opts("socket", id=f"fs{i}", fd=fds[f"virtiofsd{i}"])
                if f"virtiofsd{i}" in fds
                else opts("socket", id=f"fs{i}", path=sockets[f"virtiofsd{i}"]),
                "-device",
                opts(f"vhost-user-fs-{bus}", chardev=f"fs{i}", tag=s.tag),
            ]
        elif spec.shared_fs == "9p":
            yield _9p(i, s.tag, s.path, s.readonly, bus, fds.get(f"9p{i}"))


def build(
    spec: VmSpec,
    *,
    qemu: str,
    machine: str,
    cmdline: str,
    sockets: dict[str, Path],
    console_log: Path,
    tb_size_mib: int,
    tcg_cpu: str = "max",
    socket_fds: dict[str, int] | None = None,
) -> list[str]:
    """QEMU's argv for ``spec``. ``socket_fds`` (by name: qmp, agent, vsock)
    are sockets and devices opened for QEMU, used instead of paths it would
    open itself: a jailed QEMU can neither create nor open them."""
    socket_fds = socket_fds or {}
    m = Machine(machine)
    # Always memfd: virtio-fs needs shared memory anyway, and anonymous guest RAM gets
    # transparent huge pages, so every touched 4 KiB costs the host 2 MiB: measured
    # ~78 MiB vs ~60 MiB of guest RAM resident for an idle sandbox.
    memfd = True
    argv = [qemu, "-name", f"cocoon-{spec.id}", "-nodefaults", "-no-user-config"]
    argv += ["-nographic", "-no-reboot", "-display", "none"]
    argv += m.argv(memfd)
    if spec.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", opts("tcg", tb_size=tb_size_mib or None), "-cpu", tcg_cpu]
    argv += ["-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M"]
    if spec.template is not None:
        t = spec.template
        argv += [
            "-object",
            opts(
                "memory-backend-file",
                id="mem",
                size=f"{spec.memory_mib}M",
                mem_path=t.path,
                share=t.saving,
            ),  # fmt: skip
        ]
        if not t.saving:
            argv += ["-incoming", "defer"]
    elif memfd:
        argv += [
            "-object",
            opts("memory-backend-memfd", id="mem", size=f"{spec.memory_mib}M", share=True),
        ]
        if machine == "microvm" and spec.shared_fs == "virtio-fs" and spec.shares:
            # virtiofsd aborts (and guest reads hang) on legacy virtio-mmio.
            argv += ["-global", "virtio-mmio.force-legacy=false"]
    if spec.template is None or spec.template.saving:
        # A clone's kernel is in its template's RAM: a -kernel would only be
        # read (~6 MB) into an anonymous copy for fw_cfg that nothing reads.
        argv += ["-kernel", str(spec.kernel), "-append", cmdline]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
    argv += ["-chardev", opts("file", id="console", path=console_log), "-serial", "chardev:console"]
    if "qmp" in socket_fds:  # a jailed QEMU gets its listening sockets made
        argv += ["-chardev", opts("socket", id="qmp", fd=socket_fds["qmp"], server=True,
                                  wait=False),
                 "-mon", "chardev=qmp,mode=control"]  # fmt: skip
    else:
        argv += ["-qmp", opts("unix:" + str(sockets["qmp"]), server=True, wait=False)]
    for dev in _devices(spec, m, sockets, socket_fds):
        argv += dev
    return argv
