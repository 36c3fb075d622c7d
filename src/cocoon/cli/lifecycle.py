"""`cocoon ps|logs|exec|stop|kill|rm|inspect|wait|top|stats`: docker's verbs on
containers made by `cocoon run`. Parsing and printing only; the work is in
cocoon.runtime.lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time

import click

from cocoon.cli.env import env_flags
from cocoon.cli.main import State, cli
from cocoon.errors import CocoonError, NotRunning
from cocoon.runtime import lifecycle, logs
from cocoon.runtime.records import ContainerDir, ContainerStore
from cocoon.runtime.status import Status


def _resolve(state: State, ref: str) -> ContainerDir:
    return ContainerStore(state.cfg).resolve(ref)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.4g}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return f"{n:.4g}GiB"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@cli.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Show stopped containers too.")
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.option("--no-trunc", is_flag=True)
@click.pass_obj
def ps(state: State, show_all: bool, quiet: bool, no_trunc: bool) -> None:
    """List containers (running ones; -a for all)."""
    rows = [["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"]]
    now = time.time()
    for d, c in ContainerStore(state.cfg).all():
        try:
            status = d.status()
        except CocoonError:
            status = Status.DEAD
        if not show_all and status != Status.RUNNING:
            continue
        cid = c.id if no_trunc else c.id[:12]
        if quiet:
            click.echo(cid)
            continue
        cmd = " ".join(c.command)
        if not no_trunc and len(cmd) > 20:
            cmd = cmd[:19] + "…"
        created = lifecycle.ago(now - c.created_at) + " ago"
        rows.append([cid, c.image, f'"{cmd}"', created, lifecycle.status_text(d, now), c.name])
    if not quiet:
        _table(rows)


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until it exits.")
@click.option("--tail", "tail_n", default="all", help="Only the last N lines.")
@click.option("-t", "--timestamps", is_flag=True, help="Prefix each line with its time.")
@click.argument("container")
@click.pass_obj
def logs_cmd(state: State, follow: bool, tail_n: str, timestamps: bool, container: str) -> None:
    """Print a container's output (stdout to stdout, stderr to stderr)."""
    d = _resolve(state, container)
    try:
        n = -1 if tail_n == "all" else int(tail_n)
    except ValueError:
        raise click.BadParameter("--tail takes a number or 'all'") from None
    out = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    at_line_start = {"stdout": True, "stderr": True}

    def emit(e: logs.Entry) -> None:
        f = out[e.stream]
        if timestamps and at_line_start[e.stream]:
            f.write(e.time.encode() + b" ")
        f.write(e.content + (b"\n" if e.full else b""))
        at_line_start[e.stream] = e.full

    entries, offset, ino = logs.snapshot(d.log_path)
    try:
        for e in logs.tail(entries, n):
            emit(e)
        sys.stdout.flush()
        if follow:
            for e in logs.follow(d.log_path, d.life.held, offset, ino):
                emit(e)
                out[e.stream].flush()
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `cocoon logs x | head`: the reader had enough
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


logs_cmd.name = "logs"


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Relay stdin.")
@click.option("-t", "--tty", is_flag=True, help="Give the process a terminal.")
@click.option("-e", "--env", "envs", multiple=True, metavar="K[=V]",
              help="Set K (bare K: the host's value, if it has one).")  # fmt: skip
@click.option("-w", "--workdir", default="")
@click.option("-u", "--user", default="", metavar="USER[:GROUP]")
@click.argument("container")
@click.argument("command", nargs=-1, required=True)
@click.pass_obj
def exec_cmd(
    state: State,
    interactive: bool,
    tty: bool,
    envs: tuple[str, ...],
    workdir: str,
    user: str,
    container: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a running container; exit with its code."""
    d = _resolve(state, container)
    code = asyncio.run(
        lifecycle.exec_process(
            d, list(command), env=env_flags(envs), workdir=workdir, user=user,
            stdin=interactive, tty=tty,
        )
    )  # fmt: skip
    sys.exit(code)


@cli.command()
@click.option("-t", "--time", "timeout_s", type=float, default=10.0, show_default=True,
              help="Seconds to wait after the stop signal before SIGKILL.")  # fmt: skip
@click.argument("containers", nargs=-1, required=True)
@click.pass_obj
def stop(state: State, timeout_s: float, containers: tuple[str, ...]) -> None:
    """Stop containers: the image's StopSignal, then SIGKILL."""
    for ref in containers:
        d = _resolve(state, ref)
        asyncio.run(lifecycle.stop(d, timeout_s))
        click.echo(ref)


@cli.command()
@click.option("-s", "--signal", "sig", default="KILL", show_default=True)
@click.argument("containers", nargs=-1, required=True)
@click.pass_obj
def kill(state: State, sig: str, containers: tuple[str, ...]) -> None:
    """Send a signal to containers' main process."""
    num = lifecycle.parse_signal(sig)
    for ref in containers:
        asyncio.run(lifecycle.kill(_resolve(state, ref), num))
        click.echo(ref)


@cli.command()
@click.option("-f", "--force", is_flag=True, help="Kill a running container first.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_obj
def rm(state: State, force: bool, containers: tuple[str, ...]) -> None:
    """Remove containers (and their logs)."""
    failed = False
    for ref in containers:
        try:
            lifecycle.remove(state.cfg, _resolve(state, ref), force=force)
            click.echo(ref)
        except CocoonError as e:
            click.echo(f"cocoon: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


@cli.command()
@click.argument("containers", nargs=-1, required=True)
@click.pass_obj
def inspect(state: State, containers: tuple[str, ...]) -> None:
    """Low-level facts about containers, as JSON."""
    click.echo(json.dumps([lifecycle.inspect(_resolve(state, r)) for r in containers], indent=2))


@cli.command()
@click.argument("containers", nargs=-1, required=True)
@click.pass_obj
def wait(state: State, containers: tuple[str, ...]) -> None:
    """Block until containers stop; print their exit codes."""
    for ref in containers:
        click.echo(asyncio.run(lifecycle.wait(_resolve(state, ref))))


@cli.command()
@click.argument("container")
@click.pass_obj
def top(state: State, container: str) -> None:
    """The processes of a container (pids are the guest's)."""
    procs = asyncio.run(lifecycle.top(_resolve(state, container)))
    rows = [["PID", "USER", "TIME", "COMMAND"]]
    for p in procs:
        secs = p.cpu_ms // 1000
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        rows.append([str(p.pid), p.user, clock, p.command])
    _table(rows)


@cli.command()
@click.option("--no-stream", is_flag=True, help="One sample, then exit.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.argument("containers", nargs=-1)
@click.pass_obj
def stats(state: State, no_stream: bool, fmt: str, containers: tuple[str, ...]) -> None:
    """CPU, memory, network, block I/O and pids of running containers, from their guests."""
    store = ContainerStore(state.cfg)
    dirs = (
        [store.resolve(r) for r in containers]
        if containers
        else [d for d, _ in store.all() if d.status() == Status.RUNNING]
    )
    while True:
        rows = [["CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O",
                 "BLOCK I/O", "PIDS"]]  # fmt: skip
        samples = []
        for d in dirs:
            c = d.config()
            with contextlib.suppress(NotRunning):
                s = asyncio.run(lifecycle.stats_sample(d, 0.5))
                limit = s["memory_limit_bytes"] or c.vm_memory_mib << 20
                s.update(id=c.id, name=c.name, memory_limit_bytes=limit)
                samples.append(s)
                rows.append([
                    c.id[:12], c.name, f"{s['cpu_percent']:.2f}%",
                    f"{_size(s['memory_bytes'])} / {_size(limit)}",
                    f"{s['memory_bytes'] / limit * 100:.2f}%",
                    f"{_size(s['net_rx_bytes'])} / {_size(s['net_tx_bytes'])}",
                    f"{_size(s['block_read_bytes'])} / {_size(s['block_write_bytes'])}",
                    str(s["pids"]),
                ])  # fmt: skip
        if fmt == "json":
            click.echo(json.dumps(samples))
        else:
            if not no_stream and os.isatty(1):
                click.echo("\033[2J\033[H", nl=False)
            _table(rows)
        if no_stream:
            return
        time.sleep(0.5)
