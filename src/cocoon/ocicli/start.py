"""runc start: the created container's process starts."""

from __future__ import annotations

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime.ocicontainer import OciContainer


@cli.command()
@click.argument("container_id")
@click.pass_obj
def start(ctx: Ctx, container_id: str) -> None:
    """Start a created container's process."""
    OciContainer.load(ctx.cfg, container_id).start()
