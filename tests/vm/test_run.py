"""`cocoon run IMAGE ...` as a user types it: the image's block device in a VM."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.guestassets.cache import resolve
from tests.images.layout import Layout
from tests.images.servers import REGISTRY, SKOPEO, Registry, push, require, running
from tests.vm.conftest import cocoon

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def test_run_busybox_echo(cfg: Config, busybox: None) -> None:
    r = cocoon(cfg, "run", "--rm", "busybox", "echo", "hello")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"hello\n", b"")


@pytest.mark.parametrize(
    "script, code", [("exit 0", 0), ("exit 1", 1), ("sleep 60 & kill -9 $!; wait $!", 137)]
)
def test_exit_codes(cfg: Config, busybox: None, script: str, code: int) -> None:
    assert cocoon(cfg, "run", "--rm", "busybox", "sh", "-c", script).returncode == code


def test_signals_to_run_are_forwarded(cfg: Config, busybox: None) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "run", "--rm", "busybox",
         "sh", "-c", 'trap "echo got TERM; exit 42" TERM; echo ready; sleep 60 & wait'],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    p.terminate()
    assert p.wait(timeout=60) == 42
    assert p.stdout.read() == b"got TERM\n"


def test_env_workdir_user_entrypoint(cfg: Config, busybox: None) -> None:
    r = cocoon(cfg, "run", "--rm", "-e", "GREETING=hi there", "-w", "/tmp", "-u", "nobody",
               "--entrypoint", "sh", "busybox", "-c",
               'echo "$GREETING"; pwd; id -u; id -g')  # fmt: skip
    assert r.stdout.decode().split("\n")[:4] == ["hi there", "/tmp", "65534", "65534"], r.stderr


def test_image_cmd_and_stdin(cfg: Config, busybox: None) -> None:
    # No command: the image's Cmd ("sh") reads the script from stdin.
    r = cocoon(cfg, "run", "--rm", "-i", "busybox", input=b"echo from stdin; exit 3\n")
    assert (r.returncode, r.stdout) == (3, b"from stdin\n")


def test_read_only_and_limits(cfg: Config, busybox: None) -> None:
    r = cocoon(cfg, "run", "--rm", "--read-only", "busybox", "sh", "-c", "touch /x")
    assert r.returncode == 1 and b"Read-only file system" in r.stderr
    r = cocoon(cfg, "run", "--rm", "--memory", "64m", "--cpus", "0.5", "busybox", "sh", "-c",
               "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; nproc")  # fmt: skip
    assert r.stdout.split() == [b"67108864", b"50000", b"100000", b"1"], r.stderr


def test_errors_are_one_line(cfg: Config, busybox: None) -> None:
    r = cocoon(cfg, "run", "--rm", "busybox", "/no/such/cmd")
    assert r.returncode == 127 and r.stderr.decode().count("\n") == 1
    r = cocoon(cfg, "run", "--rm", "--pull", "never", "nosuchimage:1", "true")
    assert r.returncode == 125
    assert r.stderr.decode().startswith("cocoon: ") and r.stderr.decode().count("\n") == 1


def test_pull_from_registry_then_run(cfg: Config, tmp_path: Path) -> None:
    """A real pull (gzip + zstd layers, skopeo-pushed) unpacked to a block image and run."""
    require(REGISTRY, SKOPEO)
    lay = Layout(tmp_path / "layout")
    script = b"#!/bin/busybox sh\n/bin/busybox cat /etc/greeting\nexit 7\n"
    img = lay.image(
        [
            ({"bin/busybox": (Path("/bin/busybox").read_bytes(), 0o755)}, "gzip"),
            (
                {"etc/greeting": b"hello from a pulled layer\n", "app/run.sh": (script, 0o755)},
                "zstd",
            ),  # fmt: skip
        ]
    )
    lay.tag("app", img.manifest_digest, img.manifest_size)
    assets = resolve(cfg)
    env = {
        "COCOON_DATA_DIR": str(tmp_path / "data"),  # a store of its own
        "COCOON_HYPERVISOR_KERNEL": str(assets.kernel),
        "COCOON_HYPERVISOR_IMAGE": str(assets.image),
    }
    with running(Registry(tmp_path / "registry")) as reg:
        ref = f"{reg.host}/test/app:1"
        push(lay.root, "app", ref)
        pulled = cocoon(cfg, "pull", "-q", ref, env=env)
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.decode().strip() == img.config_digest
    r = cocoon(cfg, "run", "--rm", "--pull", "never", ref, "/app/run.sh", env=env)
    assert (r.returncode, r.stdout) == (7, b"hello from a pulled layer\n"), r.stderr


def test_image_built_by_cocoons_erofs_writer_runs(cfg: Config, tmp_path: Path) -> None:
    """An image mkfs.erofs 1.5 cannot build (a 255-byte name, a lost+found dir) is
    written by cocoon's own erofs writer; the guest kernel mounts it and the
    container sees every name and byte."""
    require(REGISTRY, SKOPEO)
    lay = Layout(tmp_path / "layout")
    long_name = "n" * 255
    script = (
        b"#!/bin/busybox sh\n/bin/busybox cat /data/" + long_name.encode()
        + b" /lost+found/note\n/bin/busybox ls /data | /bin/busybox wc -c\n"
    )  # fmt: skip
    img = lay.image(
        [
            ({"bin/busybox": (Path("/bin/busybox").read_bytes(), 0o755)}, "gzip"),
            (
                {
                    f"data/{long_name}": b"a name of NAME_MAX\n",
                    "lost+found/note": b"kept\n",
                    "app/run.sh": (script, 0o755),
                },
                "zstd",
            ),  # fmt: skip
        ]
    )
    lay.tag("app", img.manifest_digest, img.manifest_size)
    assets = resolve(cfg)
    env = {
        "COCOON_DATA_DIR": str(tmp_path / "data"),
        "COCOON_HYPERVISOR_KERNEL": str(assets.kernel),
        "COCOON_HYPERVISOR_IMAGE": str(assets.image),
    }
    with running(Registry(tmp_path / "registry")) as reg:
        ref = f"{reg.host}/test/app:1"
        push(lay.root, "app", ref)
        pulled = cocoon(cfg, "pull", "-q", ref, env=env)
        assert pulled.returncode == 0, pulled.stderr
    r = cocoon(cfg, "run", "--rm", "--pull", "never", ref, "/app/run.sh", env=env)
    assert (r.returncode, r.stdout) == (0, b"a name of NAME_MAX\nkept\n256\n"), r.stderr


def _read_until(fd: int, needle: bytes, timeout_s: float = 60) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout_s
    while needle not in buf:
        assert time.monotonic() < deadline, f"never saw {needle!r} in {buf[-500:]!r}"
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_tty_through_a_pty(cfg: Config, busybox: None) -> None:
    """`cocoon run -it` as from a terminal: size, raw mode (Ctrl-C reaches the container)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    p = subprocess.Popen(
        [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "run", "--rm", "-it",
         "busybox", "sh"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    try:
        _read_until(master, b"# ")  # the shell's prompt, through the guest's pty
        os.write(master, b"stty size; echo $((6*7))\r")
        out = _read_until(master, b"42")
        assert b"33 101" in out
        os.write(master, b"sleep 30\r")
        time.sleep(1.5)
        os.write(master, b"\x03")  # Ctrl-C: a byte in raw mode, SIGINT inside the container
        _read_until(master, b"# ", timeout_s=20)
        os.write(master, b"exit 5\r")
        assert p.wait(timeout=60) == 5
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
