"""Jailed VMMs, for real (security.jail): QEMU as a uid of its own, in
namespaces and a root of its own, with no capabilities and under seccomp;
and what a compromised QEMU could do from there, tried by a probe program
launched through the same jail code with the same plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.hypervisor import cgroup, jail
from cocoon.hypervisor.base import Share
from cocoon.hypervisor.qemu.backend import QemuBackend, proxy_launch
from cocoon.hypervisor.qemu.qmp import Qmp
from cocoon.sandbox import restore
from cocoon.sandbox.sandbox import Sandbox, backend_for, ensure_template, vm_spec
from cocoon.state import gc
from cocoon.state.store import SandboxDir
from cocoon.util.proc import alive
from tests.vm.conftest import Runner, cocoon, ok

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]
JAILED = {"COCOON_SECURITY_JAIL": "true"}


@pytest.fixture
def jcfg(cfg: Config) -> Config:
    c = copy.deepcopy(cfg)
    c.security.jail = True
    return c


def qemu_pid(c: Config, sid: str) -> int:
    return SandboxDir(c.root, sid).read().processes["qemu"].pid


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


#: In the environment of the tests' process, and so of every VMM's caller.
SECRET = ("COCOON_TEST_REGISTRY_PASSWORD", "hunter2")


@pytest.fixture
def two(jcfg: Config, run: Runner, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Sandbox]]:
    monkeypatch.setenv(*SECRET)
    sbs = [run(Sandbox.create(jcfg)), run(Sandbox.create(jcfg))]
    try:
        yield sbs
    finally:
        for sb in sbs:
            run(sb.destroy())


def test_a_jailed_qemu_has_its_own_uid_namespaces_and_root(
    jcfg: Config, two: list[Sandbox]
) -> None:
    uids = set()
    for sb in two:
        pid = qemu_pid(jcfg, sb.id)
        st = status(pid)
        uid = int(st["Uid"].split()[0])
        assert uid == sb.state.jail_uid and uid >= jcfg.security.uid_base
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
        assert st["Groups"] == "" and st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16) == 0
        for ns in ("mnt", "net", "ipc", "uts", "pid"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        assert st["NSpid"].split() == [str(pid), "1"]  # pid 1 of a namespace of its own
        # Nothing of its caller's environment but PATH (a user's tokens stay out).
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert [v.split(b"=")[0] for v in env if v] == [b"PATH"], env
        root = set(os.listdir(f"/proc/{pid}/root"))
        assert root <= {"usr", "bin", "sbin", "lib", "lib64", "etc", "dev", "proc", "run", "var"}
        assert not os.path.exists(f"/proc/{pid}/root/root") and "home" not in root
        assert sorted(os.listdir(f"/proc/{pid}/root/dev")) == ["null", "random", "urandom", "zero"]
        uids.add(uid)
        assert jail.owners(jcfg.root)[uid] == sb.id
    assert len(uids) == 2, "two sandboxes share a uid"


def test_seccomp_refuses_qemu_an_exec(jcfg: Config, two: list[Sandbox], run: Runner) -> None:
    """What a compromised QEMU would do first: run a program. QEMU's own
    `migrate exec:` is the way in that needs no exploit."""
    sb = two[0]
    pid = qemu_pid(jcfg, sb.id)

    async def try_exec() -> str:
        q = await Qmp.connect(sb.dir.file("qmp.sock"))
        try:
            await q.execute("migrate", {"uri": "exec:touch /tmp/escaped"})
            for _ in range(100):
                info = await q.execute("query-migrate")
                if info.get("status") in ("failed", "completed"):
                    return str(info.get("status"))
                await asyncio.sleep(0.02)
            return "running"
        except Exception as e:  # QEMU refused it at once, or seccomp ended QEMU
            return f"refused: {e}"
        finally:
            q.close()

    outcome = run(try_exec())
    assert outcome != "completed", outcome
    assert not Path(f"/proc/{pid}/root/tmp/escaped").exists()
    assert not Path("/tmp/escaped").exists()


PROBE = r"""
import errno, json, os, socket, sys
out = {}
def attempt(name, f):
    try:
        f(); out[name] = "ALLOWED"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
attempt("read_shadow", lambda: open("/etc/shadow").read())
attempt("read_other_disk", lambda: open(sys.argv[1], "rb").read(1))
attempt("open_other_socket", lambda: socket.socket(socket.AF_UNIX).connect(sys.argv[2]))
attempt("signal_other_qemu", lambda: os.kill(int(sys.argv[3]), 0))
def write_ram():
    os.write(os.open(f"/proc/self/fd/{sys.argv[4]}", os.O_RDWR), b"x")
attempt("write_template_ram", write_ram)
def loopback():
    s = socket.socket(); s.settimeout(2); s.connect(("127.0.0.1", int(sys.argv[5])))
attempt("host_loopback", loopback)
attempt("write_root", lambda: open("/usr/evil", "w"))
n = 0
def forks():
    global n
    while n < 5000:
        pid = os.fork()
        if pid == 0:
            import time; time.sleep(30); os._exit(0)
        n += 1
attempt("fork_bomb", forks)
out["forked"] = n
out["uid"] = os.getuid()
out["in_proc"] = [p for p in os.listdir("/proc") if p.isdigit()]
print(json.dumps(out), flush=True)
"""


def forked_by(pid: int) -> list[int]:
    """The child ``pid`` (tini) forks, once it has."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if kids := Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                return [int(k) for k in kids]
        time.sleep(0.002)
    return []


def probe(
    jcfg: Config, me: Sandbox, run: Runner, tmp_path: Path, args: Callable[[int], list[str]]
) -> tuple[subprocess.Popen[str], str, str]:
    """Python run as ``me``'s QEMU would run (its uid, cgroup, kind of
    namespaces and root, through the backend's own jail plan for a clone of
    ``me``), given the template RAM fd QEMU gets; (process, stdout, stderr)."""
    backend = backend_for(jcfg)
    assert isinstance(backend, QemuBackend)
    t, _ = run(ensure_template(jcfg))
    spec = restore.clone_spec(vm_spec(jcfg, me.id, me.dir.path, me.state.accel), t.ram, t.empty)
    spec.jail = jail.Jail(me.state.jail_uid, me.state.jail_uid, jcfg.root)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    sockets = {"qmp": probe_dir / "qmp.sock", "agent": probe_dir / "agent.sock"}
    spec = dataclasses.replace(spec, workdir=probe_dir)
    with contextlib.ExitStack() as opened:
        fds: dict[str, int] = {}
        jailed, plan = backend.jail_plan(spec, sockets, probe_dir / "console.log", fds, opened)
        assert jailed.template is not None
        mem = int(str(jailed.template.path).rsplit("/", 1)[1])
        argv = plan.argv(["/usr/bin/python3", "-I", "-S", *args(mem)])
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             pass_fds=[mem, *fds.values()], start_new_session=True,
                             preexec_fn=plan.child_setup())  # fmt: skip
        # In, as the backend moves a jailed QEMU in: tini and what it forked.
        cgroup.enter(plan.cgroups, [p.pid, *forked_by(p.pid)])
        try:
            stdout, stderr = p.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # what it forked
    return p, stdout, stderr


def test_a_compromised_qemu_reaches_nothing_of_the_host_or_other_sandboxes(
    jcfg: Config, two: list[Sandbox], run: Runner, tmp_path: Path
) -> None:
    me, other = two
    other_disk = next(iter(sorted(Path(jcfg.data_dir, "images", "erofs").glob("*.erofs"))), None)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    p, stdout, stderr = probe(jcfg, me, run, tmp_path, lambda mem: [
        "-c", PROBE, str(other_disk or "/var/lib/cocoon/images"), str(other.dir.file("qmp.sock")),
        str(qemu_pid(jcfg, other.id)), str(mem), str(listener.getsockname()[1]),
    ])  # fmt: skip
    listener.close()
    assert p.returncode == 0, stderr[-2000:]
    got = json.loads(stdout.strip().splitlines()[-1])
    assert got["uid"] == me.state.jail_uid
    assert got["read_shadow"] == "ENOENT"
    assert got["read_other_disk"] == "ENOENT"
    assert got["open_other_socket"] == "ENOENT"
    # Not even addressable: its pid namespace holds only itself (was EPERM, by uid).
    assert got["signal_other_qemu"] == "ESRCH"
    assert got["write_template_ram"] == "EPERM"
    assert got["host_loopback"] in ("ENETUNREACH", "ECONNREFUSED")
    assert got["write_root"] in ("EROFS", "EACCES")
    assert got["fork_bomb"] == "EAGAIN" and got["forked"] < jail.NPROC
    # Its /proc shows its own uid's processes only (its children, its QEMU).
    assert all(_uid_of(x) in (me.state.jail_uid, -1) for x in got["in_proc"])


PROXY_PROBE = r"""
import ctypes, errno, json, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def attempt(name, rc):
    out[name] = "ALLOWED" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
child = os.fork()
if child == 0:
    time.sleep(30); os._exit(0)
attempt("ptrace_child", libc.ptrace(16, child, None, None))  # PTRACE_ATTACH
os.kill(child, signal.SIGKILL); os.waitpid(child, 0)
attempt("mount", libc.mount(b"none", b"/mnt", b"tmpfs", 0, None))
attempt("unshare_user", libc.unshare(0x10000000))
rc = libc.syscall(56, 0x10000000 | 0x40000000 | signal.SIGCHLD, 0, 0, 0, 0)  # clone
if rc == 0:
    os._exit(0)
attempt("clone_namespaces", rc)
attempt("bpf", libc.syscall(321, 0, None, 0))
attempt("keyctl", libc.syscall(250, 0, -1, 0, 0, 0))  # KEYCTL_GET_KEYRING_ID
try:
    os.kill(int(sys.argv[1]), 0); out["signal_other_qemu"] = "ALLOWED"
except OSError as e:
    out["signal_other_qemu"] = errno.errorcode[e.errno]
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
out["status"] = {k: status[k].strip() for k in ("Seccomp", "NoNewPrivs", "NSpid", "CapBnd")}
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("readonly", [True, False], ids=["ro", "rw"])
def test_a_compromised_9p_file_server_cannot_ptrace_mount_or_unshare(
    jcfg: Config, two: list[Sandbox], tmp_path: Path, readonly: bool
) -> None:
    """A program run as a jailed VM's virtfs-proxy-helper would be, through
    the backend's own launch line for a share (sharejail, tini, seccomp):
    root, but in a pid namespace of its own and under its filter."""
    share = Share("probe", tmp_path, readonly=readonly)
    argv, setup = proxy_launch(share, ["/usr/bin/python3", "-I", "-S", "-c", PROXY_PROBE,
                                       str(qemu_pid(jcfg, two[0].id))])  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, preexec_fn=setup)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for call in ("ptrace_child", "mount", "unshare_user", "clone_namespaces", "bpf", "keyctl"):
        assert got[call] == "EPERM", (call, got)
    assert got["signal_other_qemu"] == "ESRCH"  # not even addressable
    st = got["status"]
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st
    assert st["NSpid"].split()[-1] == "1" and len(st["NSpid"].split()) == 2, st
    assert int(st["CapBnd"], 16) == sum(1 << c for c in (0, 1, 2, 3, 4, 6, 7, 18, 27)), st


def test_a_runaway_qemu_ends_only_its_own_sandbox(
    jcfg: Config, two: list[Sandbox], run: Runner, tmp_path: Path
) -> None:
    """Its host cgroup caps memory at the guest's size plus the overhead:
    allocating past it is killed there; the other sandbox does not notice."""
    me, other = two
    assert cgroup.memory_limit(me.id) == (me_mib(jcfg) + cgroup.OVERHEAD_MIB) << 20
    assert qemu_pid(jcfg, me.id) in cgroup.procs(me.id)
    hog = "b = []\nwhile True: b.append(bytearray(64 << 20))\n"
    p, _, stderr = probe(jcfg, me, run, tmp_path, lambda mem: ["-c", hog])
    # tini, outside the jail's pid namespace, passes a signal on as 128 + N
    assert p.returncode == 128 + signal.SIGKILL, stderr[-500:]
    run(other.ping())


def me_mib(c: Config) -> int:
    return c.hypervisor.memory_mib


def test_gc_after_kill_9_leaves_no_uid_allocated(
    jcfg: Config, busybox: None, tmp_path: Path
) -> None:
    """The owner of a jailed sandbox (its monitor) dies: gc kills its QEMU and
    its volume's 9p file server, with their tinis, and frees its uid, and no
    process of that uid is left."""
    cid = ok(cocoon(jcfg, "run", "-d", "--network", "none", "-v", f"{tmp_path}:/data",
                    "busybox", "sleep", "600", env=JAILED)).strip()  # fmt: skip
    try:
        [(uid, sid)] = jail.owners(jcfg.root).items()
        info = json.loads(ok(cocoon(jcfg, "inspect", cid)))[0]
        assert info["Sandbox"]["JailUid"] == uid and info["Sandbox"]["Id"] == sid
        st = SandboxDir(jcfg.root, sid).read()
        # QEMU and its tini; the volume's 9p file server and its tini
        recorded = st.processes
        assert set(recorded) == {"qemu", "jail", "9pproxy0", "9pjail0"}, recorded
        os.kill(st.owner_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while SandboxDir(jcfg.root, sid).owned():
            assert time.monotonic() < deadline, "the monitor did not die"
            time.sleep(0.05)
        assert gc.reap(jcfg.root) == [sid]
        assert jail.owners(jcfg.root) == {}
        left = {n: r.pid for n, r in recorded.items() if alive(r.pid, r.start_time)}
        assert not left, left  # (a zombie is not alive: it holds nothing)
        # Zombies excepted: the killed monitor's QEMU is reparented to pid 1,
        # which reaps it when it gets round to it; a zombie holds nothing.
        theirs = [x for x in os.listdir("/proc") if x.isdigit() and _uid_of(x) == uid
                  and "State:\tZ" not in Path(f"/proc/{x}/status").read_text()]  # fmt: skip
        assert not theirs, [Path(f"/proc/{x}/status").read_text()[:300] for x in theirs]
    finally:
        cocoon(jcfg, "rm", "-f", cid)


def _uid_of(pid: str) -> int:
    try:
        return int(status(int(pid))["Uid"].split()[0])
    except (OSError, KeyError):
        return -1


def test_cli_runs_jailed(jcfg: Config, busybox: None) -> None:
    r = cocoon(jcfg, "run", "--rm", "--network", "none", "busybox", "sh", "-c", "echo in; exit 4",
               env=JAILED)  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (4, b"in\n", b"")
    assert ok(cocoon(jcfg, "sandbox", "run", "--", "echo", "ok", env=JAILED)) == "ok\n"
