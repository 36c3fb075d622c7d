"""The guest's side of networking: NICs take the identity of the host's links.

The host gave each virtio-net NIC the MAC of the namespace link it is joined
to, so the agent finds NICs by MAC (probe order says nothing), names them as
the host's links are named, and copies addresses, routes and neighbours.
Busybox's ``ip`` does the work: no netlink code of our own in PID 1.

Containers share the VM's network namespace (the VM is the pod), so nothing
is moved into a container; its hosts/resolv.conf/hostname files are written
here and bind-mounted by the container's spec.
"""

from __future__ import annotations

import contextlib
import os

from cocoon.agent import spawn
from cocoon.agent.reaper import Reaper
from cocoon.agent.session import RemoteError
from cocoon.protocol import messages

FILES_DIR = "/run/cocoon/net"
IP = "/usr/sbin/ip"


def _links_by_mac() -> dict[str, str]:
    out = {}
    for name in os.listdir("/sys/class/net"):
        with contextlib.suppress(OSError), open(f"/sys/class/net/{name}/address") as f:
            out[f.read().strip().lower()] = name
    return out


def _ip(reaper: Reaper, *args: str) -> None:
    code, out = spawn.run([IP, *args], reaper, timeout_s=10)
    if code != 0:
        raise RemoteError("network", f"ip {' '.join(args)[:200]}: {out.strip()[-200:]}")


def _family(addr: str) -> str:
    return "-6" if ":" in addr else "-4"


def configure(msg: messages.ConfigureNetwork, reaper: Reaper) -> messages.Ok:
    _ip(reaper, "link", "set", "dev", "lo", "up")
    by_mac = _links_by_mac()
    for nic in msg.interfaces:
        cur = by_mac.get(nic.mac)
        if cur is None:
            raise RemoteError("network", f"no NIC with MAC {nic.mac}")
        if cur != nic.name:
            if nic.name in by_mac.values():  # a NIC already has the name: swap it aside
                _ip(reaper, "link", "set", "dev", nic.name, "name", f"{nic.name[:10]}_old")
            _ip(reaper, "link", "set", "dev", cur, "name", nic.name)
            by_mac = _links_by_mac()
        # No duplicate address detection: the address is the host link's, already
        # checked by whoever gave it; DAD would hold IPv6 back for ~1 s.
        with (
            contextlib.suppress(OSError),
            open(f"/proc/sys/net/ipv6/conf/{nic.name}/accept_dad", "w") as f,
        ):
            f.write("0")
        _ip(reaper, "link", "set", "dev", nic.name, "mtu", str(nic.mtu), "up")
        for a in nic.addresses:
            _ip(reaper, _family(a), "addr", "add", a, "dev", nic.name)
    for r in msg.routes:
        fam = _family(r.gateway or r.dest)
        args = ["route", "add", r.dest]
        if r.gateway:
            args += ["via", r.gateway]
        _ip(reaper, fam, *args, "dev", r.device)
    for n in msg.neighbors:
        _ip(reaper, _family(n.address), "neigh", "replace", n.address, "lladdr", n.mac,
            "dev", n.device, "nud", "permanent")  # fmt: skip
    for kv in msg.sysctls:
        key, _, value = kv.partition("=")
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
        except OSError as e:
            raise RemoteError("network", f"sysctl {key}: {e.strerror}") from None
    os.makedirs(FILES_DIR, exist_ok=True)
    for name, text in (("hosts", msg.hosts), ("resolv.conf", msg.resolv),
                       ("hostname", msg.hostname)):  # fmt: skip
        path = f"{FILES_DIR}/{name}"
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return messages.Ok()
