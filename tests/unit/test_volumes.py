"""Volume flags (-v, --mount, --tmpfs), the plan they make, and the host-side safety nets."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.errors import SandboxError, VolumeError
from cocoon.hypervisor.base import Share
from cocoon.runtime.volumes import (
    VolumeSpec,
    parse_all,
    parse_mount,
    parse_tmpfs,
    parse_volume,
    prepare,
)
from cocoon.state import gc
from cocoon.state.gc import remove_dir
from cocoon.state.store import SandboxDir
from cocoon.storage import scratch
from cocoon.storage.scratch import ScratchDisk
from cocoon.util.fs import mount_points_under


def test_volume_flag(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    assert parse_volume(f"{tmp_path}/link:/data/") == VolumeSpec("bind", "/data", tmp_path / "d")
    assert parse_volume(f"{tmp_path}/d:/x//y:ro").readonly
    assert not parse_volume(f"{tmp_path}/d:/x:rw").readonly


@pytest.mark.parametrize(
    "flag, message",
    [
        ("{d}", "anonymous volumes are not supported"),
        ("name:/data", "named volumes are not supported"),
        ("{d}/missing:/data", "does not exist"),
        ("{d}/file:/data", "is not a directory"),
        ("{d}/a,b:/data", "contains ','"),
        ("{d}:data", "must be absolute"),
        ("{d}:/a/../b", "must not contain '..'"),
        ("{d}:/", "over the container's /"),
        ("{d}:/data:rx", "unknown option 'rx'"),
        ("{d}:/data:ro:x", "use HOST:CTR"),
    ],
)
def test_volume_flag_errors(tmp_path: Path, flag: str, message: str) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(VolumeError, match=message):
        parse_volume(flag.format(d=tmp_path))


def test_mount_flag(tmp_path: Path) -> None:
    assert parse_mount(f"type=bind,src={tmp_path},dst=/d,readonly") == VolumeSpec(
        "bind", "/d", tmp_path, readonly=True
    )
    assert not parse_mount(f"type=bind,source={tmp_path},target=/d,ro=false").readonly
    assert parse_mount("type=scratch,target=/data,size=1g") == VolumeSpec(
        "scratch", "/data", size_bytes=1 << 30
    )
    assert parse_mount('type=tmpfs,"destination=/t",tmpfs-size=64m,tmpfs-mode=700') == VolumeSpec(
        "tmpfs", "/t", size_bytes=64 << 20, mode=0o700
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("target=/d", "give type="),
        ("type=volume,target=/d", "unknown type 'volume'"),
        ("type=bind,source=/nonexistent-cocoon,target=/d", "does not exist"),
        ("type=bind,source=/,target=/d,bind-propagation=shared", "unknown option"),
        ("type=scratch,target=/d", "needs size="),
        ("type=scratch,target=/d,size=lots", "invalid scratch size"),
        ("type=scratch,target=/d,size=100k", "too small: at least 1m"),
        ("type=scratch,target=/d,size=17t", "too large"),
        ("type=scratch,target=/d,size=1g,readonly", "unknown option 'readonly'"),
        ("type=scratch,source=/x,target=/d,size=1g", "unknown option 'source'"),
        ("type=tmpfs,target=/d,tmpfs-mode=9", "invalid mode"),
        ("type=tmpfs,target=/d,target=/e", "given twice"),
        ("type=tmpfs,target=", "target needs a value"),
        ("type=tmpfs", "needs a container path"),
    ],
)
def test_mount_flag_errors(flag: str, message: str) -> None:
    with pytest.raises(VolumeError, match=message):
        parse_mount(flag)


def test_tmpfs_flag() -> None:
    assert parse_tmpfs("/t") == VolumeSpec("tmpfs", "/t")
    assert parse_tmpfs("/t:size=64m,mode=1777,exec,noexec,suid,ro") == VolumeSpec(
        "tmpfs", "/t", readonly=True, size_bytes=64 << 20, mode=0o1777, flags=("suid",)
    )
    for bad, message in [
        ("t", "must be absolute"),
        ("/t:size=x", "invalid"),
        ("/t:uid=1", "unknown option 'uid=1'"),
    ]:
        with pytest.raises(VolumeError, match=message):
            parse_tmpfs(bad)


def test_targets_unique(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="two volumes on /d"):
        parse_all([f"{tmp_path}:/d"], [], ["/d/"])


def test_plan(tmp_path: Path) -> None:
    specs = parse_all(
        [f"{tmp_path}:/rw", f"{tmp_path}:/ro:ro"],
        ["type=scratch,target=/s,size=32m"],
        ["/t:size=1m,exec"],
    )
    cfg = Config()
    plan = prepare(cfg, specs)
    assert plan.shares == [Share("vol0", tmp_path), Share("vol1", tmp_path, readonly=True)]
    assert plan.scratch == [ScratchDisk("scratch2", 32 << 20)]
    assert [(m.kind, m.source, m.target, m.readonly) for m in plan.guest_mounts] == [
        ("virtiofs", "vol0", "/run/cocoon/v/0", False),
        ("virtiofs", "vol1", "/run/cocoon/v/1", True),
        ("block", "scratch2", "/run/cocoon/v/2", False),
    ]
    assert plan.oci_mounts == [
        {"destination": "/rw", "type": "bind", "source": "/run/cocoon/v/0", "options": ["rbind"]},
        {"destination": "/ro", "type": "bind", "source": "/run/cocoon/v/1",
         "options": ["rbind", "ro"]},
        {"destination": "/s", "type": "bind", "source": "/run/cocoon/v/2", "options": ["rbind"]},
        {"destination": "/t", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", "size=1048576"]},
    ]  # fmt: skip
    cfg.hypervisor.shared_fs = "9p"
    assert {m.kind for m in prepare(cfg, specs[:2]).guest_mounts} == {"9p"}
    cfg.hypervisor.shared_fs = "none"
    with pytest.raises(VolumeError, match="shared_fs"):
        prepare(cfg, specs[:1])
    assert prepare(cfg, specs[2:]).scratch  # scratch and tmpfs need no shared file system


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_scratch_image_is_sparse_and_swept_by_root(tmp_path: Path) -> None:
    data, root = tmp_path / "data", tmp_path / "root"
    d = scratch.scratch_dir(data, "sb1")
    scratch.make_dir(d, root)
    scratch.create(d / "0.img", 64 << 20)
    st = os.stat(d / "0.img")
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < 4 << 20
    with pytest.raises(Exception, match="cannot create"):
        scratch.create(d / "0.img", 64 << 20)  # never overwrites
    assert scratch.stamped(data, root) == {"sb1": d}
    assert scratch.stamped(data, tmp_path / "other-root") == {}
    (d / "keep").write_text("not ours")
    scratch.remove_dir(d)
    assert sorted(p.name for p in d.iterdir()) == ["keep"]  # only what scratch.py makes


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_remove_dir_never_enters_a_mount(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "precious").write_text("keep me")
    sdir = tmp_path / "sandbox"
    (sdir / "sub").mkdir(parents=True)
    (sdir / "sub" / "log").write_text("x")
    (sdir / "mnt").mkdir()
    (sdir / "link").symlink_to(user)
    subprocess.run(["mount", "--bind", str(user), str(sdir / "mnt")], check=True)
    try:
        assert mount_points_under(sdir) == [str(sdir / "mnt")]
        with pytest.raises(SandboxError, match="is a mount point: left in place"):
            remove_dir(sdir)
        assert (user / "precious").read_text() == "keep me"
        assert sorted(p.name for p in sdir.iterdir()) == ["mnt"]
    finally:
        subprocess.run(["umount", str(sdir / "mnt")], check=True)
    remove_dir(sdir)
    assert not sdir.exists() and (user / "precious").exists()


def test_gc_sweeps_scratch_left_without_a_sandbox(tmp_path: Path) -> None:
    """After a reboot the state root is empty but the data dir still holds scratch."""
    data, root = tmp_path / "data", tmp_path / "root"
    for sid, owner in [("gone", root), ("alive", root), ("elsewhere", tmp_path / "r2")]:
        d = scratch.scratch_dir(data, sid)
        scratch.make_dir(d, owner)
        (d / "0.img").write_bytes(b"")
    live = SandboxDir(root, "alive")
    live.create()
    live.take_ownership()
    try:
        gc.reap(root, data=data)
        assert sorted(p.name for p in (data / "scratch").iterdir()) == ["alive", "elsewhere"]
    finally:
        live.release_ownership()
