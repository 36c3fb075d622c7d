"""runc list: every container this runtime knows."""

from __future__ import annotations

import json

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime import ocicontainer


@cli.command("list")
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--quiet", "-q", is_flag=True)
@click.pass_obj
def list_cmd(ctx: Ctx, fmt: str, quiet: bool) -> None:
    """Every container this runtime knows."""
    rows = ocicontainer.states(ctx.cfg)
    if quiet:
        for r in rows:
            click.echo(r["id"])
    elif fmt == "json":
        click.echo(json.dumps(rows))
    else:
        click.echo(f"{'ID':<20} {'PID':<8} {'STATUS':<10} {'BUNDLE':<40} CREATED")
        for r in rows:
            click.echo(
                f"{r['id']:<20} {r['pid']:<8} {r['status']:<10} {r['bundle']:<40} {r['created']}"
            )
