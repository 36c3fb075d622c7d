"""Connecting the links of a network namespace to a VM's NICs.

A VM cannot use a veth; it needs a tap (or a macvtap). For each veth-like
link in the namespace, one of:

- ``tcfilter`` (default): a tap beside the veth, joined by tc ingress filters
  with a mirred redirect in each direction, so every frame the veth receives
  leaves through the tap to the guest and every frame the guest sends leaves
  through the veth. Works on any kernel with ``act_mirred``; needs nothing
  bridged or promiscuous.
- ``macvtap``: a passthru macvtap on the veth; the guest's frames go straight
  to the veth's queue, no tc on the data path.

The guest's NIC takes the veth's MAC and its addresses, routes and permanent
neighbours, so whatever made the namespace (CNI, podman, containerd, our own
bridge) sees the traffic it expects without knowing a VM is there.

The tap is opened without TUNSETPERSIST and its fd goes to QEMU: when QEMU
dies, however it dies, the kernel deletes the tap and its tc state with it.
A warm pool's sandbox (``tcfilter`` only) has its taps before anyone knows
where they will go: they wait in a namespace of the pool's own (``pool_taps``)
and are moved into the taker's namespace (``PoolTaps``), where the same
filters join them to the veth. A tap's fd stays valid across the move (QEMU
keeps its fd; frames flow both ways; closing it deletes the tap in its new
namespace: checked by hand here, on Linux 6.18).
What outlives QEMU (the filters on the veth, a macvtap link, rate-limit
qdiscs, an ifb) is written in the sandbox state before it is made and undone
by ``unplumb``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.errors import NetworkError
from cocoon.network.netns import Link, Neighbor, NetNs, Route, in_netns, in_new_netns
from cocoon.util.proc import run

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
#: Link kinds a VM NIC is made for (CNI's veth, macvlan and ipvlan plugins).
PAIRED_KINDS = ("veth", "macvlan", "ipvlan")
MODELS = ("tcfilter", "macvtap")
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_RATE_MULT = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
#: Our own links in a namespace: never paired again, always ours to delete.
OWN_PREFIX = "cc"


def parse_rate(text: str) -> int:
    """``10mbit`` -> bits per second (tc's decimal units)."""
    m = RATE_RE.match(text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise NetworkError(
            f"bad rate {text[:40]!r}: give a number and a unit, e.g. 10mbit or 1gbit"
        )
    return int(float(m.group(1)) * _RATE_MULT[m.group(2)])


def tbf(dev: str, bits: int, parent: str = "root") -> str:
    """A token bucket: burst of 10 ms of traffic, at least 32 KiB (one HZ tick and a TSO frame)."""
    burst = max(bits // 8 // 100, 32 << 10)
    return f"qdisc replace dev {dev} {parent} tbf rate {bits}bit burst {burst} latency 50ms"


def redirect(src: str, dst: str) -> list[str]:
    """Every frame ``src`` receives leaves through ``dst``."""
    return [
        f"qdisc add dev {src} handle ffff: ingress",
        f"filter add dev {src} parent ffff: protocol all u32 match u32 0 0 "
        f"action mirred egress redirect dev {dst}",
    ]


@dataclass
class GuestNic:
    """One NIC as the guest must configure it."""

    name: str
    mac: str
    mtu: int
    addresses: list[str] = field(default_factory=list)


@dataclass
class Plumbed:
    """One NIC made for the VM: the fd QEMU takes, what the guest sets up, and
    the host-side record ``unplumb`` undoes."""

    fd: int
    nic: GuestNic
    record: dict[str, Any]


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(
            fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        )
    except OSError as e:
        os.close(fd)
        raise NetworkError(f"cannot create tap {name}: {e.strerror}") from e
    return fd


def throwaway_taps(count: int) -> list[int]:
    """Tap fds in a network namespace of their own, joined to nothing.

    A template's NIC slots need a backend with the offloads (vnet headers) a
    real tap has, or the guest negotiates a NIC without them and every clone
    inherits that. The namespace lives as long as the fds: QEMU's exit ends it.
    """

    def open_all() -> list[int]:
        fds: list[int] = []
        try:
            for i in range(count):
                fds.append(_open_tap(f"tpl{i}"))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    return in_new_netns(open_all)


#: A pooled sandbox's taps, in the pool's namespace, before they are moved:
#: named as ``plumb`` names a namespace's taps, so that the usual case (one
#: namespace) moves them with no rename.
POOL_TAP = OWN_PREFIX + "tap"


def pool_taps(count: int) -> tuple[int, list[int]]:
    """A warm pool's taps: ``count`` tap fds (``cctap<i>``) in a network
    namespace made for them, and an fd of that namespace to move them out
    later. The namespace goes once the last of its fds and taps does."""

    def open_all() -> tuple[int, list[int]]:
        fds: list[int] = []
        try:
            for i in range(count):
                fds.append(_open_tap(f"{POOL_TAP}{i}"))
            return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    return in_new_netns(open_all)


@dataclass
class PoolTaps:
    """A pooled sandbox's taps, waiting in the pool's namespace (``netns``, a
    path) with QEMU holding their fds; taken in guest NIC order."""

    netns: str
    count: int
    used: int = 0

    def move(self, dest: NetNs, name: str) -> None:
        """The next tap, moved into ``dest`` and renamed ``name`` there."""
        if self.used >= self.count:
            raise NetworkError(
                f"the pooled sandbox has {self.count} NIC(s); the namespaces have more links"
            )
        src = f"{POOL_TAP}{self.used}"
        self.used += 1
        NetNs(self.netns).ip("link", "set", "dev", src, "netns", dest.path)
        if src != name:  # (a further namespace's: its own taps count from 0)
            dest.ip("link", "set", "dev", src, "name", name)


def _macvtap_devnum(ns: NetNs, name: str) -> tuple[int, int]:
    """The macvtap's char device number, read from a sysfs mounted inside the
    namespace (the host's sysfs shows only the host's links)."""
    script = f"mount -t sysfs sysfs /sys && cat /sys/class/net/{name}/macvtap/tap*/dev"
    try:
        cp = run(
            ["nsenter", f"--net={ns.path}", "--", "unshare", "-m", "--propagation", "private",
             "sh", "-c", script],
            timeout_s=10, error=NetworkError,
        )  # fmt: skip
        major, minor = cp.stdout.decode().split()[0].split(":")
        return int(major), int(minor)
    except (OSError, NetworkError, ValueError, IndexError) as e:
        raise NetworkError(f"cannot find the device of macvtap {name}: {e}") from e


def _open_macvtap(ns: NetNs, name: str, scratch: Path) -> int:
    major, minor = _macvtap_devnum(ns, name)
    node = scratch / f"{name}.dev"
    with contextlib.suppress(FileNotFoundError):
        node.unlink()
    os.mknod(node, 0o600 | 0o020000, os.makedev(major, minor))
    try:
        return os.open(node, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise NetworkError(f"cannot open macvtap {name}: {e.strerror}") from e
    finally:
        node.unlink()


def candidates(links: list[Link]) -> list[Link]:
    """The links of a namespace a VM NIC is made for."""
    return [
        ln
        for ln in links
        if ln.kind in PAIRED_KINDS and not ln.name.startswith(OWN_PREFIX) and ln.mac
    ]


def plumb(
    ns: NetNs,
    model: str,
    rate_bits: int,
    scratch: Path,
    save: Callable[[dict[str, Any]], None],
    taps: PoolTaps | None = None,
    links: list[Link] | None = None,
) -> tuple[list[Plumbed], list[Route], list[Neighbor]]:
    """A NIC for every veth-like link in ``ns``; their routes and neighbours.

    ``save(record)`` is called before anything for that link is made, so a
    crash at any point leaves a record ``unplumb`` can finish from. With
    ``taps`` (a pooled sandbox's), the NICs' taps are moved in, not made:
    their fds are QEMU's already (``Plumbed.fd`` is -1). ``links``: the
    namespace's, if the caller has just read them.
    """
    if model not in MODELS:
        raise NetworkError(f"unknown network model {model!r}: use tcfilter or macvtap")
    if taps is not None and model != "tcfilter":
        raise NetworkError("a pooled sandbox's NICs are taps: network model tcfilter only")
    links = ns.links() if links is None else links
    ours = [ln.name for ln in links if ln.name.startswith((f"{OWN_PREFIX}tap", f"{OWN_PREFIX}mvt"))]
    if ours:
        raise NetworkError(
            f"network namespace {ns.path} is already connected to a VM (link {ours[0]}): "
            "one sandbox per namespace; a pod's containers share its sandbox"
        )
    pairs = candidates(links)
    if not pairs:
        raise NetworkError(
            f"network namespace {ns.path} has no veth, macvlan or ipvlan link to connect the VM to"
        )
    out: list[Plumbed] = []
    try:
        for i, link in enumerate(pairs):
            out.append(_plumb_one(ns, link, i, model, rate_bits, scratch, save, taps))
    except BaseException:
        for p in out:
            if p.fd >= 0:
                os.close(p.fd)
        raise
    names = {ln.name for ln in pairs}
    routes = [r for r in ns.routes() if r.device in names]
    neighbors = [n for n in ns.neighbors() if n.device in names]
    return out, routes, neighbors


def _plumb_one(
    ns: NetNs,
    link: Link,
    i: int,
    model: str,
    rate_bits: int,
    scratch: Path,
    save: Callable[[dict[str, Any]], None],
    taps: PoolTaps | None = None,
) -> Plumbed:
    tap = f"{OWN_PREFIX}tap{i}" if model == "tcfilter" else f"{OWN_PREFIX}mvt{i}"
    ifb = f"{OWN_PREFIX}ifb{i}"
    record: dict[str, Any] = {
        "netns": ns.path, "link": link.name, "model": model, "tap": tap,
        "ifb": ifb if (rate_bits and model == "macvtap") else "",
        "rate": rate_bits,
    }  # fmt: skip
    save(record)
    nic = GuestNic(link.name, link.mac, link.mtu, list(link.addresses))
    if model == "tcfilter":
        if taps is not None:
            taps.move(ns, tap)
            fd = -1
        else:
            fd = in_netns(ns.path, lambda: _open_tap(tap))
        try:
            cmds = [f"link set dev {tap} mtu {link.mtu} up"]
            if not link.up:
                cmds.append(f"link set dev {link.name} up")
            ns.batch("ip", cmds)
            tc = redirect(link.name, tap) + redirect(tap, link.name)
            if rate_bits:
                tc += [tbf(tap, rate_bits), tbf(link.name, rate_bits)]
            ns.batch("tc", tc)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return Plumbed(fd, nic, record)
    cmds = [
        f"link add link {link.name} name {tap} type macvtap mode passthru",
        f"link set dev {tap} mtu {link.mtu} up",
    ]
    if not link.up:
        cmds.insert(0, f"link set dev {link.name} up")
    if rate_bits:
        cmds += [f"link add {ifb} type ifb", f"link set dev {ifb} up"]
    ns.batch("ip", cmds)
    if rate_bits:
        # Frames toward the guest never meet a qdisc on the macvtap path: detour
        # them through an ifb whose egress is shaped (the ifb hands them back).
        ns.batch("tc", [*redirect(link.name, ifb), tbf(ifb, rate_bits), tbf(link.name, rate_bits)])
    fd = _open_macvtap(ns, tap, scratch)
    return Plumbed(fd, nic, record)


def unplumb(record: dict[str, Any]) -> None:
    """Undo one link's plumbing; quiet when the namespace or links are already gone."""
    path = str(record.get("netns", ""))
    link = str(record.get("link", ""))
    if not path or not os.path.exists(path) or not link:
        return
    ns = NetNs(path)
    tc = [f"qdisc del dev {link} ingress"]
    if record.get("rate"):
        tc.append(f"qdisc del dev {link} root")
    for line in tc:
        with contextlib.suppress(NetworkError):
            ns.tc(*line.split(), check=False)
    for name in (record.get("tap", ""), record.get("ifb", "")):
        if name and str(name).startswith(OWN_PREFIX):
            ns.ip("link", "del", "dev", str(name), check=False)
