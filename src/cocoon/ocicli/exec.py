"""runc exec: a further process in a running container, held on the host by a
stand-in; without --detach, exit with its status."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime import standin
from cocoon.runtime.ocicontainer import ExecFlags, Handoff, OciContainer

F = TypeVar("F", bound=Callable[..., None])

#: runc exec's flags that make the process; each is named as its ExecFlags field.
PROCESS_OPTIONS = [
    click.option("--process", "-p", "process_file", default=None, help="process.json"),
    click.option("--tty", "-t", is_flag=True),
    click.option("--cwd", default=None),
    click.option("--env", "-e", "env", multiple=True),
    click.option("--user", "-u", default=None, metavar="UID[:GID]"),
    click.option("--additional-gids", "-g", multiple=True, type=int),
    click.option("--no-new-privs", is_flag=True),
    click.option("--cap", "-c", "caps", multiple=True),
]


def process_flags(f: F) -> F:
    """The process's flags (PROCESS_OPTIONS and the ``args`` argument), given
    to ``f`` as one ``flags: ExecFlags``, as update's limits are one ResourceFlags."""
    names = [fl.name for fl in dataclasses.fields(ExecFlags)]

    @functools.wraps(f)
    def verb(*args: Any, **params: Any) -> None:
        given = {n: params.pop(n) for n in names}  # click's tuples as ExecFlags' lists
        fields: dict[str, Any] = {
            n: list(v) if isinstance(v, tuple) else v for n, v in given.items()
        }
        f(*args, flags=ExecFlags(**fields), **params)

    for option in reversed(PROCESS_OPTIONS):
        verb = option(verb)
    return cast(F, verb)


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@process_flags
@click.option("--console-socket", default=None)
@click.option("--detach", "-d", is_flag=True)
@click.option("--pid-file", default=None)
# runc's flags that mean nothing for a container in a VM: accepted, ignored.
@click.option("--preserve-fds", type=int, default=0)
@click.option("--process-label", default=None)
@click.option("--apparmor", default=None)
@click.option("--ignore-paused", is_flag=True)
@click.argument("container_id")
@click.argument("args", nargs=-1)
@click.pass_obj
def exec_cmd(
    ctx: Ctx,
    /,
    container_id: str,
    flags: ExecFlags,
    console_socket: str | None,
    pid_file: str | None,
    detach: bool,
    **_ignored: object,
) -> None:
    """Run a further process in a running container."""
    pid = OciContainer.load(ctx.cfg, container_id).exec(flags, Handoff(pid_file, console_socket))
    if not detach:
        sys.exit(standin.wait(pid))
