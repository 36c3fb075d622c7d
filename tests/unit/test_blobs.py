"""The blob store admits only bytes whose digest matches, and resumes partial writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cocoon.images.blobs import BlobStore, ImageError, check_digest


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
