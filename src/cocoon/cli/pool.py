"""`cocoon pool serve|ls|fill|drain`: warm pools of ready sandboxes."""

from __future__ import annotations

import json
import sys

import click

from cocoon.cli.main import State, cli
from cocoon.runtime import pools


@cli.group("pool")
def pool_group() -> None:
    """Warm pools: sandboxes restored ahead of need, each handed out once."""


@pool_group.command("serve")
@click.option("--size", type=click.IntRange(0, 256), help="Per class (default: pool.size).")
@click.option(
    "--nics",
    type=click.IntRange(0, 4),
    help="NICs of each pooled sandbox, moved into the taker's network namespace "
    "(default: pool.nics; a CRI pod has 1).",
)
@click.option(
    "--once",
    is_flag=True,
    help="Stop after the first hand-out (or drain), staying the parent of the VM "
    "handed out until it ends (a pod's own pool: the shim fork server's).",
)
@click.pass_obj
def serve(state: State, size: int | None, nics: int | None, once: bool) -> None:
    """Keep pool.size sandboxes per size class ready (foreground; SIGTERM ends it
    and destroys the sandboxes still in the pool)."""
    cfg = state.cfg
    if size is not None:
        cfg.pool.size = size
    if nics is not None:
        cfg.pool.nics = nics
    pools.serve(cfg, _say, once=once)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@pool_group.command("ls")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_obj
def ls(state: State, fmt: str) -> None:
    """Ready sandboxes per size class (VCPUSxMEMORY_MIB)."""
    st = pools.status(state.cfg)
    if fmt == "json":
        click.echo(json.dumps(st, indent=1))
        return
    click.echo(f"{'CLASS':<10} {'READY':>5} {'TARGET':>6}  SANDBOXES")
    for name, ids in st.get("classes", {}).items():
        click.echo(f"{name:<10} {len(ids):>5} {st.get('size', 0):>6}  {' '.join(ids)}")
    if not st.get("filling", True):
        click.echo("(drained: not refilling until `cocoon pool fill`)")


@pool_group.command("fill")
@click.pass_obj
def fill(state: State) -> None:
    """Refill now (after a drain) and wait until full, a minute at most."""
    st = pools.fill(state.cfg)
    for name, ids in st.get("classes", {}).items():
        click.echo(f"{name} {len(ids)}/{st.get('size', 0)}")


@pool_group.command("drain")
@click.pass_obj
def drain(state: State) -> None:
    """Destroy the ready sandboxes and stop refilling until `fill`."""
    click.echo(f"drained {pools.drain(state.cfg)}")
