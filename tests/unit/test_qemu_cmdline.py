"""QEMU argv from typed objects: the rules that tie options together."""

from __future__ import annotations

from pathlib import Path

from cocoon.config import HypervisorConfig
from cocoon.hypervisor.base import Share, TemplateMemory, VmSpec
from cocoon.hypervisor.qemu import cmdline
from cocoon.hypervisor.qemu.backend import kernel_cmdline


def spec(**kw: object) -> VmSpec:
    base: dict[str, object] = dict(
        id="t1", workdir=Path("/run/x/t1"), kernel=Path("/k"), image=Path("/i,x"),
        vcpus=2, memory_mib=256, accel="tcg",
    )  # fmt: skip
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def build(s: VmSpec, machine: str = "microvm") -> list[str]:
    socks = {"qmp": Path("/q"), "agent": Path("/a"), "virtiofsd0": Path("/v")}
    return cmdline.build(s, qemu="qemu", machine=machine, cmdline="c", sockets=socks,
                         console_log=Path("/c"), tb_size_mib=32,
                         tcg_cpu=HypervisorConfig().tcg_cpu)  # fmt: skip


def test_opts_escape_commas_and_raw_keys() -> None:
    assert cmdline.opts("x", a_b=True, c=None, d="1,2") == "x,a-b=on,d=1,,2"
    assert cmdline.opts("y", {"mount_tag": "t"}) == "y,mount_tag=t"


def test_microvm_tcg_defaults() -> None:
    argv = build(spec())
    s = " ".join(argv)
    assert "-no-reboot" in argv and "-nodefaults" in argv
    # no ERMS/FSRM: TCG runs the guest kernel's `rep movsb` copies a byte at a time
    assert "tcg,tb-size=32" in s and "-cpu max,-erms,-fsrm" in s
    assert "file=/i,,x" in s  # a comma in a path cannot inject options
    assert "virtserialport,chardev=agent,name=cocoon.agent" in s
    assert "memory-backend-memfd" in s  # 4 KiB pages, not THP-inflated anonymous RAM
    assert "force-legacy" not in s  # only virtio-fs needs modern virtio-mmio


def test_virtiofs_needs_memfd_and_modern_mmio() -> None:
    s = " ".join(build(spec(shares=[Share("tag", Path("/d"))])))
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in s
    assert "virtio-mmio.force-legacy=false" in s
    assert "vhost-user-fs-device,chardev=fs0,tag=tag" in s


def test_q35_uses_pci_devices_and_kvm_uses_host_cpu() -> None:
    s = " ".join(build(spec(accel="kvm"), machine="q35"))
    assert "virtio-blk-pci" in s and "-accel kvm -cpu host" in s


def test_kernel_cmdline_for_tcg() -> None:
    line = kernel_cmdline(spec(), "microvm")
    assert "panic=-1" in line and "reboot=t" in line and "pci=off" in line
    assert "tsc=reliable" in line and "tsc_early_khz=" in line
    hostile = kernel_cmdline(spec(init=["/bin/sh", "-c", "echo a b"]), "q35")
    assert hostile.endswith('init=/bin/sh -- -c "echo a b"')
    assert "pci=off" not in hostile


def test_vsock_channel_replaces_virtio_serial() -> None:
    s = " ".join(build(spec(channel="vsock", vsock_cid=77)))
    assert "vhost-vsock-device,guest-cid=77" in s
    assert "virtserialport" not in s
    assert "cocoon.channel=vsock" in kernel_cmdline(spec(channel="vsock"), "microvm")


def test_agent_and_host_agree_on_the_vsock_port() -> None:
    from cocoon.agent.main import VSOCK_PORT
    from cocoon.hypervisor.base import AGENT_VSOCK_PORT

    assert VSOCK_PORT == AGENT_VSOCK_PORT


def test_a_clone_loads_no_kernel_its_template_does() -> None:
    """A clone's kernel is in its template's RAM: loading the file again would
    cost each clone ~6 MB of QEMU's memory (fw_cfg's copy) and a read."""
    saving = build(spec(template=TemplateMemory(Path("/ram"), True, Path("/e"))))
    clone = build(spec(template=TemplateMemory(Path("/ram"), False, Path("/e"))))
    assert "-kernel" in saving and "-incoming" not in saving
    assert "-kernel" not in clone and "-append" not in clone and "-incoming" in clone
    assert "-kernel" in build(spec())
