"""The CRI log writer and reader: format, long lines, partial lines, rotation, tail, follow."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from cocoon.runtime import logs

LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) [FP] ")


def content(entries: list[logs.Entry], stream: str = "stdout") -> bytes:
    return b"".join(e.content + (b"\n" if e.full else b"") for e in entries if e.stream == stream)


def test_lines_in_any_chunking_come_back_whole(tmp_path: Path) -> None:
    w = logs.CriLogWriter(tmp_path / "c.log", max_bytes=1 << 30, max_files=1)
    data = b"".join(b"line %d\n" % i for i in range(5000)) + b"no newline at the end"
    for i in range(0, len(data), 777):
        w.write("stdout", data[i : i + 777])
    w.write("stderr", b"an error\n")
    w.close()
    raw = (tmp_path / "c.log").read_bytes().splitlines()
    assert all(LINE.match(ln) for ln in raw)
    entries = list(logs.read_entries(tmp_path / "c.log"))
    assert content(entries) == data  # the last line is a P piece: no newline added back
    assert content(entries, "stderr") == b"an error\n"


def test_long_lines_are_split_into_partials(tmp_path: Path) -> None:
    w = logs.CriLogWriter(tmp_path / "c.log", max_bytes=1 << 30, max_files=1)
    long = b"x" * (logs.MAX_LINE * 2 + 10)
    w.write("stdout", long + b"\nshort\n")
    w.close()
    entries = list(logs.read_entries(tmp_path / "c.log"))
    assert [(e.full, len(e.content)) for e in entries] == [
        (False, logs.MAX_LINE), (False, logs.MAX_LINE), (True, 10), (True, 5),
    ]  # fmt: skip
    assert content(entries) == long + b"\nshort\n"


def test_rotation_keeps_max_files_and_the_newest_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = logs.CriLogWriter(path, max_bytes=4096, max_files=3)
    for i in range(2000):
        w.write("stdout", b"line %d\n" % i)
    w.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["c.log", "c.log.1", "c.log.2"]
    lines = content(list(logs.read_entries(path))).decode().splitlines()
    first = int(lines[0].split()[1])
    assert first > 0 and lines == [f"line {i}" for i in range(first, 2000)]
    assert all(p.stat().st_size < 4096 + 200 for p in tmp_path.iterdir())


def test_tail_counts_lines_not_pieces() -> None:
    e = [
        logs.Entry("t", "stdout", True, b"a"),
        logs.Entry("t", "stdout", False, b"b1"),
        logs.Entry("t", "stdout", True, b"b2"),
        logs.Entry("t", "stdout", True, b"c"),
    ]
    assert logs.tail(e, 1) == e[3:]
    assert logs.tail(e, 2) == e[1:]
    assert logs.tail(e, 10) == e and logs.tail(e, -1) == e and logs.tail(e, 0) == []


def test_follow_sees_everything_written_after_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = logs.CriLogWriter(path, max_bytes=1 << 30, max_files=1)
    w.write("stdout", b"before\n")
    entries, offset, ino = logs.snapshot(path)
    assert content(entries) == b"before\n"
    done = threading.Event()

    def writer() -> None:
        for i in range(200):
            w.write("stdout", b"after %d\n" % i)
            time.sleep(0.001)
        w.close()
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    got = content(list(logs.follow(path, lambda: not done.is_set(), offset, ino, poll_s=0.01)))
    t.join()
    assert got == b"".join(b"after %d\n" % i for i in range(200))


def test_garbage_lines_are_skipped() -> None:
    assert logs.parse(b"nonsense") is None
    assert logs.parse(b"2026-01-01T00:00:00.000000000Z stdin F x") is None
    e = logs.parse(b"2026-01-01T00:00:00.000000000Z stderr F")
    assert e is not None and e.content == b"" and e.stream == "stderr"
