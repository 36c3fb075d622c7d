"""runc state: the container's OCI state as JSON."""

from __future__ import annotations

import json

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime.ocicontainer import OciContainer


@cli.command("state")
@click.argument("container_id")
@click.pass_obj
def state_cmd(ctx: Ctx, container_id: str) -> None:
    """The container's OCI state as JSON."""
    click.echo(json.dumps(OciContainer.load(ctx.cfg, container_id).state(), indent=2))
