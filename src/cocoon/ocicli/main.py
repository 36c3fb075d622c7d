"""`cocoon-runtime`: runc's command line, each container in its own VM.

containerd's runc shim, conmon (podman) and docker drive it exactly as they
drive runc. One module per verb (or per small group of verbs, as runc keeps
them), each a thin translation of runc's flags into a call of the runtime
library (runtime.ocicreate, runtime.ocicontainer), imported only when its verb
is used. Errors are one line on stderr and, with --log, a runc-style
``{"level","msg","time"}`` JSON line there (the shim shows the last one); the
exit code is 1 as with runc (cocoon.frontend). Warnings go to --log, or to
stderr without one.
"""

from __future__ import annotations

import os

import click

from cocoon import __version__, frontend
from cocoon.config import Config, load

DEFAULT_ROOT = "/run/cocoon-runtime"

#: verb -> the module of cocoon.ocicli that defines it.
VERBS = {
    "checkpoint": "checkpoint",
    "create": "create",
    "delete": "delete",
    "events": "events",
    "exec": "exec",
    "features": "features",
    "kill": "kill",
    "list": "list",
    "pause": "pause",
    "ps": "ps",
    "restore": "checkpoint",
    "resume": "pause",
    "run": "run",
    "spec": "spec",
    "start": "start",
    "state": "state",
    "update": "update",
}


class Ctx:
    def __init__(self, root: str) -> None:
        self.root = root
        self._cfg: Config | None = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = load(None, overrides={"root_dir": self.root})
        return self._cfg


@click.group(
    cls=frontend.LazyGroup,
    package="cocoon.ocicli",
    verbs=VERBS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="cocoon-runtime")
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="State dir.")
@click.option("--log", default=None, help="Log file (runc's --log).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--debug", is_flag=True)
@click.option("--systemd-cgroup", is_flag=True,
              help="Accepted for compatibility: cgroups live inside each VM, where the "
                   "guest's crun manages them; the host sees one VM process.")  # fmt: skip
@click.option("--criu", default=None, hidden=True)
@click.option("--rootless", default=None, hidden=True)
@click.pass_context
def cli(
    ctx: click.Context,
    root: str,
    log: str | None,
    log_format: str,
    debug: bool,
    systemd_cgroup: bool,
    criu: str | None,
    rootless: str | None,
) -> None:
    """A runc-compatible OCI runtime that runs every container in its own VM."""
    frontend.configure("cocoon-runtime", debug=debug, log_file=log, log_file_format=log_format)
    ctx.obj = Ctx(os.path.abspath(root))


def main() -> None:
    frontend.main(cli, frontend.RUNC)
