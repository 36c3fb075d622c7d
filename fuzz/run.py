"""Fuzz cocoon's decoders of untrusted bytes.

``python3 fuzz/run.py [--seconds S] [--target NAME]... [--keep-going]``

Each target (``fuzz/targets/<name>.py``, see targets/__init__.py) feeds one
input to one decoder. Inputs start from the seeds (``fuzz/corpus/<name>/`` and
the target's ``seeds()``) and are mutated by fuzz/mutate.py. Every input runs
in a forked child, which serves inputs one after another until something goes
wrong (a fork per input would cost more than most decoders take). A finding is:

- an exception that is not in the target's ``EXPECTED`` (its decoder's errors);
- a hang: no answer within the per-input timeout (the child is killed);
- memory: the child's peak RSS grows by more than the cap (and RLIMIT_AS stops
  runaway allocations outright); or the child dying of anything else.

A finding is saved under ``fuzz/crashes/<name>/`` (with a .txt saying why),
printed, and makes the exit status 1. Hangs and memory findings are re-run
alone in a fresh child first, so a slow moment of the machine is not one.
``--reproduce FILE --target NAME`` runs one saved input and shows the traceback.

Guidance is coverage: a sample of inputs runs traced (lines of cocoon's own
code, as edges between consecutive lines), and an input that reaches an edge
no input reached before joins the corpus, to be mutated further.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import hashlib
import importlib
import os
import random
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
for _p in (str(HERE), str(SRC)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import mutate  # noqa: E402 (needs the path set up above)

TARGETS = HERE / "targets"
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"

#: Per-input wall clock: the slowest honest input of any target takes ~0.1 s.
TIMEOUT_S = 5.0
#: Peak RSS growth of a child over its start that is a finding: inputs are at
#: most a few hundred KB, so this is memory far beyond any input's size.
MEMORY_MIB = 512
#: Address-space headroom of a child (RLIMIT_AS): stops an allocation storm
#: before the machine notices, with room for threads' stacks and arenas.
ADDRESS_SPACE_MIB = 4096
#: Largest file a child may write (RLIMIT_FSIZE): archives unpack into temp files.
FILE_MIB = 512
MAX_INPUT = 1 << 16
#: A child serves this many inputs, then a fresh one takes over (slow leaks).
RECYCLE_EVERY = 20_000
MAX_CORPUS = 4096
TRACE_RATIO = 0.2

_REQ = struct.Struct("<BI")  # flags, length
_REP = struct.Struct("<BI")  # status, length
_OK, _EXC, _MEM = 0, 1, 2
_TRACE = 1


@dataclass
class Target:
    name: str
    module: ModuleType
    expected: tuple[type[BaseException], ...]
    timeout_s: float
    memory_mib: int
    max_len: int
    trace_prefixes: tuple[str, ...]


@dataclass
class Result:
    kind: str  # ok, exception, hang, memory, died
    detail: str = ""
    where: str = ""
    new_edges: list[int] = field(default_factory=list)


def discover() -> list[str]:
    """Target names: every module of fuzz/targets not starting with '_'."""
    return sorted(p.stem for p in TARGETS.glob("*.py") if not p.stem.startswith("_"))


def load_target(name: str) -> Target:
    module = importlib.import_module(f"targets.{name}")
    expected = tuple(module.EXPECTED)
    prefixes = [str(SRC / "cocoon")]
    for mod_name in getattr(module, "COVERAGE_MODULES", ()):
        mod = importlib.import_module(mod_name)
        if getattr(mod, "__file__", None):
            prefixes.append(str(mod.__file__))
    return Target(
        name=name,
        module=module,
        expected=expected,
        timeout_s=float(getattr(module, "TIMEOUT_S", TIMEOUT_S)),
        memory_mib=int(getattr(module, "MEMORY_MIB", MEMORY_MIB)),
        max_len=int(getattr(module, "MAX_INPUT", MAX_INPUT)),
        trace_prefixes=tuple(prefixes),
    )


def seeds_of(t: Target) -> list[bytes]:
    files = sorted((CORPUS / t.name).glob("*")) if (CORPUS / t.name).is_dir() else []
    out = [f.read_bytes() for f in files if f.is_file()]
    if hasattr(t.module, "seeds"):
        out += list(t.module.seeds())
    return out or [b""]


# -- the child ------------------------------------------------------------------


class Tracer:
    """Edges between consecutive lines of the traced files, AFL-style hashed."""

    def __init__(self, prefixes: tuple[str, ...], seen: set[int]) -> None:
        self.prefixes = prefixes
        self.seen = seen
        self.new: list[int] = []
        self.prev = 0
        self._codes: dict[Any, int | None] = {}

    def _key(self, frame: FrameType) -> int | None:
        code = frame.f_code
        key = self._codes.get(code, -1)
        if key == -1:
            mine = code.co_filename.startswith(self.prefixes)
            key = hash((code.co_filename, code.co_firstlineno)) & 0xFFFFFFFF if mine else None
            self._codes[code] = key
        return key

    def on_call(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        return self.on_line if self._key(frame) is not None else None

    def on_line(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        if event == "line":
            cur = ((self._key(frame) or 0) + frame.f_lineno * 0x9E3779B1) & 0xFFFFFFFF
            edge = cur ^ self.prev
            self.prev = cur >> 1
            if edge not in self.seen:
                self.seen.add(edge)
                self.new.append(edge)
        return self.on_line


def _read_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_size_mib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) // 1024
    return 0


def _limit_child(t: Target) -> float:
    """Bound the child's memory and files; the peak RSS the cap counts from."""
    vm = _vm_size_mib()
    limit = (vm + ADDRESS_SPACE_MIB + t.memory_mib) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_MIB << 20, FILE_MIB << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's clean-up
    return _peak_rss_mib()


def _describe(e: BaseException) -> tuple[str, str, str]:
    """(cause, where, traceback): where = the innermost frame of cocoon's own code."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if f.filename.startswith(str(SRC))] or frames[-1:]
    where = f"{os.path.relpath(mine[-1].filename, HERE.parent)}:{mine[-1].lineno}" if mine else ""
    cause = f"{type(e).__name__}: {str(e)[:300]}".replace("\n", " ")
    tb = "".join(traceback.format_exception(e))[-8000:]
    return cause, where, tb


def _serve(t: Target, rfd: int, wfd: int, seen: set[int]) -> None:
    base = _limit_child(t)
    run = t.module.run
    while True:
        try:
            flags, n = _REQ.unpack(_read_exact(rfd, _REQ.size))
            data = _read_exact(rfd, n)
        except EOFError:
            return
        tracer = Tracer(t.trace_prefixes, seen) if flags & _TRACE else None
        status, payload = _OK, b""
        if tracer is not None:
            sys.settrace(tracer.on_call)
        try:
            run(data)
        except t.expected:
            pass
        except BaseException as e:  # noqa: BLE001 (anything else is what we look for)
            status, payload = _EXC, "\n".join(_describe(e)).encode("utf-8", "replace")
        finally:
            sys.settrace(None)
        grown = _peak_rss_mib() - base
        if status == _OK and grown > t.memory_mib:
            status = _MEM
            payload = f"peak RSS grew {grown:.0f} MiB (cap {t.memory_mib} MiB)\n\n".encode()
        if status == _OK and tracer is not None and tracer.new:
            payload = array.array("Q", tracer.new).tobytes()
        _write_all(wfd, _REP.pack(status, len(payload)) + payload)


class Child:
    """A forked worker for one target; it inherits the coverage seen so far."""

    def __init__(self, t: Target, seen: set[int], quiet: bool = True) -> None:
        self.t = t
        to_child_r, self.wfd = os.pipe()
        self.rfd, from_child_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover (the child)
            code = 0
            try:
                os.close(self.wfd)
                os.close(self.rfd)
                if quiet:
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, 1)
                    os.dup2(null, 2)
                _serve(t, to_child_r, from_child_w, seen)
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        os.close(to_child_r)
        os.close(from_child_w)
        self.served = 0

    def run(self, data: bytes, trace: bool, timeout_s: float | None = None) -> Result:
        self.served += 1
        try:
            _write_all(self.wfd, _REQ.pack(_TRACE if trace else 0, len(data)) + data)
            ready, _, _ = select.select([self.rfd], [], [], timeout_s or self.t.timeout_s)
            if not ready:
                self.kill()
                return Result("hang", f"no answer within {timeout_s or self.t.timeout_s:g} s")
            status, n = _REP.unpack(_read_exact(self.rfd, _REP.size))
            payload = _read_exact(self.rfd, n)
        except (EOFError, BrokenPipeError):
            return Result("died", self._death())
        if status == _OK:
            return Result("ok", new_edges=list(array.array("Q", payload)) if payload else [])
        cause, where, tb = payload.decode("utf-8", "replace").split("\n", 2)
        return Result("exception" if status == _EXC else "memory", f"{cause}\n{tb}", where)

    def _death(self) -> str:
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        if os.WIFSIGNALED(status):
            return f"child killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
        return f"child exited with status {os.WEXITSTATUS(status)}"

    def kill(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0

    def close(self) -> None:
        for fd in (self.wfd, self.rfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.pid:  # EOF on its input ends it; a stuck one is killed
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.pid = 0
                    return
                time.sleep(0.01)
            self.kill()


# -- the parent -----------------------------------------------------------------


@dataclass
class Stats:
    execs: int = 0
    seconds: float = 0.0
    findings: list[str] = field(default_factory=list)
    corpus: int = 0
    edges: int = 0


def save(t: Target, data: bytes, res: Result) -> Path:
    d = CRASHES / t.name
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{res.kind}-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(f"{res.where}\n{res.detail}\n")
    return path


def confirm(t: Target, data: bytes, res: Result, seen: set[int]) -> bool:
    """A hang, memory or death counts only if the input alone does it again."""
    if res.kind == "exception":
        return True
    child = Child(t, seen)
    try:
        again = child.run(data, trace=False, timeout_s=t.timeout_s * 2)
    finally:
        child.kill()
        child.close()
    return again.kind != "ok"


class Fuzzer:
    """The loop for one target: seeds first (traced), then mutations of the corpus."""

    def __init__(self, t: Target, rng: random.Random, trace_ratio: float, keep_going: bool):
        self.t = t
        self.rng = rng
        self.trace_ratio = trace_ratio
        self.keep_going = keep_going
        self.seeds = seeds_of(t)
        self.corpus = list(self.seeds)
        self.pool = mutate.Pool()
        for s in self.seeds:
            self.pool.learn(s)
        custom = getattr(t.module, "mutate", None)
        max_len = max(t.max_len, 2 * max(len(s) for s in self.seeds))
        self.mutator = mutate.Mutator(rng, self.pool, custom, max_len)
        self.seen: set[int] = set()
        self.signatures: set[tuple[str, str]] = set()
        self.stats = Stats()

    def next_input(self, i: int) -> tuple[bytes, bool]:
        if i < len(self.seeds):
            return self.seeds[i], True
        base = self.rng.choice(self.corpus)
        other = self.rng.choice(self.corpus)
        return self.mutator.mutate(base, other), self.rng.random() < self.trace_ratio

    def run(self, seconds: float) -> Stats:
        start = time.monotonic()
        deadline = start + seconds
        child = Child(self.t, self.seen)
        i = 0
        try:
            while i < len(self.seeds) or time.monotonic() < deadline:
                data, trace = self.next_input(i)
                i += 1
                res = child.run(data, trace)
                self.stats.execs += 1
                if res.kind == "ok":
                    self._keep(data, res)
                    if child.served >= RECYCLE_EVERY:
                        child.close()
                        child = Child(self.t, self.seen)
                    continue
                child.kill()
                child.close()
                if self._finding(data, res) and not self.keep_going:
                    break
                child = Child(self.t, self.seen)
        finally:
            child.kill()
            child.close()
        self.stats.seconds = time.monotonic() - start
        self.stats.corpus = len(self.corpus)
        self.stats.edges = len(self.seen)
        return self.stats

    def _keep(self, data: bytes, res: Result) -> None:
        if not res.new_edges:
            return
        self.seen.update(res.new_edges)
        if len(self.corpus) < MAX_CORPUS:
            self.corpus.append(data)
        else:
            self.corpus[self.rng.randrange(len(self.seeds), MAX_CORPUS)] = data
        if self.rng.random() < 0.2:
            self.pool.learn(data)

    def _finding(self, data: bytes, res: Result) -> bool:
        """Report a (new, confirmed) finding; whether it was one."""
        sig = (res.detail.split("\n", 1)[0].split(":", 1)[0], res.where)
        if sig in self.signatures:
            return False
        if not confirm(self.t, data, res, self.seen):
            print(f"  {self.t.name}: {res.kind} not reproduced alone ({res.detail[:100]}); ignored")
            return False
        self.signatures.add(sig)
        path = save(self.t, data, res)
        cause = res.detail.split("\n", 1)[0]
        line = f"FINDING {self.t.name}: {res.kind}: {cause}"
        line += f" at {res.where}" if res.where else ""
        print(f"{line} (input: {os.path.relpath(path)})", flush=True)
        self.stats.findings.append(line)
        return True


def reproduce(t: Target, path: Path) -> int:
    child = Child(t, set(), quiet=False)
    try:
        res = child.run(path.read_bytes(), trace=False)
    finally:
        child.kill()
        child.close()
    if res.kind == "ok":
        print(f"{t.name}: {path} runs clean")
        return 0
    print(f"FINDING {t.name}: {res.kind} at {res.where}\n{res.detail}")
    return 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    ap.add_argument("--target", action="append", default=[], help="a target (repeat); all if none")
    ap.add_argument("--reproduce", type=Path, help="run this one input (with --target)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from time)")
    ap.add_argument("--trace-ratio", type=float, default=TRACE_RATIO, help="inputs traced")
    ap.add_argument("--keep-going", action="store_true", help="go on after a finding")
    ap.add_argument("--list", action="store_true", help="list the targets")
    return ap.parse_args(argv)


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.target or discover()
    if args.list:
        print("\n".join(discover()))
        return 0
    unknown = sorted(set(names) - set(discover()))
    if unknown:
        print(f"fuzz: no such target: {', '.join(unknown)} (have: {', '.join(discover())})")
        return 2
    # Targets make their temp dirs here (RAM when there is /dev/shm); a child
    # killed mid-input leaves its own behind, so the whole dir goes at the end,
    # also when we are told to stop (a CI timeout sends SIGTERM).
    signal.signal(signal.SIGTERM, _stop)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tempfile.tempdir = tempfile.mkdtemp(prefix="cocoon-fuzz-", dir=shm)
    try:
        if args.reproduce:
            if len(names) != 1:
                print("fuzz: --reproduce needs exactly one --target")
                return 2
            return reproduce(load_target(names[0]), args.reproduce)
        return fuzz(names, args)
    finally:
        shutil.rmtree(tempfile.tempdir, ignore_errors=True)


def fuzz(names: list[str], args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"fuzz: seed {seed}, {args.seconds:g} s per target", flush=True)
    found = 0
    for name in names:
        t = load_target(name)
        rng = random.Random(f"{seed}:{name}")
        s = Fuzzer(t, rng, args.trace_ratio, args.keep_going).run(args.seconds)
        found += len(s.findings)
        rate = s.execs / s.seconds if s.seconds else 0.0
        print(
            f"{name}: {s.execs} execs in {s.seconds:.1f} s ({rate:.0f}/s), corpus {s.corpus}, "
            f"edges {s.edges}, findings {len(s.findings)}",
            flush=True,
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
