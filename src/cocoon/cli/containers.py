"""`cocoon run`: a container from an image, in its own VM, docker's flags.

The verb only translates docker's flags; runtime.run pulls, records, boots
and attaches."""

from __future__ import annotations

import asyncio
import sys

import click

from cocoon.cli.env import env_flags
from cocoon.cli.main import State, cli
from cocoon.errors import UsageError
from cocoon.runtime import run as runner
from cocoon.runtime import volumes
from cocoon.runtime.logs import DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES
from cocoon.runtime.run import RunOptions
from cocoon.util.units import parse_size


def _limits(cpus: float, memory: str) -> int:
    """--cpus checked; --memory in bytes (0: none)."""
    if cpus < 0 or cpus > 64:
        raise UsageError("--cpus must be between 0 and 64")
    try:
        mem = parse_size(memory) if memory else 0
    except ValueError as e:
        raise UsageError(str(e)) from None
    if mem and mem < 6 << 20:
        raise UsageError("--memory must be at least 6m")
    return mem


def _labels(labels: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in labels:
        k, eq, v = item.partition("=")
        if not k:
            raise UsageError(f"invalid --label {item!r}: use KEY=VALUE")
        out[k] = v
    return out


def _log_opts(opts: tuple[str, ...]) -> tuple[int, int]:
    size, files = DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES
    for o in opts:
        k, _, v = o.partition("=")
        try:
            if k == "max-size":
                size = parse_size(v)
            elif k == "max-file":
                files = int(v)
            else:
                raise UsageError(f"unknown --log-opt {k!r}: use max-size or max-file")
        except ValueError:
            raise UsageError(f"invalid --log-opt {o!r}") from None
    if size < 4096 or not 1 <= files <= 100:
        raise UsageError("--log-opt max-size must be >= 4k and max-file 1..100")
    return size, files


@cli.command(context_settings={"ignore_unknown_options": False, "allow_interspersed_args": False})
@click.option("--rm", is_flag=True, help="Remove the container when it exits.")
@click.option("-i", "--interactive", is_flag=True, help="Relay stdin.")
@click.option("-t", "--tty", is_flag=True, help="Give the process a terminal (raw mode with -i).")
@click.option("-d", "--detach", is_flag=True, help="Run in the background, print the id.")
@click.option("--name", default="", help="Container name (default: a generated one).")
@click.option("-l", "--label", "labels", multiple=True, metavar="K=V")
@click.option("--log-opt", "log_opts", multiple=True, metavar="max-size=10m|max-file=3",
              help="CRI log rotation.")  # fmt: skip
@click.option("-e", "--env", "envs", multiple=True, metavar="K[=V]",
              help="Set K (bare K: the host's value, if it has one).")  # fmt: skip
@click.option("--env-file", "env_files", multiple=True, metavar="FILE",
              help="K=V or K lines, as -e.")  # fmt: skip
@click.option("-w", "--workdir", default="")
@click.option("-u", "--user", default="", metavar="USER[:GROUP]")
@click.option("--entrypoint", default=None)
@click.option("--hostname", default="")
@click.option("--memory", "-m", default="", metavar="SIZE", help="Memory limit, e.g. 256m.")
@click.option("--cpus", type=float, default=0.0, help="CPU limit, e.g. 1.5.")
@click.option("--read-only", is_flag=True, help="Mount the image read-only as the root.")
@click.option(
    "-v",
    "--volume",
    "volume_flags",
    multiple=True,
    metavar="HOST:CTR[:ro|:rw]",
    help="Share a host directory (read-only enforced on the host).",
)
@click.option(
    "--mount",
    "mount_flags",
    multiple=True,
    metavar="type=bind|tmpfs|scratch,...",
    help="docker's --mount; type=scratch,target=CTR,size=1g is a sized empty disk.",
)
@click.option("--tmpfs", "tmpfs_flags", multiple=True, metavar="CTR[:size=64m,mode=1777]")
@click.option(
    "--network",
    "--net",
    "networks",
    multiple=True,
    metavar="bridge|none|ns:PATH",
    help="Where the NICs come from (repeat for several; default: network.default).",
)
@click.option(
    "-p",
    "--publish",
    "publish",
    multiple=True,
    metavar="[IP:]HOST:CTR[/udp]",
    help="Relay a host port to the container (bridge network).",
)
@click.option(
    "--net-rate",
    default="",
    metavar="RATE",
    help="Rate limit per interface, each direction, e.g. 10mbit.",
)
@click.option("--dns", "dns", multiple=True, metavar="IP")
@click.option("--dns-search", "dns_search", multiple=True, metavar="DOMAIN")
@click.option("--add-host", "add_hosts", multiple=True, metavar="NAME:IP")
@click.option("--pull", "pull_policy", type=click.Choice(["missing", "always", "never"]),
              default="missing")  # fmt: skip
@click.option("--platform", default=None)
@click.option("--template/--no-template", "use_template", default=None,
              help="Start from a VM template (default: sandbox.templates).")  # fmt: skip
@click.argument("image")
@click.argument("command", nargs=-1)
@click.pass_obj
def run(
    state: State,
    rm: bool,
    interactive: bool,
    tty: bool,
    detach: bool,
    name: str,
    labels: tuple[str, ...],
    log_opts: tuple[str, ...],
    envs: tuple[str, ...],
    env_files: tuple[str, ...],
    workdir: str,
    user: str,
    entrypoint: str | None,
    hostname: str,
    memory: str,
    cpus: float,
    read_only: bool,
    volume_flags: tuple[str, ...],
    mount_flags: tuple[str, ...],
    tmpfs_flags: tuple[str, ...],
    networks: tuple[str, ...],
    publish: tuple[str, ...],
    net_rate: str,
    dns: tuple[str, ...],
    dns_search: tuple[str, ...],
    add_hosts: tuple[str, ...],
    pull_policy: str,
    platform: str | None,
    use_template: bool | None,
    image: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a new container from IMAGE, in its own VM; exit with its code."""
    if detach and (interactive or tty):
        raise UsageError("-d cannot be combined with -i/-t: there is no attach yet")
    mem = _limits(cpus, memory)
    env = env_flags(envs, env_files)
    label_map = _labels(labels)
    log_max_bytes, log_max_files = _log_opts(log_opts)
    vols = volumes.parse_all(volume_flags, mount_flags, tmpfs_flags)
    net_plan, ports = runner.networking(
        state.cfg, networks=list(networks), rate=net_rate,
        hostname=hostname,  # "" = the container's short id (runtime.run.create)
        dns=list(dns), dns_search=list(dns_search), add_hosts=list(add_hosts),
        publish=list(publish),
    )  # fmt: skip
    opts = RunOptions(
        args=list(command), entrypoint=entrypoint, env=env, workdir=workdir, user=user,
        hostname=hostname or name, memory_bytes=mem, cpus=cpus, read_only=read_only,
        stdin=interactive, tty=tty, name=name, labels=label_map, auto_remove=rm,
        detach=detach, log_max_bytes=log_max_bytes, log_max_files=log_max_files,
        volumes=vols, network=net_plan, publish=ports, template=use_template,
    )  # fmt: skip
    cdir = runner.launch(state.cfg, image, opts, pull=pull_policy, platform=platform)
    if detach:
        click.echo(cdir.id)
        return
    sys.exit(asyncio.run(runner.attach_run(cdir, opts)))
