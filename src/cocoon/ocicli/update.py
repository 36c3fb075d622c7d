"""runc update: new cgroup limits, applied by the guest's crun."""

from __future__ import annotations

import click

from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime.ocicontainer import OciContainer, ResourceFlags


@cli.command()
@click.option("--resources", "-r", default=None, help="linux.resources JSON file, - for stdin")
@click.option("--memory", default=None, type=int)
@click.option("--cpu-quota", default=None, type=int)
@click.option("--cpu-period", default=None, type=int)
@click.option("--pids-limit", default=None, type=int)
@click.argument("container_id")
@click.pass_obj
def update(
    ctx: Ctx,
    resources: str | None,
    memory: int | None,
    cpu_quota: int | None,
    cpu_period: int | None,
    pids_limit: int | None,
    container_id: str,
) -> None:
    """New cgroup limits for a running container (applied in its guest)."""
    c = OciContainer.load(ctx.cfg, container_id)
    c.update(ResourceFlags(resources, memory, cpu_quota, cpu_period, pids_limit))
