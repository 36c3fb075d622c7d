"""Network namespace pairs for tests: a container side and a peer, joined by a veth.

The container side is what CNI would leave (``eth0`` with IPv4 + IPv6
addresses and a default route); the peer holds the other end. Tests reach the
peer only by entering its namespace, so no traffic leaves them.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cocoon.network.netns import in_netns


@dataclass
class Pair:
    """A container-side namespace and its peer, joined by a veth."""

    ctr: str  # netns path for --network ns:
    peer: str
    ctr_mac: str
    ctr_ip: str
    peer_ip: str
    peer_ip6: str
    ctr_ip6: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def make_pair() -> Iterator:  # type: ignore[type-arg]
    made: list[str] = []

    def make(subnet: int) -> Pair:
        tag = secrets.token_hex(3)
        c, p = f"tc-{tag}", f"tp-{tag}"
        _ip("netns", "add", c)
        made.append(c)
        _ip("netns", "add", p)
        made.append(p)
        _ip("link", "add", "eth0", "netns", c, "type", "veth", "peer", "name", "peer0", "netns", p)
        for ns, dev, last in ((c, "eth0", 2), (p, "peer0", 1)):
            _ip("-n", ns, "addr", "add", f"10.{subnet}.0.{last}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"fd00:{subnet}::{last}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", c, "route", "add", "default", "via", f"10.{subnet}.0.1")
        mac = json.loads(subprocess.check_output(["ip", "-n", c, "-j", "link", "show", "eth0"]))[0][
            "address"
        ]
        return Pair(
            f"/run/netns/{c}",
            f"/run/netns/{p}",
            mac,
            f"10.{subnet}.0.2",
            f"10.{subnet}.0.1",
            f"fd00:{subnet}::1",
            f"fd00:{subnet}::2",
        )

    yield make
    for ns in made:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def listen_in(ns: str, addr: str, port: int, family: int = socket.AF_INET) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(4)
        return s

    return in_netns(ns, make)
