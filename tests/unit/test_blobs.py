"""The blob store admits only bytes whose digest matches, and resumes partial writes."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from cocoon.images.blobs import (
    BlobFollower,
    BlobRestarted,
    BlobStore,
    FollowStopped,
    ImageError,
    check_digest,
)


def dg(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def test_put_read_and_dedupe(tmp_path: Path) -> None:
    s = BlobStore(tmp_path)
    d = dg(b"hello")
    p = s.put(d, b"hello")
    assert s.put(d, b"hello") == p
    assert s.read(d, 10) == b"hello"
    assert s.digests() == [d]
    with pytest.raises(ImageError, match="more than"):
        s.read(d, 3)


def test_digest_mismatch_stores_nothing(tmp_path: Path) -> None:
    s = BlobStore(tmp_path)
    d = dg(b"expected")
    w = s.writer(d)
    w.write(b"something else")
    with pytest.raises(ImageError, match="digest mismatch"):
        w.commit()
    assert not s.has(d) and list((tmp_path / "ingest").iterdir()) == []


def test_oversize_and_short_blobs_refused(tmp_path: Path) -> None:
    s = BlobStore(tmp_path)
    w = s.writer(dg(b"abc"), 3)
    with pytest.raises(ImageError, match="larger than"):
        w.write(b"abcd")
    w = s.writer(dg(b"abc"), 3)
    w.write(b"ab")
    with pytest.raises(ImageError, match="expected 3 B"):
        w.commit()


def test_resume_after_interruption(tmp_path: Path) -> None:
    s = BlobStore(tmp_path)
    data = bytes(range(256)) * 1000
    d = dg(data)
    w = s.writer(d, len(data))
    w.write(data[:1000])
    w.abort()  # killed mid-download: the partial stays, invisible
    assert not s.has(d)
    w = s.writer(d, len(data))
    assert w.offset == 1000
    w.write(data[1000:])
    w.commit()
    assert s.read(d, len(data)) == data


@pytest.mark.parametrize("bad", ["sha256:xyz", "md5:" + "0" * 32, "sha256:" + "A" * 64, "../etc"])
def test_malformed_digests(bad: str) -> None:
    with pytest.raises(ImageError):
        check_digest(bad)


def test_ingest_computes_the_digest(tmp_path: Path) -> None:
    import io

    s = BlobStore(tmp_path)
    data = b"a docker-save layer" * 1000
    d, n = s.ingest(io.BytesIO(data), len(data))
    assert (d, n) == (dg(data), len(data)) and s.read(d, n) == data
    assert s.ingest(io.BytesIO(data), len(data)) == (d, n)  # already there: deduplicated
    with pytest.raises(ImageError, match="larger than"):
        s.ingest(io.BytesIO(data), 10)
    assert list((tmp_path / "ingest").iterdir()) == []


def _read_all(f: BlobFollower, out: list[bytes], errors: list[BaseException]) -> None:
    try:
        while chunk := f.read(1000):
            out.append(chunk)
    except BaseException as e:  # handed to the test thread
        errors.append(e)


def _following(
    s: BlobStore, d: str, stop: threading.Event
) -> tuple[threading.Thread, list[bytes], list[BaseException]]:
    out: list[bytes] = []
    errors: list[BaseException] = []
    t = threading.Thread(target=_read_all, args=(s.follow(d, stop), out, errors), daemon=True)
    t.start()
    return t, out, errors


def test_follow_a_blob_while_it_is_written(tmp_path: Path) -> None:
    """A follower gets the bytes as they are written, waits when it caught up,
    and sees the end only once the blob is committed; a stored blob is just read."""
    s = BlobStore(tmp_path)
    data = os.urandom(50_000)
    d = dg(data)
    t, out, errors = _following(s, d, threading.Event())  # before the writer exists
    w = s.writer(d, len(data))
    for i in range(0, len(data), 7_000):
        w.write(data[i : i + 7_000])
        time.sleep(0.01)
        assert t.is_alive()  # caught up: waiting, not at an end
    w.commit()
    t.join(5)
    assert not errors and b"".join(out) == data
    t, out, errors = _following(s, d, threading.Event())
    t.join(5)
    assert not errors and b"".join(out) == data


def test_follow_a_resumed_blob_and_a_restarted_one(tmp_path: Path) -> None:
    """A partial resumed (same file) is followed on; one thrown away (a new file)
    makes the follower raise BlobRestarted: the bytes it read may not be the blob's."""
    s = BlobStore(tmp_path)
    data = os.urandom(30_000)
    d = dg(data)
    w = s.writer(d, len(data))
    w.write(data[:10_000])
    t, out, errors = _following(s, d, threading.Event())
    w.abort()  # a broken connection: the partial stays for a resume
    w = s.writer(d, len(data))
    w.write(data[10_000:])
    w.commit()
    t.join(5)
    assert not errors and b"".join(out) == data

    data2 = os.urandom(30_000)
    d2 = dg(data2)
    w = s.writer(d2, len(data2))
    w.write(data2[:10_000])
    t, out, errors = _following(s, d2, threading.Event())
    time.sleep(0.05)
    w.abort(keep_partial=False)  # the registry refused the resume: from byte 0 again
    w = s.writer(d2, len(data2))
    w.write(data2)
    w.commit()
    t.join(5)
    assert [type(e) for e in errors] == [BlobRestarted]


def test_follow_stops_when_told(tmp_path: Path) -> None:
    s = BlobStore(tmp_path)
    stop = threading.Event()
    t, _, errors = _following(s, dg(b"never comes"), stop)
    time.sleep(0.05)
    stop.set()
    s.wake_followers()
    t.join(0.5)
    assert not t.is_alive() and [type(e) for e in errors] == [FollowStopped]
