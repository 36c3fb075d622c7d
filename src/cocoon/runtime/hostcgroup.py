"""A container's host cgroup: where its VM's host processes live, as kubelet expects.

kubelet makes a cgroup per pod and reads what the pod costs there (stats,
eviction, its limits sized with the RuntimeClass overhead); the runtime is
expected to put the pod's processes in it, at the sandbox's
``linux.cgroupsPath``. runc puts the container's processes there; cocoon's
are the VM's: the monitor joins the cgroup (in every hierarchy) before it
boots, so QEMU, virtiofsd and the 9p servers it starts are born in it, and
the jail's memory and pids limits go on that same cgroup (hypervisor.cgroup)
instead of ``cocoon/<id>``. containerd's shim joins it too for the pod's
life (shim.service). The cgroup is removed by whichever goes last: the
container's ``delete`` (after its VM is reaped) or its monitor, which moves
itself to the root cgroup as it exits and removes it (``leave``). Its
parents (the pod's) are kubelet's.

Both drivers' path forms are taken: cgroupfs's ``/a/b`` and systemd's
``slice:prefix:name`` (``kubepods-besteffort-pod1.slice:cri-containerd:id``
is ``kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice
/cri-containerd-id.scope``, as runc's systemd driver lays it out). The dirs
are made directly, not through systemd's D-Bus API: the layout is the same,
and this host has no systemd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from cocoon.errors import OciError
from cocoon.hypervisor.cgroup import hierarchies

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
#: How long a delete waits for a killed monitor to leave the cgroup. A live
#: one (still serving a client: containerd's shim holds one until the
#: delete is done) removes the cgroup itself as it exits (``leave``).
REMOVE_WAIT_S = 2.0


def resolve(cgroups_path: str) -> str:
    """The spec's ``linux.cgroupsPath`` as a path below the hierarchies' roots
    ("" for none)."""
    if not cgroups_path.strip("/"):  # none, or the root: nothing to join
        return ""
    parts = cgroups_path.split(":")
    if len(parts) == 3 and not cgroups_path.startswith("/"):
        slice_, prefix, name = parts
        rel = str(Path(*_expand_slice(slice_ or "system.slice"), f"{prefix}-{name}.scope"))
    elif len(parts) == 1:
        rel = cgroups_path.strip("/")
    else:
        what = f"linux.cgroupsPath {cgroups_path[:200]!r}"
        raise OciError(f"{what} is neither a path nor slice:prefix:name")
    if not rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise OciError(f"linux.cgroupsPath {cgroups_path[:200]!r} is not a plain path")
    return rel


def _expand_slice(name: str) -> list[str]:
    """``a-b-c.slice`` -> ``a.slice``, ``a-b.slice``, ``a-b-c.slice`` (systemd's
    nesting of slices by their dashes)."""
    if not name.endswith(".slice") or "/" in name:
        raise OciError(f"linux.cgroupsPath: {name[:200]!r} is not a systemd slice")
    if name == "-.slice":
        return []
    words = name.removesuffix(".slice").split("-")
    if "" in words:
        raise OciError(f"linux.cgroupsPath: {name[:200]!r} is not a valid slice name")
    return ["-".join(words[: i + 1]) + ".slice" for i in range(len(words))]


def enter(rel: str, pid: int = 0) -> None:
    """Move ``pid`` (default: this process, all its threads) into the cgroup
    ``rel`` of every hierarchy, made as needed."""
    pid = pid or os.getpid()
    for top in hierarchies():
        d = top / rel
        try:
            d.mkdir(parents=True, exist_ok=True)
            if "cpuset" in top.name.split(","):
                _fill_cpuset(top, d)
            (d / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            raise OciError(f"cannot join host cgroup {d}: {e.strerror}") from e


def _fill_cpuset(top: Path, d: Path) -> None:
    """A v1 cpuset with no CPUs or nodes takes no task: new dirs inherit
    their parent's, from the top down."""
    chain = [top, *reversed([p for p in d.parents if top in p.parents]), d]
    for parent, child in zip(chain, chain[1:], strict=False):
        for f in ("cpuset.cpus", "cpuset.mems"):
            if not (child / f).read_text().strip():
                (child / f).write_text((parent / f).read_text())


def current() -> dict[Path, str]:
    """This process's cgroup in every hierarchy (to go back to with ``restore``)."""
    by_controllers: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        by_controllers[controllers] = path
    out: dict[Path, str] = {}
    for top in hierarchies():
        key = "" if top == ROOT or top.name == "unified" else top.name
        for controllers, path in by_controllers.items():
            names = controllers.split(",")
            if controllers == key or key in names or f"name={key}" in names:
                out[top] = path.lstrip("/")
    return out


def leave(rel: str) -> None:
    """A process's last act: out of the cgroup ``rel`` (to the root's, which
    takes any process) and the cgroup removed, if nobody else is left in it."""
    for top in hierarchies():
        with contextlib.suppress(OSError):
            (top / "cgroup.procs").write_text(str(os.getpid()))
    remove(rel, wait_s=0, quiet=True)


def restore(saved: dict[Path, str]) -> None:
    """Move this process back where ``current`` found it."""
    for top, rel in saved.items():
        with contextlib.suppress(OSError):
            (top / rel / "cgroup.procs").write_text(str(os.getpid()))


def remove(rel: str, wait_s: float = REMOVE_WAIT_S, *, quiet: bool = False) -> None:
    """Remove the cgroup ``rel`` (and any below it) in every hierarchy,
    waiting for the last of its processes to be gone; what outlives the wait
    is left and logged (with its processes), not an error: the monitor, if
    it is one of them, removes the cgroup as it exits."""
    deadline = time.monotonic() + wait_s
    left: set[str] = set()
    for top in hierarchies():
        d = top / rel
        if not d.is_dir():
            continue
        try:
            below = sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        except FileNotFoundError:
            continue  # removed while we looked: by the monitor, as it exits
        for sub in [*below, d]:
            while True:
                try:
                    sub.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        left |= _members(sub)
                        break
                    time.sleep(0.05)
    if left and not quiet:
        log.info("host cgroup %s is left: processes %s are still in it", rel, " ".join(left))


def _members(d: Path) -> set[str]:
    out = set()
    with contextlib.suppress(OSError):
        for pid in (d / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                out.add(f"{pid} ({Path(f'/proc/{pid}/comm').read_text().strip()})")
    return out
