"""runc events: the container's stats as runc's JSON events."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

import click

from cocoon.errors import CocoonError
from cocoon.ocicli.main import Ctx, cli
from cocoon.runtime.ocicontainer import OciContainer
from cocoon.runtime.status import LIVE


def _stats_event(c: OciContainer) -> dict[str, Any]:
    st = c.stats()
    return {
        "type": "stats",
        "id": c.id,
        "data": {
            "cpu": {"usage": {"total": st.cpu_usage_us * 1000}},
            "memory": {"usage": {"usage": st.memory_bytes, "limit": st.memory_limit_bytes}},
            "pids": {"current": st.pids},
            "blkio": {
                "ioServiceBytesRecursive": [
                    {"op": "Read", "value": st.io_read_bytes},
                    {"op": "Write", "value": st.io_write_bytes},
                ]
            },
            "network_interfaces": [
                {"name": n.name, "rx_bytes": n.rx_bytes, "tx_bytes": n.tx_bytes} for n in st.net
            ],
        },
    }


@cli.command()
@click.option("--stats", is_flag=True, help="One stats event, then exit.")
@click.option("--interval", default="5s", help="Time between stats events.")
@click.argument("container_id")
@click.pass_obj
def events(ctx: Ctx, stats: bool, interval: str, container_id: str) -> None:
    """Stats events as JSON lines, read from the guest."""
    c = OciContainer.load(ctx.cfg, container_id)
    secs = float(interval.rstrip("s")) if interval.rstrip("s") else 5.0
    if stats:
        click.echo(json.dumps(_stats_event(c)))
        return
    while c.status() in LIVE:
        with contextlib.suppress(CocoonError):
            click.echo(json.dumps(_stats_event(c)), nl=True)
            sys.stdout.flush()
        time.sleep(secs)
