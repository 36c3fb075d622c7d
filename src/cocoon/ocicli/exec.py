"""runc exec: a further process in a running container, held on the host by a
stand-in; without --detach, exit with its status."""

from __future__ import annotations

import sys

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime import standin
from cocoon.runtime.ocicontainer import ExecFlags, Handoff, OciContainer


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("--process", "-p", "process_file", default=None, help="process.json")
@click.option("--console-socket", default=None)
@click.option("--tty", "-t", is_flag=True)
@click.option("--detach", "-d", is_flag=True)
@click.option("--pid-file", default=None)
@click.option("--cwd", default=None)
@click.option("--env", "-e", "envs", multiple=True)
@click.option("--user", "-u", default=None, metavar="UID[:GID]")
@click.option("--additional-gids", "-g", multiple=True, type=int)
@click.option("--no-new-privs", is_flag=True)
@click.option("--cap", "-c", "caps", multiple=True)
# runc's flags that mean nothing for a container in a VM: accepted, ignored.
@click.option("--preserve-fds", type=int, default=0)
@click.option("--process-label", default=None)
@click.option("--apparmor", default=None)
@click.option("--ignore-paused", is_flag=True)
@click.argument("container_id")
@click.argument("command", nargs=-1)
@click.pass_obj
def exec_cmd(
    ctx: Ctx,
    /,
    container_id: str,
    command: tuple[str, ...],
    process_file: str | None,
    console_socket: str | None,
    pid_file: str | None,
    detach: bool,
    tty: bool,
    cwd: str | None,
    envs: tuple[str, ...],
    user: str | None,
    additional_gids: tuple[int, ...],
    no_new_privs: bool,
    caps: tuple[str, ...],
    **_ignored: object,
) -> None:
    """Run a further process in a running container."""
    flags = ExecFlags(
        process_file=process_file,
        args=list(command),
        cwd=cwd,
        env=list(envs),
        user=user,
        additional_gids=list(additional_gids),
        no_new_privs=no_new_privs,
        caps=list(caps),
        tty=tty,
    )
    pid = OciContainer.load(ctx.cfg, container_id).exec(flags, Handoff(pid_file, console_socket))
    if not detach:
        sys.exit(standin.wait(pid))
