"""containerd's own runtime path: `ctr --runtime io.containerd.cocoon.v2`.

containerd 1.6 (private root, state, socket) starts `containerd-shim-cocoon-v2`
from its PATH, talks ttrpc to it and reads its events; each task is a cocoon
container in a real VM. After each test: no shim, no VM process, no record,
no mount, no network namespace, no shim socket left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cocoon.shim.main import socket_path
from cocoon.shim.proto import task_pb2
from cocoon.shim.service import SERVICE
from cocoon.shim.ttrpc import Client, Code, RpcError
from cocoon.state import gc
from cocoon.util.fs import mount_points_under
from tests.compat.conftest import IMAGE, SHIM_RUNTIME, Containerd
from tests.vm.conftest import _owned_elsewhere, our_netns

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

NAMESPACE = "cocoontest"  # Containerd.ctr's


def monitors(root: Path) -> set[int]:
    """The container monitors under the shim's root (forked from the shim, so
    with its command line)."""
    out = set()
    for st in root.glob("oci/*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            out.add(int(json.loads(st.read_bytes()).get("monitor_pid") or 0))
    return out


def shims(c: Containerd) -> list[int]:
    """Our shims serving this containerd (their command line names its socket)."""
    out = []
    skip = monitors(c.shim_root / NAMESPACE)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = b"containerd_shim" in b" ".join(argv) and str(c.sock).encode() in argv
        if ours and int(d.name) not in skip:
            out.append(int(d.name))
    return out


def qemus(root: Path) -> list[int]:
    return [p for p in gc.processes_naming(root)
            if Path(f"/proc/{p}/comm").read_text().startswith("qemu")]  # fmt: skip


@pytest.fixture
def shim_clean(containerd: Containerd):  # type: ignore[no-untyped-def]
    """After the test: nothing of the shim's left (teardown may still be finishing)."""
    nets = our_netns()
    yield
    root = containerd.shim_root / NAMESPACE
    deadline = time.monotonic() + 30
    while True:
        procs = shims(containerd)
        vms = gc.processes_naming(root)
        records = os.listdir(root / "oci") if (root / "oci").exists() else []
        if not procs and not vms and not records:
            break
        if time.monotonic() > deadline:
            for pid in procs:  # the test failed: leave nothing for the next one
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            gc.reap(root, force=True)
            pytest.fail(f"left behind: shims {procs}, VM processes {vms}, records {records}")
        time.sleep(0.2)
    assert not mount_points_under(containerd.shim_root), "mounts left under the shim's root"
    assert not mount_points_under(containerd.run), "rootfs mounts left in containerd's state"
    left = {n for n in our_netns() - nets if not _owned_elsewhere(n, root)}
    assert not left, f"network namespaces left: {left}"
    for group in ("s1", "s2", "s3", "s4", "pod1"):
        assert not os.path.exists(socket_path(str(containerd.sock), NAMESPACE, group))


def test_run_prints_and_exits_with_the_code(containerd: Containerd, shim_clean: None) -> None:
    ctr = containerd.ctr
    r = ctr("run", "--rm", "--runtime", SHIM_RUNTIME, IMAGE, "s1", "echo", "hello")
    assert (r.returncode, r.stdout) == (0, b"hello\n"), r.stderr
    r = ctr("run", "--rm", "--runtime", SHIM_RUNTIME, IMAGE, "s1",
            "sh", "-c", "echo out; echo err >&2; exit 7")  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    # stdin from ctr's fifo, and its EOF
    r = ctr("run", "--rm", "--runtime", SHIM_RUNTIME, IMAGE, "s1", "cat", input=b"piped\n")
    assert (r.returncode, r.stdout) == (0, b"piped\n"), r.stderr
    # a terminal: ctr -t needs one of its own, which script(1) gives it
    argv = ["ctr", "--address", str(containerd.sock), "-n", NAMESPACE, "run", "--rm", "-t",
            "--runtime", SHIM_RUNTIME, IMAGE, "s1", "sh", "-c", "tty; stty size; exit 4",
            ]  # fmt: skip
    r = subprocess.run(["script", "-qec", shlex.join(argv), "/dev/null"],
                       capture_output=True, timeout=120, input=b"")  # fmt: skip
    # (script's terminal adds a \r to the guest's \r\n, as it does with runc)
    assert r.returncode == 4 and b"/dev/pts/0\n24 80\n" in r.stdout.replace(b"\r", b""), r


def test_task_exec_ls_pause_kill(containerd: Containerd, shim_clean: None) -> None:
    ctr = containerd.ctr
    r = ctr("run", "-d", "--runtime", SHIM_RUNTIME, IMAGE, "s2",
            "sh", "-c", "while true; do sleep 0.2; done")  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        assert len(shims(containerd)) == 1
        ls = ctr("task", "ls").stdout.decode()
        assert any(line.split()[0] == "s2" and "RUNNING" in line for line in ls.splitlines()[1:])
        r = ctr("task", "exec", "--exec-id", "e1", "s2", "sh", "-c", "echo in exec; exit 6")
        assert (r.returncode, r.stdout) == (6, b"in exec\n"), r.stderr
        r = ctr("task", "ps", "s2")
        assert r.returncode == 0 and len(r.stdout.splitlines()) >= 2, r
        # the guest's cgroup, as containerd decodes a cgroup v2 container's metrics
        r = ctr("task", "metrics", "s2")
        rows = dict(line.split()[:2] for line in r.stdout.decode().splitlines() if "." in line)
        assert int(rows["pids.current"]) >= 2 and int(rows["memory.usage"]) > 0, r
        # what ctr 1.6 cannot ask, asked over ttrpc on the shim's own socket
        limit = asyncio.run(
            _calls_ctr_cannot_make(socket_path(str(containerd.sock), NAMESPACE, "s2"))
        )
        r = ctr("task", "metrics", "s2")
        rows = dict(line.split()[:2] for line in r.stdout.decode().splitlines() if "." in line)
        assert int(rows["memory.usage_limit"]) == limit, r.stdout
        assert ctr("task", "pause", "s2").returncode == 0
        assert b"PAUSED" in ctr("task", "ls").stdout
        assert ctr("task", "resume", "s2").returncode == 0
        assert b"RUNNING" in ctr("task", "ls").stdout
        r = ctr("task", "kill", "-s", "SIGKILL", "s2")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 30
        while b"STOPPED" not in ctr("task", "ls").stdout:
            assert time.monotonic() < deadline, ctr("task", "ls").stdout
            time.sleep(0.2)
        r = ctr("task", "delete", "s2")
        assert r.returncode == 0, r.stderr
    finally:
        ctr("task", "delete", "-f", "s2")
        ctr("container", "rm", "s2")


async def _calls_ctr_cannot_make(path: str) -> int:
    """Connect, Update (a new memory limit: returned) and Checkpoint on the
    shim of task s2, as containerd would call them."""
    client = await Client.connect(path)
    try:
        r = task_pb2.ConnectResponse.FromString(
            await client.call(
                SERVICE, "Connect", task_pb2.ConnectRequest(id="s2").SerializeToString(), 10
            )
        )
        assert r.shim_pid == r.task_pid and r.shim_pid in shims_of(path)
        limit = 300 << 20
        req = task_pb2.UpdateTaskRequest(id="s2")
        req.resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
        req.resources.value = json.dumps({"memory": {"limit": limit}}).encode()
        await client.call(SERVICE, "Update", req.SerializeToString(), 30)
        with pytest.raises(RpcError) as e:
            chk = task_pb2.CheckpointTaskRequest(id="s2", path="/tmp/x")
            await client.call(SERVICE, "Checkpoint", chk.SerializeToString(), 10)
        assert e.value.code == Code.UNIMPLEMENTED
        return limit
    finally:
        await client.close()


def shims_of(path: str) -> list[int]:
    """The processes listening on the shim socket ``path`` (from /proc/net/unix)."""
    inodes = {line.split()[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
              if line.endswith(" " + path)}  # fmt: skip
    out = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd).removeprefix("socket:[").rstrip("]") in inodes:
                out.append(int(fd.parts[2]))
    return out


def _wait_stopped(c: Containerd, cid: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        rows = [line.split() for line in c.ctr("task", "ls").stdout.decode().splitlines()[1:]]
        if any(r[0] == cid and r[-1] == "STOPPED" for r in rows) or all(r[0] != cid for r in rows):
            return
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def test_a_pod_has_one_shim_and_one_vm(containerd: Containerd, shim_clean: None) -> None:
    """CRI's annotations: the pod's second container goes to the sandbox's
    shim (containerd is told its address by `start`) and into its VM."""
    ctr = containerd.ctr
    root = containerd.shim_root / NAMESPACE
    pod = ["--runtime", SHIM_RUNTIME, "--annotation", "io.kubernetes.cri.sandbox-id=pod1"]
    try:
        r = ctr("run", "-d", *pod, "--annotation", "io.kubernetes.cri.container-type=sandbox",
                IMAGE, "pod1", "sleep", "1000")  # fmt: skip
        assert r.returncode == 0, r.stderr
        r = ctr("run", "-d", *pod, "--annotation", "io.kubernetes.cri.container-type=container",
                IMAGE, "app1", "sleep", "1000")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert len(shims(containerd)) == 1
        assert len(qemus(root)) == 1
        boot = "cat /proc/sys/kernel/random/boot_id"
        ids = [ctr("task", "exec", "--exec-id", f"b{i}", name, "sh", "-c", boot).stdout
               for i, name in enumerate(("pod1", "app1"))]  # fmt: skip
        assert ids[0] == ids[1] and len(ids[0]) == 37, ids
        # the member's own end and removal; the pod and its shim live on
        assert ctr("task", "kill", "-s", "SIGKILL", "app1").returncode == 0
        _wait_stopped(containerd, "app1")
        r = ctr("task", "delete", "app1")
        assert r.returncode == 0, r.stderr
        assert b"RUNNING" in ctr("task", "ls").stdout
        assert len(shims(containerd)) == 1
    finally:
        for name in ("app1", "pod1"):
            ctr("task", "delete", "-f", name)
            ctr("container", "rm", name)


def test_a_killed_shim_leaves_nothing(containerd: Containerd, shim_clean: None) -> None:
    """kill -9 of the shim: its container dies with it (the shim's attach is
    bound), containerd runs `delete` for the dead shim, which removes the rest."""
    ctr = containerd.ctr
    try:
        r = ctr("run", "-d", "--runtime", SHIM_RUNTIME, IMAGE, "s3", "sleep", "1000")
        assert r.returncode == 0, r.stderr
        (pid,) = shims(containerd)
        os.kill(pid, signal.SIGKILL)
        _wait_stopped(containerd, "s3")
    finally:
        ctr("task", "delete", "-f", "s3")
        ctr("container", "rm", "s3")


def test_a_killed_vm_ends_the_task(containerd: Containerd, shim_clean: None) -> None:
    """kill -9 of the pod's QEMU: the task exits with 137 (SIGKILL's status)
    and `ctr run --rm` cleans up as after any exit."""
    root = containerd.shim_root / NAMESPACE
    argv = ["ctr", "--address", str(containerd.sock), "-n", NAMESPACE,
            "run", "--rm", "--runtime", SHIM_RUNTIME, IMAGE, "s4", "sleep", "1000"]  # fmt: skip
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while b"RUNNING" not in containerd.ctr("task", "ls").stdout or not qemus(root):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.2)
        for pid in qemus(root):
            os.kill(pid, signal.SIGKILL)
        assert p.wait(timeout=60) == 137, p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        containerd.ctr("task", "delete", "-f", "s4")
        containerd.ctr("container", "rm", "s4")
