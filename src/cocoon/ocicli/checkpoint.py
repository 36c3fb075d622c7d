"""runc checkpoint and restore: not supported (VM snapshots are not wired to
checkpoint/restore yet); refused in runc's way, exit 1."""

from __future__ import annotations

import click

from cocoon.errors import OciError
from cocoon.ocicli.main import cli


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def checkpoint(args: tuple[str, ...]) -> None:
    """Not supported (VM snapshots are not wired to checkpoint/restore yet)."""
    raise OciError("checkpoint is not supported by cocoon-runtime")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def restore(args: tuple[str, ...]) -> None:
    """Not supported (VM snapshots are not wired to checkpoint/restore yet)."""
    raise OciError("restore is not supported by cocoon-runtime")
