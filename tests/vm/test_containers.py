"""Containers with a life of their own: -d, ps, logs, exec, stop, kill, rm,
inspect, wait, top, stats, and what survives a crash. Real VMs, real monitors."""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.runtime.records import ContainerStore
from cocoon.state import gc
from tests.vm.conftest import cocoon, ok

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

CRI_LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) [FP] ")


def inspect(cfg: Config, name: str) -> dict:  # type: ignore[type-arg]
    return json.loads(ok(cocoon(cfg, "inspect", name)))[0]  # type: ignore[no-any-return]


def wait_for(pred, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.1)


def qemu_of(cfg: Config) -> dict[int, str]:
    return gc.processes_naming(cfg.root)


def test_detached_lifecycle(cfg: Config, busybox: None) -> None:
    """One detached container through every verb, ending with nothing left."""
    script = (
        "trap 'echo got TERM; exit 7' TERM; i=0; "
        "while true; do echo out $i; echo err $i >&2; i=$((i+1)); sleep 0.2; done"
    )
    cid = ok(cocoon(cfg, "run", "-d", "--name", "life", "--label", "team=a", "-e", "X=1",
                    "busybox", "sh", "-c", script)).strip()  # fmt: skip
    assert re.fullmatch(r"[0-9a-f]{64}", cid)
    ps = ok(cocoon(cfg, "ps"))
    assert cid[:12] in ps and "life" in ps and "Up " in ps
    assert ok(cocoon(cfg, "ps", "-q")).split() == [cid[:12]]
    wait_for(lambda: b"out 2" in cocoon(cfg, "logs", "life").stdout)

    # stdout and stderr kept apart, --tail and --timestamps
    r = cocoon(cfg, "logs", "life")
    assert b"out 0\nout 1\n" in r.stdout and b"err" not in r.stdout
    assert b"err 0\nerr 1\n" in r.stderr and b"out" not in r.stderr
    r = cocoon(cfg, "logs", "--tail", "1", "-t", cid[:5])
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) == 1 and re.match(rb"^\d{4}-\d\d-\d\dT[\d:.]+Z (out|err) \d+$", lines[0])

    # exec: env of the container plus -e, workdir, user, exit code, stdin
    r = cocoon(cfg, "exec", "-e", "Y=2", "-w", "/tmp", "-u", "nobody", "life",
               "sh", "-c", "echo $X$Y $(pwd) $(id -un); exit 4")  # fmt: skip
    assert (r.returncode, r.stdout) == (4, b"12 /tmp nobody\n"), r.stderr
    r = cocoon(cfg, "exec", "-i", "life", "sh", "-c", "tr a-z A-Z", input=b"piped\n")
    assert (r.returncode, r.stdout) == (0, b"PIPED\n")

    # top and stats read from the guest
    top = ok(cocoon(cfg, "top", "life")).splitlines()
    assert top[0].split() == ["PID", "USER", "TIME", "COMMAND"]
    assert any("sh -c trap" in ln and " root " in ln for ln in top[1:]), top
    st = json.loads(ok(cocoon(cfg, "stats", "--no-stream", "--format", "json", "life")))[0]
    assert st["pids"] >= 1 and st["memory_bytes"] > 0 and st["id"] == cid
    assert st["block_read_bytes"] > 0  # the shell was paged in from the image's block device
    assert {"net_rx_bytes", "net_tx_bytes", "cpu_percent"} <= set(st)
    table = ok(cocoon(cfg, "stats", "--no-stream"))
    assert "NET I/O" in table and "BLOCK I/O" in table and "life" in table

    # rm of a running container needs -f; kill -s sends a signal; stop uses the trap
    r = cocoon(cfg, "rm", "life")
    assert r.returncode != 0 and b"running" in r.stderr and r.stderr.count(b"\n") == 1
    # (the init is PID 1 of its namespace: only signals it traps reach it, as with runc)
    ok(cocoon(cfg, "kill", "-s", "TERM", "life"))
    assert ok(cocoon(cfg, "wait", "life")).strip() == "7"
    info = inspect(cfg, "life")
    assert info["State"]["Status"] == "exited" and info["State"]["ExitCode"] == 7
    assert info["Config"]["Labels"] == {"team": "a"} and info["Id"] == cid
    assert not qemu_of(cfg), "the VM must be gone once the container exited"
    assert "Exited (7)" in ok(cocoon(cfg, "ps", "-a")) and cid[:12] not in ok(cocoon(cfg, "ps"))
    # the log stays readable after the exit, in CRI format on disk
    log = Path(info["LogPath"])
    assert all(CRI_LINE.match(ln) for ln in log.read_bytes().splitlines())
    assert b"out 0" in cocoon(cfg, "logs", "life").stdout
    ok(cocoon(cfg, "rm", "life"))
    assert not log.exists() and cocoon(cfg, "inspect", "life").returncode != 0


def test_stop_uses_the_signal_then_kills(cfg: Config, busybox: None) -> None:
    ok(cocoon(cfg, "run", "-d", "--name", "trapper", "busybox", "sh", "-c",
              "trap 'echo bye; exit 7' TERM; while true; do sleep 0.1; done"))  # fmt: skip
    ok(cocoon(cfg, "run", "-d", "--name", "stubborn", "busybox", "sh", "-c",
              "trap '' TERM; while true; do sleep 0.1; done"))  # fmt: skip
    t0 = time.monotonic()
    ok(cocoon(cfg, "stop", "-t", "1", "trapper", "stubborn"))
    assert time.monotonic() - t0 < 20
    assert inspect(cfg, "trapper")["State"]["ExitCode"] == 7
    assert b"bye" in cocoon(cfg, "logs", "trapper").stdout
    assert inspect(cfg, "stubborn")["State"]["ExitCode"] == 137
    ok(cocoon(cfg, "rm", "trapper", "stubborn"))


def test_logs_follow_and_rotation(cfg: Config, busybox: None) -> None:
    """-f has every line and ends with the container; rotation bounds the files."""
    count = "i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done"
    ok(cocoon(cfg, "run", "-d", "--name", "chatty", "busybox", "sh", "-c", f"sleep 1; {count}"))
    ok(cocoon(cfg, "run", "-d", "--name", "rotated", "--log-opt", "max-size=16k",
              "--log-opt", "max-file=2", "busybox", "sh", "-c", count))  # fmt: skip
    r = cocoon(cfg, "logs", "-f", "chatty")
    assert r.returncode == 0 and r.stdout.decode().splitlines() == [
        f"line {i}" for i in range(3000)
    ]
    assert ok(cocoon(cfg, "wait", "rotated")).strip() == "0"
    lines = cocoon(cfg, "logs", "rotated").stdout.decode().splitlines()
    # rotation dropped the oldest lines; what is left is the newest, complete and in order
    first = int(lines[0].split()[1])
    assert first > 0 and lines == [f"line {i}" for i in range(first, 3000)]
    log = Path(inspect(cfg, "rotated")["LogPath"])
    files = sorted(log.parent.glob("container.log*"))
    assert [f.name for f in files] == ["container.log", "container.log.1"]
    assert all(f.stat().st_size < 16 * 1024 + 64 * 1024 for f in files)
    ok(cocoon(cfg, "rm", "chatty", "rotated"))


def test_100mb_through_stdin_and_stdout(cfg: Config, busybox: None, tmp_path: Path) -> None:
    """100 MB in through stdin, back out through stdout: complete and in order."""
    data = os.urandom(100_000_000)
    src = tmp_path / "in"
    src.write_bytes(data)
    with open(src, "rb") as f:
        p = subprocess.run(
            [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "run", "--rm", "-i",
             "busybox", "cat"],
            stdin=f, capture_output=True, timeout=240,
        )  # fmt: skip
    assert p.returncode == 0, p.stderr[-500:]
    assert len(p.stdout) == len(data)
    assert hashlib.sha256(p.stdout).digest() == hashlib.sha256(data).digest()


def test_oom_kill_is_reported(cfg: Config, busybox: None) -> None:
    r = cocoon(cfg, "run", "--name", "hog", "--memory", "32m", "busybox", "sh", "-c",
               "echo start; tail /dev/zero")  # fmt: skip
    assert r.returncode == 137 and r.stdout == b"start\n"
    info = inspect(cfg, "hog")
    assert info["State"]["OOMKilled"] is True and info["State"]["ExitCode"] == 137
    assert info["HostConfig"]["Memory"] == 32 << 20
    ok(cocoon(cfg, "rm", "hog"))


def test_cpus_are_visible_in_the_guest(cfg: Config, busybox: None) -> None:
    r = cocoon(cfg, "run", "--rm", "--cpus", "1.5", "busybox", "sh", "-c",
               "nproc; cat /sys/fs/cgroup/cpu.max")  # fmt: skip
    assert r.stdout.split() == [b"2", b"150000", b"100000"], r.stderr


def test_parallel_runs(cfg: Config, busybox: None) -> None:
    """20 `cocoon run` at once (20 VMs on 2 cores under TCG): each its own output."""
    n = 20

    # 20 TCG guests booting at once on 2 host cores get ~1/10 of a core each: a
    # boot that takes ~2 s alone takes ~40 s here, past the default 30 s limit
    # meant for one VM. The point is isolation under contention, not speed.
    env = {**os.environ, "COCOON_HYPERVISOR_BOOT_TIMEOUT_S": "150"}

    def one(i: int) -> tuple[int, bytes]:
        r = subprocess.run(
            [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "run", "--rm",
             "--name", f"par{i}", "busybox", "sh", "-c", f"echo $((6*{i}))"],
            capture_output=True, timeout=280, env=env,
        )  # fmt: skip
        return r.returncode, r.stdout + r.stderr

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    assert results == [(0, f"{6 * i}\n".encode()) for i in range(n)]


def test_state_survives_a_killed_cocoon_run(cfg: Config, busybox: None) -> None:
    """kill -9 of the attached `cocoon run`: the container goes on (ps lists it, its
    output is logged); kill -9 of its monitor: ps says dead; rm cleans up both."""
    p = subprocess.Popen(
        [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "run", "--name", "orphan",
         "busybox", "sh", "-c", "while true; do echo alive; sleep 0.2; done"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None
    assert p.stdout.readline() == b"alive\n"
    p.kill()
    p.wait()
    assert "orphan" in ok(cocoon(cfg, "ps")) and qemu_of(cfg)
    n = cocoon(cfg, "logs", "orphan").stdout.count(b"alive")
    wait_for(lambda: cocoon(cfg, "logs", "orphan").stdout.count(b"alive") > n)

    d = ContainerStore(cfg).resolve("orphan")
    os.kill(d.state().monitor_pid, signal.SIGKILL)
    wait_for(lambda: "Dead" in ok(cocoon(cfg, "ps", "-a")))
    assert inspect(cfg, "orphan")["State"]["Dead"] is True
    ok(cocoon(cfg, "rm", "orphan"))
    assert not qemu_of(cfg) and not d.path.exists()


def test_qemu_killed_under_a_running_container(cfg: Config, busybox: None) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "run", "--name", "victim",
         "busybox", "sh", "-c", "echo up; sleep 60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline() == b"up\n"
    for pid in qemu_of(cfg):
        with open(f"/proc/{pid}/comm") as f:
            if f.read().startswith("qemu"):
                os.kill(pid, signal.SIGKILL)
    assert p.wait(timeout=60) == 137
    err = p.stderr.read().decode()
    assert err.startswith("cocoon: ") and "VM exited" in err and err.count("\n") == 1, err
    info = inspect(cfg, "victim")
    assert info["State"]["Status"] == "exited" and "VM exited" in info["State"]["Error"]
    assert b"up" in cocoon(cfg, "logs", "victim").stdout  # the log has what came before
    ok(cocoon(cfg, "rm", "victim"))


def test_names_and_errors(cfg: Config, busybox: None) -> None:
    ok(cocoon(cfg, "run", "--name", "dup", "busybox", "true"))
    r = cocoon(cfg, "run", "--name", "dup", "busybox", "true")
    assert r.returncode == 125 and b"already used" in r.stderr and r.stderr.count(b"\n") == 1
    r = cocoon(cfg, "run", "--rm", "--name", "bad/name", "busybox", "true")
    assert r.returncode == 125 and b"invalid container name" in r.stderr
    for verb in (["logs"], ["exec", "nosuch", "true"], ["stop"], ["rm"], ["inspect"]):
        args = verb if len(verb) > 1 else [*verb, "nosuch"]
        r = cocoon(cfg, *args)
        assert r.returncode != 0 and b"no such container" in r.stderr, (verb, r.stderr)
    r = cocoon(cfg, "exec", "dup", "true")
    assert r.returncode != 0 and b"not running" in r.stderr and r.stderr.count(b"\n") == 1
    ok(cocoon(cfg, "rm", "dup"))


def test_exec_with_a_tty(cfg: Config, busybox: None) -> None:
    """`cocoon exec -it` from a terminal: a guest pty of our size, input and output."""
    ok(cocoon(cfg, "run", "-d", "--name", "tty1", "busybox", "sleep", "300"))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen(
        [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "exec", "-it", "tty1",
         "sh", "-c", "tty; stty size; read x; echo got $x; exit 3"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    buf, sent = b"", False
    deadline = time.monotonic() + 60
    try:
        while b"got hi" not in buf and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    buf += os.read(master, 4096)
                except OSError:
                    break
            if b"120" in buf and not sent:
                os.write(master, b"hi\r")
                sent = True
        assert p.wait(timeout=60) == 3
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
        cocoon(cfg, "rm", "-f", "tty1")
    assert b"/dev/pts/" in buf and b"40 120" in buf and b"got hi" in buf, buf
