"""Scratch volumes (an EmptyDir with a quota): a sparse ext4 image per volume.

A directory shared from the host would let one tenant fill the host's disk;
a block file of a fixed size cannot grow: the guest gets ENOSPC at the size
asked for, and the host file only takes the blocks really written (sparse).
The files live on persistent disk under the data dir (``/run`` is a tmpfs: RAM),
at ``<data_dir>/scratch/<sandbox-id>/<n>.img``, and go with their sandbox.

Because the data dir outlives a reboot and the runtime state under ``/run``
does not, every scratch dir carries a ``root`` file naming the state root of
its sandbox: ``cocoon gc`` removes the dirs of that root whose sandbox is gone
(and never those of another root sharing the data dir).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cocoon.errors import HostError
from cocoon.util.proc import run

#: Below this mkfs.ext4 has no room for its metadata and a useful file system.
MIN_SIZE_BYTES = 1 << 20
MKFS_TIMEOUT_S = 60.0
IMAGE_SUFFIX = ".img"
ROOT_MARKER = "root"


def scratch_dir(data: Path, sandbox_id: str) -> Path:
    return data / "scratch" / sandbox_id


def make_dir(path: Path, state_root: Path) -> None:
    """Create a sandbox's scratch dir and stamp it with the state root that owns it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    (path / ROOT_MARKER).write_text(str(state_root))


def create(path: Path, size_bytes: int) -> None:
    """A sparse file of ``size_bytes`` holding an empty ext4 whose root is mode 1777.

    No journal (the file dies with its sandbox, a journal would only cost space
    and writes), no reserved blocks (the tenant gets the whole size), lazy
    inode table init (mkfs writes ~1 MB whatever the size). Root mode 1777 as
    a tmpfs: any container user can write, nobody deletes another's files.
    """
    if size_bytes < MIN_SIZE_BYTES:
        raise HostError(f"scratch size {size_bytes} B is below the minimum 1m")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size_bytes)
        finally:
            os.close(fd)
    except OSError as e:
        raise HostError(f"cannot create scratch image {path}: {e.strerror}") from e
    run(
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
         "-E", "lazy_itable_init=1,root_owner=0:0", str(path)],
        timeout_s=MKFS_TIMEOUT_S,
    )  # fmt: skip
    run(["debugfs", "-w", "-R", "set_inode_field / mode 041777", str(path)], timeout_s=30.0)


def remove_dir(path: Path) -> None:
    """Remove a scratch dir: its images and marker only, never anything else.

    The path comes from a state file, so it is checked for the shape this
    module gives it (``.../scratch/<id>``) before anything is unlinked.
    """
    if path.parent.name != "scratch" or not path.is_dir() or path.is_symlink():
        return
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False) and (
            entry.name.endswith(IMAGE_SUFFIX) or entry.name == ROOT_MARKER
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    with contextlib.suppress(OSError):
        path.rmdir()


def stamped(data: Path, state_root: Path) -> dict[str, Path]:
    """sandbox id -> scratch dir, for the dirs stamped with ``state_root``.

    A caller looking for orphans lists the sandbox dirs *after* this: a sandbox
    dir is made before its scratch dir and removed after it, so a sandbox being
    created or destroyed meanwhile is never taken for an orphan.
    """
    base = data / "scratch"
    out = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(base):
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                owner = (Path(entry.path) / ROOT_MARKER).read_text()
            except OSError:
                continue
            if owner == str(state_root):
                out[entry.name] = Path(entry.path)
    return out


@dataclass(frozen=True)
class ScratchDisk:
    """A scratch volume a sandbox creates at boot and deletes with itself."""

    serial: str
    size_bytes: int
