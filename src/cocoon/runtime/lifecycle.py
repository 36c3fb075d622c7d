"""What the docker-like verbs do to a container once it exists: exec, stop,
kill, rm, wait, inspect, top, stats, in docker's terms over the one
container lifecycle (runtime.container). Each goes through the container's
monitor while it lives; once it is gone, the container dir is all there is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import asdict
from typing import Any

from cocoon.config import Config
from cocoon.errors import CocoonError, NotRunning, StateError
from cocoon.oci.spec import merge_env, parse_user
from cocoon.protocol import messages
from cocoon.runtime.container import TEARDOWN_S, Container, reap_sandbox
from cocoon.runtime.control import MonitorClient
from cocoon.runtime.records import ContainerConfig, ContainerDir, ContainerStore
from cocoon.runtime.status import Status
from cocoon.runtime.stdio import attach, terminal_size
from cocoon.sandbox.process import Process
from cocoon.util.proc import parse_signal as parse_signal  # docker's and runc's verbs

log = logging.getLogger(__name__)


def exec_spec(
    cdir: ContainerDir, args: list[str], *, env: list[str], workdir: str, user: str, tty: bool
) -> dict[str, Any]:
    """The OCI process of a new process in the container: the container's own
    environment, user and capabilities, with docker exec's overrides."""
    base = cdir.config().spec["process"]
    process: dict[str, Any] = {
        "args": args,
        "env": merge_env(list(base.get("env", [])), env),
        "cwd": workdir or base.get("cwd", "/"),
        "terminal": tty,
        "user": dict(base.get("user", {"uid": 0, "gid": 0})),
        "capabilities": base.get("capabilities", {}),
        "noNewPrivileges": base.get("noNewPrivileges", True),
    }
    if user:
        uid, gid = parse_user(user)
        process["user"] = {"uid": uid, "gid": gid, "username": user}
    return process


async def exec_process(
    cdir: ContainerDir,
    args: list[str],
    *,
    env: list[str],
    workdir: str,
    user: str,
    stdin: bool,
    tty: bool,
) -> int:
    """docker exec: a new process in the running container, attached; its exit code."""
    process = exec_spec(cdir, args, env=env, workdir=workdir, user=user, tty=tty)
    rows, cols = terminal_size()
    client = await Container(cdir).connect()
    try:
        proc = await client.exec(process, stdin=stdin, tty=tty, rows=rows, cols=cols)
        return await attach(proc, stdin=stdin, tty=tty)
    finally:
        await client.close()


class Exec:
    """A process exec'd in a running container for a caller that does its own
    I/O (a service): its stdin, stdout and stderr are streams, not this
    process's. ``close`` when done (the process is not killed by it)."""

    def __init__(self, client: MonitorClient, process: Process) -> None:
        self.client = client
        self.process = process

    @classmethod
    async def start(
        cls, cdir: ContainerDir, args: list[str], *, env: list[str], workdir: str = ""
    ) -> Exec:
        process = exec_spec(cdir, args, env=env, workdir=workdir, user="", tty=False)
        client = await Container(cdir).connect()
        try:
            proc = await client.exec(process, stdin=True, tty=False)
        except BaseException:
            await client.close()
            raise
        return cls(client, proc)

    async def close(self) -> None:
        await self.client.close()


async def kill(cdir: ContainerDir, sig: int) -> None:
    await Container(cdir).signal(sig, all_processes=sig == signal.SIGKILL)


async def stop(cdir: ContainerDir, timeout_s: float) -> None:
    """The image's StopSignal, SIGKILL after ``timeout_s``; back once the VM is gone."""
    sig = parse_signal(cdir.config().stop_signal or "SIGTERM")
    try:
        client = await Container(cdir).connect()
    except NotRunning:
        return
    try:
        with contextlib.suppress(NotRunning):
            await client.signal(sig)
            if not await asyncio.to_thread(_wait_exited, cdir, timeout_s):
                await client.signal(signal.SIGKILL, all_processes=True)
    finally:
        await client.close()
    await asyncio.to_thread(cdir.life.wait_released, TEARDOWN_S)


def _wait_exited(cdir: ContainerDir, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(CocoonError):
            if cdir.state().status == Status.EXITED or not cdir.life.held():
                return True
        time.sleep(0.05)
    return False


async def wait(cdir: ContainerDir) -> int:
    """Block until the container exits; its exit code (from the record)."""
    await asyncio.to_thread(cdir.life.wait_released, None)
    return cdir.state().exit_code


def remove(cfg: Config, cdir: ContainerDir, *, force: bool) -> None:
    """Delete a container; a running one only with ``force`` (killed first).

    Works after any crash: a monitor that cannot be reached is killed by pid
    (checked against its start time), its sandbox reaped like `cocoon gc` would.
    """
    if cdir.life.held():
        if not force:
            raise StateError(f"container {cdir.id[:12]} is running: stop it first or use `rm -f`")
        Container(cdir).end_monitor(
            lambda: asyncio.wait_for(kill(cdir, signal.SIGKILL), 10.0),
            f"killing container {cdir.id[:12]}",
            log=log,
            errors=(CocoonError, OSError, TimeoutError),
        )
    sid = ""
    with contextlib.suppress(CocoonError):  # no record: it never had a sandbox
        sid = cdir.state().sandbox_id or cdir.config().sandbox_id
    with contextlib.suppress(FileNotFoundError):
        reap_sandbox(cfg, sid, f"reaping the sandbox of container {cdir.id[:12]}", log=log)
    ContainerStore(cfg).remove(cdir)


def status_text(cdir: ContainerDir, now: float | None = None) -> str:
    """docker ps's STATUS column."""
    now = now or time.time()
    st = cdir.state()
    status = cdir.status()
    if status == Status.RUNNING:
        return f"Up {ago(now - st.started_at)}"
    if status == Status.EXITED:
        return f"Exited ({st.exit_code}) {ago(now - st.finished_at)} ago"
    if status == Status.DEAD:
        return "Dead (its monitor died; `cocoon rm` cleans up)"
    return "Created"


def ago(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return "Less than a second" if s < 1 else f"{s} second{'s' * (s != 1)}"
    if s < 3600:
        return f"{s // 60} minute{'s' * (s // 60 != 1)}"
    if s < 86400:
        return f"{s // 3600} hour{'s' * (s // 3600 != 1)}"
    return f"{s // 86400} day{'s' * (s // 86400 != 1)}"


def iso(ts: float) -> str:
    if not ts:
        return "0001-01-01T00:00:00Z"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e9):09d}Z"


def inspect(cdir: ContainerDir) -> dict[str, Any]:
    """docker inspect's shape for the fields that mean something here."""
    c: ContainerConfig = cdir.config()
    st = cdir.state()
    status = cdir.status()
    proc = c.spec.get("process", {})
    return {
        "Id": c.id,
        "Name": "/" + c.name,
        "Created": iso(c.created_at),
        "Image": c.image_id,
        "Path": c.command[0] if c.command else "",
        "Args": c.command[1:],
        "State": {
            "Status": status,
            "Running": status == Status.RUNNING,
            "Dead": status == Status.DEAD,
            "OOMKilled": st.oom_killed,
            "ExitCode": st.exit_code,
            "Error": st.error,
            "StartedAt": iso(st.started_at),
            "FinishedAt": iso(st.finished_at),
            "Pid": st.monitor_pid if status == Status.RUNNING else 0,
            "GuestPid": st.pid,
        },
        "Config": {
            "Image": c.image,
            "Cmd": c.command,
            "Env": proc.get("env", []),
            "WorkingDir": proc.get("cwd", "/"),
            "User": proc.get("user", {}).get("username", ""),
            "Tty": c.tty,
            "OpenStdin": c.stdin,
            "Hostname": c.spec.get("hostname", ""),
            "Labels": c.labels,
            "StopSignal": c.stop_signal,
        },
        "HostConfig": {
            "AutoRemove": c.auto_remove,
            "Memory": c.memory_bytes,
            "NanoCpus": int(c.cpus * 1e9),
            "ReadonlyRootfs": c.read_only,
            "Binds": c.volumes,
            "NetworkMode": ",".join(c.network.get("networks", [])) or "none",
            "PortBindings": c.ports,
        },
        "NetworkSettings": {
            "IPAddress": next((x.split("/")[0] for x in st.addresses if ":" not in x), ""),
            "Addresses": st.addresses,
            "Ports": st.ports,
        },
        "Sandbox": {
            "Id": st.sandbox_id or c.sandbox_id,
            "Vcpus": c.vcpus,
            "MemoryMiB": c.vm_memory_mib,
            "Accel": st.accel,
            "BootSeconds": round(st.boot_s, 3),
            "Template": st.template,
            "JailUid": st.jail_uid,
        },
        "LogPath": str(cdir.log_path),
        "RawState": asdict(st),
    }


async def top(cdir: ContainerDir) -> list[messages.ProcessInfo]:
    return await Container(cdir).top()


async def stats_sample(cdir: ContainerDir, interval_s: float) -> dict[str, Any]:
    """One `docker stats` row: CPU % over ``interval_s``, the rest as read now."""
    client = await Container(cdir).connect()
    try:
        a = await client.stats()
        t0 = time.monotonic()
        await asyncio.sleep(interval_s)
        b = await client.stats()
        dt = time.monotonic() - t0
    finally:
        await client.close()
    return {
        "cpu_percent": (b.cpu_usage_us - a.cpu_usage_us) / (dt * 1e6) * 100 if dt > 0 else 0.0,
        "memory_bytes": b.memory_bytes,
        "memory_limit_bytes": b.memory_limit_bytes,
        "net_rx_bytes": sum(n.rx_bytes for n in b.net),
        "net_tx_bytes": sum(n.tx_bytes for n in b.net),
        "block_read_bytes": b.io_read_bytes,
        "block_write_bytes": b.io_write_bytes,
        "pids": b.pids,
    }
