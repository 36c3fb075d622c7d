"""Pods: the containers of one CRI pod share the pod's single VM.

containerd's CRI plugin marks every bundle with
``io.kubernetes.cri.container-type`` (sandbox | container) and
``io.kubernetes.cri.sandbox-id``. The sandbox container boots the VM with one
more virtio-fs share: the pod's dir, a bind mount of itself made *shared*, so
mounts made under it later propagate into virtiofsd's view. A later container
of the pod gets its rootfs and bind sources bind-mounted there on the host (a
read-only bind remounted read-only: enforced on the host) and is created in
the running VM through the sandbox's monitor: no second VM, no hotplug.
Every other container's binds are made the same way, under its own binds dir
(``binds_dir``), shared when its VM boots.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import HostError
from cocoon.log import teardown_step
from cocoon.util import mounts
from cocoon.util.fs import mount_points_under

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"

log = logging.getLogger(__name__)


def role(annotations: dict[str, str]) -> tuple[str, str]:
    """("sandbox" | "container" | "", the pod's sandbox id)."""
    kind = annotations.get(CONTAINER_TYPE, "")
    return (kind if kind in ("sandbox", "container") else ""), annotations.get(SANDBOX_ID, "")


def key(cid: str) -> str:
    return hashlib.sha256(cid.encode()).hexdigest()[:16]


def pod_dir(cfg: Config, sandbox_cid: str) -> Path:
    return cfg.root / "pods" / key(sandbox_cid)


def make_pod_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if str(path) not in mount_points_under(path):
        mounts.bind(str(path), str(path))
    mounts.make_shared(str(path))


def bind(src: str, dst: Path, readonly: bool, recursive: bool = False) -> None:
    """Bind ``src`` at ``dst`` (made for it). A read-only bind is remounted
    read-only and is never recursive: a mount below it would stay writable."""
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.path.isdir(src):
        dst.mkdir(exist_ok=True)
    else:
        dst.touch(exist_ok=True)
    mounts.bind(src, str(dst), recursive=recursive and not readonly)
    if readonly:
        mounts.remount_readonly(str(dst))


def unbind(targets: list[str], top: Path) -> None:
    """Undo ``bind`` (newest first) and drop the mount points we made, and the
    dirs made for them up to and including ``top``; never a recursive delete.
    Lazily: the pod's virtiofsd may still hold inodes of a deleted member's
    files until the guest forgets them, and that must not keep the mount (or
    the user's directory) pinned under the pod's dir."""
    for t in reversed(targets):
        for mp in sorted(mount_points_under(t), key=len, reverse=True):  # an rbind's too
            with teardown_step(log, f"unmounting {mp}", f"{mp}, mounted", errors=(HostError,)):
                mounts.detach(mp)
        with contextlib.suppress(OSError):
            p = Path(t)
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        parent = Path(t).parent
        while top in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
    with contextlib.suppress(OSError):
        top.rmdir()


def binds_dir(cfg: Config, cid: str) -> Path:
    """Where a (non-pod) container's bind sources are bound on the host."""
    return cfg.root / "binds" / key(cid)


def remove_pod_dir(path: Path) -> None:
    """Unmount everything under the pod's dir (members a crash left too), then it."""
    if not path.exists():
        return
    for mp in sorted(mount_points_under(path), key=len, reverse=True):
        with teardown_step(log, f"unmounting {mp}", f"{mp}, mounted", errors=(HostError,)):
            mounts.detach(mp)
    if not mount_points_under(path):
        for dirpath, dirnames, filenames in os.walk(path, topdown=False):
            for f in filenames:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, f))
            for d in dirnames:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(dirpath, d))
        with contextlib.suppress(OSError):
            path.rmdir()
