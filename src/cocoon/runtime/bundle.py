"""An OCI bundle (config.json + rootfs dir) turned into what one VM needs.

The bundle is written for a host runtime; inside a VM some of it means
something else, and this module is the one place that decides what:
- the rootfs directory becomes a virtio-fs (or 9p) share; every bind-mounted
  host path is bind-mounted on the host under one more share, the container's
  binds dir, as ``<n>/<its base name>`` (read-only ones remounted read-only,
  so the host enforces them), and bound into the container from there: one
  virtiofsd for all of them, a bound file exposes that file and not its
  directory, and the container's mount table names what was bound;
- namespace paths name host namespaces the guest cannot see: checked (the
  path must be a namespace of the stated type, as runc and crun insist), then
  dropped, the guest's crun makes fresh ones (the VM is the boundary;
  networking of a given netns is plumbed to the VM's NIC by the network layer);
- hooks name host binaries: run on the host by the runtime, never in the guest;
- cgroup resources go to the guest's crun and also size the VM.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cocoon.errors import BundleError
from cocoon.hypervisor.base import Share
from cocoon.protocol import messages
from cocoon.runtime import hostcgroup
from cocoon.util import boundedjson, nsfs

if TYPE_CHECKING:  # the verbs that load a bundle's record need no VM machinery
    from cocoon.sandbox.sandbox import Sandbox

#: Guest kernel + agent headroom on top of the container's memory limit.
VM_OVERHEAD_MIB = 128
#: hypervisor.vcpus' bound.
MAX_VCPUS = 64
GUEST_BASE = "/run/cocoon/oci"
#: Where a pod's shared dir appears in its VM (its members' rootfs and binds).
POD_GUEST = "/run/cocoon/pod"
#: Where a container's binds dir appears in its VM.
BINDS_GUEST = f"{GUEST_BASE}/binds"
#: Host paths the guest has its own of: a bind from these stays the guest's.
GUEST_OWN = ("/dev", "/proc", "/sys")
#: config.json's size bound: podman's and containerd's are a few KB, tens with
#: a seccomp profile; what the guest gets must also fit one request (MAX_SPEC).
MAX_CONFIG = 4 << 20


@dataclass
class Bind:
    """One host path bind-mounted (by the runtime, on the host) where the VM sees it."""

    source: str
    target: Path
    readonly: bool
    recursive: bool = False


def bind_name(src: str) -> str:
    """The bind's base name, kept: the container's mount table shows it."""
    return os.path.basename(src.rstrip("/")) or "root"


@dataclass
class BundlePlan:
    bundle: Path
    spec: dict[str, Any]  # as the guest's crun gets it
    original: dict[str, Any]  # as the caller wrote it (hooks, annotations, state)
    shares: list[Share] = field(default_factory=list)
    guest_mounts: list[tuple[str, str, bool]] = field(default_factory=list)  # tag, target, ro
    #: Host bind mounts the runtime makes before the VM starts (and undoes).
    binds: list[Bind] = field(default_factory=list)
    rootfs_tag: str = "rootfs"
    readonly_rootfs: bool = False
    vcpus: int = 1
    memory_mib: int = 0
    terminal: bool = False
    #: The network namespace the caller made for the container (CNI, podman,
    #: containerd): where the VM's NICs must be plumbed to.
    netns_path: str = ""
    #: The spec's net.* sysctls when its network namespace is the VM's.
    net_sysctls: dict[str, str] = field(default_factory=dict)
    #: What was left out of the spec, for the caller's log.
    warnings: list[str] = field(default_factory=list)
    #: The spec's cgroupsPath, resolved: the VM's host processes live there
    #: (runtime.hostcgroup); "" for none.
    host_cgroup: str = ""

    async def setup(self, sb: Sandbox, fs: str) -> str:
        """Mount the shares in the guest; the container's rootfs path."""
        kind = "9p" if fs == "9p" else "virtiofs"
        for tag, target, ro in self.guest_mounts:
            await sb.mount(kind, tag, target, readonly=ro)
        return f"{GUEST_BASE}/rootfs"


def load(bundle: Path) -> dict[str, Any]:
    """config.json parsed and every field cocoon reads type- and range-checked:
    ``plan`` and the runtime's verbs rely on that."""
    path = bundle / "config.json"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror}") from e
    if len(raw) > MAX_CONFIG:
        raise BundleError(f"{path} is over {MAX_CONFIG >> 20} MiB")
    try:
        spec = boundedjson.loads(raw, max_bytes=MAX_CONFIG)
    except boundedjson.JSONError as e:
        raise BundleError(f"{path} is not usable JSON: {e}") from e
    if not isinstance(spec, dict):
        raise BundleError(f"{path}: not an OCI runtime spec")
    try:
        _SPEC(spec, "")
    except _Invalid as e:
        raise BundleError(f"{path}: {e}") from None
    return spec


# -- the fields cocoon reads, checked as runc's typed decoding would ------------

Check = Callable[[object, str], None]
I64 = (1 << 63) - 1
U64 = (1 << 64) - 1
#: The highest uid/gid: (uid_t)-1 means "unchanged" to the kernel.
MAX_ID = 0xFFFFFFFE


class _Invalid(ValueError):
    """One field of the spec is wrong; the message names it."""


def _string(value: object, where: str) -> None:
    if not isinstance(value, str):
        raise _Invalid(f"{where} must be a string")


def _path(value: object, where: str) -> None:
    """A host path: a string without NUL (which no system call takes)."""
    if not isinstance(value, str) or "\0" in value:
        raise _Invalid(f"{where} must be a path (a string without NUL bytes)")


def _boolean(value: object, where: str) -> None:
    if not isinstance(value, bool):
        raise _Invalid(f"{where} must be true or false")


def _integer(lo: int, hi: int) -> Check:
    def check(value: object, where: str) -> None:
        # bool is an int to Python, not to JSON; floats (NaN, 1e999) are no integers
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _Invalid(f"{where} must be an integer in [{lo}, {hi}]")

    return check


def _list(item: Check) -> Check:
    def check(value: object, where: str) -> None:
        if not isinstance(value, list):
            raise _Invalid(f"{where} must be a list")
        for i, x in enumerate(value):
            item(x, f"{where}[{i}]")

    return check


def _map(item: Check) -> Check:
    """An object of arbitrary keys whose values all pass ``item``."""

    def check(value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(f"{where} must be an object")
        for k, v in value.items():
            item(v, f"{where}.{k[:40]}")

    return check


def _fields(*fields: tuple[str, Check]) -> Check:
    """An object whose listed keys, where present and not null, pass their check;
    other keys are the guest's crun's to judge."""

    def check(value: object, where: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(f"{where or 'the spec'} must be an object")
        for key, sub in fields:
            v = value.get(key)
            if v is not None:
                sub(v, f"{where}.{key}" if where else key)

    return check


_ID = _integer(0, MAX_ID)
_STRINGS = _list(_string)
_PATHS = _list(_path)
_SPEC = _fields(
    ("process", _fields(
        ("terminal", _boolean), ("args", _STRINGS), ("env", _STRINGS), ("cwd", _string),
        ("user", _fields(("uid", _ID), ("gid", _ID), ("additionalGids", _list(_ID)))),
        ("capabilities", _map(_STRINGS)), ("noNewPrivileges", _boolean),
    )),
    ("root", _fields(("path", _path), ("readonly", _boolean))),
    ("mounts", _list(_fields(
        ("destination", _string), ("type", _string), ("source", _path), ("options", _STRINGS),
    ))),
    # Run on the host by cocoon-runtime: what subprocess needs, checked now, not at start.
    ("hooks", _map(_list(_fields(
        ("path", _path), ("args", _PATHS), ("env", _PATHS), ("timeout", _integer(1, 1 << 31)),
    )))),
    ("annotations", _map(_string)),
    ("linux", _fields(
        ("cgroupsPath", _string),
        ("namespaces", _list(_fields(("type", _string), ("path", _path)))),
        ("sysctl", _map(_string)),
        ("resources", _fields(
            ("memory", _fields(*((k, _integer(-1, I64)) for k in (
                "limit", "reservation", "swap", "kernel", "kernelTCP")))),
            ("cpu", _fields(
                ("quota", _integer(-1, I64)), ("period", _integer(0, U64)), ("cpus", _string),
            )),
        )),
    )),
)  # fmt: skip


def plan(
    bundle: Path, spec: dict[str, Any], *, binds_dir: Path, default_vcpus: int, default_mib: int
) -> BundlePlan:
    bundle = bundle.resolve()
    guest = copy.deepcopy(spec)
    root = guest.get("root") or {}
    rootfs = rootfs_of(bundle, root)
    ro_root = bool(root.get("readonly", False))
    p = BundlePlan(bundle=bundle, spec=guest, original=spec, readonly_rootfs=ro_root)
    p.terminal = bool((guest.get("process") or {}).get("terminal"))
    # Shared read-write even for root.readonly: like runc, the guest's crun makes
    # the mount points the spec needs (podman binds /etc/hosts) and only then
    # remounts the root read-only. The rootfs is the container's own layer.
    p.shares.append(Share("rootfs", rootfs, readonly=False))
    p.guest_mounts.append(("rootfs", f"{GUEST_BASE}/rootfs", False))

    def expose(src: str, ro: bool, recursive: bool) -> str:
        n, name = len(p.binds), bind_name(src)
        p.binds.append(Bind(src, binds_dir / str(n) / name, ro, recursive))
        return f"{BINDS_GUEST}/{n}/{name}"

    rewrite_binds(guest, expose)
    if p.binds:
        # Read-write: the read-only binds in it are read-only mounts on the host.
        p.shares.append(Share("binds", binds_dir, readonly=False))
        p.guest_mounts.append(("binds", BINDS_GUEST, False))
    finish(guest, p, default_vcpus, default_mib)
    p.host_cgroup = hostcgroup.resolve(str((spec.get("linux") or {}).get("cgroupsPath") or ""))
    return p


def rootfs_of(bundle: Path, root: dict[str, Any]) -> Path:
    """root.path, relative to the bundle unless absolute; it must be a directory."""
    rootfs = Path(root.get("path") or "rootfs")
    if not rootfs.is_absolute():
        rootfs = bundle / rootfs
    try:
        is_dir = rootfs.is_dir()
    except OSError as e:  # is_dir() is False only for a missing path, not a too long one
        raise BundleError(f"rootfs {str(rootfs)[:200]}: {e.strerror}") from e
    if not is_dir:
        raise BundleError(f"rootfs {str(rootfs)[:200]} is not a directory")
    return rootfs


def rewrite_binds(guest: dict[str, Any], expose: Callable[[str, bool, bool], str]) -> None:
    """Point every bind mount of a host path at where ``expose`` makes it
    appear in the guest (the guest's own /dev, /proc, /sys stay)."""
    for m in guest.get("mounts", []) or []:
        if not isinstance(m, dict):
            raise BundleError("mounts: every entry must be an object")
        opts = m.get("options") or []
        if m.get("type") != "bind" and "bind" not in opts and "rbind" not in opts:
            continue
        src = m.get("source", "")
        if not isinstance(src, str) or not os.path.isabs(src):
            raise BundleError(f"bind mount source {str(src)[:80]!r} must be an absolute path")
        if any(src == d or src.startswith(d + "/") for d in GUEST_OWN):
            continue
        if not os.path.exists(src):
            raise BundleError(f"bind mount source {src} does not exist")
        m["source"] = expose(src, "ro" in opts, "rbind" in opts)
        if "bind" not in opts and "rbind" not in opts:
            m["options"] = [*opts, "rbind"]


def finish(guest: dict[str, Any], p: BundlePlan, default_vcpus: int, default_mib: int) -> None:
    """What every plan shares: namespaces, hooks, VM size."""
    linux = guest["linux"] = guest.get("linux") or {}
    for ns in linux.get("namespaces", []) or []:
        if isinstance(ns, dict) and ns.get("path"):
            check_namespace_path(str(ns.get("type", "")), ns["path"])
        if isinstance(ns, dict) and ns.get("type") == "network" and ns.get("path"):
            p.netns_path = str(ns["path"])
    # A given network namespace is the VM's own (its NICs are plumbed to it), so
    # the container stays in the guest's; a fresh one stays fresh (loopback only).
    linux["namespaces"] = [
        {"type": ns["type"]}
        for ns in linux.get("namespaces", []) or []
        if isinstance(ns, dict)
        and isinstance(ns.get("type"), str)
        and not (ns["type"] == "network" and ns.get("path"))
    ]
    if p.netns_path:
        # The container shares the guest's network namespace (the VM's NICs are
        # the given namespace's): its net.* sysctls belong to the VM's.
        sysctl = linux.get("sysctl") or {}
        if isinstance(sysctl, dict):
            for k in [k for k in sysctl if isinstance(k, str) and k.startswith("net.")]:
                p.net_sysctls[k] = str(sysctl.pop(k))
    guest.pop("hooks", None)
    res = linux.get("resources") or {}
    memory = res.get("memory")
    if isinstance(memory, dict):
        # The guest's cgroups are v2, which has no kernel memory limits; runc
        # ignores them too (runtime-spec 1.1 deprecates memory.kernel).
        for key in ("kernel", "kernelTCP"):
            if memory.pop(key, None) is not None:
                p.warnings.append(f"linux.resources.memory.{key} ignored: cgroup v2 has none")
    mem = (res.get("memory") or {}).get("limit") or 0
    cpu = res.get("cpu") or {}
    vcpus = default_vcpus
    if cpu.get("quota") and cpu.get("period") and cpu["quota"] > 0:
        vcpus = max(vcpus, min(MAX_VCPUS, math.ceil(cpu["quota"] / cpu["period"])))
    # A container pinned to CPUs 0-3 needs a VM that has CPUs 0-3.
    vcpus = max(vcpus, min(MAX_VCPUS, cpuset_size(cpu.get("cpus"))))
    p.vcpus = vcpus
    p.memory_mib = max(default_mib, (int(mem) >> 20) + VM_OVERHEAD_MIB) if mem > 0 else 0
    size = len(json.dumps(guest))
    if size > messages.MAX_SPEC:
        raise BundleError(f"the spec is {size} B as the guest gets it, over {messages.MAX_SPEC} B")


def check_namespace_path(kind: str, path: object) -> None:
    """A namespace path must name a namespace of its entry's type (runtime-spec:
    "the runtime MUST generate an error" otherwise), even though the VM's
    container gets a fresh one: a wrong or dead path is the caller's mistake."""
    if kind not in nsfs.CLONE_FLAGS:
        raise BundleError(f"linux.namespaces: unknown type {kind[:40]!r}")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise BundleError(f"linux.namespaces: {kind} path must be an absolute path")
    try:
        got = nsfs.kind_of(path)
    except OSError as e:
        raise BundleError(f"{kind} namespace path {path[:200]}: {e.strerror}") from e
    if got != kind:
        what = f"a {got} namespace" if got else "not a namespace"
        raise BundleError(f"{kind} namespace path {path[:200]} is {what}")


def cpuset_size(cpus: object) -> int:
    """1 + the highest CPU a cpuset list ("0-3,6") names; 0 for none or garbage
    (the guest's crun then refuses what it cannot parse)."""
    if not isinstance(cpus, str):
        return 0
    top = -1
    for part in cpus.split(","):
        last = part.strip().rpartition("-")[2]
        if last.isascii() and last.isdigit() and len(last) < 6:  # "²".isdigit() too
            top = max(top, int(last))
    return top + 1


@dataclass
class MemberPlan:
    """A pod member: its rootfs and binds are bind-mounted on the host under
    the pod's shared dir (which propagates into the running VM's share: virtio-fs,
    or 9p when the pod's sandbox is a template clone)."""

    plan: BundlePlan
    binds: list[Bind]  # the rootfs first
    rootfs_guest: str


def plan_member(bundle: Path, spec: dict[str, Any], pod_dir: Path, key: str) -> MemberPlan:
    bundle = bundle.resolve()
    guest = copy.deepcopy(spec)
    root = guest.get("root") or {}
    rootfs = rootfs_of(bundle, root)
    p = BundlePlan(bundle=bundle, spec=guest, original=spec)
    p.readonly_rootfs = bool(root.get("readonly", False))
    p.terminal = bool((guest.get("process") or {}).get("terminal"))
    binds = [Bind(str(rootfs), pod_dir / key / "rootfs", False)]

    def expose(src: str, ro: bool, recursive: bool) -> str:
        n, name = len(binds), bind_name(src)
        binds.append(Bind(src, pod_dir / key / f"m{n}" / name, ro, recursive))
        return f"{POD_GUEST}/{key}/m{n}/{name}"

    rewrite_binds(guest, expose)
    finish(guest, p, 1, 0)
    return MemberPlan(p, binds, f"{POD_GUEST}/{key}/rootfs")
