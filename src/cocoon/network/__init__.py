"""A sandbox's networks: which namespaces its NICs come from, and undoing it all.

``--network`` names where each NIC comes from: ``bridge`` (a namespace of our
own on the ``cocoon0`` bridge, network.bridge), ``ns:PATH`` (a namespace
someone else made: CNI, podman, containerd, a test) or ``none`` (loopback
only). Every veth-like link of those namespaces becomes one virtio-net NIC
(network.plumb), and the guest agent is told the MAC, addresses, routes and
neighbours to give each one.

Everything made on the host is written into the sandbox's state before it is
made (``record``), so ``release`` can undo it from the state alone: on rm, on
a failed start, and from ``cocoon gc`` after any crash.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import NetworkError
from cocoon.network import bridge, plumb
from cocoon.network.netns import NetNs, check_path
from cocoon.protocol import messages

#: Guest dir where the agent writes the container's hosts, resolv.conf and hostname.
GUEST_FILES = "/run/cocoon/net"


@dataclass
class NetworkPlan:
    """What a sandbox's networking should be (kept in the container's config)."""

    networks: list[str] = field(default_factory=lambda: ["bridge"])
    model: str = "tcfilter"
    rate: str = ""
    hostname: str = ""
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    add_hosts: list[str] = field(default_factory=list)  # "name:address"
    #: Write /etc/hosts, resolv.conf, hostname for the container (the OCI
    #: runtime's callers bring their own).
    files: bool = True
    #: A namespace without veth-like links is fine (an OCI caller's
    #: loopback-only netns) rather than a mistake worth an error.
    allow_empty: bool = False
    #: net.* sysctls for the VM's network namespace (an OCI spec's).
    sysctls: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        if not self.networks:
            self.networks = ["none"]
        for n in self.networks:
            if n not in ("none", "bridge") and not n.startswith("ns:"):
                raise NetworkError(f"unknown network {n!r}: use bridge, none or ns:PATH")
            if n.startswith("ns:") and not n[3:].startswith("/"):
                raise NetworkError(f"network {n!r}: ns: takes an absolute path")
        if "none" in self.networks and len(self.networks) > 1:
            raise NetworkError("--network none cannot be combined with other networks")
        if self.networks.count("bridge") > 1:
            raise NetworkError("--network bridge can be given once")
        if self.model not in plumb.MODELS:
            raise NetworkError(f"unknown network model {self.model!r}: use tcfilter or macvtap")
        if self.rate:
            plumb.parse_rate(self.rate)
        for d in self.dns:
            _address(d, "--dns")
        for h in self.add_hosts:
            name, sep, addr = h.partition(":")
            if not sep or not name or any(c.isspace() for c in name):
                raise NetworkError(f"--add-host {h!r}: give NAME:ADDRESS")
            _address(addr, "--add-host")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _address(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise NetworkError(f"{what} {text!r} is not an IP address") from None


@dataclass
class Attachment:
    """The host side is ready: fds for QEMU, the agent's orders, the addresses."""

    nics: list[tuple[str, int]]  # (mac, tap fd) in guest order
    message: messages.ConfigureNetwork
    addresses: list[str]  # CIDRs the guest's NICs carry, first = the main one

    def close_fds(self) -> None:
        for _, fd in self.nics:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.nics = [(mac, -1) for mac, _ in self.nics]


def attach(
    cfg: Config,
    sandbox_id: str,
    plan: NetworkPlan,
    record: dict[str, Any],
    save: Callable[[], None],
    scratch: Path,
    taps: plumb.PoolTaps | None = None,
) -> Attachment:
    """Make every NIC of the plan; ``record`` is filled (and ``save``d) ahead
    of each step. With ``taps`` (a pooled sandbox's), the NICs are its taps,
    moved into the plan's namespaces: their fds in the result are -1."""
    plan.check()
    record.setdefault("links", [])
    nics: list[plumb.Plumbed] = []
    routes: list[messages.NetRoute] = []
    neighbors: list[messages.NetNeighbor] = []
    used: set[str] = set()
    defaults: set[int] = set()
    rate = plumb.parse_rate(plan.rate) if plan.rate else 0

    def keep(rec: dict[str, Any]) -> None:
        record["links"].append(rec)
        save()

    try:
        for net in plan.networks:
            if net == "none":
                continue
            if net == "bridge":
                record["bridge"] = {
                    "state_dir": cfg.network.state_dir,
                    "subnet": cfg.network.bridge_subnet,
                    "name": cfg.network.bridge,
                }
                save()
                path, _ = bridge.create(cfg, sandbox_id)
            else:
                path = check_path(net[3:])
            ns = NetNs(path)
            links = ns.links()
            if plan.allow_empty and not plumb.candidates(links):
                continue
            got, ns_routes, ns_neigh = plumb.plumb(ns, plan.model, rate, scratch, keep, taps, links)
            rename: dict[str, str] = {}
            for p in got:
                name = p.nic.name
                if name in used:
                    name = next(f"eth{i}" for i in range(64) if f"eth{i}" not in used)
                used.add(name)
                rename[p.nic.name] = name
                p.nic.name = name
                nics.append(p)
            for r in sorted(ns_routes, key=lambda r: bool(r.gateway)):
                if r.dest == "default":
                    if r.family in defaults:
                        continue  # the first network gives the default route
                    defaults.add(r.family)
                routes.append(messages.NetRoute(r.dest, r.gateway, rename[r.device]))
            neighbors += [
                messages.NetNeighbor(n.address, n.mac, rename[n.device]) for n in ns_neigh
            ]
    except BaseException:
        for p in nics:
            if p.fd >= 0:
                os.close(p.fd)
        raise
    if taps is not None and taps.used != taps.count:
        raise NetworkError(f"the pooled sandbox has {taps.count} NIC(s), the namespaces "
                           f"{taps.used} link(s) to connect")  # fmt: skip
    addresses = [a for p in nics for a in p.nic.addresses]
    hostname = plan.hostname or "cocoon"
    msg = messages.ConfigureNetwork(
        interfaces=[
            messages.NetInterface(p.nic.name, p.nic.mac, p.nic.mtu, p.nic.addresses) for p in nics
        ],
        routes=routes,
        neighbors=neighbors,
        hosts=hosts_file(hostname, addresses, plan.add_hosts) if plan.files else "",
        resolv=resolv_file(plan.dns, plan.dns_search) if plan.files else "",
        hostname=f"{hostname}\n" if plan.files else "",
        sysctls=[f"{k}={v}" for k, v in sorted(plan.sysctls.items())],
    )
    msg.check()
    return Attachment([(p.nic.mac, p.fd) for p in nics], msg, addresses)


def pool_nics(plan: NetworkPlan) -> int | None:
    """How many NICs ``plan`` makes, where a warm pool's sandbox can serve it
    (its taps moved in: ``tcfilter``, namespaces someone else made); None
    where none can (our own bridge's namespace is made per sandbox, macvtap
    is not a tap, an empty namespace is an error of its own)."""
    nets = [n for n in plan.networks if n != "none"]
    if not nets:
        return 0
    if plan.model != "tcfilter" or not all(n.startswith("ns:") for n in nets):
        return None
    total = 0
    try:
        for n in nets:
            found = len(plumb.candidates(NetNs(check_path(n[3:])).links()))
            if not found and not plan.allow_empty:
                return None
            total += found
    except NetworkError:
        return None
    return total


def release(record: dict[str, Any], sandbox_id: str) -> None:
    """Undo what ``attach`` recorded (VM already gone); safe to repeat."""
    errors = []
    br = record.get("bridge")
    # Our own namespace goes as a whole (taps, filters and all): no need to undo
    # its links one by one first.
    own = str(bridge.NETNS_DIR / bridge.netns_name(sandbox_id)) if br else None
    for rec in record.get("links", []):
        if rec.get("netns") == own:
            continue
        try:
            plumb.unplumb(rec)
        except NetworkError as e:
            errors.append(str(e))
    if isinstance(br, dict):
        try:
            bridge.release(str(br["state_dir"]), str(br["subnet"]), str(br["name"]), sandbox_id)
        except (NetworkError, KeyError, ValueError) as e:
            errors.append(str(e))
    if errors:
        raise NetworkError(f"network clean-up of sandbox {sandbox_id}: {errors[0]}")


def hosts_file(hostname: str, addresses: list[str], add_hosts: list[str]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    mine = [a.split("/")[0] for a in addresses]
    lines.append(f"{mine[0] if mine else '127.0.1.1'}\t{hostname}")
    for h in add_hosts:
        name, _, addr = h.partition(":")
        lines.append(f"{addr}\t{name}")
    return "\n".join(lines) + "\n"


def resolv_file(dns: list[str], search: list[str], host_file: str = "/etc/resolv.conf") -> str:
    """The given servers, else the host's minus loopback ones (unreachable from a VM)."""
    lines: list[str] = []
    if dns:
        lines = [f"nameserver {d}" for d in dns]
    else:
        try:
            text = Path(host_file).read_text(errors="replace")
        except OSError:
            text = ""
        for ln in text.splitlines():
            parts = ln.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    if ipaddress.ip_address(parts[1]).is_loopback:
                        continue
                lines.append(f"nameserver {parts[1]}")
            elif parts and parts[0] in ("search", "options") and not search:
                lines.append(" ".join(parts))
    if search:
        lines.append("search " + " ".join(search))
    return "\n".join(lines) + ("\n" if lines else "")
