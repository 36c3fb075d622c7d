"""runc run: create and start; unless --detach, wait for the container's end,
delete it, and exit with its status."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cocoon.ocicli.create import runc_only
from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime import ocicreate
from cocoon.runtime.ocicontainer import Handoff


@cli.command()
@click.option("--bundle", "-b", default=".")
@click.option("--pid-file", default=None)
@click.option("--console-socket", default=None)
@click.option("--detach", "-d", is_flag=True)
@runc_only
@click.argument("container_id")
@click.pass_obj
def run(
    ctx: Ctx,
    /,
    bundle: str,
    pid_file: str | None,
    console_socket: str | None,
    detach: bool,
    container_id: str,
    **_ignored: object,
) -> None:
    """create + start (+ wait and delete unless --detach)."""
    handoff = Handoff(pid_file, console_socket)
    code = ocicreate.run(ctx.cfg, container_id, Path(bundle), handoff, detach=detach)
    if code is not None:
        sys.exit(code)
