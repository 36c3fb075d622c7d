"""A template VM is saved once its guest is quiet (``restore._settle``),
judged by its QEMU's CPU: real processes stand in for QEMU here."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from cocoon.sandbox import restore

#: Spins for argv[1] seconds of CPU, then sleeps: a guest finishing its work.
BUSY_THEN_QUIET = (
    "import sys, time\n"
    "end = time.process_time() + float(sys.argv[1])\n"
    "while time.process_time() < end: pass\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def short_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long enough for 0.5 s of CPU on a busy CI host, short enough for a test."""
    monkeypatch.setattr(restore, "SETTLE_MAX_S", 3.0)


@pytest.fixture
def process() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def settle_s(pid: int) -> float:
    t0 = time.monotonic()
    asyncio.run(restore._settle(pid))
    return time.monotonic() - t0


def test_a_quiet_guest_is_saved_after_the_minimum(
    short_cap: None, process: list[subprocess.Popen[bytes]]
) -> None:
    process.append(subprocess.Popen(["sleep", "60"]))
    took = settle_s(process[0].pid)
    assert restore.SETTLE_MIN_S <= took < restore.SETTLE_MIN_S + 0.5


def test_a_busy_guest_is_waited_for_until_it_is_quiet(
    short_cap: None, process: list[subprocess.Popen[bytes]]
) -> None:
    process.append(subprocess.Popen([sys.executable, "-c", BUSY_THEN_QUIET, "0.5"]))
    took = settle_s(process[0].pid)
    assert 0.5 <= took < restore.SETTLE_MAX_S


def test_a_guest_that_never_quiets_is_saved_at_the_cap(
    monkeypatch: pytest.MonkeyPatch, process: list[subprocess.Popen[bytes]]
) -> None:
    monkeypatch.setattr(restore, "SETTLE_MAX_S", 1.0)
    process.append(subprocess.Popen([sys.executable, "-c", BUSY_THEN_QUIET, "60"]))
    took = settle_s(process[0].pid)
    assert restore.SETTLE_MAX_S <= took < restore.SETTLE_MAX_S + 0.5


def test_a_gone_qemu_ends_the_wait(process: list[subprocess.Popen[bytes]]) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    assert settle_s(p.pid) < restore.SETTLE_MIN_S + 0.2
