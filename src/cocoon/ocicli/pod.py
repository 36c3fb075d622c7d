"""Pods: the containers of one CRI pod share the pod's single VM.

containerd's CRI plugin marks every bundle with
``io.kubernetes.cri.container-type`` (sandbox | container) and
``io.kubernetes.cri.sandbox-id``. The sandbox container boots the VM with one
more virtio-fs share: the pod's dir, a bind mount of itself made *shared*, so
mounts made under it later propagate into virtiofsd's view. A later container
of the pod gets its rootfs and bind sources bind-mounted there on the host (a
read-only bind remounted read-only: enforced on the host) and is created in
the running VM through the sandbox's monitor: no second VM, no hotplug.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import HostError
from cocoon.sandbox.sandbox import mount_points_under
from cocoon.util.proc import run

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
MOUNT_TIMEOUT_S = 10.0


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
        run(["mount", "--bind", str(path), str(path)], timeout_s=MOUNT_TIMEOUT_S)
    run(["mount", "--make-shared", str(path)], timeout_s=MOUNT_TIMEOUT_S)


def bind(src: str, dst: Path, readonly: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.path.isdir(src):
        dst.mkdir(exist_ok=True)
    else:
        dst.touch(exist_ok=True)
    run(["mount", "--bind", src, str(dst)], timeout_s=MOUNT_TIMEOUT_S)
    if readonly:
        run(["mount", "-o", "remount,bind,ro", str(dst)], timeout_s=MOUNT_TIMEOUT_S)


def unbind(targets: list[str]) -> None:
    """Undo ``bind`` (newest first) and drop the mount points we made. Lazily:
    the pod's virtiofsd may still hold inodes of a deleted member's files until
    the guest forgets them, and that must not keep the mount (or the user's
    directory) pinned under the pod's dir."""
    for t in reversed(targets):
        with contextlib.suppress(HostError):
            if t in mount_points_under(t):
                run(["umount", "-l", t], timeout_s=MOUNT_TIMEOUT_S)
        with contextlib.suppress(OSError):
            p = Path(t)
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
    if targets:
        with contextlib.suppress(OSError):
            Path(targets[0]).parent.rmdir()


def remove_pod_dir(path: Path) -> None:
    """Unmount everything under the pod's dir (members a crash left too), then it."""
    if not path.exists():
        return
    for mp in sorted(mount_points_under(path), key=len, reverse=True):
        with contextlib.suppress(HostError):
            run(["umount", "-l", mp], timeout_s=MOUNT_TIMEOUT_S)
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
