"""Warm pools, for real: `cocoon pool serve` keeps restored sandboxes ready,
a start takes one (once), the pool refills, a dead pooled VM is thrown away."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.config import Config
from cocoon.state.store import SandboxDir
from cocoon.util.fs import mount_points_under
from tests.vm.conftest import cocoon, ok
from tests.vm.test_ocicli import make_bundle

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def pool_ls(cfg: Config) -> list[str]:
    st = json.loads(ok(cocoon(cfg, "pool", "ls", "--format", "json")))
    return [sid for ids in st["classes"].values() for sid in ids]


def wait_for(what: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return got


@pytest.fixture
def server(cfg: Config) -> Iterator[subprocess.Popen[bytes]]:
    with serving(cfg) as p:
        yield p


@contextlib.contextmanager
def serving(cfg: Config, *flags: str) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(
        [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "pool", "serve",
         "--size", "1", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: (cfg.root / "pool.sock").exists() and len(pool_ls(cfg)) == 1)
        yield p
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        print(err.decode(errors="replace")[-3000:])
    assert p.returncode == 0
    # Every pooled sandbox ran its warm-up container and cleaned up after it.
    assert b"warm-up failed" not in err and b"did not go quiet" not in err


def test_a_start_takes_a_pooled_sandbox_once_and_the_pool_refills(
    cfg: Config, busybox: None, server: subprocess.Popen[bytes]
) -> None:
    [pooled] = pool_ls(cfg)
    cid = ok(cocoon(cfg, "run", "-d", "--network", "none", "busybox", "sleep", "300")).strip()
    try:
        info = json.loads(ok(cocoon(cfg, "inspect", cid)))
        info = info[0] if isinstance(info, list) else info
        assert info["Sandbox"]["Id"] == pooled and info["Sandbox"]["Template"]
        # It is the container's now: owned by its monitor, no longer the pool's.
        st = SandboxDir(cfg.root, pooled).read()
        assert st.owner_pid == info["State"]["Pid"] and "cocoon.pool" not in st.annotations
        out = ok(cocoon(cfg, "exec", cid, "sh", "-c", "echo alive; cat /etc/hostname"))
        assert out.startswith("alive\n")
        refill = wait_for(lambda: pool_ls(cfg))
        assert refill != [pooled]
    finally:
        ok(cocoon(cfg, "rm", "-f", cid))
    # The container is gone, and its sandbox with it: never back in the pool.
    assert not (cfg.root / "sandboxes" / pooled).exists()
    assert pooled not in pool_ls(cfg)
    r = cocoon(cfg, "run", "--rm", "--network", "none", "busybox", "sh", "-c", "echo ok; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"ok\n", b"")


def test_a_dead_pooled_vm_is_discarded_not_handed_out(
    cfg: Config, busybox: None, server: subprocess.Popen[bytes]
) -> None:
    [pooled] = pool_ls(cfg)
    qemu = SandboxDir(cfg.root, pooled).read().processes["qemu"].pid
    os.kill(qemu, signal.SIGKILL)
    fresh = wait_for(lambda: [s for s in pool_ls(cfg) if s != pooled])
    assert not (cfg.root / "sandboxes" / pooled).exists()
    r = cocoon(cfg, "run", "--rm", "--network", "none", "busybox", "echo", "fine")
    assert (r.returncode, r.stdout) == (0, b"fine\n"), r.stderr
    assert fresh[0] not in pool_ls(cfg)  # that start took the fresh one


def test_starts_that_do_not_fit_restore_by_themselves(
    cfg: Config, busybox: None, server: subprocess.Popen[bytes]
) -> None:
    """A VM size the pool keeps no class of (2 vCPUs here) skips the pool."""
    [pooled] = pool_ls(cfg)
    r = cocoon(cfg, "run", "--rm", "--network", "none", "--cpus", "2", "busybox", "nproc")
    assert (r.returncode, r.stdout) == (0, b"2\n"), r.stderr
    assert pool_ls(cfg) == [pooled]


def test_host_directories_reach_a_pooled_sandbox_through_its_hub(
    cfg: Config, busybox: None, server: subprocess.Popen[bytes], tmp_path: Any
) -> None:
    """Volumes bound late into the pooled sandbox's hub: rw written through to
    the host, :ro refused (a read-only bind on the host), and at the end every
    bind gone from the host and every file of the user's still there."""
    [pooled] = pool_ls(cfg)
    hub = cfg.root / "hubs" / pooled
    # its warm-up's use of the hub (sandbox.warmup.hub_warm_up) left nothing
    assert mount_points_under(hub) == [str(hub)] and not list(hub.iterdir())
    assert not (cfg.root / "sandboxes" / pooled / "warm").exists()
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "hello").write_text("read me\n")
    cid = ok(cocoon(cfg, "run", "-d", "--network", "none", "-v", f"{rw}:/data",
                    "-v", f"{ro}:/ro:ro", "busybox", "sleep", "300")).strip()  # fmt: skip
    try:
        info = json.loads(ok(cocoon(cfg, "inspect", cid)))
        info = info[0] if isinstance(info, list) else info
        assert info["Sandbox"]["Id"] == pooled
        assert sorted(mount_points_under(hub)) == [str(hub), str(hub / "0"), str(hub / "1")]
        script = "cat /ro/hello; echo written > /data/out; touch /ro/x 2>&1 || echo refused"
        out = ok(cocoon(cfg, "exec", cid, "sh", "-c", script))
        assert out.startswith("read me\n") and out.endswith("refused\n"), out
        assert "Read-only file system" in out
        assert (rw / "out").read_text() == "written\n" and not (ro / "x").exists()
        # Taken, its VM's processes (the hub's file server too) run at the
        # taker's priority, not the pool's.
        procs = SandboxDir(cfg.root, pooled).read().processes
        assert {"qemu", "9pproxy0"} <= set(procs), procs
        assert {n: os.getpriority(os.PRIO_PROCESS, r.pid) for n, r in procs.items()} == {
            n: 0 for n in procs
        }
    finally:
        ok(cocoon(cfg, "rm", "-f", cid))
    assert not hub.exists() and mount_points_under(hub) == []  # (the refill has a hub of its own)
    assert (rw / "out").read_text() == "written\n" and (ro / "hello").read_text() == "read me\n"


def test_a_pooled_sandbox_with_a_nic_serves_a_start_in_a_network_namespace(
    cfg: Config, busybox: None
) -> None:
    """``pool serve --nics 1``: the pooled VM's tap waits in the pool's own
    namespace and moves into the start's (a veth's, as CNI makes it): the
    guest's NIC has the veth's MAC and address and reaches its peer; the tap
    and filters go with the container; a start without that NIC count, or the
    pool's end, leaves no tap, filter or namespace anywhere."""
    ns, peer = f"cocoon-pooltest-{uuid.uuid4().hex[:6]}", f"ccpt{uuid.uuid4().hex[:6]}"
    ip = ["ip", "-n", ns]
    before = set((cfg.root / "sandboxes").glob("*"))  # the session's shared sandbox may be up
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0",
                        "netns", ns], check=True)  # fmt: skip
        subprocess.run(["ip", "addr", "add", "10.233.9.1/24", "dev", peer], check=True)
        subprocess.run(["ip", "link", "set", peer, "up"], check=True)
        subprocess.run([*ip, "addr", "add", "10.233.9.2/24", "dev", "eth0"], check=True)
        subprocess.run([*ip, "link", "set", "eth0", "up"], check=True)
        mac = json.loads(subprocess.run([*ip, "-j", "link", "show", "eth0"], check=True,
                                        capture_output=True).stdout)[0]["address"]  # fmt: skip
        with serving(cfg, "--nics", "1") as p:
            [pooled] = pool_ls(cfg)
            # no NIC: not this pool's class, so restored by itself
            r = cocoon(cfg, "run", "--rm", "--network", "none", "busybox", "true")
            assert r.returncode == 0 and pool_ls(cfg) == [pooled], r.stderr
            cid = ok(cocoon(cfg, "run", "-d", "--network", f"ns:/run/netns/{ns}", "busybox",
                            "sleep", "300")).strip()  # fmt: skip
            try:
                info = json.loads(ok(cocoon(cfg, "inspect", cid)))
                info = info[0] if isinstance(info, list) else info
                assert info["Sandbox"]["Id"] == pooled
                script = ("cat /sys/class/net/eth0/address; ip -4 -o addr show eth0; "
                          "ping -c 1 -W 5 10.233.9.1 >/dev/null && echo reached")  # fmt: skip
                out = ok(cocoon(cfg, "exec", cid, "sh", "-c", script))
                assert out.splitlines()[0] == mac and "10.233.9.2/24" in out, out
                assert out.endswith("reached\n"), out
                links = subprocess.run([*ip, "-o", "link"], capture_output=True, text=True).stdout
                assert "cctap0" in links, links
            finally:
                ok(cocoon(cfg, "rm", "-f", cid))
            links = subprocess.run([*ip, "-o", "link"], capture_output=True, text=True).stdout
            qdiscs = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", "eth0"],
                                    capture_output=True, text=True).stdout  # fmt: skip
            assert "cctap" not in links and "ingress" not in qdiscs, (links, qdiscs)
            [refill] = wait_for(lambda: pool_ls(cfg))
            assert refill != pooled

            def held() -> list[str]:
                fds = [os.readlink(f) for f in Path(f"/proc/{p.pid}/fd").iterdir()]
                return [f for f in fds if f.startswith("net:")]

            assert len(held()) == 1, held()  # the refill's namespace of taps, one
            # a pooled VM that died is discarded: its namespace let go with it
            os.kill(SandboxDir(cfg.root, refill).read().processes["qemu"].pid, signal.SIGKILL)
            [fresh] = wait_for(lambda: [s for s in pool_ls(cfg) if s != refill])
            assert len(held()) == 1 and not (cfg.root / "sandboxes" / refill).exists(), held()
            assert fresh
        # drained: the server held no namespace, and nothing of the pool is left
        assert set((cfg.root / "sandboxes").glob("*")) == before
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "link", "del", peer], capture_output=True, check=False)


def test_no_server_no_pool(cfg: Config) -> None:
    r = cocoon(cfg, "pool", "ls")
    assert r.returncode == 125 and b"start `cocoon pool serve`" in r.stderr


def test_a_killed_server_leaves_nothing_gc_cannot_clean(cfg: Config, busybox: None) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "pool", "serve",
         "--size", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        [pooled] = wait_for(lambda: (cfg.root / "pool.sock").exists() and pool_ls(cfg))
    finally:
        p.kill()
        p.wait(timeout=30)
    # The pool's sandbox lost its owner with the server: gc reaps its VM and dir.
    r = cocoon(cfg, "gc")
    assert r.returncode == 0 and pooled in r.stdout.decode().split(), r.stderr
    assert not (cfg.root / "sandboxes" / pooled).exists()
    # A start finds the stale socket, no server behind it, and restores by itself.
    assert (cfg.root / "pool.sock").exists()
    r = cocoon(cfg, "run", "--rm", "--network", "none", "busybox", "echo", "ok")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"ok\n", b"")
    (cfg.root / "pool.sock").unlink(missing_ok=True)


def _vm_processes(root: Path) -> list[int]:
    """The VM processes (QEMU, tini, file servers) of sandboxes under ``root``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if str(root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
    return found


#: Points in a pooled sandbox's start, each seen from the host.
STAGES: dict[str, Callable[[Path], bool]] = {
    "its sandbox made": lambda r: any(r.glob("sandboxes/*/state.json")),
    "QEMU started": lambda r: any(r.glob("sandboxes/*/qemu.argv")),
    "its warm-up running": lambda r: any(r.glob("sandboxes/*/warm")),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_server_stopped_mid_start_stops_at_once_and_leaves_nothing(
    cfg: Config, busybox: None, stage: str
) -> None:
    """SIGTERM while its first sandbox is still starting (QEMU not yet
    answering, the restore's QMP connection open, the warm-up's requests in
    flight): the server ends cleanly within seconds, and nothing is left of
    the sandbox it was making: no VM process, no mount, no state dir."""
    root = cfg.root
    p = subprocess.Popen(
        [sys.executable, "-m", "cocoon.cli", "--root", str(root), "pool", "serve", "--size", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not STAGES[stage](root):
            assert p.poll() is None and time.monotonic() < deadline, f"never saw {stage}"
            time.sleep(0.002)
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = err.decode(errors="replace")
    assert p.returncode == 0 and "pool: stopped" in text, text[-2000:]
    assert took < 10, f"stopping took {took:.1f} s"
    assert "warm-up failed" not in text and "could not start" not in text, text[-2000:]
    assert _vm_processes(root) == []
    assert mount_points_under(root) == []
    assert list((root / "sandboxes").iterdir()) == []


def test_a_pod_takes_a_pooled_sandbox_into_its_host_cgroup(
    cfg: Config, rootfs: Path, server: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """A bundle with a ``linux.cgroupsPath`` (kubelet's pod cgroup below it)
    still takes a pooled VM: its processes, which the pool started in its own
    cgroups, move into the container's host cgroup in every hierarchy, and
    the delete removes that cgroup."""
    [pooled] = pool_ls(cfg)
    top = f"cocoon-pool-test-{uuid.uuid4().hex[:8]}"
    rel = f"{top}/pod/c1"
    b = make_bundle(tmp_path, rootfs, ["sleep", "300"])
    spec = json.loads((b / "config.json").read_text())
    spec.setdefault("linux", {})["cgroupsPath"] = f"/{rel}"
    (b / "config.json").write_text(json.dumps(spec))
    code = "from cocoon.entry import cocoon_runtime; cocoon_runtime()"
    rt = [sys.executable, "-c", code, "--root", str(cfg.root)]
    try:
        create = [*rt, "create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "c1"]
        with open(tmp_path / "err", "wb") as err:  # (the stand-in keeps create's stdio)
            r = subprocess.run(create, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=err, timeout=120)  # fmt: skip
        assert r.returncode == 0, (tmp_path / "err").read_text()
        state = json.loads((cfg.root / "oci" / "c1" / "state.json").read_text())
        assert state["sandbox_id"] == pooled
        st = SandboxDir(cfg.root, pooled).read()
        pids = [p.pid for p in st.processes.values()] + [st.owner_pid]  # the VM's and its monitor
        assert len(pids) >= 3, st.processes
        for pid in pids:
            for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
                assert line.split(":", 2)[2] == f"/{rel}", (pid, line)
        mem = Path("/sys/fs/cgroup/memory", rel, "memory.limit_in_bytes")
        if mem.exists() and st.jail_uid:  # the jail's cap came along
            assert int(mem.read_text()) == (cfg.hypervisor.memory_mib + 256) << 20
        assert not Path("/sys/fs/cgroup/memory/cocoon", pooled).exists()
    finally:
        subprocess.run([*rt, "delete", "--force", "c1"], capture_output=True, timeout=120)
        wait_for(lambda: not any(Path(t, rel).exists() for t in _hierarchies()), 20)
        for t in _hierarchies():
            for d in (Path(t, top, "pod"), Path(t, top)):
                if d.is_dir():
                    d.rmdir()


def _hierarchies() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return [root]
    return [d for d in root.iterdir() if (d / "cgroup.procs").exists()]
