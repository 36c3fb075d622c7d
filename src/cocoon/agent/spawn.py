"""Starting helper programs (crun, mount) from the agent.

posix_spawn rather than subprocess: the reaper owns waitpid, and Popen would
race it for the exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from cocoon.agent.reaper import Reaper, exit_code

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
OUTPUT_CAP = 64 << 10


def spawn(
    argv: list[str], reaper: Reaper, stdio: tuple[int, int, int]
) -> tuple[int, asyncio.Future[int]]:
    actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(stdio)]
    pid = os.posix_spawnp(argv[0], argv, ENV, file_actions=actions, setsid=True)
    return pid, reaper.expect(pid)


async def run(argv: list[str], reaper: Reaper, timeout_s: float = 60.0) -> tuple[int, str]:
    """Run to completion; return (exit code, combined output tail). Kills on timeout."""
    r, w = os.pipe()
    devnull = os.open("/dev/null", os.O_RDONLY)
    try:
        pid, fut = spawn(argv, reaper, (devnull, w, w))
    finally:
        os.close(w)
        os.close(devnull)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", buffering=0)
    )
    out = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(65536):
                out += chunk
                if len(out) > OUTPUT_CAP:
                    del out[: len(out) - OUTPUT_CAP]
            status = await fut
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, 9)
        raise TimeoutError(f"{argv[0]} did not finish within {timeout_s:g} s") from None
    finally:
        transport.close()
    code, _ = exit_code(status)
    return code, out.decode(errors="replace")
