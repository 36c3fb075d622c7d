"""The agent's output pump (agent.containers._fd_to_stream): output after a
quiet spell goes at once; output that keeps coming is sent in batches."""

from __future__ import annotations

import os
import threading
import time

import pytest

from cocoon.agent import containers


class Recorder:
    """Stands in for the session's OutStream: the pump's only peer here."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed = threading.Event()
        self.got = threading.Condition()

    def write(self, data: bytes) -> None:
        with self.got:
            self.chunks.append(data)
            self.got.notify_all()

    def close(self) -> None:
        self.closed.set()

    def wait_for(self, n: int, timeout_s: float) -> bool:
        with self.got:
            return self.got.wait_for(lambda: len(self.chunks) >= n, timeout_s)


def test_a_quiet_stream_sends_at_once_and_a_busy_one_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A window far longer than the test's waits: a chunk that waited in it
    # would come seconds late, not within the one second allowed.
    monkeypatch.setattr(containers, "COALESCE_S", 5.0)
    r, w = os.pipe()
    out = Recorder()
    pump = threading.Thread(target=containers._fd_to_stream, args=(r, out), daemon=True)
    pump.start()
    try:
        t0 = time.monotonic()
        os.write(w, b"first\n")
        assert out.wait_for(1, 1.0), "the first output after a quiet spell waited"
        assert time.monotonic() - t0 < 1.0
        # The stream is busy now: these wait in the window for more, together.
        os.write(w, b"b")
        time.sleep(0.1)
        os.write(w, b"c")
        time.sleep(0.1)
        assert out.chunks == [b"first\n"]  # still held
    finally:
        os.close(w)  # the end closes the window
    assert out.closed.wait(5.0)
    pump.join(5.0)
    assert out.chunks == [b"first\n", b"bc"]
