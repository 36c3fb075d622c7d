"""runc kill: a signal to the container's init, or to all its processes."""

from __future__ import annotations

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime.ocicontainer import OciContainer, parse_signal


@cli.command()
@click.option("--all", "-a", "all_processes", is_flag=True, help="Every process, not just init.")
@click.argument("container_id")
@click.argument("sig", default="SIGTERM")
@click.pass_obj
def kill(ctx: Ctx, all_processes: bool, container_id: str, sig: str) -> None:
    """Send a signal to the container's init (or every process with --all)."""
    c = OciContainer.load(ctx.cfg, container_id)
    c.kill(parse_signal(sig), all_processes=all_processes)
