"""Volumes for `cocoon run`: docker's -v, --mount and --tmpfs, plus sized scratch.

Three kinds, each reaching the container in two hops (host -> guest, then a
bind from the guest into the container through the OCI spec's ``mounts``):

- ``bind``: a host directory, shared over virtio-fs (one virtiofsd each) or
  9p (``hypervisor.shared_fs``). Read-only is enforced on the host, since the
  guest is untrusted: virtiofsd serves a read-only bind mount that exists only
  in its own mount namespace (``hypervisor/qemu/sharejail``), QEMU's 9p has
  ``readonly=on``. The guest mounts it read-only too, for a plain EROFS.
- ``scratch``: an empty ext4 of a fixed size on a sparse host file, attached as
  virtio-blk (an EmptyDir with a quota: one tenant cannot fill the host's disk).
  The sandbox creates and deletes the file (``storage/scratch.py``).
- ``tmpfs``: a tmpfs in the container, in guest memory; no host side at all.

Parsing is separate from planning so the CLI refuses a bad flag before any VM
boots; ``prepare`` is pure (what to give the VM, mount in the guest, add to the
spec), ``apply`` does the guest mounts once the sandbox is up.
"""

from __future__ import annotations

import csv
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import VolumeError
from cocoon.hypervisor.base import Share
from cocoon.sandbox.sandbox import Sandbox
from cocoon.storage.scratch import MIN_SIZE_BYTES, ScratchDisk
from cocoon.util.units import parse_size

KINDS = ("bind", "tmpfs", "scratch")
#: ext4 with 4 KiB blocks and no 64bit feature stops at 16 TiB.
MAX_SCRATCH_BYTES = 16 << 40
#: Where the guest mounts each volume before crun binds it into the container.
GUEST_DIR = "/run/cocoon/v"
#: docker's defaults for --tmpfs; ``exec``, ``suid``, ``dev`` lift them.
TMPFS_DEFAULTS = ("noexec", "nosuid", "nodev")
TMPFS_FLAGS = {"exec": "noexec", "suid": "nosuid", "dev": "nodev"}


@dataclass(frozen=True)
class VolumeSpec:
    """One volume as the user asked for it, checked."""

    kind: str
    target: str
    #: bind: the host directory, absolute and resolved.
    source: Path | None = None
    readonly: bool = False
    #: scratch: the size (required); tmpfs: 0 = the guest's default (half its RAM).
    size_bytes: int = 0
    #: tmpfs: permission bits of its root (None = 1777).
    mode: int | None = None
    #: tmpfs: flags lifted from the defaults (``exec``, ``suid``, ``dev``).
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestMount:
    kind: str
    source: str
    target: str
    fstype: str = ""
    readonly: bool = False


@dataclass
class VolumePlan:
    """Everything a sandbox needs for a list of volumes, decided before it boots."""

    shares: list[Share] = field(default_factory=list)
    scratch: list[ScratchDisk] = field(default_factory=list)
    guest_mounts: list[GuestMount] = field(default_factory=list)
    oci_mounts: list[dict[str, Any]] = field(default_factory=list)


# -- parsing -----------------------------------------------------------------


def check_target(path: str) -> str:
    """An absolute, normalized container path other than ``/``."""
    if not path:
        raise VolumeError("a volume needs a container path")
    if any(c in path for c in "\0\n") or len(path) > 4096:
        raise VolumeError(f"invalid container path {path[:80]!r}")
    if not path.startswith("/"):
        raise VolumeError(f"container path {path[:80]!r} must be absolute")
    if ".." in path.split("/"):
        raise VolumeError(f"container path {path[:80]!r} must not contain '..'")
    norm = "/" + posixpath.normpath(path).lstrip("/")
    if norm == "/":
        raise VolumeError("cannot mount a volume over the container's /")
    return norm


def check_source(path: str) -> Path:
    """An existing host directory, absolute and with symlinks resolved.

    Directories only: virtio-fs and 9p share directories, and sharing a file's
    parent to reach the file would hand the guest its siblings too.
    A path swapped between this check and virtiofsd's start is the host
    user's own doing: the guest never names host paths.
    """
    if not path:
        raise VolumeError("a bind volume needs a host path")
    if "\0" in path or "\n" in path:
        raise VolumeError(f"invalid host path {path[:80]!r}")
    real = Path(os.path.realpath(path))
    if "," in str(real):
        # virtiofsd reads its -o source=... as a comma-separated option list.
        raise VolumeError(f"host path {path[:200]} contains ',': not supported")
    if not real.exists():
        raise VolumeError(f"host path {path[:200]} does not exist")
    if not real.is_dir():
        raise VolumeError(f"host path {path[:200]} is not a directory: only directories")
    return real


def _size(text: str, what: str, minimum: int, maximum: int) -> int:
    try:
        n = parse_size(text)
    except ValueError:
        raise VolumeError(f"invalid {what} {text[:40]!r}: use e.g. 64m or 1g") from None
    if n < minimum:
        least = f"{minimum >> 20}m" if minimum >= 1 << 20 else f"{minimum} byte"
        raise VolumeError(f"{what} {text[:40]} is too small: at least {least}")
    if n > maximum:
        raise VolumeError(f"{what} {text[:40]} is too large: at most {maximum >> 40}t")
    return n


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise VolumeError(f"invalid mode {text[:20]!r}: use octal, e.g. 1777") from None
    if not 0 <= mode <= 0o7777:
        raise VolumeError(f"invalid mode {text[:20]!r}: use octal, e.g. 1777")
    return mode


def _bool(key: str, value: str | None) -> bool:
    if value is None or value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise VolumeError(f"invalid {key}={value[:20]!r}: use true or false")


def parse_volume(text: str) -> VolumeSpec:
    """``-v HOST:CTR[:ro|:rw]`` (docker's syntax; HOST must be a path, not a name)."""
    parts = text.split(":")
    if len(parts) == 1:
        raise VolumeError(
            f"-v {text[:80]}: anonymous volumes are not supported; use HOST:CTR, "
            "or --mount type=scratch,target=CTR,size=SIZE"
        )
    if len(parts) > 3:
        raise VolumeError(f"-v {text[:80]}: use HOST:CTR[:ro|:rw]")
    host, target = parts[0], parts[1]
    if not host.startswith(("/", ".")):
        raise VolumeError(
            f"-v {text[:80]}: named volumes are not supported; give a host path (/... or ./...)"
        )
    readonly = False
    if len(parts) == 3:
        for opt in parts[2].split(","):
            if opt in ("ro", "rw"):
                readonly = opt == "ro"
            else:
                raise VolumeError(f"-v {text[:80]}: unknown option {opt[:20]!r} (ro or rw)")
    return VolumeSpec("bind", check_target(target), check_source(host), readonly)


def _mount_fields(text: str) -> dict[str, str | None]:
    """``k=v,k2,...`` as docker reads it (CSV: a value may be quoted to hold a comma)."""
    try:
        rows = list(csv.reader([text]))
    except csv.Error as e:
        raise VolumeError(f"--mount {text[:80]}: {e}") from None
    out: dict[str, str | None] = {}
    for item in rows[0] if rows else []:
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not key:
            raise VolumeError(f"--mount {text[:80]}: empty field")
        if key in out:
            raise VolumeError(f"--mount {text[:80]}: {key} given twice")
        out[key] = value if eq else None
    return out


_ALIASES = {"src": "source", "dst": "target", "destination": "target", "ro": "readonly"}
_KEYS = {
    "bind": {"type", "source", "target", "readonly"},
    "scratch": {"type", "target", "size"},
    "tmpfs": {"type", "target", "tmpfs-size", "tmpfs-mode", "readonly"},
}


def parse_mount(text: str) -> VolumeSpec:
    """``--mount type=bind|tmpfs|scratch,...`` (docker's keys; scratch is ours)."""
    raw = _mount_fields(text)
    fields = {_ALIASES.get(k, k): v for k, v in raw.items()}
    kind = fields.get("type")
    if kind is None:
        raise VolumeError(f"--mount {text[:80]}: give type=bind, type=tmpfs or type=scratch")
    if kind not in KINDS:
        raise VolumeError(
            f"--mount {text[:80]}: unknown type {kind[:20]!r} (bind, tmpfs or scratch)"
        )
    for key in fields:
        if key not in _KEYS[kind]:
            raise VolumeError(f"--mount {text[:80]}: unknown option {key[:30]!r} for type={kind}")
    for key in ("source", "target", "size", "tmpfs-size", "tmpfs-mode"):
        if key in fields and not fields[key]:
            raise VolumeError(f"--mount {text[:80]}: {key} needs a value")
    target = check_target(fields.get("target") or "")
    readonly = "readonly" in fields and _bool("readonly", fields["readonly"])
    if kind == "bind":
        return VolumeSpec("bind", target, check_source(fields.get("source") or ""), readonly)
    if kind == "scratch":
        if not fields.get("size"):
            raise VolumeError(f"--mount {text[:80]}: type=scratch needs size=, e.g. size=1g")
        size = _size(fields["size"] or "", "scratch size", MIN_SIZE_BYTES, MAX_SCRATCH_BYTES)
        return VolumeSpec("scratch", target, size_bytes=size)
    size_text, mode_text = fields.get("tmpfs-size"), fields.get("tmpfs-mode")
    return VolumeSpec(
        "tmpfs",
        target,
        readonly=readonly,
        size_bytes=_size(size_text, "tmpfs size", 1, MAX_SCRATCH_BYTES) if size_text else 0,
        mode=_mode(mode_text) if mode_text else None,
    )


def parse_tmpfs(text: str) -> VolumeSpec:
    """``--tmpfs CTR[:size=64m,mode=1777,exec,...]`` (docker's syntax and defaults)."""
    target, _, opts = text.partition(":")
    size, readonly = 0, False
    mode: int | None = None
    flags: set[str] = set()
    for opt in opts.split(",") if opts else []:
        key, eq, value = opt.partition("=")
        if key == "size" and eq:
            size = _size(value, "tmpfs size", 1, MAX_SCRATCH_BYTES)
        elif key == "mode" and eq:
            mode = _mode(value)
        elif opt in ("ro", "rw"):
            readonly = opt == "ro"
        elif opt in TMPFS_FLAGS:  # exec, suid, dev: lift docker's default
            flags.add(opt)
        elif opt in TMPFS_FLAGS.values():  # noexec, nosuid, nodev: the default again
            flags.discard(opt[2:])
        else:
            raise VolumeError(f"--tmpfs {text[:80]}: unknown option {opt[:30]!r}")
    target = check_target(target)
    return VolumeSpec("tmpfs", target, None, readonly, size, mode, tuple(sorted(flags)))


def parse_all(
    volumes: Iterable[str] = (), mounts: Iterable[str] = (), tmpfs: Iterable[str] = ()
) -> list[VolumeSpec]:
    """The volumes of one command line, in flag order by kind; targets unique."""
    specs = [
        *(parse_volume(v) for v in volumes),
        *(parse_mount(m) for m in mounts),
        *(parse_tmpfs(t) for t in tmpfs),
    ]
    check_unique(specs)
    return specs


def check_unique(specs: Iterable[VolumeSpec]) -> None:
    seen: set[str] = set()
    for s in specs:
        if s.target in seen:
            raise VolumeError(f"two volumes on {s.target}")
        seen.add(s.target)


# -- planning and applying ------------------------------------------------------


def _tmpfs_options(spec: VolumeSpec) -> list[str]:
    opts = [f for f in TMPFS_DEFAULTS if f[2:] not in spec.flags]
    opts.append(f"mode={spec.mode if spec.mode is not None else 0o1777:o}")
    if spec.size_bytes:
        opts.append(f"size={spec.size_bytes}")
    if spec.readonly:
        opts.append("ro")
    return opts


def prepare(cfg: Config, specs: Iterable[VolumeSpec]) -> VolumePlan:
    """What the VM gets, what the guest mounts, what the spec binds; no side effects."""
    specs = list(specs)
    check_unique(specs)
    shared_fs = cfg.hypervisor.shared_fs
    if shared_fs == "none" and any(s.kind == "bind" for s in specs):
        raise VolumeError("host directories need hypervisor.shared_fs = virtio-fs or 9p")
    plan = VolumePlan()
    for i, s in enumerate(specs):
        if s.kind == "tmpfs":
            plan.oci_mounts.append(
                {
                    "destination": s.target,
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": _tmpfs_options(s),
                }
            )
            continue
        guest = f"{GUEST_DIR}/{i}"
        if s.kind == "bind":
            assert s.source is not None
            tag = f"vol{i}"
            plan.shares.append(Share(tag, s.source, readonly=s.readonly))
            kind = "virtiofs" if shared_fs == "virtio-fs" else "9p"
            plan.guest_mounts.append(GuestMount(kind, tag, guest, readonly=s.readonly))
        else:
            serial = f"scratch{i}"
            plan.scratch.append(ScratchDisk(serial, s.size_bytes))
            plan.guest_mounts.append(GuestMount("block", serial, guest, fstype="ext4"))
        plan.oci_mounts.append(
            {
                "destination": s.target,
                "type": "bind",
                "source": guest,
                "options": ["rbind", "ro"] if s.readonly else ["rbind"],
            }
        )
    return plan


async def apply(sb: Sandbox, plan: VolumePlan) -> None:
    """Mount the volumes in the guest, where the spec's binds expect them."""
    for m in plan.guest_mounts:
        await sb.mount(m.kind, m.source, m.target, fstype=m.fstype, readonly=m.readonly)
