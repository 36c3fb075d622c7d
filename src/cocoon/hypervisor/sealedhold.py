"""Hold one template's RAM in a sealed memfd for as long as the template lasts.

Run as ``python3 -I -S sealedhold.py RAM RECORD`` (standard library only) by
hypervisor.sealed. A jailed QEMU must map its template's RAM privately, yet
QEMU 7.2 opens a memory-backend-file read-write whatever the mapping: given
the template file, a compromised VMM could write into the RAM every other
clone maps. So it gets this memfd instead (as /proc/self/fd/N): the same
bytes, sealed against writes, growth and shrinking, so no one can change it,
while a private mapping still gives each clone its own copy-on-write pages
and every clone of the template shares the clean ones.

The record (pid, the memfd's fd number, the RAM file's stamp) is written once
the memfd is sealed; the holder exits when the template's RAM file is gone or
replaced, when its record is (gc, or a successor after a crash), when no
clone has mapped the memfd for IDLE_S, or on SIGTERM. Clones that mapped the
memfd keep it. The memfd holds the template's touched RAM (~70 MiB for 256
MiB) in shared memory, once per template.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import sys
import time

MFD_ALLOW_SEALING = 2
F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8
SEEK_DATA, SEEK_HOLE = 3, 4
POLL_S = 2.0
#: A copy no clone has mapped for this long is let go (the next clone makes
#: another in ~70 ms): its ~70 MiB are not kept for templates nobody uses.
IDLE_S = 60.0


def stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def sealed_copy(path: str) -> int:
    """A memfd with ``path``'s bytes (holes stay holes), sealed."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.memfd_create(b"cocoon-template-ram", MFD_ALLOW_SEALING | 1)  # | MFD_CLOEXEC
    if fd < 0:
        raise OSError(ctypes.get_errno(), "memfd_create")
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        os.ftruncate(fd, size)
        off = 0
        while off < size:
            try:
                data = os.lseek(src, off, SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(src, data, SEEK_HOLE)
            pos = data
            while pos < hole:
                os.lseek(fd, pos, os.SEEK_SET)
                sent = os.sendfile(fd, src, pos, hole - pos)
                if sent <= 0:
                    raise OSError("short copy of the template's RAM")
                pos += sent
            off = hole
    finally:
        os.close(src)
    fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL)
    return int(fd)


def _mapped(ino: int) -> bool:
    """Whether any process maps our memfd (a clone's QEMU)."""
    needle = f" {ino} "
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "memfd:cocoon-template-ram" in line and needle in line:
                        return True
        except OSError:
            continue
    return False


def _ours(record: str) -> bool:
    """Our record is still in place (not removed, not another holder's)."""
    try:
        with open(record) as f:
            return bool(json.load(f).get("pid") == os.getpid())
    except (OSError, ValueError):
        return False


def to_root_cgroups() -> None:
    """Out of the cgroups of the start that needed us (a pod's, which goes
    with the pod: runtime.hostcgroup) into each hierarchy's root, before the
    copy: the memfd's pages are charged where they are first written, and
    they belong to every clone of the template, not to one pod."""
    top = "/sys/fs/cgroup"
    tops = [top] if os.path.exists(f"{top}/cgroup.controllers") else [
        f"{top}/{d}" for d in sorted(os.listdir(top)) if os.path.exists(f"{top}/{d}/cgroup.procs")
    ]  # fmt: skip
    for d in tops:
        try:
            with open(f"{d}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            pass  # not ours to move (an unprivileged cocoon): stay


def main() -> None:
    ram, record = sys.argv[1], sys.argv[2]
    if os.fork() > 0:  # outlive the start that needed us, as nobody's child
        os._exit(0)
    os.setsid()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    to_root_cgroups()
    made = stamp(ram)
    fd = sealed_copy(ram)
    tmp = f"{record}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "fd": fd, "stamp": made}, f)
    os.rename(tmp, record)
    ino = os.fstat(fd).st_ino
    last_used = time.monotonic()
    polls = 0
    while stamp(ram) == made and _ours(record):
        time.sleep(POLL_S)
        polls += 1
        if polls % int(IDLE_S / POLL_S / 4) == 0:  # a /proc walk: every quarter of IDLE_S
            if _mapped(ino):
                last_used = time.monotonic()
            elif time.monotonic() - last_used > IDLE_S:
                break
    try:  # the record, unless a successor's replaced it
        with open(record) as f:
            if json.load(f).get("pid") == os.getpid():
                os.unlink(record)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    main()
