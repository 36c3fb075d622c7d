"""`cocoon sandbox run|ls|rm` and `cocoon gc`: sandboxes without images."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys

import click

from cocoon.cli.main import State, cli
from cocoon.runtime import sandboxes, templates
from cocoon.runtime.busybox import busybox_rootfs
from cocoon.runtime.oneshot import run_in_sandbox


@cli.group()
def sandbox() -> None:
    """Run and manage sandboxes (VMs) directly."""


@sandbox.command("run", context_settings={"ignore_unknown_options": True})
@click.option("-i", "--interactive", is_flag=True, help="Relay stdin to the process.")
@click.option("-e", "--env", "envs", multiple=True, metavar="K=V", help="Environment variable.")
@click.option("-w", "--workdir", default="/", help="Working directory in the container.")
@click.option("--cpus", type=click.IntRange(1, 64), help="vCPUs of the VM.")
@click.option("--memory", type=click.IntRange(64, 262144), help="VM memory in MiB.")
@click.option("--template/--no-template", "use_template", default=None,
              help="Start from a VM template (default: sandbox.templates).")  # fmt: skip
@click.argument("command", nargs=-1, required=True)
@click.pass_obj
def run(
    state: State,
    interactive: bool,
    envs: tuple[str, ...],
    workdir: str,
    cpus: int | None,
    memory: int | None,
    use_template: bool | None,
    command: tuple[str, ...],
) -> None:
    """Boot a VM, run COMMAND in a busybox container in it, tear it down.

    The exit code is the command's (128+N if killed by signal N).
    """
    cfg = state.cfg
    rootfs = busybox_rootfs(cfg)
    env = ["PATH=/bin", *envs]
    code = asyncio.run(
        run_in_sandbox(
            cfg, rootfs, command, env=env, cwd=workdir, stdin=interactive,
            vcpus=cpus, memory_mib=memory, template=use_template,
        )
    )  # fmt: skip
    sys.exit(code)


@sandbox.command("ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_obj
def ls(state: State, fmt: str) -> None:
    """List sandboxes, including those a crashed process left (owner: dead)."""
    infos = sandboxes.ls(state.cfg)
    if fmt == "json":
        click.echo(json.dumps([i.__dict__ for i in infos], indent=1))
        return
    click.echo(f"{'SANDBOX':<14} {'STATUS':<9} {'OWNER':<6} {'ACCEL':<5} {'CREATED':<20} PROCESSES")
    for i in infos:
        created = datetime.datetime.fromtimestamp(i.created_at).strftime("%Y-%m-%d %H:%M:%S")
        procs = " ".join(
            f"{k}={v}{'' if i.live.get(k) else '(dead)'}" for k, v in i.processes.items()
        )
        owner = "live" if i.owned else "dead"
        click.echo(f"{i.id:<14} {i.status:<9} {owner:<6} {i.accel:<5} {created:<20} {procs}")


@sandbox.command("rm")
@click.option("-f", "--force", is_flag=True, help="Also kill a sandbox whose owner is alive.")
@click.argument("ids", nargs=-1, required=True)
@click.pass_obj
def rm(state: State, force: bool, ids: tuple[str, ...]) -> None:
    """Kill a sandbox's VM processes and remove its state."""
    failed = False
    for sid in ids:
        if sandboxes.rm(state.cfg, sid, force=force):
            click.echo(sid)
        else:
            failed = True
            click.echo(
                f"cocoon: sandbox {sid} not found or owned by a live process (use -f)", err=True
            )
    if failed:
        sys.exit(1)


@cli.command("gc")
@click.pass_obj
def gc_cmd(state: State) -> None:
    """Reap everything crashed cocoon processes left: VM processes, sockets, state."""
    for sid in sandboxes.reap(state.cfg):
        click.echo(sid)
    for name in templates.sweep(state.cfg):
        click.echo(name)
