"""A pooled sandbox's hub: one share whose contents arrive after the VM started.

A pooled sandbox is restored and warmed before anyone knows what it will
run, and a 9p share's backend is fixed when QEMU starts. So every pooled
sandbox exports one directory of its own, its hub (``<root>/hubs/<id>``),
through its first share slot, with nothing in it. Whoever takes the sandbox
binds its host directories into the hub (``<hub>/<n>``: an OCI bundle's
rootfs, volumes; a read-only one remounted read-only on the host, so the
host kernel enforces it), and the guest mounts the hub once and binds
``<n>`` where each share belongs. No copy, no reboot, no device hot-plug:
the start path Baidu's function compute measured at 98 ms.

Who sees the binds: an unjailed QEMU serves the hub itself, in the host's
mount namespace. A jailed VM's virtfs-proxy-helper runs in a mount namespace
of its own (hypervisor/qemu/sharejail), a slave of the host's: so the hub is a mount of its
own, made *shared*, and binds under it propagate into the helper's view.

Never a recursive delete: ``remove`` unmounts what is under the hub (lazily:
the file server may still hold an inode) and removes only the empty mount
points it made. What is bound in is the user's.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cocoon.errors import HostError
from cocoon.util import mounts
from cocoon.util.fs import mount_points_under

#: Where the guest mounts its hub; share n is ``GUEST_DIR/n``.
GUEST_DIR = "/run/cocoon/hub"


def hubs_dir(root: Path) -> Path:
    return root / "hubs"


def hub_dir(root: Path, sandbox_id: str) -> Path:
    return hubs_dir(root) / sandbox_id


def create(path: Path) -> None:
    """An empty hub, a shared mount of itself (see the module's docstring)."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.mkdir(mode=0o700)
    mounts.bind(str(path), str(path))
    mounts.make_shared(str(path))


def attach(path: Path, n: int, source: Path, readonly: bool) -> str:
    """Bind ``source`` at ``<hub>/<n>``; returns where the guest finds it.

    A read-only bind is remounted read-only, and is not recursive: a mount
    below it would stay writable. A writable one carries its submounts
    (an OCI bundle's binds dir is a tree of binds)."""
    dst = path / str(n)
    dst.mkdir(mode=0o700)
    mounts.bind(str(source), str(dst), recursive=not readonly)
    if readonly:
        mounts.remount_readonly(str(dst))
    return f"{GUEST_DIR}/{n}"


def cover(slot: Path, source: Path) -> None:
    """Bind ``source`` read-only over a slot already attached (a pre-warmed
    function instance's empty /code taking its version's code).

    The guest needs no word of it: its 9p mount of the hub resolves every
    path anew on the host, so the slot's guest bind, and the container's bind
    of that, show the top mount from the next lookup on; the host enforces
    the read-only. ``remove`` unmounts both layers."""
    mounts.bind(str(source), str(slot))
    try:
        mounts.remount_readonly(str(slot))
    except HostError:
        mounts.detach(str(slot))
        raise


def clear(path: Path) -> None:
    """Unmount everything attached to the hub and remove the slots' empty
    mount points, keeping the hub itself (a pool's warm-up used it: the
    taker attaches from slot 0 on). Raises HostError as ``remove`` does."""
    _empty(path, keep=True)


def remove(path: Path) -> None:
    """Unmount everything in the hub and the hub itself, then its empty dirs.

    Raises HostError, leaving the hub in place, if anything stays mounted or
    a dir is not empty: nothing below it is ever deleted."""
    if not path.exists():
        return
    _empty(path, keep=False)
    try:
        path.rmdir()
    except FileNotFoundError:
        pass  # another reaper of the same sandbox (its pool, `cocoon gc`) was first
    except OSError as e:
        raise HostError(f"hub {path} not removed: {e.strerror}: see what is in it") from e


def _empty(path: Path, *, keep: bool) -> None:
    """The hub's mounts gone (lazily: the file server may still hold an
    inode), its own too unless ``keep``, and only our empty mount points
    removed: anything else in it fails the rmdir and stays."""
    held = [os.path.realpath(path)] if keep else []
    for mp in sorted(mount_points_under(path), key=len, reverse=True):
        if mp not in held:
            with contextlib.suppress(HostError):  # already gone: checked below
                mounts.detach(mp)
    if left := [mp for mp in mount_points_under(path) if mp not in held]:
        raise HostError(f"{left[0]} is still mounted: left in place; unmount it, then `cocoon gc`")
    try:
        for child in path.iterdir():
            with contextlib.suppress(FileNotFoundError):  # a concurrent reaper's
                child.rmdir()
    except FileNotFoundError:
        return  # the hub itself went under a concurrent reaper
    except OSError as e:
        raise HostError(f"hub {path} not emptied: {e.strerror}: see what is in it") from e


def sweep(root: Path, live: set[str]) -> None:
    """Remove the hubs of sandboxes that are gone (a crash between making a
    hub and recording it); one that will not go is left for the next gc."""
    d = hubs_dir(root)
    if not d.is_dir():
        return
    for hub in d.iterdir():
        if hub.name not in live:
            with contextlib.suppress(HostError):
                remove(hub)
