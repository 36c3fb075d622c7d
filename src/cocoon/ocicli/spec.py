"""runc spec: a starting config.json."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cocoon.errors import OciError
from cocoon.oci.spec import default_spec
from cocoon.ocicli.main import cli
from cocoon.runtime.ocirecords import OCI_VERSION


@cli.command("spec")
@click.option("--bundle", "-b", default=".")
@click.option("--rootless", is_flag=True)
def spec_cmd(bundle: str, rootless: bool) -> None:
    """Write a starting config.json (busybox sh on a terminal, like runc's)."""
    path = Path(bundle) / "config.json"
    if path.exists():
        raise OciError(f"{path} exists: remove it first")
    spec = default_spec(["sh"], terminal=True, hostname="cocoon")
    spec["ociVersion"] = OCI_VERSION
    path.write_text(json.dumps(spec, indent=2) + "\n")
