"""`cocoon check` and `cocoon env`: what this host can do, what config is in force."""

from __future__ import annotations

import json
import sys

import click

from cocoon.cli.main import State, cli
from cocoon.runtime.hostcheck import run_checks


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_obj
def check(state: State, fmt: str) -> None:
    """Report whether this host can run sandboxes, and how (KVM or TCG)."""
    items = run_checks(state.cfg)
    failed = [i for i in items if i.fatal and not i.ok]
    if fmt == "json":
        click.echo(json.dumps([i.__dict__ for i in items], indent=1))
    else:
        width = max(len(i.name) for i in items)
        for i in items:
            mark = "ok  " if i.ok else ("FAIL" if i.fatal else "no  ")
            click.echo(f"{mark} {i.name:<{width}}  {i.detail}")
    if failed:
        click.echo(f"cocoon: cannot run sandboxes: {failed[0].detail}", err=True)
        sys.exit(1)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["toml", "json"]), default="toml")
@click.pass_obj
def env(state: State, fmt: str) -> None:
    """Print the effective configuration (defaults < file < COCOON_* env < flags)."""
    data = state.cfg.as_dict()
    if fmt == "json":
        click.echo(json.dumps(data, indent=1))
        return
    for key, value in data.items():
        if not isinstance(value, dict):
            click.echo(f"{key} = {json.dumps(value)}")
    for section, values in data.items():
        if isinstance(values, dict):
            click.echo(f"\n[{section}]")
            for key, value in values.items():
                click.echo(f"{key} = {json.dumps(value)}")
