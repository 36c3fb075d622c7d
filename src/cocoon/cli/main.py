"""`cocoon`: the docker-like command line.

Verbs parse flags and call the library; errors from the CocoonError tree become
one line on stderr and their exit code (traceback only with --debug).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import Any

import click

from cocoon import __version__
from cocoon.config import Config, load
from cocoon.errors import CocoonError


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
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_VERBS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in LAZY_VERBS:
            importlib.import_module(f"cocoon.cli.{LAZY_VERBS[cmd_name]}")
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cocoon")
@click.option("--config", "config_path", metavar="FILE", help="Configuration file (TOML).")
@click.option("--root", metavar="DIR", help="Runtime state dir (default /run/cocoon).")
@click.option("--data-dir", metavar="DIR", help="Data dir for guest assets and images.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: str | None,
    root: str | None,
    data_dir: str | None,
    debug: bool,
) -> None:
    """cocoon: every container in its own lightweight VM."""
    ctx.obj = State(config_path, {"root_dir": root, "data_dir": data_dir}, debug)


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("cocoon: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code if e.exit_code != 1 else 125)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except CocoonError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"cocoon: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("cocoon: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        # A bug (ours, or a library's on hostile input): still one line and
        # docker's "the runtime failed"; --debug has the traceback.
        if debug:
            traceback.print_exc()
        text = f"{e.__class__.__name__}: {str(e)[:500]}"
        click.echo(f"cocoon: internal error: {text} (--debug shows where)", err=True)
        sys.exit(125)
