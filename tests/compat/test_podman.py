"""podman --runtime cocoon-runtime: the runc contract as conmon expects it."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compat.conftest import DEFAULT_ROOT, IMAGE, Podman, assert_clean
from tests.netpair import listen_in

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

NET = "--network=none"


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    yield
    assert_clean(DEFAULT_ROOT)


def test_run_echo_exit_codes_env_workdir_user(podman: Podman) -> None:
    r = podman("run", "--rm", NET, IMAGE, "echo", "hi")
    assert (r.returncode, r.stdout) == (0, b"hi\n"), r.stderr
    assert podman("run", "--rm", NET, IMAGE, "sh", "-c", "exit 3").returncode == 3
    r = podman("run", "--rm", NET, "-e", "FOO=bar", "-w", "/tmp", "-u", "65534:65534", IMAGE,
               "sh", "-c", "echo $FOO $(pwd) $(id -u):$(id -g)")  # fmt: skip
    assert r.stdout == b"bar /tmp 65534:65534\n", r.stderr
    r = podman("run", "--rm", NET, "-i", IMAGE, "sh", "-c", "tr a-z A-Z", input=b"stdin\n")
    assert r.stdout == b"STDIN\n", r.stderr


def test_read_only_rootfs_and_a_volume(podman: Podman, tmp_path: Path) -> None:
    r = podman("run", "--rm", NET, "--read-only", IMAGE, "touch", "/x")
    assert r.returncode == 1 and b"Read-only file system" in r.stderr
    (tmp_path / "in").write_text("from host\n")
    r = podman("run", "--rm", NET, "-v", f"{tmp_path}:/data", IMAGE,
               "sh", "-c", "cat /data/in; echo from container > /data/out")  # fmt: skip
    assert r.stdout == b"from host\n", r.stderr
    assert (tmp_path / "out").read_text() == "from container\n"
    r = podman("run", "--rm", NET, "-v", f"{tmp_path}:/data:ro", IMAGE, "touch", "/data/x")
    assert r.returncode == 1 and not (tmp_path / "x").exists()


def test_detached_logs_exec_pause_stop_rm(podman: Podman) -> None:
    script = "trap 'echo bye; exit 0' TERM; while true; do echo tick; sleep 0.3; done"
    r = podman("run", "-d", "--name", "web", NET, IMAGE, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    try:
        r = podman("exec", "web", "sh", "-c", "echo exec $((2+3)); exit 4")
        assert (r.returncode, r.stdout) == (4, b"exec 5\n"), r.stderr
        assert podman("pause", "web").returncode == 0
        st = podman("inspect", "--format", "{{.State.Status}}", "web").stdout.strip()
        assert st == b"paused"
        assert podman("unpause", "web").returncode == 0
        r = podman("stop", "-t", "5", "web")
        assert r.returncode == 0, r.stderr
        logs = podman("logs", "web").stdout
        assert b"tick\n" in logs and logs.endswith(b"bye\n")
        code = podman("inspect", "--format", "{{.State.ExitCode}}", "web").stdout.strip()
        assert code == b"0"
    finally:
        assert podman("rm", "-f", "web").returncode == 0


def test_interactive_tty(podman: Podman) -> None:
    """podman run -it from a terminal: conmon gets our pty master over
    --console-socket; size, input and output pass through the stand-in."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    p = subprocess.Popen(
        [*podman.argv, "run", "--rm", "-it", NET, IMAGE, "sh", "-c",
         "tty; stty size; read x; echo got $x; exit 3"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    buf = b""
    sent = False
    deadline = time.monotonic() + 60
    try:
        while b"got hello" not in buf and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    buf += os.read(master, 4096)
                except OSError:
                    break
            if b"101" in buf and not sent:
                os.write(master, b"hello\r")
                sent = True
        assert p.wait(timeout=60) == 3
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert b"/dev/pts/0\r\n33 101\r\n" in buf and b"got hello\r\n" in buf, buf


def test_the_given_network_namespace_reaches_the_vm(podman: Podman, make_pair) -> None:  # type: ignore[no-untyped-def]
    """podman --network ns:PATH puts the path in the spec: the VM's NIC is
    plumbed to the veth there (tcfilter), with its MAC and address."""
    pair = make_pair(236)
    srv = listen_in(pair.peer, pair.peer_ip, 5000)
    srv.settimeout(120)
    got: list[bytes] = []

    def accept() -> None:
        conn, _ = srv.accept()
        with conn:
            got.append(conn.recv(100))

    t = threading.Thread(target=accept)
    t.start()
    script = (
        f"ip -o link show eth0; ip -o -4 addr show eth0; echo via-podman | nc {pair.peer_ip} 5000"
    )
    r = podman("run", "--rm", "--network", f"ns:{pair.ctr}", IMAGE, "sh", "-c", script)
    t.join(120)
    srv.close()
    assert r.returncode == 0, r.stderr
    assert pair.ctr_mac.encode() in r.stdout and f"{pair.ctr_ip}/24".encode() in r.stdout
    assert got == [b"via-podman\n"]
    ns = pair.ctr.rsplit("/", 1)[1]
    left = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout
    assert "cctap" not in left


def test_podman_bridge_network_and_published_port(podman: Podman) -> None:
    """podman's own networking, unchanged: CNI's bridge plugin makes the netns
    and veth, the portmap plugin publishes the port; the VM's NIC takes the
    veth's place and the host's loopback reaches httpd in the guest."""
    script = "mkdir /w && echo via-cni > /w/index.html && httpd -f -p 80 -h /w"
    r = podman("run", "-d", "--name", "cni", "-p", "127.0.0.1:18089:80", IMAGE, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                body = urllib.request.urlopen("http://127.0.0.1:18089/", timeout=10).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the published port never answered"
                time.sleep(0.5)
        assert body == b"via-cni\n"
        r = podman("exec", "cni", "ip", "-o", "-4", "addr", "show", "eth0")
        assert b"10.88." in r.stdout, r.stdout + r.stderr  # podman's CNI subnet
    finally:
        assert podman("rm", "-f", "-t", "0", "cni").returncode == 0
