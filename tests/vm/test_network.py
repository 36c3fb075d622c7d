"""Networking of real VMs, only inside network namespaces these tests create.

Each "peer" is a namespace holding one end of a veth; the other end sits in a
namespace the container is given (``--network ns:PATH``), as CNI would leave
it. The test process reaches the peer by opening its sockets inside the peer
namespace (network.netns.in_netns), so no traffic ever leaves this host's
test namespaces, the cocoon0 bridge and loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from cocoon.config import Config
from cocoon.network.netns import NetNs, in_netns
from cocoon.state import gc
from tests.netpair import listen_in
from tests.vm.conftest import cocoon, ok

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def host_state() -> tuple[set[str], set[str], int]:
    """Our namespaces, host links named cc*, iptables rules tagged cocoon."""
    netns = {n for n in os.listdir("/run/netns")} if os.path.isdir("/run/netns") else set()
    links = {ln.name for ln in NetNs().links() if ln.name.startswith("cc")}
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    return {n for n in netns if n.startswith("cocoon-")}, links, rules.count("cocoon")


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    before = host_state()
    yield
    after = host_state()
    assert after[0] <= before[0], f"namespaces left: {after[0] - before[0]}"
    assert after[1] <= before[1], f"host links left: {after[1] - before[1]}"
    assert after[2] <= before[2], "iptables rules left"


def test_ns_network_ping_tcp_ipv6_identity(cfg: Config, busybox: None, make_pair) -> None:  # type: ignore[no-untyped-def]
    pair = make_pair(231)
    srv = listen_in(pair.peer, pair.peer_ip, 5000)
    srv6 = listen_in(pair.peer, pair.peer_ip6, 5001, socket.AF_INET6)
    got: dict[str, bytes] = {}

    def accept(s: socket.socket, key: str) -> None:
        s.settimeout(60)
        conn, _ = s.accept()
        with conn:
            got[key] = conn.recv(100)

    threads = [
        threading.Thread(target=accept, args=(srv, "v4")),
        threading.Thread(target=accept, args=(srv6, "v6")),
    ]
    for t in threads:
        t.start()
    script = (
        f"ip -o link show eth0; ip -o addr show dev eth0; ip route; "
        f"ping -c1 -W10 {pair.peer_ip} >/dev/null && echo PING4; "
        f"ping6 -c1 -W10 {pair.peer_ip6} >/dev/null && echo PING6; "
        f"echo hello4 | nc {pair.peer_ip} 5000; echo hello6 | nc {pair.peer_ip6} 5001"
    )
    r = cocoon(cfg, "run", "--rm", "--network", f"ns:{pair.ctr}", "busybox", "sh", "-c", script)
    for t in threads:
        t.join(60)
    srv.close()
    srv6.close()
    out = ok(r)
    assert pair.ctr_mac in out  # the guest NIC took the veth's MAC
    assert f"{pair.ctr_ip}/24" in out and f"{pair.ctr_ip6}/64" in out
    assert f"default via {pair.peer_ip}" in out
    assert "PING4" in out and "PING6" in out
    assert got == {"v4": b"hello4\n", "v6": b"hello6\n"}
    # the namespace is as CNI left it: no ingress filter, no tap of ours
    left = subprocess.run(
        ["ip", "netns", "exec", os.path.basename(pair.ctr), "tc", "qdisc", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
    ).stdout
    assert "ingress" not in left
    assert [ln.name for ln in NetNs(pair.ctr).links()] == ["lo", "eth0"]


UDP_ECHO = r"""
#include <arpa/inet.h>
#include <stdlib.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    if (argc < 2 || bind(s, (struct sockaddr *)&a, sizeof a) != 0) return 1;
    char buf[2048];
    for (;;) {
        struct sockaddr_in p;
        socklen_t pl = sizeof p;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&p, &pl);
        if (n >= 0) sendto(s, buf, n, 0, (struct sockaddr *)&p, pl);
    }
}
"""


@pytest.fixture(scope="module")
def udp_echo(tmp_path_factory: pytest.TempPathFactory) -> str:
    """busybox has no UDP server: a static echo server, built here with the
    set-up's gcc, shared into the container."""
    d = tmp_path_factory.mktemp("udpecho")
    (d / "udpecho.c").write_text(UDP_ECHO)
    gcc = ["gcc", "-static", "-O2", "-o", str(d / "udpecho"), str(d / "udpecho.c")]
    subprocess.run(gcc, check=True)
    return str(d)


def published(ports: list[str], suffix: str) -> int:
    spec = next(p for p in ports if p.endswith(suffix))
    return int(spec.split("->")[0].rsplit(":", 1)[1])


def test_bridge_two_containers_publish_and_files(cfg: Config, busybox: None, udp_echo: str) -> None:
    flags = ["-d", "--name", "web", "-p", "127.0.0.1:0:80", "-p", "127.0.0.1::81/udp"]
    script = (
        "mkdir /w && echo served-by-web > /w/index.html && "
        "(/opt/udp/udpecho 81 &) ; httpd -f -p 80 -h /w"
    )
    run_web = ["run", *flags, "-v", f"{udp_echo}:/opt/udp:ro", "busybox", "sh", "-c", script]
    web = ok(cocoon(cfg, *run_web)).strip()
    try:
        info = json.loads(ok(cocoon(cfg, "inspect", web)))[0]
        ip = info["NetworkSettings"]["IPAddress"]
        assert ip.startswith("10.213.")
        ports = info["NetworkSettings"]["Ports"]
        # the host's loopback reaches the container through the published port
        url = f"http://127.0.0.1:{published(ports, '->80/tcp')}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                body = urllib.request.urlopen(url, timeout=10).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "published port never answered"
                time.sleep(0.5)
        assert body == b"served-by-web\n"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(3)
            for _ in range(10):
                u.sendto(b"ping-udp\n", ("127.0.0.1", published(ports, "->81/udp")))
                try:
                    assert u.recvfrom(100)[0] == b"ping-udp\n"
                    break
                except TimeoutError:
                    continue
            else:
                pytest.fail("no UDP echo through the published port")
        # a second container reaches the first over the bridge, and sees its files
        flags = ["--rm", "--hostname", "client", "--add-host", "db:10.1.2.3", "--dns", "10.0.0.53"]
        flags += ["--dns-search", "corp.test"]
        script = f"wget -qO- http://{ip}/ && cat /etc/hosts /etc/resolv.conf /etc/hostname"
        out = ok(cocoon(cfg, "run", *flags, "busybox", "sh", "-c", script))
        assert "served-by-web" in out
        assert "10.1.2.3\tdb" in out and "\tclient" in out
        assert "nameserver 10.0.0.53" in out and "search corp.test" in out
        assert out.rstrip().endswith("client")
    finally:
        ok(cocoon(cfg, "rm", "-f", web))
    # the last bridged container gone: the bridge and its rules are too
    assert "cocoon0" not in {ln.name for ln in NetNs().links()}


def test_rate_limit_both_ways(cfg: Config, busybox: None, make_pair) -> None:  # type: ignore[no-untyped-def]
    pair = make_pair(232)
    rate_bits = 8_000_000
    size = 3_000_000  # 3 s at 8 mbit/s
    srv = listen_in(pair.peer, pair.peer_ip, 5000)
    srv.settimeout(120)
    script = f"head -c {size} /dev/zero | nc {pair.peer_ip} 5000; nc -l -p 5001 >/dev/null; "
    net = ["--network", f"ns:{pair.ctr}", "--net-rate", "8mbit"]
    cid = ok(cocoon(cfg, "run", "-d", *net, "busybox", "sh", "-c", script + "sleep 600")).strip()
    try:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(60)
            first = conn.recv(65536)
            t0, n = time.monotonic(), len(first)
            while chunk := conn.recv(65536):
                n += len(chunk)
            egress = (n - len(first)) * 8 / (time.monotonic() - t0)
        srv.close()
        assert n == size

        # toward the container: send from the peer into the container's listener
        def connect() -> socket.socket:
            return socket.create_connection((pair.ctr_ip, 5001), timeout=10)

        deadline = time.monotonic() + 30
        while True:
            try:
                c = in_netns(pair.peer, connect)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        with c:
            c.settimeout(60)
            # Twice the bytes of the other direction: the same few hundred KB
            # reach the guest ahead of the shaper whatever the size (measured:
            # 8.5-9.7 Mbit/s over 3 MB, 8.1-8.4 over 6 MB, before templates too),
            # and over 3 MB that alone came near the +20 % bound.
            t0 = time.monotonic()
            c.sendall(b"\0" * (2 * size))
            c.shutdown(socket.SHUT_WR)
            c.recv(1)  # EOF once the container has read everything
            ingress = 2 * size * 8 / (time.monotonic() - t0)
    finally:
        ok(cocoon(cfg, "rm", "-f", cid))
    for what, measured in (("egress", egress), ("ingress", ingress)):
        assert 0.8 * rate_bits <= measured <= 1.2 * rate_bits, (what, measured)


def test_macvtap_model_and_two_nics(cfg: Config, busybox: None, make_pair) -> None:  # type: ignore[no-untyped-def]
    a, b = make_pair(233), make_pair(234)
    r = cocoon(
        cfg, "run", "--rm", "--network", f"ns:{a.ctr}", "--network", f"ns:{b.ctr}",
        "busybox", "sh", "-c",
        f"ip -o addr; ping -c1 -W10 {a.peer_ip} >/dev/null && echo PING-A; "
        f"ping -c1 -W10 {b.peer_ip} >/dev/null && echo PING-B",
        env={"COCOON_NETWORK_MODEL": "macvtap"},
    )  # fmt: skip
    out = ok(r)
    assert "PING-A" in out and "PING-B" in out
    assert f"{a.ctr_ip}/24" in out and f"{b.ctr_ip}/24" in out
    for p in (a, b):  # the macvtaps went with the container
        assert [ln.name for ln in NetNs(p.ctr).links()] == ["lo", "eth0"]


def test_kill_qemu_leaves_nothing(cfg: Config, busybox: None, make_pair) -> None:  # type: ignore[no-untyped-def]
    pair = make_pair(235)
    net = ["--network", "bridge", "--network", f"ns:{pair.ctr}", "--net-rate", "100mbit"]
    cid = ok(cocoon(cfg, "run", "-d", *net, "busybox", "sleep", "600")).strip()
    sid = cid[:12]
    assert os.path.exists(f"/run/netns/cocoon-{sid}")
    qemu = [pid for pid, s in gc.processes_naming(cfg.root).items() if s == sid]
    assert qemu
    for pid in qemu:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/run/netns/cocoon-{sid}"):
        assert time.monotonic() < deadline, "the bridge namespace outlived the VM"
        time.sleep(0.2)
    ok(cocoon(cfg, "rm", "-f", cid))
    qdiscs = subprocess.run(
        ["ip", "netns", "exec", os.path.basename(pair.ctr), "tc", "qdisc", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
    ).stdout
    assert "ingress" not in qdiscs and "tbf" not in qdiscs
    assert [ln.name for ln in NetNs(pair.ctr).links()] == ["lo", "eth0"]


def test_network_errors(cfg: Config, busybox: None) -> None:
    for args, word in (
        (["--network", "ns:/run/netns/does-not-exist"], "does-not-exist"),
        (["--network", "none", "-p", "80"], "-p needs"),
        (["--network", "wifi"], "unknown network"),
        (["--net-rate", "fast"], "bad rate"),
    ):
        r = cocoon(cfg, "run", "--rm", *args, "busybox", "true")
        err = r.stderr.decode()
        assert r.returncode == 125, err
        assert word in err and len(err.strip().splitlines()) == 1, err
    out = ok(cocoon(cfg, "run", "--rm", "--network", "none", "busybox", "ip", "-o", "link"))
    assert "lo:" in out and "eth0" not in out


def test_agent_netlink_in_a_test_namespace(make_pair) -> None:  # type: ignore[no-untyped-def]
    """The agent's rtnetlink requests, run on the host inside a namespace of
    the test's (the guest kernel speaks the same netlink): rename, MTU, v4/v6
    addresses, routes, a permanent neighbour, and the kernel's errno on refusal."""
    from cocoon.agent.netlink import Netlink

    pair = make_pair(238)

    def configure() -> None:
        idx = socket.if_nametoindex("eth0")
        with Netlink() as nl:
            nl.set_link(idx, name="cc-renamed", up=False)
            assert socket.if_indextoname(idx) == "cc-renamed"
            nl.set_link(idx, name="eth0", up=False)
            nl.set_link(idx, mtu=1400)
            nl.add_address(idx, "10.238.1.2/24")
            nl.add_address(idx, "fd00:238:1::2/64")
            nl.add_route(idx, "10.99.0.0/16", "10.238.1.1")
            nl.add_route(idx, "10.98.0.0/16", "")
            nl.set_neighbor(idx, "10.238.1.1", "02:00:00:00:00:01")
            with pytest.raises(OSError) as e:
                nl.add_address(idx, "10.238.1.2/24")
            assert e.value.errno == 17  # EEXIST

    in_netns(pair.ctr, configure)
    ns = os.path.basename(pair.ctr)

    def ip(*args: str) -> str:
        return subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True).stdout

    assert "10.238.1.2/24" in ip("-o", "addr") and "fd00:238:1::2/64" in ip("-o", "addr")
    assert "mtu 1400" in ip("-o", "link", "show", "eth0")
    routes = ip("route")
    assert "10.99.0.0/16 via 10.238.1.1 dev eth0" in routes
    assert "10.98.0.0/16 dev eth0 scope link" in routes
    assert "10.238.1.1 dev eth0 lladdr 02:00:00:00:00:01 PERMANENT" in ip("neigh")


def test_one_vm_per_namespace(cfg: Config, busybox: None, make_pair) -> None:  # type: ignore[no-untyped-def]
    pair = make_pair(239)
    first = ok(cocoon(cfg, "run", "-d", "--network", f"ns:{pair.ctr}", "busybox", "sleep", "600"))
    try:
        r = cocoon(cfg, "run", "--rm", "--network", f"ns:{pair.ctr}", "busybox", "true")
        err = r.stderr.decode()
        assert r.returncode == 125 and "already connected to a VM" in err, err
    finally:
        ok(cocoon(cfg, "rm", "-f", first.strip()))


def test_gc_after_the_monitor_is_killed(cfg: Config, busybox: None, make_pair) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the VM's owner (the monitor): its network outlives it until
    `cocoon gc`, which undoes it from the sandbox's state."""
    from cocoon.runtime.records import ContainerStore
    from cocoon.state.store import SandboxDir

    pair = make_pair(240)
    net = ["--network", "bridge", "--network", f"ns:{pair.ctr}", "--net-rate", "50mbit"]
    cid = ok(cocoon(cfg, "run", "-d", *net, "busybox", "sleep", "600")).strip()
    sid = cid[:12]
    monitor = ContainerStore(cfg).resolve(cid).state().monitor_pid
    assert SandboxDir(cfg.root, sid).read().owner_pid == monitor  # the VM's owner
    os.kill(monitor, signal.SIGKILL)
    time.sleep(0.5)
    r = cocoon(cfg, "gc")
    assert r.returncode == 0 and sid in r.stdout.decode().split(), r.stderr
    assert not os.path.exists(f"/run/netns/cocoon-{sid}")
    ns = os.path.basename(pair.ctr)
    qdiscs = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", "eth0"],
                            capture_output=True, text=True).stdout  # fmt: skip
    assert "ingress" not in qdiscs and "tbf" not in qdiscs
    assert [ln.name for ln in NetNs(pair.ctr).links()] == ["lo", "eth0"]
    ok(cocoon(cfg, "rm", cid))
