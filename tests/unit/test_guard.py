"""The write guard: zero blocks as holes, the inflation ratio, the free-space reserve."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocoon.errors import ImageError
from cocoon.images.guard import BLOCK, GuardLimits, WriteGuard, write_holes

ROOT = os.geteuid() == 0


def _pattern(rng: random.Random, n_blocks: int) -> bytes:
    """Blocks of zeros, of data, and of zeros with one byte set at either end."""
    out = []
    for _ in range(n_blocks):
        kind = rng.randrange(5)
        if kind < 2:
            out.append(bytes(BLOCK))
        elif kind == 2:
            out.append(rng.randbytes(BLOCK))
        else:
            b = bytearray(BLOCK)
            b[0 if kind == 3 else -1] = 1
            out.append(bytes(b))
    return b"".join(out)


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The file's allocated ranges, by SEEK_DATA / SEEK_HOLE."""
    out, pos = [], 0
    while pos < size:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: only a hole is left
        end = os.lseek(fd, pos, os.SEEK_HOLE)
        out.append((pos, end))
        pos = end
    return out


def test_write_holes_keeps_content_and_leaves_every_zero_block_a_hole(tmp_path: Path) -> None:
    """Whatever the chunking and the file offset, the file reads back the same,
    every file-aligned block of zeros is a hole (a block two chunks share, too)
    and every other block is data."""
    rng = random.Random(7)
    for trial in range(40):
        data = _pattern(rng, 200)[rng.randrange(BLOCK) :]
        skew = rng.randrange(2 * BLOCK)  # the data starts here in the file
        size = skew + len(data)
        p = tmp_path / f"f{trial}"
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            pos = 0
            while pos < len(data):
                n = rng.choice((1, 511, BLOCK, 3 * BLOCK + 5, 1 << 16, 1 << 20))
                piece = data[pos : pos + n]
                pad = bytes(rng.randrange(64))  # the piece sits inside a bigger chunk
                chunk = pad + piece + b"tail"
                write_holes(fd, chunk, len(pad), len(pad) + len(piece), skew + pos)
                pos += n
            os.ftruncate(fd, size)
            ranges = _data_ranges(fd, size)
        finally:
            os.close(fd)
        content = bytes(skew) + data
        assert p.read_bytes() == content, trial
        for b in range(0, size, BLOCK):
            in_data = any(lo <= b < hi for lo, hi in ranges)
            assert in_data == any(content[b : b + BLOCK]), (trial, b)


def test_zero_file_costs_no_blocks(tmp_path: Path) -> None:
    guard = WriteGuard()
    p = tmp_path / "zeros"
    fd = os.open(p, os.O_RDWR | os.O_CREAT)
    try:
        zeros = bytes(1 << 20)
        for i in range(64):
            guard.write(fd, zeros, 0, len(zeros), i << 20, "test")
        guard.write(fd, b"end", 0, 3, 64 << 20, "test")
        os.ftruncate(fd, (64 << 20) + 3)
    finally:
        os.close(fd)
    st = p.stat()
    assert st.st_size == (64 << 20) + 3 and st.st_blocks * 512 <= 64 << 10
    assert (guard.holes, guard.written) == (64 << 20, 3)


def test_inflation_bound_is_ratio_times_blob_past_the_floor() -> None:
    limits = GuardLimits(max_ratio=80, ratio_floor=1 << 20)
    small = WriteGuard(limits).inflation(1000, "layer 1/1 (sha256:abc)")
    small.add(1 << 20)  # under the floor, whatever the ratio
    with pytest.raises(ImageError, match=r"^layer 1/1 \(sha256:abc\): .*over 80 times"):
        small.add(1)
    big = WriteGuard(limits).inflation(100 << 20, "layer")
    big.add(8000 << 20)
    with pytest.raises(ImageError, match="images.max_inflation_ratio"):
        big.add(1)
    unknown = WriteGuard(limits).inflation(None, "layer")
    unknown.add(1 << 40)  # no size, no ratio: the other caps hold


@contextlib.contextmanager
def tiny_fs(where: Path, size_mib: int = 64) -> Iterator[Path]:
    """A small tmpfs (we are root), unmounted after."""
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(where)],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.mark.skipif(not ROOT, reason="mounts a tmpfs")
def test_reserve_refuses_with_what_is_left(tmp_path: Path) -> None:
    with tiny_fs(tmp_path / "fs") as fs:
        guard = WriteGuard(GuardLimits(min_free_bytes=40 << 20, min_free_percent=0), str(fs))
        fd = os.open(fs / "f", os.O_RDWR | os.O_CREAT)
        try:
            data = os.urandom(1 << 20)
            with pytest.raises(ImageError) as e:
                for i in range(64):
                    guard.write(fd, data, 0, len(data), i << 20, "layer 1/1 (sha256:abc)")
        finally:
            os.close(fd)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1
        left = f"only 32 MiB left on the file system of {fs};"
        assert msg.startswith(f"layer 1/1 (sha256:abc): {left}")
        assert "cocoon keeps 40 MiB free there (images.min_free_bytes" in msg
        assert "cocoon rmi" in msg
        # checked every CHECK_EVERY (16 MiB) of data: refused at the first check past it
        assert guard.written == 32 << 20
        # the percentage counts too, and a build asks for its room up front
        pct = WriteGuard(GuardLimits(min_free_bytes=0, min_free_percent=50), str(fs))
        with pytest.raises(ImageError, match=r"and 10 MiB more are needed; cocoon keeps 32 MiB"):
            pct.check_room(fs, 10 << 20, "image x")


@pytest.mark.skipif(not ROOT, reason="mounts a tmpfs")
def test_blob_writes_keep_the_reserve_and_leave_nothing(tmp_path: Path) -> None:
    """A registry's blob (or a loaded archive's) may not fill the disk either: a
    blob announced too big for the room left is refused before a byte is written;
    one that grows past it is refused as it is written, its partial removed."""
    import hashlib

    from cocoon.images.blobs import BlobStore

    with tiny_fs(tmp_path / "fs") as fs:
        guard = WriteGuard(GuardLimits(min_free_bytes=24 << 20, min_free_percent=0), str(fs))
        store = BlobStore(fs / "blobs", guard)
        digest = "sha256:" + hashlib.sha256(b"x").hexdigest()
        with pytest.raises(ImageError, match=r"^blob sha256:2d711642b726: only 64 MiB .*, and 48"):
            store.writer(digest, 48 << 20)
        w = store.writer(digest)  # size unknown up front
        with pytest.raises(ImageError, match=r"^blob sha256:2d711642b726: only \d+ MiB left on"):
            for _ in range(48):
                w.write(os.urandom(1 << 20))
        assert os.listdir(fs / "blobs" / "ingest") == []
        with pytest.raises(ImageError, match=r"^blob: only \d+ MiB left"):
            store.ingest(open("/dev/urandom", "rb"), 1 << 30)  # noqa: SIM115
        assert os.listdir(fs / "blobs" / "ingest") == []
