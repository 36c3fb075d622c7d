"""The guest's side of networking: NICs take the identity of the host's links.

The host gave each virtio-net NIC the MAC of the namespace link it is joined
to, so the agent finds NICs by MAC (probe order says nothing), names them as
the host's links are named, and copies addresses, routes and neighbours.
A handful of rtnetlink requests do it (agent.netlink): spawning busybox
``ip`` per step cost ~0.1 s each under TCG.

Containers share the VM's network namespace (the VM is the pod), so nothing
is moved into a container; its hosts/resolv.conf/hostname files are written
here and bind-mounted by the container's spec.
"""

from __future__ import annotations

import contextlib
import os

from cocoon.agent.netlink import Netlink
from cocoon.agent.session import RemoteError
from cocoon.protocol import messages

FILES_DIR = "/run/cocoon/net"


def links_by_mac() -> dict[str, tuple[str, int]]:
    """MAC -> (name, ifindex) of the guest's links."""
    out = {}
    for name in os.listdir("/sys/class/net"):
        with contextlib.suppress(OSError, ValueError):
            with open(f"/sys/class/net/{name}/address") as f:
                mac = f.read().strip().lower()
            with open(f"/sys/class/net/{name}/ifindex") as f:
                out[mac] = (name, int(f.read()))
    return out


def configure(msg: messages.ConfigureNetwork) -> messages.Ok:
    try:
        with Netlink() as nl:
            _configure(nl, msg)
    except OSError as e:
        raise RemoteError("network", f"network set-up: {e.strerror or e}") from None
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


def _configure(nl: Netlink, msg: messages.ConfigureNetwork) -> None:
    nl.set_link(1)  # lo is always ifindex 1
    links = links_by_mac()
    index: dict[str, int] = {}
    for nic in msg.interfaces:
        found = links.get(nic.mac)
        if found is None:
            raise RemoteError("network", f"no NIC with MAC {nic.mac}")
        cur, idx = found
        if cur != nic.name:
            taken = [i for n, i in links.values() if n == nic.name]
            for other in taken:  # a NIC probed under that name: move it aside
                nl.set_link(other, name=f"{nic.name[:10]}_old", up=False)
            nl.set_link(idx, name=nic.name, up=False)
            links = links_by_mac()
        index[nic.name] = idx
        nl.set_link(idx, mtu=nic.mtu)
        for a in nic.addresses:
            nl.add_address(idx, a)
    for r in msg.routes:
        nl.add_route(index[r.device], r.dest, r.gateway)
    for n in msg.neighbors:
        nl.set_neighbor(index[n.device], n.address, n.mac)
