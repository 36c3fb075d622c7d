"""Find and reap what crashed cocoon processes left behind.

A sandbox whose ``owner.lock`` nobody holds has lost its owner (killed, crashed):
its recorded processes are killed (pid + start time, so a recycled pid is never
hit), then any process whose command line still names the sandbox dir (a QEMU
spawned just before the crash, before its pid was written), then what it
made on the host outside its dir (scratch images), then the dir.

Scratch images live in the data dir, which outlives a reboot while the state
root (a tmpfs) does not: given the data dir, ``reap`` also removes scratch dirs
stamped with this root whose sandbox dir is gone.

``release_host`` and ``remove_dir`` are also how ``Sandbox.destroy`` ends a
sandbox: one code path for an owner's teardown and a reaper's, kept here, below
the sandbox, so that the sandbox uses gc and gc never needs the sandbox.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from cocoon import network as net
from cocoon.errors import CocoonError, SandboxError
from cocoon.hypervisor import cgroup, jail
from cocoon.state.store import SandboxDir, SandboxState, list_ids
from cocoon.storage import hub, scratch
from cocoon.util.fs import mount_points_under
from cocoon.util.proc import alive


@dataclass
class SandboxInfo:
    id: str
    status: str
    owned: bool
    processes: dict[str, int]
    live: dict[str, bool]
    created_at: float
    accel: str


def describe(root: Path) -> list[SandboxInfo]:
    out = []
    for sid in list_ids(root):
        sdir = SandboxDir(root, sid)
        try:
            st = sdir.read()
            procs = {k: v.pid for k, v in st.processes.items()}
            live = {k: alive(v.pid, v.start_time) for k, v in st.processes.items()}
            out.append(
                SandboxInfo(sid, st.status, sdir.owned(), procs, live, st.created_at, st.accel)
            )
        except CocoonError:
            out.append(SandboxInfo(sid, "corrupt", sdir.owned(), {}, {}, 0.0, ""))
    return out


def processes_naming(root: Path) -> dict[int, str]:
    """pid -> sandbox id for every process whose argv names a sandbox dir."""
    marker = (str(root) + "/sandboxes/").encode()
    found: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read(65536)
        except OSError:
            continue
        i = cmd.find(marker)
        if i < 0:
            continue
        rest = cmd[i + len(marker) :]
        sid = rest.split(b"/", 1)[0].split(b"\0", 1)[0].split(b",", 1)[0]
        found[int(name)] = sid.decode(errors="replace")
    return found


def _kill_and_wait(pids: list[int], timeout_s: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(alive(p, None) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def reap(
    root: Path, *, only: str | None = None, force: bool = False, data: Path | None = None
) -> list[str]:
    """Reap stale sandboxes (or ``only`` one; ``force`` even if owned). Returns ids reaped.

    With ``data`` (the data dir), scratch dirs of this root left without a
    sandbox (a reboot emptied the root) are removed too.
    """
    reaped = []
    if data is not None and only is None:
        stamped = scratch.stamped(data, root)  # before listing sandboxes: see stamped()
        live = set(list_ids(root))
        for sid, path in stamped.items():
            if sid not in live:
                scratch.remove_dir(path)
    naming = processes_naming(root)
    ids = set(list_ids(root)) | set(naming.values())
    for sid in sorted(ids):
        if only is not None and sid != only:
            continue
        try:
            sdir = SandboxDir(root, sid)
        except CocoonError:
            continue
        if sdir.owned() and not force:
            continue
        # One reaper per sandbox at a time (two `cocoon gc` racing each other).
        with sdir.locked():
            pids = []
            st = None
            with contextlib.suppress(CocoonError):
                st = sdir.read()
                pids += [r.pid for r in st.processes.values() if alive(r.pid, r.start_time)]
            pids += [p for p, s in naming.items() if s == sid]
            _kill_and_wait(sorted(set(pids)))
            if st is not None:
                release_host(st, root)
            remove_dir(sdir.path)
        reaped.append(sid)
    if only is None:  # uids of sandboxes whose every trace is gone (a crash mid-create)
        live = set(list_ids(root))
        jail.sweep(root, live)
        cgroup.sweep(live)
        hub.sweep(root, live)
    return reaped


def release_host(st: SandboxState, root: Path) -> None:
    """Delete what the sandbox made on the host outside its state dir (VM already gone)."""
    if st.scratch_dir:
        scratch.remove_dir(Path(st.scratch_dir))
    if st.network:
        net.release(st.network, st.id)
    if st.jail_uid:
        cgroup.remove(st.id)
        jail.release(root, st.jail_uid, st.id)
    if st.hub:  # QEMU and its file server are gone: nothing holds the binds
        hub.remove(Path(st.hub))


def remove_dir(path: Path) -> None:
    """Remove a sandbox dir (sockets, logs, state) without leaving it for anything else.

    Never follows a symlink, never crosses into another file system or into a
    mount point (bind mounts of the same file system included): whatever is
    mounted below a state dir may be a user's own directory. Such a dir is left
    in place and reported, so nothing of the user's is ever deleted.
    """
    if not os.path.lexists(path):
        return
    top = os.path.realpath(path)
    mounts = set(mount_points_under(top))
    if top in mounts:
        raise SandboxError(f"{top} is a mount point: not removing it; unmount it first")
    dev = os.lstat(top).st_dev
    refused: list[str] = []

    def empty(d: str) -> bool:
        clean = True
        with os.scandir(d) as it:
            entries = list(it)
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if e.path in mounts or e.stat(follow_symlinks=False).st_dev != dev:
                        refused.append(e.path)
                        clean = False
                    elif empty(e.path):
                        os.rmdir(e.path)
                    else:
                        clean = False
                else:
                    os.unlink(e.path)
            except FileNotFoundError:
                continue
        return clean

    if empty(top):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(top)
    if refused:
        raise SandboxError(
            f"{refused[0]} is a mount point: left in place with {top}; unmount it, then `cocoon gc`"
        )
