"""runc create: the container is recorded and its VM boots; its process waits
for `start`, held on the host by a stand-in whose pid goes to --pid-file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime import ocicreate
from cocoon.runtime.ocicontainer import Handoff

F = TypeVar("F", bound=Callable[..., None])


def runc_only(f: F) -> F:
    """runc's flags that mean nothing for a container in a VM: accepted, ignored."""
    f = click.option("--preserve-fds", type=int, default=0)(f)
    f = click.option("--no-new-keyring", is_flag=True)(f)
    return click.option("--no-pivot", is_flag=True)(f)


@cli.command()
@click.option("--bundle", "-b", default=".", help="Path to the bundle.")
@click.option("--pid-file", default=None)
@click.option("--console-socket", default=None)
@runc_only
@click.argument("container_id")
@click.pass_obj
def create(
    ctx: Ctx,
    /,
    bundle: str,
    pid_file: str | None,
    console_socket: str | None,
    container_id: str,
    **_ignored: object,
) -> None:
    """Create a container (its VM boots; the process waits for `start`)."""
    ocicreate.create(ctx.cfg, container_id, Path(bundle), Handoff(pid_file, console_socket))
