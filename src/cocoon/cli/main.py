"""`cocoon`: the docker-like command line.

Verbs parse flags and call the library; whatever they raise becomes one line
on stderr and an exit code by docker's conventions (cocoon.frontend).
"""

from __future__ import annotations

from typing import Any

import click

from cocoon import __version__, frontend
from cocoon.config import Config, load
from cocoon.log import FORMATS


class State:
    def __init__(self, config_path: str | None, overrides: dict[str, Any], debug: bool) -> None:
        self._path = config_path
        self._overrides = overrides
        self.debug = debug
        self._cfg: Config | None = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = load(self._path, overrides=self._overrides)
        return self._cfg


#: verb -> module that defines it. Imported on use: `cocoon run` should not pay
#: for the registry client's imports, nor `cocoon pull` for the sandbox's.
LAZY_VERBS = {
    "check": "check",
    "env": "check",
    "guest": "guest",
    "sandbox": "sandbox",
    "template": "template",
    "pool": "pool",
    "metrics": "metrics",
    "gc": "sandbox",
    "run": "containers",
    "ps": "lifecycle",
    "logs": "lifecycle",
    "exec": "lifecycle",
    "stop": "lifecycle",
    "kill": "lifecycle",
    "rm": "lifecycle",
    "inspect": "lifecycle",
    "wait": "lifecycle",
    "top": "lifecycle",
    "stats": "lifecycle",
    "pull": "images",
    "images": "images",
    "image": "images",
    "rmi": "images",
    "load": "images",
    "login": "images",
    "logout": "images",
    "serve": "functions",
    "fn": "functions",
}


@click.group(
    cls=frontend.LazyGroup,
    package="cocoon.cli",
    verbs=LAZY_VERBS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="cocoon")
@click.option("--config", "config_path", metavar="FILE", help="Configuration file (TOML).")
@click.option("--root", metavar="DIR", help="Runtime state dir (default /run/cocoon).")
@click.option("--data-dir", metavar="DIR", help="Data dir for guest assets and images.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--log-format", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Warnings and the error line on stderr as text or JSON lines.")  # fmt: skip
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: str | None,
    root: str | None,
    data_dir: str | None,
    debug: bool,
    log_format: str,
) -> None:
    """cocoon: every container in its own lightweight VM."""
    frontend.configure("cocoon", fmt=log_format, debug=debug)
    ctx.obj = State(config_path, {"root_dir": root, "data_dir": data_dir}, debug)


def main() -> None:
    frontend.main(cli, frontend.DOCKER)
