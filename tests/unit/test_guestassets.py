"""Inputs of the guest build: the kernel fragment and the image's contents."""

from __future__ import annotations

from cocoon.guestassets import kernel, rootfs
from cocoon.guestassets.cache import data_file, digest
from cocoon.hypervisor import accel

REQUIRED = [
    "CONFIG_MISC_FILESYSTEMS=y",  # else EROFS silently stays off
    "CONFIG_EROFS_FS=y",
    "CONFIG_VIRTIO_MMIO=y",
    "CONFIG_VIRTIO_PCI=y",
    "CONFIG_VIRTIO_BLK=y",
    "CONFIG_VIRTIO_NET=y",
    "CONFIG_VIRTIO_CONSOLE=y",
    "CONFIG_VIRTIO_FS=y",
    "CONFIG_9P_FS=y",
    "CONFIG_OVERLAY_FS=y",
    "CONFIG_EXT4_FS=y",
    "CONFIG_CGROUPS=y",
    "CONFIG_MEMCG=y",
    "CONFIG_USER_NS=y",
    "CONFIG_SECCOMP_FILTER=y",
    "CONFIG_RANDOM_TRUST_CPU=y",
    "CONFIG_KERNEL_LZ4=y",
    "CONFIG_PVH=y",
    "CONFIG_VIRTIO_MEM=y",
    "CONFIG_HOTPLUG_PCI=y",
    "CONFIG_NETFILTER=y",
]


def test_fragment_has_what_the_runtime_needs() -> None:
    lines = kernel.fragment_lines(data_file("kernel.config"))
    for opt in REQUIRED:
        assert opt in lines
    assert not any(ln.startswith("CONFIG_MODULES=y") for ln in lines)


def test_missing_options_detected() -> None:
    frag = b"# c\nCONFIG_A=y\nCONFIG_B=y\n"
    assert kernel.missing_options(frag, "CONFIG_A=y\n# CONFIG_B is not set\n") == ["CONFIG_B=y"]


def test_digest_separates_parts() -> None:
    assert digest("ab", "c") != digest("a", "bc")


def test_agent_sources_are_stdlib_only() -> None:
    """The guest has no site-packages: the agent may import only stdlib + what is shipped."""
    srcs = rootfs.agent_sources()
    assert "cocoon/agent/main.py" in srcs and "cocoon/protocol/framing.py" in srcs
    assert "cocoon/util/boundedjson.py" in srcs
    for name, body in srcs.items():
        for line in body.decode().splitlines():
            if line.startswith(("import ", "from ")) and "cocoon" in line:
                assert (
                    "cocoon.protocol" in line
                    or "cocoon.agent" in line
                    or line == "from cocoon.util import boundedjson"
                    or line.startswith("from cocoon import __version__")
                ), f"{name}: {line}"


def test_accel_choice() -> None:
    bad = accel.AccelReport(False, "nested PVM", True)
    good = accel.AccelReport(True, "ran", False)
    assert accel.choose("auto", bad)[0] == "tcg"
    assert accel.choose("auto", good)[0] == "kvm"
    assert accel.choose("tcg", good)[0] == "tcg"
    assert accel.choose("kvm", bad) == ("kvm", "forced by configuration (nested PVM)")
