"""`cocoon run -v/--mount/--tmpfs` on real VMs: what the container sees, what the host keeps.

Each boot costs ~2 s under TCG, so one boot checks everything one command line
can honestly show; the container waits on stdin while the test looks at the
host side (virtiofsd's mounts, the scratch file) of the running sandbox.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.state import gc
from cocoon.state.store import SandboxDir
from cocoon.storage.scratch import scratch_dir, stamped
from cocoon.util.fs import mount_points_under
from tests.vm.conftest import SHARED, cocoon

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


class Running:
    """`cocoon run -i ...` in the background, its container paused on `read`."""

    def __init__(self, cfg: Config, *args: str, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.p = subprocess.Popen(
            [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "run", "--rm", "-i",
             *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        assert self.p.stdout is not None
        self.before = b""
        while not self.before.endswith(b"ready\n"):
            line = self.p.stdout.readline()
            assert line, f"container ended early: {self.before!r} {self.stderr()!r}"
            self.before += line

    def stderr(self) -> bytes:
        self.p.wait(timeout=60)
        assert self.p.stderr is not None
        return self.p.stderr.read()

    def sandbox(self) -> gc.SandboxInfo:
        [info] = [s for s in gc.describe(self.cfg.root) if s.id not in SHARED]
        return info

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        """On a failed check, end the run as a user would (the signal reaches the container)."""
        if exc[0] is not None and self.p.poll() is None:
            self.p.terminate()
            self.p.communicate(timeout=60)

    def finish(self) -> tuple[int, bytes, bytes]:
        out, err = self.p.communicate(b"go\n", timeout=120)
        return self.p.returncode, self.before + out, err


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "from-host").write_text("host data\n")
    (ro / "hello").write_text("read me\n")
    return rw, ro


SCRIPT = """
cat /data/from-host; echo written > /data/from-guest
cat /ro/hello; touch /ro/new 2>&1; echo touch=$?
echo t > /scratch/f && grep ' /scratch ' /proc/mounts | cut -d' ' -f3
echo ready; read go
"""


EXPECTED = [
    "host data",
    "read me",
    "touch: /ro/new: Read-only file system",
    "touch=1",
    "tmpfs",
    "ready",
]


def test_bind_rw_ro_and_tmpfs(cfg: Config, busybox: None, tmp_path: Path) -> None:
    """virtio-fs (a cold boot: a template's clone has 9p shares, tested below)."""
    rw, ro = _dirs(tmp_path)
    run = Running(cfg, "--no-template", "-v", f"{rw}:/data", "-v", f"{ro}:/ro:ro",
                  "--tmpfs", "/scratch", "busybox", "sh", "-c", SCRIPT)  # fmt: skip
    # While it runs: each virtiofsd lives in mount, pid and network namespaces
    # of its own, pivoted into its share (its mountinfo: the share at "/" and
    # nothing else of the host). The read-only share is a read-only mount
    # there; the rw share is served as is; the host has no new mount at all.
    with run:
        procs = run.sandbox().processes
        for name, flag in (("virtiofsd0", "rw"), ("virtiofsd1", "ro")):
            pid = procs[name]
            [root] = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
            fields = root.split()
            assert fields[4] == "/" and flag in fields[5].split(","), root
            # (the pid namespace is its child's, which does the serving)
            for ns, theirs in (("mnt", "mnt"), ("net", "net"), ("pid", "pid_for_children")):
                assert os.readlink(f"/proc/{pid}/ns/{theirs}") != os.readlink(f"/proc/self/ns/{ns}")
            [child] = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            status = Path(f"/proc/{child}/status").read_text()
            assert "Seccomp:\t2" in status, status  # its own filter, in force
            # capabilities: what serving owners needs, and no CAP_SETFCAP (31)
            eff = int(status.split("CapEff:\t")[1].split()[0], 16)
            assert eff and not eff & (1 << 31) and not eff & (1 << 21), hex(eff)  # nor SYS_ADMIN
        # Even root cannot write there through virtiofsd's root.
        with pytest.raises(OSError, match="Read-only file system"):
            Path(f"/proc/{procs['virtiofsd1']}/root/x").write_text("x")
        assert mount_points_under(tmp_path) == []  # nothing mounted on the host
    code, out, err = run.finish()
    assert code == 0, err
    assert out.decode().splitlines() == EXPECTED
    assert (rw / "from-guest").read_text() == "written\n"
    assert sorted(p.name for p in ro.iterdir()) == ["hello"]
    assert not os.path.exists(f"/proc/{procs['virtiofsd1']}")


@pytest.mark.parametrize("jailed", [True, False], ids=["jail", "no-jail"])
def test_bind_rw_ro_and_tmpfs_in_a_template_clone(
    cfg: Config, busybox: None, tmp_path: Path, jailed: bool
) -> None:
    """A clone's shares are the template's 9p slots, no virtiofsd, nothing
    mounted on the host. Unjailed, QEMU serves them and its read-only fsdev
    refuses writes to a :ro one. Jailed, QEMU has no file access: one
    virtfs-proxy-helper per share serves it, the :ro one from a read-only
    mount of its own (sharejail), so not even a compromised QEMU can write."""
    rw, ro = _dirs(tmp_path)
    run = Running(cfg, "-v", f"{rw}:/data", "-v", f"{ro}:/ro:ro", "--tmpfs", "/scratch",
                  "busybox", "sh", "-c", SCRIPT,
                  env={"COCOON_SECURITY_JAIL": str(jailed).lower()})  # fmt: skip
    with run:
        info = run.sandbox()
        argv = Path(f"/proc/{info.processes['qemu']}/cmdline").read_bytes().split(b"\0")
        if jailed:
            assert set(info.processes) == {"qemu", "jail", "9pproxy0", "9pproxy1", "9pjail0",
                                           "9pjail1"}  # fmt: skip
            proxies = [a.decode() for a in argv if a.startswith(b"proxy,")]
            assert len(proxies) == 2 and sum("readonly=on" in f for f in proxies) == 1, proxies
            helpers = {n: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                       for n, pid in info.processes.items()
                       if n.startswith("9pproxy")}  # fmt: skip
            [ro_pid] = [info.processes[n] for n, h in helpers.items() if str(ro).encode() in h]
            assert os.readlink(f"/proc/{ro_pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
            info_text = Path(f"/proc/{ro_pid}/mountinfo").read_text()
            mounts = [ln.split() for ln in info_text.splitlines()]
            assert any(m[4] in ("/", str(ro)) and "ro" in m[5].split(",") for m in mounts), mounts
            for i in (0, 1):
                pid = info.processes[f"9pproxy{i}"]
                # Jailed as the helper is: own namespaces, a bounding set of
                # only what serving owners needs (no CAP_SYS_ADMIN, 21), NNP,
                # its own seccomp filter, and pid 1 of a pid namespace of its
                # own under its tini (recorded too: our child, outside).
                for ns in ("mnt", "net", "ipc", "uts", "pid"):
                    assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
                status = Path(f"/proc/{pid}/status").read_text()
                bnd = int(status.split("CapBnd:\t")[1].split()[0], 16)
                assert bnd and not bnd & (1 << 21), hex(bnd)
                assert "NoNewPrivs:\t1" in status, status
                assert "Seccomp:\t2" in status, status
                assert f"NSpid:\t{pid}\t1\n" in status, status
                tini = info.processes[f"9pjail{i}"]
                assert Path(f"/proc/{tini}/task/{tini}/children").read_text().split() == [str(pid)]
        else:
            assert set(info.processes) == {"qemu"}
            fsdevs = [a.decode() for a in argv if a.startswith(b"local,")]
            assert any(f"path={ro}," in f and "readonly=on" in f for f in fsdevs), fsdevs
            assert any(f"path={rw}," in f and "readonly" not in f for f in fsdevs), fsdevs
        assert mount_points_under(tmp_path) == []
    code, out, err = run.finish()
    assert code == 0, err
    assert out.decode().splitlines() == EXPECTED
    assert (rw / "from-guest").read_text() == "written\n"
    assert sorted(p.name for p in ro.iterdir()) == ["hello"]


def test_9p_fallback(cfg: Config, busybox: None, tmp_path: Path) -> None:
    rw, ro = _dirs(tmp_path)
    r = cocoon(cfg, "run", "--rm", "-v", f"{rw}:/data", "-v", f"{ro}:/ro:ro", "busybox", "sh",
               "-c", "grep -c ' 9p ' /proc/mounts; cat /ro/hello; echo x > /data/f; touch /ro/f",
               env={"COCOON_HYPERVISOR_SHARED_FS": "9p"})  # fmt: skip
    assert (r.returncode, r.stdout) == (1, b"2\nread me\n"), r.stderr
    assert b"Read-only file system" in r.stderr
    assert (rw / "f").read_text() == "x\n" and not (ro / "f").exists()


def test_scratch_is_bounded_and_removed(cfg: Config, busybox: None) -> None:
    run = Running(cfg, "--mount", "type=scratch,target=/data,size=32m", "busybox", "sh", "-c",
                  "dd if=/dev/zero of=/data/big bs=1M count=64 2>&1; echo dd=$?; "
                  "df -k /data | tail -1; echo ready; read go")  # fmt: skip
    with run:
        image = scratch_dir(cfg.data, run.sandbox().id) / "0.img"
        st = image.stat()
        assert st.st_size == 32 << 20
        assert st.st_blocks * 512 <= 33 << 20  # sparse, and never past its size
    code, out, err = run.finish()
    assert code == 0, err
    assert b"No space left on device" in out and b"dd=1" in out
    assert not image.exists() and not image.parent.exists()


def test_gc_after_a_crash_removes_scratch(cfg: Config, busybox: None, tmp_path: Path) -> None:
    """SIGKILL the container's monitor (the VM's owner) and the CLI mid-run:
    `cocoon gc` kills the VM and deletes the scratch file; `rm` drops the record."""
    _, ro = _dirs(tmp_path)
    run = Running(cfg, "-v", f"{ro}:/ro:ro", "--mount", "type=scratch,target=/s,size=8m",
                  "busybox", "sh", "-c", "echo ready; read go")  # fmt: skip
    with run:
        sid = run.sandbox().id
        sdir = scratch_dir(cfg.data, sid)
        assert (sdir / "0.img").exists()
    owner = SandboxDir(cfg.root, sid).read().owner_pid
    os.kill(owner, signal.SIGKILL)
    run.p.send_signal(signal.SIGKILL)
    run.p.wait(timeout=30)
    r = cocoon(cfg, "gc")
    assert r.returncode == 0 and sid in r.stdout.decode().split(), r.stderr
    assert not sdir.exists()
    assert (ro / "hello").read_text() == "read me\n"
    [cid] = cocoon(cfg, "ps", "-aq").stdout.decode().split()
    assert cocoon(cfg, "rm", cid).returncode == 0


@pytest.mark.parametrize(
    "flags",
    [
        ["-v", "/no/such/dir:/data"],
        ["-v", "/tmp:data"],
        ["--mount", "type=scratch,target=/data,size=lots"],
        ["--mount", "type=volume,source=x,target=/data"],
        ["--mount", "type=bind,source=/tmp,target=/data,propagation=shared"],
        ["--tmpfs", "/t:size=1m,uid=0"],
        # Boots, then crun cannot make a mount point under a file: the
        # sandbox and its scratch file must still go.
        ["--mount", "type=scratch,target=/bin/busybox/new,size=8m"],
    ],
)
def test_bad_specs_one_line_and_nothing_left(cfg: Config, busybox: None, flags: list[str]) -> None:
    r = cocoon(cfg, "run", "--rm", *flags, "busybox", "true")
    err = r.stderr.decode()
    assert r.returncode == 125 and err.startswith("cocoon: ") and err.count("\n") == 1, err
    assert mount_points_under(cfg.root) == []
    assert stamped(cfg.data, cfg.root) == {}
