"""`cocoon-runtime` driven directly, the way a shim does: state transitions,
the stand-in process contract, hooks, errors. Real VMs."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.config import Config
from cocoon.oci.spec import default_spec
from cocoon.state import gc
from cocoon.util.fs import mount_points_under

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> Iterator[None]:
    """We reap stand-ins as containerd's shim and conmon do."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture()
def rt(cfg: Config) -> Iterator[list[str]]:
    root = cfg.root / "oci-rt"
    argv = [shutil.which("cocoon-runtime") or "cocoon-runtime", "--root", str(root)]
    yield argv
    ids = subprocess.run([*argv, "list", "-q"], capture_output=True, text=True).stdout.split()
    for cid in ids:
        subprocess.run([*argv, "delete", "--force", cid], capture_output=True)
    left = gc.processes_naming(root)
    gc.reap(root, force=True)
    assert not ids and not left, f"left behind: {ids} {left}"


def make_bundle(tmp: Path, rootfs: Path, args: list[str], **extra: Any) -> Path:
    b = tmp / "bundle"
    shutil.copytree(rootfs, b / "rootfs", symlinks=True)
    (b / "rootfs").chmod(0o755)
    spec = default_spec(args, env=["PATH=/bin"])
    spec.update(extra)
    (b / "config.json").write_text(json.dumps(spec))
    return b


def start_sleeper(rt: list[str], rootfs: Path, tmp: Path, cid: str) -> int:
    """A running container that sleeps; its stand-in's pid."""
    b = make_bundle(tmp, rootfs, ["sleep", "100"])
    pidf = tmp / "pid"
    subprocess.run([*rt, "create", "--bundle", str(b), "--pid-file", str(pidf), cid],
                   stdin=subprocess.DEVNULL, check=True)  # fmt: skip
    subprocess.run([*rt, "start", cid], check=True)
    return int(pidf.read_text())


def state(rt: list[str], cid: str) -> dict[str, Any]:
    r = subprocess.run([*rt, "state", cid], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def reap(pid: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        got, st = os.waitpid(pid, os.WNOHANG)
        if got:
            return st
        assert time.monotonic() < deadline, "the stand-in never exited"
        time.sleep(0.05)


def test_lifecycle_states_hooks_and_stand_in(
    cfg: Config, rootfs: Path, rt: list[str], tmp_path: Path
) -> None:
    log = tmp_path / "hooks.log"
    hook = {"path": "/bin/sh", "args": ["sh", "-c", f"cat >> {log}; echo >> {log}"]}
    b = make_bundle(
        tmp_path, rootfs, ["sh", "-c", "echo out; echo err >&2; read x; exit $x"],
        hooks={"prestart": [hook], "poststart": [hook], "poststop": [hook]},
        annotations={"org.example/k": "v"},
    )  # fmt: skip
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        r = subprocess.run(
            [*rt, "create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "c1"],
            stdout=o, stderr=e, input=b"7\n",
        )  # fmt: skip
    assert r.returncode == 0, err.read_text()
    pid = int((tmp_path / "pid").read_text())
    st = state(rt, "c1")
    assert st["status"] == "created" and st["pid"] == pid and st["bundle"] == str(b)
    assert st["annotations"] == {"org.example/k": "v"} and st["ociVersion"]
    assert json.loads(log.read_text().splitlines()[0])["status"] == "created"
    assert subprocess.run([*rt, "start", "c1"]).returncode == 0
    # the stand-in holds the stdio create was given and exits with the code
    assert os.waitstatus_to_exitcode(reap(pid)) == 7
    assert out.read_bytes() == b"out\n" and err.read_bytes() == b"err\n"
    deadline = time.monotonic() + 30
    while state(rt, "c1")["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    again = subprocess.run([*rt, "start", "c1"], capture_output=True, text=True)
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert subprocess.run([*rt, "delete", "c1"]).returncode == 0
    statuses = [json.loads(x)["status"] for x in log.read_text().splitlines() if x.strip()]
    assert statuses == ["created", "running", "stopped"]
    gone = subprocess.run([*rt, "state", "c1"], capture_output=True, text=True)
    assert gone.returncode == 1 and "does not exist" in gone.stderr


def test_signals_kill_and_stand_in_death(
    cfg: Config, rootfs: Path, rt: list[str], tmp_path: Path
) -> None:
    loop = "trap 'exit 9' USR1; echo ready; while true; do sleep 0.1; done"
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", loop])
    pidf = tmp_path / "pid"
    for cid in ("s1", "s2"):
        out = tmp_path / f"{cid}.out"
        with open(out, "wb") as o:
            cp = subprocess.run([*rt, "create", "--bundle", str(b), "--pid-file", str(pidf), cid],
                                stdin=subprocess.DEVNULL, stdout=o)  # fmt: skip
        assert cp.returncode == 0
        pid = int(pidf.read_text())
        assert subprocess.run([*rt, "start", cid]).returncode == 0
        deadline = time.monotonic() + 30
        while out.read_bytes() != b"ready\n":  # the trap is set
            assert time.monotonic() < deadline
            time.sleep(0.05)
        if cid == "s1":
            # a signal sent to the stand-in reaches the container's process
            os.kill(pid, signal.SIGUSR1)
            assert os.waitstatus_to_exitcode(reap(pid)) == 9
        else:
            # SIGKILL of the stand-in kills what it stood for
            os.kill(pid, signal.SIGKILL)
            reap(pid)
            deadline = time.monotonic() + 30
            while state(rt, cid)["status"] != "stopped":
                assert time.monotonic() < deadline
                time.sleep(0.1)
        r = subprocess.run([*rt, "kill", cid, "KILL"], capture_output=True, text=True)
        assert r.returncode == 1 and "not running" in r.stderr
        assert subprocess.run([*rt, "delete", cid]).returncode == 0


def test_kill_by_runtime_dies_by_signal(
    cfg: Config, rootfs: Path, rt: list[str], tmp_path: Path
) -> None:
    pid = start_sleeper(rt, rootfs, tmp_path, "k1")
    r = subprocess.run([*rt, "delete", "k1"], capture_output=True, text=True)
    assert r.returncode == 1 and "not stopped" in r.stderr
    subprocess.run([*rt, "kill", "k1", "KILL"], check=True)
    st = reap(pid)
    assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL
    subprocess.run([*rt, "delete", "k1"], check=True)


def test_errors_are_one_line_and_logged(rt: list[str], tmp_path: Path) -> None:
    log = tmp_path / "rt.log"
    r = subprocess.run([*rt, "--log", str(log), "--log-format", "json", "create",
                        "--bundle", str(tmp_path), "e1"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "config.json" in r.stderr
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "config.json" in entry["msg"] and entry["time"]
    r = subprocess.run([*rt, "start", "nosuch"], capture_output=True, text=True)
    assert r.returncode == 1 and "does not exist" in r.stderr
    feats = json.loads(subprocess.run([*rt, "features"], capture_output=True, text=True).stdout)
    assert feats["ociVersionMax"].startswith("1.")
    r = subprocess.run([*rt, "checkpoint", "x"], capture_output=True, text=True)
    assert r.returncode == 1 and "not supported" in r.stderr
    assert subprocess.run([*rt, "spec", "--bundle", str(tmp_path)]).returncode == 0
    assert json.loads((tmp_path / "config.json").read_text())["process"]["args"] == ["sh"]


def test_killed_monitor_leaves_nothing_after_delete(
    cfg: Config, rootfs: Path, rt: list[str], tmp_path: Path
) -> None:
    """kill -9 of the process that owns the VM: the container reads as stopped,
    its stand-in ends, and `delete` reaps the VM and the state."""
    b = make_bundle(tmp_path, rootfs, ["sleep", "100"])
    pidf = tmp_path / "pid"
    subprocess.run([*rt, "create", "--bundle", str(b), "--pid-file", str(pidf), "m1"],
                   stdin=subprocess.DEVNULL, check=True)  # fmt: skip
    pid = int(pidf.read_text())
    subprocess.run([*rt, "start", "m1"], check=True)
    root = Path(rt[2])
    monitor = json.loads((root / "oci" / "m1" / "state.json").read_text())["monitor_pid"]
    os.kill(monitor, signal.SIGKILL)
    reap(pid)  # the stand-in lost its guest process: it ends too
    assert state(rt, "m1")["status"] == "stopped"
    assert gc.processes_naming(root), "the VM outlives its owner until delete"
    subprocess.run([*rt, "delete", "m1"], check=True)
    assert not gc.processes_naming(root)


def test_binds_are_host_binds_named_as_bound(
    cfg: Config, rootfs: Path, rt: list[str], tmp_path: Path
) -> None:
    """Bind sources reach the VM as host bind mounts under one share: the
    container's mount table names each (a file alone, not its directory),
    read-only is enforced, writes land on the host, and delete undoes them."""
    data, etc = tmp_path / "data", tmp_path / "etc"
    data.mkdir()
    etc.mkdir()
    (etc / "hosts").write_text("10.0.0.1 h\n")
    (etc / "shadow").write_text("not for the guest\n")
    script = (
        "cat /etc/hosts; echo w > /data/new; echo x 2>/dev/null > /etc/hosts && echo WROTE;"
        ' awk \'$5 == "/etc/hosts" || $5 == "/data" {print $5, $4}\' /proc/self/mountinfo'
    )
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", script], mounts=[
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/etc/hosts", "type": "bind", "source": str(etc / "hosts"),
         "options": ["rbind", "ro"]},
        {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind"]},
    ])  # fmt: skip
    r = subprocess.run([*rt, "run", "--bundle", str(b), "b1"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "10.0.0.1 h" and "WROTE" not in lines
    assert sorted(lines[1:]) == ["/data /1/data", "/etc/hosts /0/hosts"]
    assert (data / "new").read_text() == "w\n" and (etc / "hosts").read_text() == "10.0.0.1 h\n"
    root = Path(rt[2])
    assert not mount_points_under(root) and not list((root / "binds").iterdir())


def test_resources_the_guest_can_apply(
    cfg: Config, rootfs: Path, rt: list[str], tmp_path: Path
) -> None:
    """A cpuset gets a VM with those CPUs; kubelet's zero hugetlb limits apply in
    the guest; kernel memory limits (no cgroup v2 knob) do not stop the container."""
    script = "cd /sys/fs/cgroup; cat cpuset.cpus.effective hugetlb.2MB.max memory.max"
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", script])
    spec = json.loads((b / "config.json").read_text())
    spec["linux"]["resources"] = {
        "cpu": {"cpus": "0-1"},
        "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
        "memory": {"limit": 64 << 20, "kernel": 64 << 20, "kernelTCP": 64 << 20},
    }
    (b / "config.json").write_text(json.dumps(spec))
    log = tmp_path / "rt.log"
    r = subprocess.run([*rt, "--log", str(log), "run", "--bundle", str(b), "r1"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0-1", "0", str(64 << 20)]
    assert "memory.kernel ignored" in log.read_text()
    spec["linux"]["resources"] = {"hugepageLimits": [{"pageSize": "3MB", "limit": 0}]}
    (b / "config.json").write_text(json.dumps(spec))
    r = subprocess.run([*rt, "run", "--bundle", str(b), "r2"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and "3MB" in r.stderr  # no such page size: refused
    subprocess.run([*rt, "delete", "--force", "r2"], capture_output=True)


def test_exec_of_a_command_that_cannot_run(
    cfg: Config, rootfs: Path, rt: list[str], tmp_path: Path
) -> None:
    """runc's exit 1 with crun's words, which podman and containerd read to pick
    docker's 127 or 126; in --log too. The container lives on."""
    pid = start_sleeper(rt, rootfs, tmp_path, "x1")
    log = tmp_path / "rt.log"
    for command, said in (("nosuchcmd", "executable file `nosuchcmd` not found in $PATH"),
                          ("/etc/passwd", "open executable: Permission denied")):  # fmt: skip
        r = subprocess.run([*rt, "--log", str(log), "--log-format", "json", "exec", "x1", command],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and said in r.stderr, r.stderr
        entry = json.loads(log.read_text().splitlines()[-1])
        assert entry["level"] == "error" and said in entry["msg"]
    r = subprocess.run([*rt, "exec", "x1", "sh", "-c", "exit 5"], stdin=subprocess.DEVNULL)
    assert r.returncode == 5 and state(rt, "x1")["status"] == "running"
    subprocess.run([*rt, "kill", "x1", "KILL"], check=True)
    reap(pid)
    subprocess.run([*rt, "delete", "x1"], check=True)
