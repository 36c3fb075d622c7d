"""The 9p file server's seccomp filter (hypervisor/qemu/sharejail.py): the
program read by a small classic-BPF interpreter for every case, and installed
for real in a child process."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cocoon.hypervisor.qemu import sharejail as sj

I386 = 0x40000003
SRC = str(Path(sj.__file__).parents[3])


def verdict(nr: int, arch: int = sj.AUDIT_ARCH_X86_64, arg0: int = 0) -> int:
    """What the filter returns for one call: the loads, jumps and returns it uses."""
    prog = sj.program()
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    pc, acc = 0, 0
    while True:
        op, jt, jf, k = struct.unpack_from("<HBBI", prog, pc * 8)
        pc += 1
        if op == sj.LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif op == sj.RET_K:
            return k
        else:
            taken = {sj.JEQ_K: acc == k, sj.JGE_K: acc >= k, sj.JSET_K: bool(acc & k)}[op]
            pc += jt if taken else jf


DENIED = sj.RET_ERRNO | sj.EPERM


@pytest.mark.parametrize("name", sorted(sj.DENY))
def test_each_denied_call_is_eperm(name: str) -> None:
    assert verdict(sj.DENY[name]) == DENIED


@pytest.mark.parametrize("nr", [0, 1, 2, 59, 72, 105, 117, 119, 126, 133, 161, 257, 322])
def test_what_the_server_does_is_allowed(nr: int) -> None:
    """read, write, open, execve, fcntl, setuid, setresuid, setresgid,
    capset, mknod, chroot, openat, execveat: its job, and tini's."""
    assert verdict(nr) == sj.RET_ALLOW


def test_clone_may_fork_but_not_make_a_namespace() -> None:
    assert verdict(sj.SYS_CLONE, arg0=signal.SIGCHLD | 0x01200000) == sj.RET_ALLOW
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                 0x40000000):  # fmt: skip
        assert verdict(sj.SYS_CLONE, arg0=signal.SIGCHLD | flag) == DENIED, hex(flag)
    assert verdict(sj.SYS_CLONE3) == sj.RET_ERRNO | sj.ENOSYS


def test_other_abis_are_refused() -> None:
    """x32's numbers are the same calls by another name; i386's (int 0x80)
    are other numbers altogether: the filter could not read them right."""
    assert verdict(sj.X32_SYSCALL_BIT | 101) == DENIED
    assert verdict(sj.X32_SYSCALL_BIT | 0) == DENIED
    assert verdict(0, arch=I386) == sj.RET_KILL_PROCESS


def test_installed_it_refuses_and_allows_for_real() -> None:
    """Root, so without the filter every one of these would succeed."""
    code = f"""
import ctypes, errno, json, os, subprocess, sys
sys.path.insert(0, {SRC!r})
from cocoon.hypervisor.qemu import sharejail as sj
libc = ctypes.CDLL(None, use_errno=True)
sj.install(sj.program())
out = {{}}
def attempt(name, rc):
    out[name] = "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()]
attempt("unshare", libc.unshare(0x00020000))
attempt("ptrace", libc.ptrace(0, 0, None, None))
attempt("clone3", libc.syscall(435, None, 0))
out["fork_exec"] = subprocess.run(["/bin/sh", "-c", "exit 3"]).returncode
out["seccomp"] = open("/proc/self/status").read().split("Seccomp:")[1].split()[0]
print(json.dumps(out))
"""
    p = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got == {"unshare": "EPERM", "ptrace": "EPERM", "clone3": "ENOSYS", "fork_exec": 3,
                   "seccomp": "2"}  # fmt: skip


def test_the_program_fits_classic_bpf() -> None:
    prog = sj.program()
    assert len(prog) % 8 == 0 and len(prog) // 8 < 4096
