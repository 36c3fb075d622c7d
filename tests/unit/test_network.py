"""Network parsing and the guest's orders: what the host accepts and sends."""

from __future__ import annotations

import pytest

from cocoon.errors import NetworkError
from cocoon.network import NetworkPlan, hosts_file, resolv_file
from cocoon.network.plumb import parse_rate, tbf
from cocoon.network.ports import PortSpec, parse
from cocoon.protocol import messages


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("80", PortSpec("0.0.0.0", 0, 80)),
        ("8080:80", PortSpec("0.0.0.0", 8080, 80)),
        ("127.0.0.1:8080:80/udp", PortSpec("127.0.0.1", 8080, 80, "udp")),
        ("127.0.0.1::80", PortSpec("127.0.0.1", 0, 80)),
        ("[::1]:8080:80", PortSpec("::1", 8080, 80)),
    ],
)
def test_publish_forms(text: str, want: PortSpec) -> None:
    assert parse(text) == want


@pytest.mark.parametrize("text", ["", "x:80", "1.2.3.4:80000:80", "80/sctp", "0", "999.1.1.1:1:1"])
def test_publish_refused(text: str) -> None:
    with pytest.raises(NetworkError):
        parse(text)


def test_rates() -> None:
    assert parse_rate("10mbit") == 10_000_000
    assert parse_rate("1.5gbit") == 1_500_000_000
    for bad in ("10", "fast", "0mbit", "-1mbit", "10mb/s"):
        with pytest.raises(NetworkError):
            parse_rate(bad)
    # burst: at least 32 KiB, 10 ms of traffic at high rates
    assert "burst 32768 " in tbf("x", 1_000_000)
    assert "burst 1250000 " in tbf("x", 1_000_000_000)


def test_plan_checks() -> None:
    NetworkPlan(networks=["bridge", "ns:/run/netns/x"], dns=["10.0.0.53"]).check()
    for bad in (
        NetworkPlan(networks=["none", "bridge"]),
        NetworkPlan(networks=["bridge", "bridge"]),
        NetworkPlan(networks=["host"]),
        NetworkPlan(networks=["ns:relative"]),
        NetworkPlan(dns=["resolver"]),
        NetworkPlan(add_hosts=["nohost"]),
        NetworkPlan(model="vhost-user"),
        NetworkPlan(rate="lots"),
    ):
        with pytest.raises(NetworkError):
            bad.check()


def test_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hosts = hosts_file("web", ["10.213.0.5/16"], ["db:10.1.2.3", "v6:fd00::1"])
    assert "10.213.0.5\tweb\n" in hosts and "10.1.2.3\tdb\n" in hosts and "fd00::1\tv6\n" in hosts
    host_resolv = tmp_path / "resolv.conf"
    host_resolv.write_text("nameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch corp\n")
    # a loopback resolver cannot be reached from the VM: dropped
    assert resolv_file([], [], str(host_resolv)) == "nameserver 192.0.2.1\nsearch corp\n"
    assert resolv_file(["10.0.0.53"], ["a.b"], str(host_resolv)) == (
        "nameserver 10.0.0.53\nsearch a.b\n"
    )


def _conf(**kw: object) -> messages.ConfigureNetwork:
    iface = messages.NetInterface("eth0", "0a:00:00:00:00:01", 1500, ["10.0.0.2/24", "fd00::2/64"])
    base = dict(
        interfaces=[iface],
        routes=[messages.NetRoute("default", "10.0.0.1", "eth0")],
        neighbors=[],
        hosts="",
        resolv="",
        hostname="",
        sysctls=["net.ipv4.ping_group_range=0 2147483647"],
    )
    base.update(kw)
    return messages.ConfigureNetwork(**base)


def test_configure_network_round_trip() -> None:
    msg = _conf()
    assert messages.decode(messages.encode(msg)) == msg


@pytest.mark.parametrize(
    "bad",
    [
        {"interfaces": [messages.NetInterface("eth0; rm", "0a:00:00:00:00:01", 1500, [])]},
        {"interfaces": [messages.NetInterface("eth0", "zz:00:00:00:00:01", 1500, [])]},
        {"interfaces": [messages.NetInterface("eth0", "0a:00:00:00:00:01", 10, [])]},
        {"interfaces": [messages.NetInterface("eth0", "0a:00:00:00:00:01", 1500, ["1.2.3.4/33"])]},
        {"routes": [messages.NetRoute("default", "10.0.0.1", "eth9")]},
        {"routes": [messages.NetRoute("default", "-rf", "eth0")]},
        {"hosts": "x" * (65 << 10)},
        {"sysctls": ["kernel.panic=0"]},  # only the network's own
        {"sysctls": ["net.ipv4/../../kernel/panic=0"]},
        {"sysctls": ["net.ipv4.ip_forward"]},
    ],
)
def test_configure_network_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        messages.decode(messages.encode(_conf(**bad)))
