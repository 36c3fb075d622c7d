"""The shell loop's two halves that need no VM: the words the host writes,
evaluated by a real busybox sh as the loop evaluates them, and the reading
of its output, cut at a call's mark however the bytes arrive."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import pytest

from cocoon.serve.shloop import READY, SCRIPT, _Marked, begin_frame, call_frame, env_words, quote

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="needs busybox (scripts/setup.sh)")

ODD = [
    "",
    "plain",
    "it's",
    "'''",
    'say "hi"',
    "$HOME `id` $(id) \\n \\",
    "two\nlines\n",
    "\n",
    "tab\there\r",
    "ünïcödé ✓",
    "a'\nb'\"$COCOON_NL\"",
]


def _environ(script: str) -> dict[str, str]:
    """What a child sees after ``script`` is evaluated as the loop's
    subshell evaluates a call's words."""
    assert BUSYBOX is not None
    dump = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
    sh = f"COCOON_NL='\n'\nset -- {' '.join(quote(a) for a in dump)}\n_l={quote(script)}\n"
    sh += '(eval "$_l"; exec "$@")\n'
    out = subprocess.run([BUSYBOX, "sh", "-c", sh], capture_output=True, check=True, timeout=30)
    env: dict[str, str] = json.loads(out.stdout)
    return env


@needs_busybox
def test_any_value_survives_the_quoting() -> None:
    env = [f"V{i}={v}" for i, v in enumerate(ODD)]
    got = _environ(env_words(env))
    for i, v in enumerate(ODD):
        assert got[f"V{i}"] == v


@needs_busybox
def test_a_name_no_shell_variable_can_have_still_reaches_the_handler() -> None:
    got = _environ(env_words(["HTTP_X.THING=a'b\nc", "PLAIN=1"]))
    assert got["HTTP_X.THING"] == "a'b\nc" and got["PLAIN"] == "1"


def test_frames_are_one_line_each_and_say_their_lengths() -> None:
    frame = begin_frame(["/bin/sh", "/code/a b.sh"], ["X=1\n2"])
    n, _, script = frame.partition(b"\n")
    assert int(n) == len(script) and script.count(b"\n") == 1 and script.endswith(b"\n")
    payload = bytes(range(256)) * 3
    frame = call_frame("ab" * 16, ["Y=multi\nline"], payload)
    head, _, rest = frame.partition(b"\n")
    mark, e, p = head.split()
    assert mark == b"ab" * 16 and int(p) == len(payload) and rest[int(e) :] == payload
    assert rest[: int(e)].count(b"\n") == 1
    assert call_frame("cd" * 16, [], b"") == b"cd" * 16 + b" 0 0\n"


def test_the_script_says_ready_as_the_host_expects() -> None:
    assert f"printf '{READY.decode().strip()}\\n'" in SCRIPT


def _cut(chunks: list[bytes], mark: bytes) -> tuple[bytes, bytes | None, bytes]:
    got = bytearray()
    m = _Marked(1 << 20)
    m.expect(mark, got.extend)
    for c in chunks:
        m.feed(c)
    return bytes(got), m.trailer, m.take_stray()


def test_output_is_cut_at_the_mark_however_it_is_split() -> None:
    async def run() -> None:
        mark = b"0123456789abcdef0123456789abcdef"
        body = b"out\x00put with " + mark[:31] + b" almost a mark\n"
        stream = body + mark + b" 3 0\nlater"
        for i in range(len(stream) + 1):
            for j in range(i, len(stream) + 1):
                got, trailer, stray = _cut([stream[:i], stream[i:j], stream[j:]], mark)
                assert (got, trailer, stray) == (body, b" 3 0", b"later"), (i, j)

    asyncio.run(run())


def test_held_back_bytes_are_output_when_no_mark_comes() -> None:
    async def run() -> None:
        got = bytearray()
        m = _Marked(1 << 20)
        m.expect(b"x" * 32, got.extend)
        m.feed(b"partial output xxxx")
        m.flush()
        assert bytes(got) == b"partial output xxxx" and m.trailer is None
        m.end()
        assert m.done.is_set()

    asyncio.run(run())


def test_bytes_no_call_waits_for_are_kept_bounded() -> None:
    async def run() -> None:
        m = _Marked(8)
        m.feed(b"stray output of a leftover process")
        assert m.take_stray() == b"stray ou" and m.take_stray() == b""

    asyncio.run(run())
