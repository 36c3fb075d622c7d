"""A booted sandbox: agent, guest kernel, containers, stdio, signals, stats."""

from __future__ import annotations

import hashlib
import itertools
import os
import signal

import pytest

from cocoon.errors import AgentError
from cocoon.sandbox.sandbox import Sandbox
from tests.vm.conftest import GUEST_ROOTFS, Runner, spec

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]
_ids = itertools.count()


def cid() -> str:
    return f"c{next(_ids)}"


async def run_container(sb: Sandbox, args: list[str], stdin: bytes | None = None, **kw: object):
    c = cid()
    proc = await sb.create_container(c, GUEST_ROOTFS, spec(args), stdin=stdin is not None, **kw)
    await sb.start_container(c)
    if stdin is not None:
        await proc.write_stdin(stdin)
    out, err = await proc.output()
    exited = await proc.wait()
    await sb.delete_container(c)
    return out, err, exited


def test_agent_answers_from_its_own_kernel(booted: Sandbox, run: Runner) -> None:
    run(booted.ping())
    d = run(booted.details())
    assert d.kernel_release != os.uname().release  # the guest kernel is not the host's
    assert d.kernel_release.startswith("6.1.")
    assert d.cgroup_version == 2
    assert d.cpus == 1
    assert 200_000 < d.mem_total_kib < 262_144
    assert "/ erofs" in d.mounts
    assert booted.state.accel in ("tcg", "kvm")
    assert booted.boot_s is not None and booted.boot_s < 30


def test_qemu_runs_without_huge_pages_under_tcg(booted: Sandbox) -> None:
    """Under TCG, huge pages only fatten QEMU (its translation cache, its ROM):
    its process has them off; under KVM, on (a cold boot's guest RAM)."""
    assert booted.launched is not None
    qemu = booted.launched.processes["qemu"]
    with open(f"/proc/{qemu}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    assert status["THP_enabled"].strip() == ("0" if booted.state.accel == "tcg" else "1")
    with open("/proc/self/status") as f:  # the launcher put its own back
        assert "THP_enabled:\t1" in f.read()


def test_process_stdout_stderr_and_exit_code(booted: Sandbox, run: Runner) -> None:
    out, err, ex = run(
        run_container(booted, ["sh", "-c", "echo out; echo err >&2; uname -r; exit 3"])
    )
    assert out == f"out\n{run(booted.details()).kernel_release}\n".encode()
    assert err == b"err\n"
    assert (ex.exit_code, ex.signal, ex.oom_killed) == (3, 0, False)


def test_stdin_is_streamed(booted: Sandbox, run: Runner) -> None:
    data = os.urandom(300_000)
    out, _, ex = run(run_container(booted, ["sh", "-c", "cat | sha256sum"], stdin=data))
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert ex.exit_code == 0


def test_large_output_complete_and_in_order(booted: Sandbox, run: Runner) -> None:
    """20 MB through the credit-windowed stream: every byte, in order."""
    n = 20_000_000
    out, _, ex = run(run_container(booted, ["sh", "-c", f"seq 1 9999999 | head -c {n}"]))
    assert len(out) == n
    expected = "".join(f"{i}\n" for i in range(1, 3_000_000)).encode()[:n]
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert ex.exit_code == 0


def test_exec_signal_and_kill_exit_status(booted: Sandbox, run: Runner) -> None:
    c = cid()

    async def body() -> None:
        init = await booted.create_container(c, GUEST_ROOTFS, spec(["sleep", "1000"]))
        await booted.start_container(c)
        e = await booted.exec(c, "e1", spec(["sh", "-c", "echo in-container; exit 4"])["process"])
        out, _ = await e.output()
        assert out == b"in-container\n"
        assert (await e.wait()).exit_code == 4
        pids = await booted.list_processes(c)
        assert init.pid in pids
        st = await booted.stats(c)
        assert st.memory_bytes > 0 and st.pids >= 1
        await init.signal(signal.SIGKILL)
        ex = await init.wait()
        assert (ex.exit_code, ex.signal) == (137, 9)
        await booted.delete_container(c)

    run(body())


def test_container_processes_keep_address_randomisation(booted: Sandbox, run: Runner) -> None:
    """crun runs with a fixed layout (a TCG speed-up); the container's init and
    its execs must not inherit it: persona 0 and a stack somewhere new each time."""
    probe = "cat /proc/self/personality; grep stack /proc/self/maps"
    c = cid()

    async def body() -> list[bytes]:
        outs = [(await run_container(booted, ["sh", "-c", probe]))[0] for _ in range(2)]
        init = await booted.create_container(c, GUEST_ROOTFS, spec(["sleep", "1000"]))
        await booted.start_container(c)
        for n in range(2):
            e = await booted.exec(c, f"p{n}", spec(["sh", "-c", probe])["process"])
            outs.append((await e.output())[0])
            assert (await e.wait()).exit_code == 0
        await init.signal(signal.SIGKILL)
        await init.wait()
        await booted.delete_container(c)
        return outs

    outs = run(body())
    assert all(o.split(b"\n")[0] == b"00000000" for o in outs), outs
    stacks = {o.split(b"\n")[1].split()[0] for o in outs}
    assert len(stacks) == len(outs), outs


def test_seccomp_profile_compiled_on_the_host_is_enforced(booted: Sandbox, run: Runner) -> None:
    """The host compiles the profile (oci/seccomp.py) and crun in the guest
    loads it: the container runs filtered, and what the profile denies fails."""
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}],
    }
    sp = spec(["sh", "-c", "grep Seccomp: /proc/self/status; mkdir /tmp/x 2>&1"])
    sp["linux"]["seccomp"] = profile
    c = cid()

    async def body() -> bytes:
        proc = await booted.create_container(c, GUEST_ROOTFS, sp)
        await booted.start_container(c)
        out, _ = await proc.output()
        await proc.wait()
        await booted.delete_container(c)
        return out

    out = run(body())
    # errno 13 is the profile's (a read-only root would say so, not this)
    assert b"Seccomp:\t2" in out and b"Permission denied" in out, out


def test_start_is_once_and_only_for_a_live_created_init(booted: Sandbox, run: Runner) -> None:
    """The agent starts a created container itself (crun's exec fifo, no crun
    process); a second start, or one after the init died, gets crun's refusal."""
    live, dead = cid(), cid()

    async def body() -> None:
        p = await booted.create_container(live, GUEST_ROOTFS, spec(["echo", "started"]))
        await booted.start_container(live)
        assert (await p.output()) == (b"started\n", b"")
        assert (await p.wait()).exit_code == 0
        with pytest.raises(AgentError):
            await booted.start_container(live)
        await booted.delete_container(live)
        q = await booted.create_container(dead, GUEST_ROOTFS, spec(["echo", "never"]))
        await q.signal(signal.SIGKILL)
        assert (await q.wait()).signal == 9
        with pytest.raises(AgentError):
            await booted.start_container(dead)
        assert (await q.output()) == (b"", b"")
        await booted.delete_container(dead)
        await booted.ping()

    run(body())


def test_tty_process(booted: Sandbox, run: Runner) -> None:
    out, err, ex = run(
        run_container(booted, ["sh", "-c", "tty; stty size"], tty=True, rows=33, cols=101)
    )
    text = out.replace(b"\r\n", b"\n").decode()
    assert text.startswith("/dev/pts/")
    assert "33 101" in text
    assert err == b""
    assert ex.exit_code == 0


def test_agent_refusal_is_an_error_not_a_teardown(booted: Sandbox, run: Runner) -> None:
    with pytest.raises(AgentError, match="not found"):
        run(run_container(booted, ["/no/such/binary"]))
    run(booted.ping())  # the sandbox survives a refused request


def test_mount_tmpfs_in_guest(booted: Sandbox, run: Runner) -> None:
    run(booted.mount("tmpfs", "tmpfs", "/run/scratch-test", options=["size=1m"]))
    assert any(m.startswith("/run/scratch-test tmpfs") for m in run(booted.details()).mounts)


def test_memory_limit_oom_kill_is_reported(booted: Sandbox, run: Runner) -> None:
    s = spec(["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])
    s["linux"]["resources"] = {"memory": {"limit": 32 << 20}}

    async def body() -> None:
        c = cid()
        p = await booted.create_container(c, GUEST_ROOTFS, s)
        await booted.start_container(c)
        await p.output()
        ex = await p.wait()
        await booted.delete_container(c)
        assert (ex.exit_code, ex.signal, ex.oom_killed) == (137, 9, True)

    run(body())


def test_cpu_and_pids_limits_reach_the_cgroup(booted: Sandbox, run: Runner) -> None:
    s = spec(["sh", "-c", "cat /sys/fs/cgroup/cpu.max /sys/fs/cgroup/pids.max"])
    s["linux"]["resources"] = {"cpu": {"quota": 50000, "period": 100000}, "pids": {"limit": 64}}

    async def body() -> None:
        c = cid()
        p = await booted.create_container(c, GUEST_ROOTFS, s)
        await booted.start_container(c)
        out, err = await p.output()
        await p.wait()
        await booted.delete_container(c)
        assert out.split() == [b"50000", b"100000", b"64"], err

    run(body())


def test_bad_oci_spec_is_refused_in_one_line(booted: Sandbox, run: Runner) -> None:
    with pytest.raises(AgentError, match="spec must be an object with a process") as ei:
        run(booted.create_container(cid(), GUEST_ROOTFS, {"ociVersion": "1.0.2"}))
    assert "\n" not in str(ei.value)
    run(booted.ping())
