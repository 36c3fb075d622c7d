"""The one way cocoon runs a host program to completion.

List argv, never a shell; own session so a timeout or Ctrl-C can kill the whole
group; the tail of stderr goes into the error so the user sees why.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence

from cocoon.errors import CocoonError, HostError, StateError

STDERR_TAIL = 2000


def run(
    argv: Sequence[str],
    *,
    timeout_s: float,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    error: type[CocoonError] = HostError,
    check: bool = True,
    capture: bool = True,
    input: bytes | None = None,
    executable: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """``argv`` to completion within ``timeout_s``, or ``error``; ``executable``
    runs another file than ``argv[0]`` names (execv's path, as OCI hooks have)."""
    try:
        p = subprocess.Popen(
            list(argv),
            executable=executable,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise error(f"{argv[0]} not found: install it (see README set-up)") from None
    try:
        out, err = p.communicate(input=input, timeout=timeout_s)
    except BaseException as e:
        kill_group(p)
        if isinstance(e, subprocess.TimeoutExpired):
            raise error(f"{argv[0]} did not finish within {timeout_s:g} s") from None
        raise
    cp = subprocess.CompletedProcess(list(argv), p.returncode, out, err)
    if check and p.returncode != 0:
        tail = (err or out or b"").decode(errors="replace").strip()[-STDERR_TAIL:]
        last = tail.splitlines()[-1] if tail else ""
        raise error(f"{' '.join(argv[:3])} failed (exit {p.returncode}): {last}")
    return cp


def kill_group(p: subprocess.Popen[bytes], grace_s: float = 2.0) -> None:
    """SIGTERM the process group, wait a little, then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot, or None if gone.

    Recorded with every pid cocoon stores, so a recycled pid is never killed.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parens: fields resume after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int, started: int | None) -> bool:
    st = start_time(pid)
    if st is None:
        return False
    if started is not None and st != started:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z"


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) the process has used so far; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_ns(pid: int) -> int | None:
    """CPU time the process's live threads have run, in ns, from the
    scheduler's own accounting (``schedstat``: exact, where ``stat`` counts
    10 ms ticks; a thread that ended takes its count with it); None if the
    process is gone."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            # FileNotFoundError: a thread that ended since the listing.
            with (
                contextlib.suppress(FileNotFoundError),
                open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f,
            ):
                total += int(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return total


def runnable() -> int:
    """Tasks running or ready to run on the host right now (/proc/loadavg)."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0


def parse_signal(text: str) -> int:
    """docker's forms: 9, KILL, SIGKILL (any case)."""
    t = text.strip().upper()
    # isascii: "²".isdigit() is true, but int() refuses it (an image's StopSignal).
    if t.isascii() and t.isdigit() and len(t) <= 2 and 0 < int(t) <= 64:
        return int(t)
    name = t if t.startswith("SIG") else "SIG" + t
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise StateError(
            f"invalid signal {text[:20]!r}: use a name (TERM, SIGKILL) or number"
        ) from None
