"""runc ps: the container's processes."""

from __future__ import annotations

import json

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime.ocicontainer import OciContainer


@cli.command()
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.argument("container_id")
@click.argument("ps_args", nargs=-1)
@click.pass_obj
def ps(ctx: Ctx, fmt: str, container_id: str, ps_args: tuple[str, ...]) -> None:
    """The container's processes: host pids (json) or the guest's table."""
    c = OciContainer.load(ctx.cfg, container_id)
    if fmt == "json":
        pid = c.state()["pid"]
        click.echo(json.dumps([pid] if pid else []))
        return
    procs = c.processes()
    click.echo("PID   USER     TIME  COMMAND")
    for p in procs:
        click.echo(f"{p.pid:<5} {p.user:<8} {p.cpu_ms // 1000:>4}s {p.command}")
