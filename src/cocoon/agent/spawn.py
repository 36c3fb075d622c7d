"""Starting helper programs (crun, mount) from the agent.

posix_spawn rather than subprocess: the reaper owns waitpid, and Popen would
race it for the exit status (subprocess is also a costly import at boot).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import threading
import time

from cocoon.agent.reaper import Exit, Reaper, exit_code

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
OUTPUT_CAP = 64 << 10


_libc = ctypes.CDLL(None, use_errno=True)
ADDR_NO_RANDOMIZE = 0x0040000
_QUERY = 0xFFFFFFFF
_layout = threading.Lock()


def spawn(
    argv: list[str], reaper: Reaper, stdio: tuple[int, int, int], fixed_layout: bool = False
) -> tuple[int, Exit]:
    """Start argv in its own session with stdio as fds 0/1/2; return (pid, its Exit).

    ``fixed_layout`` starts it without address-space randomisation. Under TCG
    QEMU finds a translated block by its virtual address, so a crun whose
    libraries land somewhere new each time is translated afresh each time:
    crun create took 0.25 s in a pooled sandbox, and 0.04 s with crun mapped
    where the warm-up container's crun was. Only crun's own code runs so: the
    spec's personality (see containers.create) gives the container's processes
    their randomisation back before crun execs them. The persona is a
    thread's, so only the calling thread's children see it."""
    actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(stdio)]
    if not fixed_layout:
        pid = os.posix_spawnp(argv[0], argv, ENV, file_actions=actions, setsid=True)
    else:
        with _layout:
            old = _libc.personality(_QUERY)
            _libc.personality(old | ADDR_NO_RANDOMIZE)
            try:
                pid = os.posix_spawnp(argv[0], argv, ENV, file_actions=actions, setsid=True)
            finally:
                _libc.personality(old)
    reaper.spawned()
    return pid, reaper.expect(pid)


def run(argv: list[str], reaper: Reaper, timeout_s: float = 60.0) -> tuple[int, str]:
    """Run to completion; return (exit code, combined output tail). Kills on timeout."""
    r, w = os.pipe()
    try:
        devnull = os.open("/dev/null", os.O_RDONLY)
        try:
            pid, ex = spawn(argv, reaper, (devnull, w, w))
        finally:
            os.close(w)
            os.close(devnull)
        deadline = time.monotonic() + timeout_s
        poller = select.poll()
        poller.register(r, select.POLLIN)
        out = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000 + 1):
                _timed_out(argv, pid, timeout_s)
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
            if len(out) > OUTPUT_CAP:
                del out[: len(out) - OUTPUT_CAP]
    finally:
        os.close(r)
    status = ex.wait(max(0.0, deadline - time.monotonic()))
    if status is None:
        _timed_out(argv, pid, timeout_s)
    code, _ = exit_code(status)
    return code, out.decode(errors="replace")


def _timed_out(argv: list[str], pid: int, timeout_s: float) -> NoReturn:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, 9)
    raise TimeoutError(f"{argv[0]} did not finish within {timeout_s:g} s")
