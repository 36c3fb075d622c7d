"""What this host can do for cocoon, each item with a verdict and a reason.

``fatal`` items make `cocoon check` exit non-zero: without them no sandbox can
start. The rest say what a feature will cost or lack (no vhost-vsock: the agent
channel is virtio-serial; no vhost-net: network runs through QEMU's userspace).

In ``runtime/`` because it asks every layer below (hypervisor, guest assets,
templates) what it can do, and ``cocoon check`` is a front end like the others.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import CocoonError
from cocoon.guestassets.cache import resolve
from cocoon.guestassets.rootfs import image_key, image_path
from cocoon.hypervisor import accel, jail
from cocoon.sandbox.template import listing, templates_dir
from cocoon.util.proc import run


@dataclass
class Item:
    name: str
    ok: bool
    detail: str
    fatal: bool = False


def _qemu_version(binary: str) -> tuple[bool, str]:
    path = shutil.which(binary)
    if not path:
        return False, f"{binary} not found (apt-get install qemu-system-x86)"
    try:
        out = run([path, "--version"], timeout_s=10, check=False).stdout.decode(errors="replace")
    except (OSError, CocoonError) as e:
        return False, f"{path} does not run: {e}"
    m = re.search(r"version (\S+)", out)
    return True, f"{path} {m.group(1) if m else '?'}"


def _cgroups() -> tuple[bool, str]:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        ctrl = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
        return True, f"v2 unified ({' '.join(ctrl)})"
    v1 = sorted(p.name for p in Path("/sys/fs/cgroup").glob("*") if p.is_dir())
    if v1:
        return True, f"v1 hierarchies ({', '.join(v1)}); containers use cgroup v2 inside the guest"
    return False, "no cgroup file system mounted"


def _templates(cfg: Config) -> Item:
    if not cfg.sandbox.templates:
        return Item("templates", False, "off (sandbox.templates = false): every start boots")
    found = listing(cfg)
    good = [k for k, _, problem in found if not problem]
    bad = len(found) - len(good)
    detail = f"{len(good)} usable" + (f", {bad} unusable (rebuilt on need)" if bad else "")
    detail += f" under {templates_dir(cfg)}; built on first need (`cocoon template ls`)"
    return Item("templates", True, detail)


def _jail(cfg: Config) -> Item:
    sec = cfg.security
    if not sec.jail:
        return Item("jail", False, "off (security.jail = false): QEMU runs as root")
    if platform.machine() != "x86_64":
        return Item("jail", False, f"on, but written for x86_64, not {platform.machine()}: "
                    "jailed VMs will not start (set security.jail = false)")  # fmt: skip
    if not os.access(jail.TINI, os.X_OK):
        return Item("jail", False, f"on, but {jail.TINI} is missing: jailed VMs will not "
                    "start (apt-get install tini)")  # fmt: skip
    detail = (
        f"QEMU as uids {sec.uid_base}..{sec.uid_base + sec.uid_count - 1} (one per sandbox), "
        "own mount/pid/ipc/uts/net namespaces, root and host cgroup, no capabilities, "
        "no_new_privs, QEMU seccomp sandbox, no core dumps; virtiofsd in its own "
        "namespaces under its seccomp filter; virtfs-proxy-helper in its own "
        "mount/pid/ipc/uts/net namespaces with only the capabilities it serves owners "
        "with, no_new_privs, under cocoon's seccomp filter"
    )
    return Item("jail", True, detail)


def run_checks(cfg: Config) -> list[Item]:
    items: list[Item] = []
    report = accel.cached_probe(cfg.root / "accel.json")
    chosen, why = accel.choose(cfg.hypervisor.accel, report)
    items.append(Item("kvm", report.kvm_usable, report.reason))
    items.append(Item("accelerator", True, f"{chosen} ({why})"))
    ok, detail = _qemu_version(cfg.hypervisor.qemu_binary)
    items.append(Item("qemu", ok, detail, fatal=True))
    vfsd = cfg.hypervisor.virtiofsd
    items.append(
        Item(
            "virtiofsd",
            os.access(vfsd, os.X_OK),
            vfsd if os.access(vfsd, os.X_OK) else f"{vfsd} missing: host dirs fall back to 9p",
        )
    )
    vsock = Path("/dev/vhost-vsock").exists()
    items.append(
        Item(
            "vhost-vsock",
            vsock,
            "present" if vsock else "absent: the agent channel uses virtio-serial",
        )
    )
    vnet = Path("/dev/vhost-net").exists()
    items.append(
        Item("vhost-net", vnet, "present" if vnet else "absent: virtio-net runs in QEMU userspace")
    )
    tun = Path("/dev/net/tun").exists()
    items.append(Item("tun", tun, "/dev/net/tun" if tun else "/dev/net/tun missing: no networking"))
    ip = shutil.which("ip")
    netns = Path("/proc/self/ns/net").exists() and ip is not None
    items.append(
        Item("netns", netns, f"{ip} + network namespaces" if netns else "iproute2 or netns missing")
    )
    tools = {t: shutil.which(t) for t in ("tc", "iptables", "nsenter")}
    missing = [t for t, p in tools.items() if p is None]
    items.append(
        Item(
            "bridge network",
            not missing,
            "tc (mirred), iptables (NAT), nsenter"
            if not missing
            else f"{', '.join(missing)} missing: only --network none works",
        )
    )
    e2fs = [shutil.which(b) for b in ("mkfs.ext4", "debugfs")]
    items.append(
        Item(
            "scratch volumes",
            all(e2fs),
            "mkfs.ext4 + debugfs" if all(e2fs) else "e2fsprogs missing: no --mount type=scratch",
        )
    )
    ok, detail = _cgroups()
    items.append(Item("cgroups", ok, detail))
    items.append(_jail(cfg))
    try:
        assets = resolve(cfg)
        items.append(Item("guest kernel", True, str(assets.kernel), fatal=True))
        fresh = cfg.hypervisor.image or assets.image == image_path(cfg, image_key(cfg))
        items.append(
            Item(
                "guest image",
                True,
                str(assets.image)
                + ("" if fresh else " (stale: the agent changed; run `cocoon guest build`)"),
                fatal=True,
            )
        )
    except CocoonError as e:
        items.append(Item("guest assets", False, str(e), fatal=True))
    items.append(_templates(cfg))
    try:
        cfg.root.mkdir(parents=True, exist_ok=True)
        writable = os.access(cfg.root, os.W_OK)
    except OSError:
        writable = False
    items.append(
        Item("state dir", writable, f"{cfg.root}" + ("" if writable else " not writable"), True)
    )
    return items
