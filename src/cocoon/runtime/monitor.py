"""The container monitor: one host process per container that owns its VM.

`cocoon run` forks it (no re-exec: it inherits the loaded modules, so it costs
no Python start-up) and it detaches into its own session. From then on it is
the only holder of the agent channel: it boots the sandbox, creates and starts
the container, writes every byte of output to the CRI log (before any client
sees it, so the log is complete even if the VM dies), and serves the other
cocoon commands (attach, exec, signals, stats, top) on ``ctl.sock`` with the
same framed protocol the agent speaks. When the container's init exits it
records the exit (code, OOM, or why the VM died), tears the VM down, and with
--rm removes the container.

It is three parts, each of its own concern, and one owner: the supervisor
(runtime.supervisor) owns the VM and the containers' status, the control
endpoint (runtime.endpoint) only turns requests into the supervisor's calls,
and the fan-out (runtime.fanout) relays output, log first. Every task any of
them starts belongs to one TaskSet, which the monitor closes, with a
deadline, before it exits.

``monitor.lock`` is held for the monitor's life: nobody holding it means the
container is not running, whatever state.json says. The monitor's own log,
``monitor.log`` in the container's dir, is JSON lines (cocoon.log): its start,
the container's start and end, and every teardown step that failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cocoon import log as cocoon_log
from cocoon.errors import SandboxError, from_error_line
from cocoon.runtime import hostcgroup
from cocoon.runtime.endpoint import ControlEndpoint
from cocoon.runtime.supervisor import LaunchPlan, ReadyPipe, Supervisor
from cocoon.util.tasks import CLOSE_S, TaskSet

log = logging.getLogger(__name__)


def spawn(plan: LaunchPlan, reap: Callable[[int], None] | None = None) -> None:
    """Fork the monitor and return once the container is created (attach) or
    started (detached); raise its one-line error if it could not get there.

    By default the monitor is forked twice (the first child exits at once), so
    that it is re-parented to init: `cocoon run` and `cocoon-runtime` are
    short-lived, and their monitor must outlive them with nobody left to reap
    it. A long-lived caller that reaps (containerd's shim, one per pod) passes
    ``reap``: the monitor is then forked once and stays its child, so the pod's
    host processes are one tree under the caller, as with containerd's own
    shims. ``reap(pid)`` is called at once, before the monitor reports, and
    must collect that pid's exit, and only that pid's, whenever it comes (a
    ``waitpid(-1)`` or a child subreaper would also collect the exits that
    ``subprocess`` and asyncio wait for by pid, and the monitor's children,
    QEMU and its file servers, would come back to the caller when a monitor
    died before them)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            os.close(r)
            os.setsid()
            if reap is not None or os.fork() == 0:
                _detach_stdio(w, plan.cdir.path / "monitor.log")
                code = asyncio.run(_run(plan, w))
            else:
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    if reap is None:
        os.waitpid(pid, 0)
    else:
        reap(pid)
    timeout = plan.cfg.hypervisor.boot_timeout_s + plan.cfg.hypervisor.agent_timeout_s + 60
    timeout += plan.cfg.sandbox.template_wait_s if plan.cfg.sandbox.templates else 0
    timeout += plan.cfg.sandbox.start_queue_s
    deadline = time.monotonic() + timeout
    while (line := _read_line(r, deadline)).startswith("warn "):
        log.warning(line[5:])
    os.close(r)
    if line == "ready":
        return
    if line.startswith("error"):
        raise from_error_line(line, SandboxError)
    raise SandboxError(
        f"the monitor of container {plan.config.id[:12]} died while starting it"
        f" (see {plan.cdir.path / 'monitor.log'})"
    )


def _read_line(fd: int, deadline: float) -> str:
    """One line from the monitor, read a byte at a time (a few short lines:
    no buffer may swallow the next one)."""
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < 4096:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return "error the container monitor did not report within its deadline"
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def _detach_stdio(keep: int, log: Path) -> None:
    """No terminal, no inherited fds (a pty kept open here would keep a test's
    reader or a user's shell waiting): stdio to /dev/null and our own log."""
    null = os.open(os.devnull, os.O_RDWR)
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(logfd, 2)
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    sys.stderr = os.fdopen(2, "w", buffering=1)
    cocoon_log.setup_process_log(sys.stderr)
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)


async def _run(plan: LaunchPlan, ready_fd: int) -> int:
    """The monitor's life: its parts wired, every task they start owned by
    one TaskSet, closed (what is left cancelled, ``CLOSE_S`` at most) however
    the container's life ends."""
    tasks = TaskSet(log)
    try:
        sup = Supervisor(plan, ReadyPipe(ready_fd), tasks)
        sup.endpoint = ControlEndpoint(sup, tasks)
        return await sup.run()
    finally:
        await tasks.aclose(CLOSE_S)
        if plan.host_cgroup:  # the VM's processes are gone: so is their cgroup
            hostcgroup.leave(plan.host_cgroup)
