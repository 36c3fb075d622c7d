"""runc delete: the container's VM, binds and record go."""

from __future__ import annotations

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime import ocicontainer


@cli.command()
@click.option("--force", "-f", is_flag=True, help="Kill it first if it runs.")
@click.argument("container_id")
@click.pass_obj
def delete(ctx: Ctx, force: bool, container_id: str) -> None:
    """Delete a container (its VM and state)."""
    ocicontainer.delete(ctx.cfg, container_id, force=force)
