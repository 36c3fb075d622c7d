"""`cocoon template ls|build|rm`: the VM templates sandboxes start from."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys

import click

from cocoon.cli.main import State, cli
from cocoon.runtime import templates


@cli.group()
def template() -> None:
    """VM templates: booted once, saved, cloned copy-on-write by every start."""


@template.command("ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_obj
def ls(state: State, fmt: str) -> None:
    """List templates on disk and whether each is usable."""
    infos = templates.ls(state.cfg)
    if fmt == "json":
        click.echo(json.dumps([i.__dict__ for i in infos], indent=1))
        return
    click.echo(
        f"{'TEMPLATE':<17} {'VCPUS':>5} {'MEMORY':>7} {'NICS':>4} {'DIRS':>4} {'ACCEL':<5} "
        f"{'RAM ON DISK':>11} {'CREATED':<19} STATUS"
    )
    for i in infos:
        created = datetime.datetime.fromtimestamp(i.created).strftime("%Y-%m-%d %H:%M:%S")
        status = "ok" if not i.problem else f"unusable: {i.problem}"
        click.echo(
            f"{i.key:<17} {i.vcpus:>5} {i.memory_mib:>6}M {i.nics:>4} {i.shares:>4} {i.accel:<5} "
            f"{i.ram_bytes_used / (1 << 20):>10.1f}M {created:<19} {status}"
        )


@template.command("build")
@click.option("--cpus", type=click.IntRange(1, 64), help="vCPUs (default: hypervisor.vcpus).")
@click.option("--memory", type=click.IntRange(64, 262144), help="Guest memory in MiB.")
@click.option("--nics", type=click.IntRange(0, 4), default=0, show_default=True,
              help="NICs (a container on the bridge network has one).")  # fmt: skip
@click.option("--host-dirs", is_flag=True,
              help="The template with share slots, for sandboxes given host directories "
                   "(volumes, an OCI bundle's rootfs, a warm pool's sandboxes).")  # fmt: skip
@click.pass_obj
def build(state: State, cpus: int | None, memory: int | None, nics: int, host_dirs: bool) -> None:
    """Build the template for sandboxes of this size now, not on the first start."""
    key, built, secs = asyncio.run(
        templates.build(state.cfg, vcpus=cpus, memory_mib=memory, nics=nics, host_dirs=host_dirs)
    )
    click.echo(key)
    click.echo(f"{'built' if built else 'already there'} in {secs:.2f} s", err=True)


@template.command("rm")
@click.option("-a", "--all", "all_", is_flag=True, help="Remove every template.")
@click.argument("keys", nargs=-1)
@click.pass_obj
def rm(state: State, all_: bool, keys: tuple[str, ...]) -> None:
    """Remove templates (the next start that needs one builds it again)."""
    if not keys and not all_:
        raise click.UsageError("name templates to remove, or --all")
    removed = templates.rm(state.cfg, list(keys))
    for k in removed:
        click.echo(k)
    missing = set(keys) - set(removed)
    if missing:
        click.echo(f"cocoon: no template {sorted(missing)[0]}", err=True)
        sys.exit(1)
