"""Debian's prebuilt cloud kernel as the guest kernel: no build, slower boot.

The alternative to building (guest.kernel_source = "debian-cloud"). Debian
ships virtio, erofs, virtio-fs and overlay as modules, so an initramfs loads
them (in modules.dep order), mounts the erofs root image from /dev/vda and
switches to it; from there the boot is the same as with our kernel. Costs
about a second of boot under TCG, and the cloud kernel has no 9p.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import GuestAssetError
from cocoon.guestassets.cache import BUILDER_VERSION, digest, guest_dir
from cocoon.util.proc import run

Log = Callable[[str], None]

META_PACKAGE = "linux-image-cloud-amd64"
#: What the guest needs beyond the built-ins; their dependencies come along.
MODULES = [
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "erofs",
    "virtiofs",
    "overlay",
    "vmw_vsock_virtio_transport",
]

INIT = """#!/bin/busybox sh
# cocoon initramfs for Debian's cloud kernel: load the virtio/erofs modules,
# mount the erofs root image, hand over to its /sbin/init (the agent's init).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do
  insmod /modules/$m 2>/dev/null || echo "cocoon-initramfs: insmod $m failed" > /dev/console
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
mkdir -p /newroot
if ! mount -t erofs -o ro /dev/vda /newroot; then
  echo "cocoon-initramfs: cannot mount the root image" > /dev/console; exit 1
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
"""


def versioned_package() -> str:
    cp = run(
        ["apt-cache", "depends", META_PACKAGE], timeout_s=60, error=GuestAssetError, check=False
    )
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", cp.stdout.decode())
    if not m:
        raise GuestAssetError(
            f"apt knows no {META_PACKAGE}: run apt-get update (needs the Debian mirror once)"
        )
    return m.group(1)


def fetch_deb(cfg: Config, log: Log) -> Path:
    """The kernel package's .deb, downloaded once into the data dir."""
    debs = cfg.data / "build" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    have = sorted(debs.glob("linux-image-*-cloud-amd64_*.deb"))
    if have:
        return have[-1]
    pkg = versioned_package()
    log(f"cloud kernel: downloading {pkg}")
    run(["apt-get", "download", "-q", pkg], cwd=debs, timeout_s=600, error=GuestAssetError)
    have = sorted(debs.glob("linux-image-*-cloud-amd64_*.deb"))
    if not have:
        raise GuestAssetError(f"apt-get download {pkg} produced no .deb")
    return have[-1]


def load_order(modroot: Path, wanted: list[str]) -> list[str]:
    """Module files (relative to modroot) in an order where dependencies come first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modroot / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.removesuffix(".ko").replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for d in deps.get(mod, []):
            visit(d)
        order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise GuestAssetError(f"module {name} not in the cloud kernel (is it built in?)")
        visit(by_name[name])
    return order


def key_for(deb: Path) -> str:
    me = (resources.files("cocoon.guestassets") / "cloudkernel.py").read_bytes()
    return digest(BUILDER_VERSION, deb.name, me)


def build(cfg: Config, log: Log) -> Path:
    deb = fetch_deb(cfg, log)
    key = key_for(deb)
    out = guest_dir(cfg) / "kernel-cloud" / key
    if (out / "vmlinuz").is_file() and (out / "initrd.img").is_file():
        log(f"cloud kernel {key}: cached ({out})")
        return out / "vmlinuz"
    for tool in ("dpkg-deb", "depmod", "cpio", "/bin/busybox"):
        if not shutil.which(tool):
            raise GuestAssetError(f"{tool} not found: run the README set-up")
    build_root = cfg.data / "build"
    with tempfile.TemporaryDirectory(prefix="cloudkernel-", dir=build_root) as tmp:
        x = Path(tmp) / "x"
        run(["dpkg-deb", "-x", str(deb), str(x)], timeout_s=300, error=GuestAssetError)
        (version,) = os.listdir(x / "lib/modules")
        run(["depmod", "-b", str(x), version], timeout_s=120, error=GuestAssetError)
        modroot = x / "lib/modules" / version
        order = load_order(modroot, MODULES)
        ird = Path(tmp) / "initrd"
        for d in ("bin", "proc", "sys", "dev", "modules", "newroot"):
            (ird / d).mkdir(parents=True)
        shutil.copy2("/bin/busybox", ird / "bin/busybox")
        for applet in (
            "sh",
            "mount",
            "umount",
            "insmod",
            "switch_root",
            "mkdir",
            "sleep",
            "cat",
            "echo",
        ):
            os.symlink("busybox", ird / "bin" / applet)
        names = []
        for mod in order:
            name = Path(mod).name
            shutil.copy2(modroot / mod, ird / "modules" / name)
            names.append(name)
        (ird / "modules/order").write_text("\n".join(names) + "\n")
        (ird / "init").write_text(INIT)
        (ird / "init").chmod(0o755)
        files = sorted(str(p.relative_to(ird)) for p in ird.rglob("*"))
        cp = run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            cwd=ird,
            input=("\n".join(["."] + files) + "\n").encode(),
            timeout_s=120,
            error=GuestAssetError,
        )
        staging = Path(tmp) / "out"
        staging.mkdir()
        (staging / "initrd.img").write_bytes(cp.stdout)
        shutil.copy2(x / "boot" / f"vmlinuz-{version}", staging / "vmlinuz")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    log(f"cloud kernel {key}: built {out} ({len(order)} modules in the initramfs)")
    return out / "vmlinuz"
