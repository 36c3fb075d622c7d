"""runc features: what this runtime supports (runtime-spec features.md)."""

from __future__ import annotations

import json

import click

from cocoon.ocicli.main import cli
from cocoon.runtime.ocirecords import OCI_VERSION


@cli.command()
def features() -> None:
    """What this runtime supports (runtime-spec features.md)."""
    click.echo(
        json.dumps(
            {
                "ociVersionMin": "1.0.0",
                "ociVersionMax": OCI_VERSION,
                "hooks": [
                    "prestart",
                    "createRuntime",
                    "createContainer",
                    "startContainer",
                    "poststart",
                    "poststop",
                ],  # fmt: skip
                "mountOptions": ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec"],
                "linux": {
                    "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts", "user"],
                    "cgroup": {"v1": False, "v2": True, "systemd": False},
                    "seccomp": {"enabled": True},
                },
                "annotations": {
                    "io.cocoon.runtime": "every container in its own VM",
                    "org.opencontainers.runc.version": "compatible CLI",
                },
            },
            indent=2,
        )
    )
