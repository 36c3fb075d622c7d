"""`cocoon metrics`: the node's Prometheus endpoint (runtime/metrics.py)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from cocoon.cli.main import State, cli
from cocoon.errors import UsageError
from cocoon.runtime.metrics import NodeCollector, node_roots


@cli.command("metrics")
@click.option("--listen", default="127.0.0.1:8090", show_default=True,
              help="HOST:PORT to serve /metrics on (kata-monitor's port).")  # fmt: skip
@click.option("--root", "roots", multiple=True, type=click.Path(path_type=Path),
              help="Another state root to cover, e.g. cocoon-runtime's --root "
                   "(cocoon's own and the shim's are always covered); repeatable.")  # fmt: skip
@click.option("--once", is_flag=True, help="Print one scrape on stdout and exit.")
@click.pass_obj
def metrics(state: State, listen: str, roots: tuple[Path, ...], once: bool) -> None:
    """Per container, its guest's CPU, memory, network and block I/O; per
    sandbox, its host processes' PSS and CPU; start times; counts by status."""
    registry = CollectorRegistry(auto_describe=False)
    cfg = state.cfg
    registry.register(NodeCollector(node_roots(cfg.root, Path(cfg.shim.root_dir), roots)))
    if once:
        sys.stdout.buffer.write(generate_latest(registry))
        return
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {listen!r}: give HOST:PORT, e.g. 127.0.0.1:8090")
    server, thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0",
                                       registry=registry)  # fmt: skip
    click.echo(f"serving http://{listen}/metrics", err=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.shutdown()
    thread.join(5.0)
