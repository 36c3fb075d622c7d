"""The shell runtime's handler loop: one ``sh`` per instance that runs each
invocation's handler as its child, so an invocation costs a fork and an exec
in the guest, not a `crun exec` (~40 ms of a ~55 ms first call under TCG:
the agent, crun, the namespaces and cgroup of a new process in the container).

The loop is busybox ``sh`` (the shell runtime's image has nothing else to
run it), started by one exec for the instance's life, as the Python loop is
(images/pyloop.py); its script is given on the command line, so the image
is unchanged. A pre-warmed blank starts it before any function's code is
there and it waits; the version's ``begin`` gives it the handler's command
and environment once the code is bound in.

The loop's stdin, from the host (all lengths in bytes, decimal):

- ``begin``: a line ``N``, then N bytes of a script it evaluates once (one
  line, ending in a newline): ``set --`` the handler's command line, and
  ``_b``, the version's environment as ``export`` words.
- each invocation: a line ``MARK E P`` (MARK: 32 random hex digits, new for
  each call), E bytes of this call's environment (one line, as ``_b``'s), P
  bytes of its input. The loop reads them exactly (``read`` stops at the
  newline; a longer line or the input by ``dd`` with one full block), so a
  handler that reads none of its input leaves nothing behind.

The handler runs as the loop's child, in a subshell that exports the two
environments and execs the command (the loop's own variables are not
exported, and it unsets what it would add, OLDPWD and SHLVL, so the
handler's environment is an exec's): its stdin the input (through a pipe
from ``dd``, which has read all of it before it writes), its stdout and
stderr the loop's own, so its output streams to the host as an exec's does
and the host caps what it keeps (serve.max_result_bytes, max_log_bytes).
When it exits, the loop writes ``MARK`` and a newline on stderr, then
``MARK RC OOM`` and a newline on stdout: RC as a shell reports it (128 + the
signal if killed), OOM 1 if it was killed (SIGKILL) while the container's
cgroup counted an OOM kill (memory.events), as the agent tells of an exec.

Why a mark rather than length-prefixed frames: a shell cannot count what a
child wrote without forking a counter per stream (~2 ms each under TCG) or
keeping it in files first (in the instance's memory, its first byte late).
The mark is 128 random bits the host picks per call and the handler is never
given, so no output can carry it by chance; a handler that digs it out of
its parent's memory can only garble its own invocations, in an instance
that serves its function alone, and the host bounds everything it reads.

What it changes against an exec per invocation: a process the handler
leaves running that still writes to stdout or stderr writes into a later
call's output (an exec's call waited until every writer closed them, up to
its timeout), and one that signals its whole process group (``kill 0``)
ends the loop with it (the call fails and the instance is replaced). A
timed-out call kills the loop, and the instance goes, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cocoon.config import Config
from cocoon.errors import CocoonError, SandboxError
from cocoon.runtime.lifecycle import Exec
from cocoon.runtime.records import ContainerDir

#: The loop's first line on stdout, once it is up and warm.
READY = b"cocoon-shloop 1\n"
#: A line the loop reads byte by byte below this size (a read(2) each, ~2.5
#: us a byte under TCG), by ``dd`` (one fork, ~2 ms) above.
_READ_MAX = 1024
#: An end mark's line (after the mark) is a few numbers: a longer one is broken.
_MAX_TRAILER = 64

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

SCRIPT = f"""\
COCOON_NL='
'
_oc() {{
  _c=0
  [ -r /sys/fs/cgroup/memory.events ] || return 0
  while read -r _k _v; do [ "$_k" = oom_kill ] && _c=$_v; done </sys/fs/cgroup/memory.events
  return 0
}}
_rd() {{
  if [ "$1" -gt {_READ_MAX} ]; then _l=$(dd bs="$1" count=1 iflag=fullblock 2>/dev/null)
  else IFS= read -r _l; fi
}}
for _w in 1 2; do
  _oc
  for _f in /code/* /code/.w; do [ -e "$_f" ]; done
  printf x | dd bs=1 count=1 iflag=fullblock 2>/dev/null |
    (eval "export '_w=1';"; exec /bin/sh /dev/null)
done
printf 'cocoon-shloop 1\\n'
IFS=' ' read -r _n || exit 0
_rd "$_n"
eval "$_l"
cd /code || exit 1
unset OLDPWD SHLVL
while IFS=' ' read -r _n _e _p; do
  _l=
  [ "$_e" -gt 0 ] && _rd "$_e"
  _oc
  _o=$_c
  if [ "$_p" -gt 0 ]; then
    dd bs="$_p" count=1 iflag=fullblock 2>/dev/null | (eval "$_b$_l"; exec "$@")
  else
    (eval "$_b$_l"; exec "$@") </dev/null
  fi
  _r=$?
  _m=0
  if [ "$_r" = 137 ]; then _oc; [ "$_c" -gt "$_o" ] && _m=1; fi
  printf '%s\\n' "$_n" >&2
  printf '%s %s %s\\n' "$_n" "$_r" "$_m"
done
"""


def quote(word: str) -> str:
    """``word`` as one shell word, on one line: single quotes (inside them
    nothing is special but the quote itself), each newline as
    ``"$COCOON_NL"`` (a function's variables cannot be named COCOON_*)."""
    body = word.replace("'", "'\\''").replace("\n", "'\"$COCOON_NL\"'")
    return f"'{body}'"


def env_words(env: list[str]) -> str:
    """``NAME=value`` entries as a script for the handler's subshell: exported,
    or (a name no shell variable can have, e.g. an HTTP trigger's header
    ``HTTP_X.Y``) put in the handler's environment by ``env``, as an exec
    gives it. Empty, or ending in ``;``."""
    plain = [e for e in env if _IDENT.match(e.partition("=")[0])]
    odd = [e for e in env if not _IDENT.match(e.partition("=")[0])]
    out = f"export {' '.join(quote(e) for e in plain)};" if plain else ""
    if odd:
        out += f'set -- /bin/env {" ".join(quote(e) for e in odd)} "$@";'
    return out


def _line(script: str) -> bytes:
    return script.encode("utf-8", "surrogateescape") + b"\n"


def begin_frame(argv: list[str], env: list[str]) -> bytes:
    script = _line(f"set -- {' '.join(quote(a) for a in argv)}; _b={quote(env_words(env))}")
    return b"%d\n" % len(script) + script


def call_frame(mark: str, env: list[str], payload: bytes) -> bytes:
    script = _line(env_words(env)) if env else b""
    return b"%s %d %d\n" % (mark.encode(), len(script), len(payload)) + script + payload


class _Marked:
    """One of the loop's output streams, cut at the current call's mark.

    Bytes while no call waits (what a handler left running wrote after its
    call ended) are kept, bounded, for the next call's logs."""

    def __init__(self, stray_cap: int) -> None:
        self.stray_cap = stray_cap
        self.stray = bytearray()
        self.mark = b""
        self.sink: Callable[[bytes], None] = lambda _: None
        self.pending = bytearray()
        self.found = False
        self.trailer: bytes | None = None
        self.done = asyncio.Event()
        self.eof = False

    def expect(self, mark: bytes, sink: Callable[[bytes], None]) -> None:
        self.mark, self.sink = mark, sink
        self.pending.clear()
        self.found, self.trailer = False, None
        self.done.clear()
        if self.eof:
            self.done.set()

    def take_stray(self) -> bytes:
        out = bytes(self.stray)
        self.stray.clear()
        return out

    def _keep_stray(self, data: bytes | bytearray) -> None:
        room = self.stray_cap - len(self.stray)
        if room > 0:
            self.stray += data[:room]

    def feed(self, chunk: bytes) -> None:
        if not self.mark or self.trailer is not None:
            self._keep_stray(chunk)
            return
        self.pending += chunk
        if not self.found:
            i = self.pending.find(self.mark)
            if i < 0:
                # All but a tail that may be the start of the mark is output.
                cut = max(0, len(self.pending) - len(self.mark) + 1)
                if cut:
                    self.sink(bytes(self.pending[:cut]))
                    del self.pending[:cut]
                return
            if i:
                self.sink(bytes(self.pending[:i]))
            del self.pending[: i + len(self.mark)]
            self.found = True
        j = self.pending.find(b"\n")
        if j < 0:
            if len(self.pending) > _MAX_TRAILER:
                self.trailer = b"?"  # broken: the caller fails the call
                self.done.set()
            return
        self.trailer = bytes(self.pending[:j])
        self._keep_stray(self.pending[j + 1 :])
        self.pending.clear()
        self.done.set()

    def flush(self) -> None:
        """What was held back as a possible mark is output after all (the
        call ended without one: killed, or the loop died)."""
        if not self.found and self.pending:
            self.sink(bytes(self.pending))
        self.pending.clear()

    def end(self) -> None:
        self.eof = True
        self.done.set()


@dataclass
class ShellResult:
    exit_code: int
    oom_killed: bool


class ShellBroken(Exception):
    """The loop ended or broke its protocol: the instance goes."""


class HandlerLoop:
    """A handler loop's process in one instance (this shell loop, or
    instances.LoopSession's Python one): what ending it takes."""

    ex: Exec

    async def kill(self) -> None:
        with contextlib.suppress(CocoonError, OSError, TimeoutError):
            await asyncio.wait_for(self.ex.process.signal(signal.SIGKILL), 5.0)

    async def exited(self) -> Any:
        """The loop's end (ProcessExited), if it ended; None if it did not say."""
        with contextlib.suppress(CocoonError, OSError, TimeoutError):
            return await asyncio.wait_for(self.ex.process.wait(), 5.0)
        return None


class ShellSession(HandlerLoop):
    """The shell loop in one instance, as the host drives it (see the
    module's docstring). One call at a time; its output goes through the
    ``sinks`` the caller gives, the same bounded buffers an exec fills."""

    def __init__(self, ex: Exec, cfg: Config) -> None:
        self.ex = ex
        stray = cfg.serve.max_log_bytes
        self._out = _Marked(stray)
        self._err = _Marked(stray)
        loop = asyncio.get_running_loop()
        self._pumps = [
            loop.create_task(self._pump(ex.process.stdout, self._out)),
            loop.create_task(self._pump(ex.process.stderr, self._err)),
        ]

    @classmethod
    async def start(cls, cdir: ContainerDir, cfg: Config, timeout_s: float) -> ShellSession:
        """The loop started and up (its fork, pipe and exec paths run once,
        so the guest's TCG has them translated before the first call)."""
        ex = await Exec.start(cdir, ["/bin/sh", "-c", SCRIPT], env=[], workdir="/code")
        try:
            got = await asyncio.wait_for(cls._hello(ex), timeout_s)
        except BaseException:
            with contextlib.suppress(CocoonError, OSError):
                await ex.close()
            raise
        if got != READY:
            with contextlib.suppress(CocoonError, OSError):
                await ex.close()
            raise SandboxError(f"the shell loop did not start: {got[:200]!r}")
        return cls(ex, cfg)

    @staticmethod
    async def _hello(ex: Exec) -> bytes:
        stream = ex.process.stdout
        assert stream is not None
        buf = b""
        while len(buf) < len(READY):
            chunk = await stream.read()
            if not chunk:
                break
            buf += chunk
        return buf

    async def _pump(self, stream: Any, marked: _Marked) -> None:
        with contextlib.suppress(CocoonError, ConnectionError):
            while chunk := await stream.read():
                marked.feed(chunk)
        marked.end()

    async def begin(self, argv: list[str], env: list[str]) -> None:
        """The handler's command and the version's environment: sent, not
        answered (a loop that cannot take them fails the first call)."""
        try:
            await self.ex.process.write_stdin(begin_frame(argv, env), close=False)
        except BaseException:
            await self.close()
            raise

    def take_stray(self) -> bytes:
        return self._out.take_stray() + self._err.take_stray()

    async def call(
        self,
        env: list[str],
        payload: bytes,
        out: Callable[[bytes], None],
        err: Callable[[bytes], None],
    ) -> ShellResult:
        """One invocation: its output through ``out`` and ``err`` as it
        comes; its end. Raises ShellBroken if the loop ended or broke."""
        mark = secrets.token_hex(16).encode()
        self._out.expect(mark, out)
        self._err.expect(mark, err)
        try:
            try:
                await self.ex.process.write_stdin(call_frame(mark.decode(), env, payload),
                                                  close=False)  # fmt: skip
            except CocoonError as e:
                raise ShellBroken(f"its input failed: {e}") from None
            await self._out.done.wait()
            await self._err.done.wait()
        except BaseException:
            self._out.flush()
            self._err.flush()
            raise
        trailer = self._out.trailer
        if trailer is None or self._err.trailer is None:
            self._out.flush()
            self._err.flush()
            raise ShellBroken("its output ended")
        fields = trailer.split()
        if self._err.trailer != b"" or len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise ShellBroken(f"a bad end of call: {trailer[:_MAX_TRAILER]!r}")
        return ShellResult(min(int(fields[0]), 255), fields[1] == b"1")

    async def close(self) -> None:
        for t in self._pumps:
            t.cancel()
        for t in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        with contextlib.suppress(CocoonError, OSError):
            await self.ex.close()
