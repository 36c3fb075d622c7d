"""The default network: a namespace per sandbox on the ``cocoon0`` bridge, with NAT.

Each bridged sandbox gets a namespace of its own (``/run/netns/cocoon-<id>``)
holding one end of a veth whose other end is a port of ``cocoon0``; the VM is
then connected to that veth like to any CNI-made one (network.plumb). So the
bridge model is our own tiny CNI plugin, and everything downstream of it is
the one code path podman and containerd also use.

Shared state (the bridge, the NAT rules, the address table) is changed only
under one file lock. The bridge and its rules exist while at least one address
is handed out: the last sandbox to leave takes them down, so a host that stops
using cocoon keeps nothing of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import NetworkError
from cocoon.network.netns import NetNs
from cocoon.util.proc import run

NETNS_DIR = Path("/run/netns")
COMMENT = "cocoon"


def netns_name(sandbox_id: str) -> str:
    return f"cocoon-{sandbox_id}"


def host_veth(sandbox_id: str) -> str:
    return f"cc{sandbox_id[:12]}"  # <= 15 bytes, the kernel's IFNAMSIZ - 1


class Ipam:
    """Addresses of the bridge subnet, one per sandbox, in a JSON table in a
    host-global dir on a tmpfs (a reboot forgets it together with the namespaces)."""

    def __init__(self, cfg: Config) -> None:
        self.dir = Path(cfg.network.state_dir)
        self.subnet = ipaddress.ip_network(cfg.network.bridge_subnet, strict=True)
        if not isinstance(self.subnet, ipaddress.IPv4Network) or self.subnet.prefixlen > 30:
            raise NetworkError(
                f"network.bridge_subnet {cfg.network.bridge_subnet} must be IPv4, /30 or larger"
            )
        self.gateway = next(self.subnet.hosts())
        self.bridge = cfg.network.bridge

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, str]]:
        """The table (address -> sandbox id), written back on a clean exit."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / f"{self.bridge}.lock", "a+") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            path = self.dir / f"{self.bridge}.json"
            try:
                table = json.loads(path.read_text())
                if not isinstance(table, dict):
                    table = {}
            except (OSError, ValueError):
                table = {}
            yield table
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, sort_keys=True))
            os.replace(tmp, path)

    def allocate(self, table: dict[str, str], sandbox_id: str) -> str:
        for addr in self.subnet.hosts():
            if addr != self.gateway and str(addr) not in table:
                table[str(addr)] = sandbox_id
                return f"{addr}/{self.subnet.prefixlen}"
        raise NetworkError(f"bridge subnet {self.subnet} is full: remove containers or widen it")


def _rules(subnet: str, bridge: str) -> list[tuple[str, str, str]]:
    """(table, chain, rule) spelled the way iptables-save prints them."""
    tag = f"-m comment --comment {COMMENT}"
    return [
        ("nat", "POSTROUTING", f"-s {subnet} ! -o {bridge} {tag} -j MASQUERADE"),
        ("filter", "FORWARD", f"-i {bridge} {tag} -j ACCEPT"),
        ("filter", "FORWARD", f"-o {bridge} {tag} -j ACCEPT"),
    ]


def _present(rules: list[tuple[str, str, str]]) -> list[bool]:
    saved = run(["iptables-save"], timeout_s=15, error=NetworkError).stdout.decode()
    tables: dict[str, set[str]] = {}
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            tables.setdefault(table, set()).add(line[3:].strip())
    return [f"{chain} {rule}" in tables.get(t, set()) for t, chain, rule in rules]


def _apply(op: str, rules: list[tuple[str, str, str]]) -> None:
    """One iptables-restore for all of them (atomic per table, no flush)."""
    if not rules:
        return
    lines: list[str] = []
    for table in sorted({t for t, _, _ in rules}):
        lines.append(f"*{table}")
        lines += [f"{op} {chain} {rule}" for t, chain, rule in rules if t == table]
        lines.append("COMMIT")
    run(["iptables-restore", "-n", "-w", "5"], timeout_s=15, error=NetworkError,
        input=("\n".join(lines) + "\n").encode())  # fmt: skip


def ensure_bridge(ipam: Ipam) -> None:
    """The bridge with the gateway address, forwarding on, the NAT rules (idempotent)."""
    host = NetNs()
    if host.ip("link", "show", "dev", ipam.bridge, check=False).strip() == "":
        host.batch(
            "ip",
            [
                f"link add {ipam.bridge} type bridge",
                f"addr add {ipam.gateway}/{ipam.subnet.prefixlen} dev {ipam.bridge}",
                f"link set dev {ipam.bridge} up",
            ],
        )
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    rules = _rules(str(ipam.subnet), ipam.bridge)
    _apply("-I", [r for r, here in zip(rules, _present(rules), strict=True) if not here])


def remove_bridge(ipam: Ipam) -> None:
    rules = _rules(str(ipam.subnet), ipam.bridge)
    _apply("-D", [r for r, here in zip(rules, _present(rules), strict=True) if here])
    NetNs().ip("link", "del", "dev", ipam.bridge, check=False)


def create(cfg: Config, sandbox_id: str) -> tuple[str, str]:
    """A namespace for the sandbox with ``eth0`` on the bridge: (netns path, address).

    The caller has recorded ``sandbox_id`` as bridged first: ``release`` undoes
    any part of this after a crash.
    """
    ipam = Ipam(cfg)
    name, veth = netns_name(sandbox_id), host_veth(sandbox_id)
    path = str(NETNS_DIR / name)
    with ipam.locked() as table:
        addr = ipam.allocate(table, sandbox_id)
        ensure_bridge(ipam)
        host = NetNs()
        host.ip("netns", "add", name)
        host.batch(
            "ip",
            [
                f"link add {veth} type veth peer name eth0 netns {name}",
                f"link set dev {veth} master {ipam.bridge} up",
            ],
        )
    NetNs(path).batch(
        "ip",
        [
            "link set dev lo up",
            f"addr add {addr} dev eth0",
            "link set dev eth0 up",
            f"route add default via {ipam.gateway} dev eth0",
        ],
    )
    return path, addr


def release(state_dir: str, subnet: str, bridge: str, sandbox_id: str) -> None:
    """Give back the address, delete the namespace and veth; the last one out
    takes the bridge and NAT rules down. Quiet about what is already gone."""
    host = NetNs()
    name = netns_name(sandbox_id)
    host.ip("link", "del", "dev", host_veth(sandbox_id), check=False)
    if (NETNS_DIR / name).exists():
        host.ip("netns", "del", name, check=False)
    cfg = Config()
    cfg.network.state_dir, cfg.network.bridge_subnet, cfg.network.bridge = state_dir, subnet, bridge
    ipam = Ipam(cfg)
    with ipam.locked() as table:
        for addr in [a for a, sid in table.items() if sid == sandbox_id]:
            del table[addr]
        if not table:
            remove_bridge(ipam)
