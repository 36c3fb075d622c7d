"""runc pause and resume: every process of the container frozen, or thawed."""

from __future__ import annotations

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime.ocicontainer import OciContainer


@cli.command()
@click.argument("container_id")
@click.pass_obj
def pause(ctx: Ctx, container_id: str) -> None:
    """Freeze every process of the container."""
    OciContainer.load(ctx.cfg, container_id).pause()


@cli.command()
@click.argument("container_id")
@click.pass_obj
def resume(ctx: Ctx, container_id: str) -> None:
    """Thaw a paused container."""
    OciContainer.load(ctx.cfg, container_id).resume()
