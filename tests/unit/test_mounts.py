"""util.mounts against the host's real mount table (root, as the suite runs)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocoon.errors import HostError
from cocoon.util import mounts
from cocoon.util.fs import mount_points_under


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A nosuid, nodev, noexec tmpfs: flags a read-only bind of it must keep."""
    t = tmp_path / "t"
    t.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "nosuid,nodev,noexec,size=1m", "x", str(t)],
                   check=True)  # fmt: skip
    yield t
    for mp in sorted(mount_points_under(tmp_path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False)


def test_readonly_bind_keeps_the_sources_flags_and_refuses_writes(
    tmpfs: Path, tmp_path: Path
) -> None:
    (tmpfs / "f").write_text("x")
    dst = tmp_path / "ro"
    dst.mkdir()
    mounts.bind(str(tmpfs), str(dst))
    mounts.remount_readonly(str(dst))
    flags = os.statvfs(dst).f_flag
    assert flags & os.ST_RDONLY and flags & os.ST_NOSUID
    assert flags & os.ST_NODEV and flags & os.ST_NOEXEC
    assert (dst / "f").read_text() == "x"
    with pytest.raises(OSError) as e:
        (dst / "g").write_text("y")
    assert e.value.errno == errno.EROFS
    (tmpfs / "g").write_text("y")  # the source stays writable
    mounts.detach(str(dst))
    assert str(dst) not in mount_points_under(tmp_path)


def test_recursive_bind_carries_submounts_and_shared_propagates(
    tmpfs: Path, tmp_path: Path
) -> None:
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    mounts.bind(str(top), str(top))
    mounts.make_shared(str(top))
    dst = tmp_path / "peer"
    dst.mkdir()
    mounts.bind(str(top), str(dst), recursive=True)  # a peer of the shared mount
    mounts.bind(str(tmpfs), str(top / "sub"))  # made after: propagates to the peer
    (tmpfs / "f").write_text("z")
    assert (dst / "sub" / "f").read_text() == "z"


def test_failures_are_one_line_host_errors(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"binding .*/nowhere at .*: No such file or directory"):
        mounts.bind(str(tmp_path / "nowhere"), str(tmp_path))
    with pytest.raises(HostError, match=r"unmounting .*: Invalid argument"):
        mounts.detach(str(tmp_path))  # not a mount point
