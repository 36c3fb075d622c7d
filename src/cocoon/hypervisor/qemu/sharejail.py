"""A share's file server (virtiofsd, virtfs-proxy-helper) in a jail of its own.

The file server runs as root, because it must give the guest's files their
owners on the host; the guest on the other end is untrusted. So the backend
starts it with ``child_setup``'s jail entered in the forked child before its
exec (subprocess's ``preexec_fn``: the launcher's own interpreter, already
loaded, not a ``python3`` of its own, which was ~20 ms of every start with a
host directory). In order, then exec (same pid: what the backend recorded is
the server):

- a new mount namespace with every mount private (nothing propagates back to
  the host) or, with ``slave``, a slave of the host's (nothing propagates
  back either, but mounts the host makes later under a shared DIR reach the
  server: a pooled sandbox's hub), and DIR bound onto itself nosuid and nodev (read-only too with
  ``readonly``: QEMU 7.2's C virtiofsd has no read-only option, and a ``ro``
  mount inside the guest is a request, not a guarantee). These mounts exist
  only in the server's namespace and vanish with it: no host mount to
  record, to leak after a crash, or for a later ``rm -r`` to descend into.
  A read-only bind is not recursive on purpose: a recursive bind would carry
  DIR's submounts along *writable* (a remount applies to one mount only), so
  mounts below DIR show as empty directories instead. A writable one is
  recursive: an OCI bundle's binds dir is a tree of bind mounts.
- ``isolate``: new network, IPC and UTS namespaces too (virtiofsd makes its
  own; virtfs-proxy-helper, which only chroots, does not).
- ``pid_ns``: a new pid namespace for what the program forks. It is then
  tini, which forks the server as pid 1 there (the backend records both, as
  it does a jailed QEMU and its tini): the server cannot name, let alone
  signal or trace, any process of the host.
- ``caps``: every capability but these dropped from the bounding set, and
  no_new_privs: the server can never regain what it does not need.
- ``seccomp``: the deny-list filter below, installed last, right before
  the exec, and inherited by everything the program runs (virtiofsd has its
  own).

The child runs only this module's system calls, nothing that takes a lock
another thread of the parent might have held at the fork; a failure is one
line on its stderr (the server's log) and exit 125.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from collections.abc import Callable

from cocoon.errors import HypervisorError

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
LAST_CAP = 63  # unknown ones fail with EINVAL and are skipped
CAPS = {
    "chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4,
    "setgid": 6, "setuid": 7, "setpcap": 8, "sys_chroot": 18, "mknod": 27,
}  # fmt: skip


class JailError(Exception):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def enter(path: str, readonly: bool, isolate: bool, slave: bool, pid_ns: bool = False) -> None:
    """Give this process its own view of ``path`` (and namespaces with ``isolate``;
    a pid namespace for its children with ``pid_ns``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    src = os.fsencode(path)
    flags = CLONE_NEWNS | (CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS if isolate else 0)
    flags |= CLONE_NEWPID if pid_ns else 0
    _check(libc.unshare(flags), "unshare")
    how = MS_SLAVE if slave else MS_PRIVATE
    _check(libc.mount(None, b"/", None, MS_REC | how, None), "make / rprivate or rslave")
    _check(libc.mount(src, src, None, MS_BIND | (0 if readonly else MS_REC), None), f"bind {path}")
    remount = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    _check(libc.mount(None, src, None, remount, None), f"remount {path}")
    if readonly and not os.statvfs(path).f_flag & os.ST_RDONLY:
        raise JailError(f"{path} is still writable after the remount")


def limit(keep: set[int]) -> None:
    """Bound the capabilities the exec'd server can hold to ``keep``; no_new_privs."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(LAST_CAP + 1):
        if cap in keep or libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
            continue
        if ctypes.get_errno() != 22:  # EINVAL: no such capability on this kernel
            _check(-1, f"drop capability {cap}")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


# The file server's seccomp filter (--seccomp), in the spirit of QEMU's
# -sandbox: a deny-list of what serving files never needs and what an
# attacker who took the server over would reach for first, the way out of
# its namespaces and into the kernel's less-used code. What it cannot do:
# the server's own work (open, mknod, chown, setresuid/setresgid to each
# file's owner, capset, its one chroot into the share) is the attacker's too,
# and execve stays allowed, because a classic filter keeps no state and cannot
# tell tini's exec of the server from a later one. no_new_privs, the bounding
# set and the share's nosuid mount make such an exec gain nothing.

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
#: struct seccomp_data: nr, arch, instruction pointer, then 6 64-bit args.
DATA_NR, DATA_ARCH, DATA_ARG0 = 0, 4, 16
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
EPERM, ENOSYS = 1, 38
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
#: Every namespace clone(2) can create: an attacker's way out of ours.
CLONE_NAMESPACES = 0x7E020000
#: x86_64 numbers of the calls refused with EPERM.
DENY = {
    # other processes' memory and fds
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "pidfd_getfd": 438,
    # mounts and namespaces (the old mount calls and the new file-system API)
    "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272, "setns": 308,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442,
    # the kernel itself: modules, kexec, BPF, perf, keys, swap, reboot
    "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
    "kexec_file_load": 320, "bpf": 321, "perf_event_open": 298, "keyctl": 250,
    "add_key": 248, "request_key": 249, "swapon": 167, "swapoff": 168, "reboot": 169,
    # memory tricks, execution domains, io_uring (its operations bypass the filter)
    "userfaultfd": 323, "personality": 135, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427,
    # file handles (a chroot's classic way out), host-wide settings, obsolete calls
    "open_by_handle_at": 304, "name_to_handle_at": 303, "acct": 163, "quotactl": 179,
    "quotactl_fd": 443, "syslog": 103, "settimeofday": 164, "clock_settime": 227,
    "clock_adjtime": 305, "adjtimex": 159, "sethostname": 170, "setdomainname": 171,
    "iopl": 172, "ioperm": 173, "vhangup": 153, "fanotify_init": 300, "lookup_dcookie": 212,
    "_sysctl": 156, "uselib": 134, "create_module": 174, "get_kernel_syms": 177,
    "query_module": 178, "nfsservctl": 180,
}  # fmt: skip
SYS_CLONE = 56
#: Its flags are in a struct a filter cannot read: "no such call" makes
#: glibc fall back to clone(2), whose flags it can.
SYS_CLONE3 = 435


Insn = tuple[int, int | str, int | str, int]


def _assemble(code: list[Insn], labels: dict[str, int]) -> bytes:
    """Classic BPF, jump targets given as labels (forward only, as BPF wants)."""
    out = b""
    for at, (op, jt, jf, k) in enumerate(code):
        offsets = [labels[j] - at - 1 if isinstance(j, str) else j for j in (jt, jf)]
        if not all(0 <= o <= 255 for o in offsets):
            raise ValueError(f"jump out of range at instruction {at}")
        out += struct.pack("<HBBI", op, offsets[0], offsets[1], k)
    return out


def program() -> bytes:
    """The filter: any ABI but x86_64's kills the process, x32's numbers and
    DENY are EPERM, clone(2) making a namespace is EPERM, clone3 is ENOSYS."""
    if platform.machine() != "x86_64":
        raise HypervisorError(
            f"the file server's seccomp filter is written for x86_64, "
            f"not {platform.machine()}: refusing to start it unfiltered"
        )
    code: list[Insn] = [
        (LD_W_ABS, 0, 0, DATA_ARCH),
        (JEQ_K, 0, "kill", AUDIT_ARCH_X86_64),
        (LD_W_ABS, 0, 0, DATA_NR),
        (JGE_K, "deny", 0, X32_SYSCALL_BIT),
        *((JEQ_K, "deny", 0, nr) for nr in sorted(DENY.values())),
        (JEQ_K, "clone", 0, SYS_CLONE),
        (JEQ_K, "enosys", 0, SYS_CLONE3),
        (RET_K, 0, 0, RET_ALLOW),
    ]
    labels = {"clone": len(code)}
    code += [(LD_W_ABS, 0, 0, DATA_ARG0), (JSET_K, "deny", 0, CLONE_NAMESPACES),
             (RET_K, 0, 0, RET_ALLOW)]  # fmt: skip
    for name, ret in (("deny", RET_ERRNO | EPERM), ("enosys", RET_ERRNO | ENOSYS),
                      ("kill", RET_KILL_PROCESS)):  # fmt: skip
        labels[name] = len(code)
        code.append((RET_K, 0, 0, ret))
    return _assemble(code, labels)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install(prog: bytes) -> None:
    """Apply ``prog`` to this process and all it execs (no_new_privs first:
    the kernel wants it, and nothing may gain privileges past the filter)."""
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    fprog = _SockFprog(len(prog) // 8, prog)
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


def child_setup(
    path: str,
    *,
    readonly: bool = False,
    isolate: bool = False,
    slave: bool = False,
    pid_ns: bool = False,
    seccomp: bool = False,
    caps: set[str] | None = None,
) -> Callable[[], None]:
    """The jail of a file server serving ``path``, for the child to enter
    before its exec (what each option does: the module's docstring). What
    can be refused is refused here, in the parent, before anything starts."""
    if not os.path.isabs(path):
        raise HypervisorError(f"a share's path must be absolute: {path}")
    prog = program() if seccomp else b""
    unknown = sorted((caps or set()) - CAPS.keys())
    if unknown:
        raise HypervisorError(f"unknown capability {unknown[0]}")
    keep = None if caps is None else {CAPS[name] for name in caps}

    def setup() -> None:  # pragma: no cover - runs in the forked child
        try:
            enter(path, readonly, isolate, slave, pid_ns)
            if keep is not None:
                limit(keep)
            if prog:
                install(prog)
        except BaseException as e:  # noqa: BLE001 - the child must never run half-jailed
            os.write(2, f"cocoon sharejail: {e}\n".encode(errors="replace"))
            os._exit(125)

    return setup
