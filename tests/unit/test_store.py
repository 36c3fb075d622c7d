"""The image store: records, tags, blob GC, and no half image after a failure or crash."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cocoon.config import Config
from cocoon.errors import ImageError, StateError
from cocoon.images import layers as layers_mod
from cocoon.images import store as store_mod
from cocoon.images.store import Image, ImageStore, repository_of
from tests.unit.imagekit import Tar, add_image, compress, dg, make_image, mounted

BASE = Tar().dir("bin").file("bin/sh", b"#!shell", mode=0o755).file("etc/os", b"base").bytes()
APP = Tar().file("app/run", b"app", mode=0o4755, uid=1000, gid=1000).file(".wh.etc", b"").bytes()
OTHER = Tar().file("other", b"o").bytes()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(Config(data_dir=str(tmp_path / "data")))


def leftovers(s: ImageStore) -> tuple[list[str], list[str], list[str]]:
    return (
        sorted(os.listdir(s.erofs_dir)),
        sorted(os.listdir(s.tmp_dir)),
        sorted(os.listdir(s.blobs.root / "ingest")),
    )


def test_add_list_resolve_inspect(store: ImageStore, tmp_path: Path) -> None:
    img = add_image(store, [BASE, APP], tags=("docker.io/library/app:1",), cmd=("run",))
    assert img.repo_tags == ["docker.io/library/app:1"]
    assert img.repo_digests == [f"docker.io/library/app@{img.manifest_digest}"]
    assert img.platform == "linux/amd64" and img.created == "2024-01-02T03:04:05Z"
    assert [x.diff_id for x in img.layers] == [dg(BASE), dg(APP)]
    assert Path(img.erofs).is_file() and img.size == Path(img.erofs).stat().st_size
    assert [i.id for i in store.list()] == [img.id]
    for ref in (
        "docker.io/library/app:1",
        img.repo_digests[0],
        img.id,
        img.id[7:],
        img.id[7:19],
        "sha256:" + img.id[7:19],
        img.manifest_digest,
    ):
        assert store.resolve(ref).id == img.id, ref
    for bad in (img.id[7:18], "app:1", "nope"):
        with pytest.raises(ImageError, match="no such image"):
            store.resolve(bad)
    info = store.inspect("docker.io/library/app:1")
    assert info.config.cmd == ["run"] and info.image.id == img.id
    # the erofs is the unpacked image: layer 2 deleted etc/, kept setuid and owners
    with mounted(img.erofs, tmp_path / "mnt") as m:
        assert sorted(os.listdir(m)) == ["app", "bin"]
        st = (m / "app/run").stat()
        assert stat.S_IMODE(st.st_mode) == 0o4755 and (st.st_uid, st.st_gid) == (1000, 1000)
        assert (m / "bin/sh").read_bytes() == b"#!shell"


def test_sparse_files_stay_holes_in_the_image(store: ImageStore, tmp_path: Path) -> None:
    """A 256 MiB mostly-hole file (tar --sparse) costs ~nothing in the erofs image
    too: chunk-based files there, since the holes outweigh a block per entry."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(256 << 20)
        f.seek(100 << 20)
        f.write(b"data")
    layer = subprocess.run(
        ["tar", "--sparse", "--format=pax", "-cf", "-", "-C", str(src), "sparse"],
        check=True,
        capture_output=True,
    ).stdout
    img = add_image(store, [BASE, layer])
    assert Path(img.erofs).stat().st_size < 1 << 20
    with mounted(img.erofs, tmp_path / "mnt") as m:
        assert (m / "sparse").stat().st_size == 256 << 20
        with open(m / "sparse", "rb") as f:
            f.seek((100 << 20) - 2)
            assert f.read(8) == b"\0\0data\0\0"
        assert (m / "bin/sh").read_bytes() == b"#!shell"
    plain = add_image(store, [BASE, APP])  # no holes: tail-packed as before
    assert Path(plain.erofs).stat().st_size <= 8192


def test_add_is_idempotent_and_merges_tags(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    md, mb, cb = make_image(store, [BASE])
    a = store.add(md, mb, cb, ["x.io/a:1"])
    mtime = Path(a.erofs).stat().st_mtime_ns

    def no_build(*args: object) -> None:
        raise AssertionError("rebuilt an image that was there")

    monkeypatch.setattr(ImageStore, "_build", no_build)
    b = store.add(md, mb, cb, ["x.io/a:2"])
    assert b.id == a.id and b.repo_tags == ["x.io/a:1", "x.io/a:2"]
    assert Path(a.erofs).stat().st_mtime_ns == mtime
    assert len(store.list()) == 1


def test_tags_move_and_remove_collects_blobs(store: ImageStore) -> None:
    one = add_image(store, [BASE, APP], tags=("r.io/app:1", "r.io/app:latest"))
    two = add_image(store, [BASE, OTHER], tags=("r.io/other:1",))
    # a tag moves: the image that had it stays, without it
    store.tag("r.io/other:1", "r.io/app:latest")
    assert store.resolve("r.io/app:latest").id == two.id
    assert store.resolve("r.io/app:1").repo_tags == ["r.io/app:1"]
    store.tag(one.id, "r.io/app:2")
    # by id with two tags: refused without force
    with pytest.raises(ImageError, match="force"):
        store.remove(one.id[7:19])
    # by tag while another remains: untag only
    r = store.remove("r.io/app:2")
    assert r.untagged == ["r.io/app:2"] and r.deleted == []
    # the last tag goes: the image, its erofs and its own blobs go; the shared base stays
    base_blob = one.layers[0].digest
    r = store.remove("r.io/app:1")
    assert r.deleted == [one.id]
    assert f"r.io/app@{one.manifest_digest}" in r.untagged
    assert not Path(one.erofs).exists()
    assert store.blobs.has(base_blob)
    for b in one.blobs:
        if b not in two.blobs:
            assert not store.blobs.has(b), b
    store.remove(two.id, force=True)
    assert store.list() == [] and store.blobs.digests() == []
    assert leftovers(store) == ([], [], [])


def test_add_refuses_inconsistent_input(store: ImageStore) -> None:
    md, mb, cb = make_image(store, [BASE])
    with pytest.raises(ImageError, match="manifest bytes"):
        store.add(dg(b"x"), mb, cb)
    with pytest.raises(ImageError, match="image config does not match"):
        store.add(md, mb, cb + b" ")
    md, mb, cb = make_image(store, [BASE], diff_ids=[dg(BASE), dg(APP)])
    with pytest.raises(ImageError, match="2 diff_ids for 1 layers"):
        store.add(md, mb, cb)
    md, mb, cb = make_image(store, [OTHER])
    store.blobs.remove(json.loads(mb)["layers"][0]["digest"])
    with pytest.raises(ImageError, match="not in the blob store"):
        store.add(md, mb, cb)
    with pytest.raises(ImageError, match="invalid image reference"):
        store.add(*make_image(store, [BASE]), ["bad tag"])
    assert store.list() == []


def test_diff_id_mismatch_leaves_nothing(store: ImageStore) -> None:
    md, mb, cb = make_image(store, [BASE, APP], diff_ids=[dg(BASE), dg(OTHER)])
    with pytest.raises(ImageError, match=r"layer 2/2 .*image config says"):
        store.add(md, mb, cb, ["r.io/x:1"])
    assert store.list() == [] and leftovers(store) == ([], [], [])


def test_hostile_layer_leaves_nothing(store: ImageStore, tmp_path: Path) -> None:
    evil = Tar().symlink("etc", str(tmp_path)).file("etc/pwned", b"x").bytes()
    with pytest.raises(ImageError, match="not writing through it"):
        add_image(store, [BASE, evil], tags=("r.io/evil:1",))
    assert not (tmp_path / "pwned").exists()
    assert store.list() == [] and leftovers(store) == ([], [], [])


def test_failure_mid_unpack_then_retry(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real = layers_mod.unpack_layer
    calls = []

    def failing(*args: object, **kw: object) -> str:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as good as a crash for what is left behind
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(layers_mod, "unpack_layer", failing)
    md, mb, cb = make_image(store, [BASE, APP])
    with pytest.raises(KeyboardInterrupt):
        store.add(md, mb, cb, ["r.io/x:1"])
    assert store.list() == [] and leftovers(store) == ([], [], [])
    monkeypatch.setattr(layers_mod, "unpack_layer", real)
    assert store.add(md, mb, cb, ["r.io/x:1"]).repo_tags == ["r.io/x:1"]


def test_mkfs_failure_leaves_nothing(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ImageError, match="mkfs.erofs not found"):
        add_image(store, [BASE])
    assert store.list() == [] and leftovers(store) == ([], [], [])


def test_crash_leftovers_are_cleaned_or_reused(store: ImageStore) -> None:
    # a process killed mid-unpack: its staging dir stays, its flock is gone
    dead = store.tmp_dir / "dead-1234"
    (dead / "rootfs/etc").mkdir(parents=True)
    (dead / "lock").touch()
    # one that was killed before it could lock its dir: removed once old
    unlocked = store.tmp_dir / ".new-old"
    unlocked.mkdir()
    os.utime(unlocked, (0, 0))
    # one just being made by a live add, not yet locked: kept
    fresh = store.tmp_dir / ".new-fresh"
    fresh.mkdir()
    # a live add elsewhere: its flock is held, its dir must survive
    live = store.tmp_dir / "live-5678"
    live.mkdir()
    fd = os.open(live / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        # killed after the erofs rename, before the record: the retry reuses the erofs
        md, mb, cb = make_image(store, [BASE])
        img = store.add(md, mb, cb)
        erofs = Path(img.erofs)
        store.remove(img.id)
        img_bytes = b"complete erofs from the crashed run"
        erofs.write_bytes(img_bytes)
        assert store.gc() == [erofs]  # nobody records it: gc removes it
        erofs.write_bytes(img_bytes)
        md, mb, cb = make_image(store, [BASE])  # (remove took the blobs: pull again)
        again = store.add(md, mb, cb)
        assert erofs.read_bytes() == img_bytes and again.id == img.id
        assert not dead.exists() and not unlocked.exists()
        assert live.exists() and fresh.exists()
    finally:
        os.close(fd)
    assert store.gc() == [live]
    fresh.rmdir()


def test_corrupt_index_is_a_state_error(store: ImageStore) -> None:
    store.index_path.write_text("{not json")
    with pytest.raises(StateError, match="corrupt"):
        store.list()


@pytest.mark.parametrize(
    ("ref", "repo"),
    [
        ("docker.io/library/busybox:latest", "docker.io/library/busybox"),
        ("localhost:5000/a/b", "localhost:5000/a/b"),
        ("localhost:5000/a/b:v1", "localhost:5000/a/b"),
        ("r.io/x@sha256:" + "a" * 64, "r.io/x"),
    ],
)
def test_repository_of(ref: str, repo: str) -> None:
    assert repository_of(ref) == repo


def _pulling(
    store: ImageStore, layers: list[bytes], compression: str = "gzip"
) -> tuple[str, list[bytes]]:
    """An image whose manifest and config are stored and whose layer blobs are not yet:
    (manifest digest, layer blobs) for a fake fetch to write."""
    md, mb, cb = make_image(store, layers, compression=compression)
    blobs = [compress(t, compression) for t in layers]
    for b in blobs:
        store.blobs.remove(dg(b))
    store.blobs.put(md, mb)
    store.blobs.put(dg(cb), cb)
    return md, blobs


async def _arrive(
    store: ImageStore, blobs: list[bytes], piece: int = 2000, pause_s: float = 0.002
) -> None:
    """What RegistryClient.fetch_layers does to the store, slowly."""
    for b in blobs:
        w = store.blobs.writer(dg(b), len(b))
        for i in range(0, len(b), piece):
            w.write(b[i : i + piece])
            await asyncio.sleep(pause_s)
        w.commit()


BIG = Tar().file("big", os.urandom(100_000)).file("etc/more", b"more").bytes()


@pytest.mark.parametrize("how", ["gzip", "zstd", "none"])
def test_add_pulled_unpacks_layers_as_they_arrive(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    real = layers_mod.unpack_layer
    done: list[float] = []

    def timed(*args: Any, **kw: Any) -> str:
        got = real(*args, **kw)
        done.append(time.monotonic())
        return got

    monkeypatch.setattr(layers_mod, "unpack_layer", timed)
    md, blobs = _pulling(store, [BASE, BIG, APP], how)

    async def fetch() -> float:
        await _arrive(store, blobs[:1])
        await _arrive(store, blobs[1:], piece=20_000, pause_s=0.05)
        return time.monotonic()

    async def main() -> tuple[Image, float]:
        f = asyncio.ensure_future(fetch())
        img = await store.add_pulled(md, f, ["r.io/x:1"])
        return img, f.result()

    img, fetched = asyncio.run(main())
    assert done[0] < fetched  # layer 1 was unpacked while layer 2 was still coming
    assert img.repo_tags == ["r.io/x:1"] and [x.diff_id for x in img.layers] == [
        dg(BASE),
        dg(BIG),
        dg(APP),
    ]
    assert leftovers(store) == ([f"{img.id[7:]}.erofs"], [], [])
    with mounted(img.erofs, tmp_path / "mnt") as m:
        assert sorted(os.listdir(m)) == ["app", "big", "bin"]
        assert (m / "big").read_bytes() == BIG[512:100_512]
        assert stat.S_IMODE((m / "app/run").stat().st_mode) == 0o4755


def test_add_pulled_fetch_failure_stops_the_unpacker(store: ImageStore) -> None:
    md, blobs = _pulling(store, [BASE, BIG])

    async def fetch() -> None:
        await _arrive(store, blobs[:1])
        w = store.blobs.writer(dg(blobs[1]), len(blobs[1]))
        w.write(blobs[1][:1000])
        await asyncio.sleep(0.05)  # the unpacker waits for the rest
        w.abort()
        raise ImageError("registry r.io unreachable: connection refused")

    before = threading.active_count()
    with pytest.raises(ImageError, match="connection refused"):
        asyncio.run(store.add_pulled(md, fetch(), ["r.io/x:1"]))
    assert threading.active_count() == before
    erofs, tmp, ingest = leftovers(store)
    assert store.list() == [] and erofs == tmp == []
    assert ingest == [dg(blobs[1])[7:] + ".partial"]  # kept for a resume


def test_add_pulled_bad_blob_is_the_error_not_what_was_unpacked(store: ImageStore) -> None:
    """A layer the unpacker refuses but whose blob then fails verification: the
    pull fails on the digest, as it would have without unpacking ahead."""
    md, blobs = _pulling(store, [BASE, APP], "none")
    hostile = Tar().file("../escape", b"x").bytes()

    async def fetch() -> None:
        await _arrive(store, blobs[:1])
        w = store.blobs.writer(dg(blobs[1]), len(blobs[1]))
        w.write(hostile[: len(blobs[1])].ljust(len(blobs[1]), b"\0"))
        await asyncio.sleep(0.05)
        w.commit()

    with pytest.raises(ImageError, match="digest mismatch"):
        asyncio.run(store.add_pulled(md, fetch(), ["r.io/x:1"]))
    assert store.list() == [] and leftovers(store) == ([], [], [])


def test_add_pulled_hostile_layer_refused(store: ImageStore, tmp_path: Path) -> None:
    evil = Tar().symlink("etc", str(tmp_path)).file("etc/pwned", b"x").bytes()
    md, blobs = _pulling(store, [BASE, evil])
    with pytest.raises(ImageError, match="not writing through it"):
        asyncio.run(store.add_pulled(md, _arrive(store, blobs), ["r.io/evil:1"]))
    assert not (tmp_path / "pwned").exists()
    assert store.list() == [] and leftovers(store) == ([], [], [])


def test_add_pulled_blob_fetched_again_from_zero(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial thrown away while the unpacker read it (a refused resume): the
    layers are unpacked again from the verified blobs."""
    calls: list[int] = []
    real = layers_mod.unpack_layer

    def counted(*args: Any, **kw: Any) -> str:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(layers_mod, "unpack_layer", counted)
    md, blobs = _pulling(store, [BASE, BIG], "none")

    async def fetch() -> None:
        w = store.blobs.writer(dg(blobs[0]), len(blobs[0]))
        w.write(blobs[0][:1024])
        await asyncio.sleep(0.1)  # read by the unpacker
        w.abort(keep_partial=False)
        await _arrive(store, blobs)

    img = asyncio.run(store.add_pulled(md, fetch(), ["r.io/x:1"]))
    assert len(calls) == 3 and [x.diff_id for x in img.layers] == [dg(BASE), dg(BIG)]
    assert leftovers(store) == ([f"{img.id[7:]}.erofs"], [], [])


def test_add_pulled_of_a_built_image_only_fetches_and_records(store: ImageStore) -> None:
    md, blobs = _pulling(store, [BASE])
    a = asyncio.run(store.add_pulled(md, _arrive(store, blobs), ["r.io/x:1"]))
    b = asyncio.run(store.add_pulled(md, asyncio.sleep(0), ["r.io/x:2"]))
    assert a.id == b.id and b.repo_tags == ["r.io/x:1", "r.io/x:2"]


# -- hostile input cannot exhaust the host (issue 14, item 3) ----------------


def _zero_bomb(size: int) -> tuple[bytes, int]:
    """A valid gzip of a tar holding one ``size``-byte file of zeros, ~1000x smaller,
    made without ever holding it: identical gzip members of 64 MiB of zeros each
    (a multi-member gzip is one stream), with the tar's header and end around them.
    Returns the blob and the tar's length."""
    import gzip
    import tarfile

    step = 64 << 20
    assert size % step == 0
    ti = tarfile.TarInfo("zeros")
    ti.size, ti.mtime = size, 1_000_000
    head = ti.tobuf(tarfile.PAX_FORMAT)
    tail = bytes(1024)
    zeros = gzip.compress(bytes(step), compresslevel=9, mtime=0)
    blob = gzip.compress(head, mtime=0) + zeros * (size // step) + gzip.compress(tail, mtime=0)
    return blob, len(head) + size + len(tail)


def test_zero_bomb_refused_early_and_leaves_nothing(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's bomb: an 11 MiB gzip layer of an 11 GiB file of zeros, within
    images.max_unpacked_bytes (32 GiB). It is refused by the inflation ratio after
    less than 1 GiB of output, of which nothing reached the disk (zero blocks are
    holes), in one line, and the store is left as it was."""
    from cocoon.images.guard import WriteGuard

    blob, tar_len = _zero_bomb(11 << 30)
    assert len(blob) < 12 << 20 and tar_len < store.cfg.images.max_unpacked_bytes
    handed = [0]
    real_write = WriteGuard.write

    def counted(self: WriteGuard, fd: int, buf: bytes, start: int, end: int, *a: Any) -> int:
        handed[0] += end - start
        return real_write(self, fd, buf, start, end, *a)

    monkeypatch.setattr(WriteGuard, "write", counted)
    md, mb, cb = make_image(store, [], blobs=[blob], diff_ids=[dg(b"not computed: refused first")])
    with open("/proc/self/io") as f:
        wchar0 = int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])
    t0 = time.monotonic()
    with pytest.raises(ImageError) as e:
        store.add(md, mb, cb, ["docker.io/library/bomb:1"])
    elapsed = time.monotonic() - t0
    with open("/proc/self/io") as f:
        wchar = int(dict(line.split(": ") for line in f.read().splitlines())["wchar"]) - wchar0
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    limit = 80 * len(blob)  # images.max_inflation_ratio times the blob, past the floor
    assert f"of compressed data inflate to more than {limit / (1 << 20):.0f} MiB (over 80" in msg
    assert limit - (1 << 20) <= handed[0] < 1 << 30  # bytes written, or left as holes
    assert wchar < 1 << 20  # the zeros went nowhere: holes
    assert elapsed < 30
    assert leftovers(store) == ([], [], [])
    assert store.list() == []


@pytest.fixture
def tiny_store(tmp_path: Path) -> Any:
    """A store on a 64 MiB tmpfs that keeps 24 MiB free (we are root)."""
    from tests.unit.test_guard import tiny_fs

    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs")
    with tiny_fs(tmp_path / "fs") as fs:
        cfg = Config(data_dir=str(fs / "data"))
        cfg.images.min_free_bytes, cfg.images.min_free_percent = 24 << 20, 0.0
        yield ImageStore(cfg)


def _incompressible_but_small(n: int) -> bytes:
    """n bytes of one random 64 KiB block repeated: no zero blocks, and zstd
    finds the repeats (the blob is a few hundred KiB)."""
    return os.urandom(64 << 10) * (n >> 16)


def test_free_space_reserve_refuses_an_unpack(tiny_store: ImageStore) -> None:
    layer = Tar().file("big", _incompressible_but_small(48 << 20)).bytes()
    with pytest.raises(ImageError) as e:
        add_image(tiny_store, [layer], compression="zstd")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith("layer 1/1 (sha256:")
    assert "MiB left on the file system of " + str(tiny_store.root) in msg
    assert "cocoon keeps 24 MiB free there (images.min_free_bytes, images.min_free_percent)" in msg
    assert leftovers(tiny_store) == ([], [], [])


def test_free_space_reserve_refuses_a_build_before_mkfs(tiny_store: ImageStore) -> None:
    """The tree fits, but the image built from it would not: refused up front."""
    layer = Tar().file("big", _incompressible_but_small(24 << 20)).bytes()
    with pytest.raises(ImageError, match=r"^image [0-9a-f]{12}: only \d+ MiB left .* and 24 MiB"):
        add_image(tiny_store, [layer], compression="zstd")
    assert leftovers(tiny_store) == ([], [], [])
    small = add_image(tiny_store, [Tar().file("f", b"fits").bytes()], compression="zstd")
    assert Path(small.erofs).is_file()


def test_zero_filled_files_keep_the_fast_plain_erofs(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few zero-filled files (holes in the tree now) do not flip an ordinary image
    to chunk-based erofs (3-7x mkfs time); a tree that is mostly holes does."""
    argvs: list[list[str]] = []
    real_run = store_mod.run

    def spy(argv: list[str], **kw: Any) -> Any:
        argvs.append(argv)
        return real_run(argv, **kw)

    monkeypatch.setattr(store_mod, "run", spy)
    t = Tar().dir("usr")
    for i in range(40):
        t.file(f"usr/bin{i}", os.urandom(200_000) + bytes(16 << 10) + os.urandom(9_000))
    t.file("var/zeros1", bytes(1 << 20)).file("var/zeros2", bytes(3 << 20))
    img = add_image(store, [t.bytes()])
    assert not any(a.startswith("--chunksize") for a in argvs[-1])
    with mounted(img.erofs, tmp_path / "mnt") as m:
        assert (m / "var/zeros2").read_bytes() == bytes(3 << 20)
    mostly = add_image(store, [Tar().file("a", b"x").file("zeros", bytes(64 << 20)).bytes()])
    assert any(a.startswith("--chunksize") for a in argvs[-1])
    assert Path(mostly.erofs).stat().st_size < 1 << 20


# -- trees mkfs.erofs 1.5 gets wrong (issue 18, item 2) ------------------------


@pytest.mark.parametrize(
    "layer, path, why",
    [
        (Tar().file("d/" + "n" * 255, b"max").bytes(), "d/" + "n" * 255, "a name of 255 B"),
        (Tar().file("lost+found/f", b"lf").bytes(), "lost+found/f", "lost+found"),
        (Tar().file("a/lost+found.txt", b"lf").bytes(), "a/lost+found.txt", "lost+found"),
        (
            Tar().file("/".join(["d" * 250] * 16) + "/leaf", b"deep").bytes(),
            "/".join(["d" * 250] * 16) + "/leaf",
            "a path of",
        ),
    ],
    ids=["name-255", "lost+found", "lost+found-prefix", "path-max"],
)
def test_trees_mkfs_erofs_gets_wrong_build_with_names_intact(
    store: ImageStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layer: bytes,
    path: str,
    why: str,
) -> None:
    """mkfs.erofs 1.5 fails on a 255-byte name or a path of PATH_MAX, and drops
    every lost+found* entry: such a tree is written by cocoon's erofs writer, and
    the image holds every name, as the layer says. Other trees still go to mkfs."""
    reasons: list[str] = []
    real = store_mod._own_writer

    def spy(budget: Any) -> str:
        reasons.append(real(budget))
        return reasons[-1]

    monkeypatch.setattr(store_mod, "_own_writer", spy)
    img = add_image(store, [BASE, layer])
    assert why in reasons[-1]
    with mounted(img.erofs, tmp_path / "mnt") as m:
        fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
        try:
            *dirs, leaf = path.split("/")
            for d in dirs:  # by dir fds: the deep path is longer than PATH_MAX from /
                nfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            assert os.stat(leaf, dir_fd=fd).st_size > 0
        finally:
            os.close(fd)
        assert (m / "bin/sh").read_bytes() == b"#!shell"
    add_image(store, [BASE, OTHER])
    assert reasons[-1] == ""  # an ordinary tree: mkfs.erofs


def test_mkfs_ignores_source_date_epoch(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkfs.erofs clamps every mtime to $SOURCE_DATE_EPOCH when it is set (as
    in many build environments): the image's mtimes must be the layers'."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000")
    img = add_image(store, [Tar().file("f", b"x", mtime=1_700_000_000).bytes()])
    with mounted(img.erofs, tmp_path / "mnt") as m:
        assert (m / "f").stat().st_mtime == 1_700_000_000
