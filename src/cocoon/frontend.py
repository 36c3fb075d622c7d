"""What both command lines share: how a command that failed ends, and verbs
imported only when used.

`cocoon` keeps docker's conventions and `cocoon-runtime` runc's; they differ
in their name and their exit codes, and in nothing else. What a failure looks
like is decided here once: one line on stderr (and in the log), a traceback
only when --debug asked for one, and the exit code its class (or the
front end's convention) gives it. A further front end (a shim, a function
service) reports failures by the same function, not a copy of it.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from cocoon import log as cocoon_log
from cocoon.errors import CocoonError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conventions:
    prog: str
    #: The exit code of a CocoonError.
    error_code: Callable[[CocoonError], int]
    #: The exit code of click's refusal of the command line (after its usage text).
    usage_code: Callable[[click.ClickException], int]
    #: The exit code of an exception that is no CocoonError: a bug.
    internal_code: int
    #: Said after an internal error's line.
    internal_hint: str = ""


#: docker: each error's own code; 125 for any failure of the runtime itself,
#: a command line it refuses (a bad flag) included, where click would say 2.
DOCKER = Conventions("cocoon", lambda e: e.exit_code, lambda e: 125, 125, " (--debug shows where)")
#: runc: 1 for every failure, 2 for click's usage errors.
RUNC = Conventions("cocoon-runtime", lambda e: 1, lambda e: 2 if e.exit_code == 2 else 1, 1)

_debug = False


def configure(
    prog: str,
    *,
    fmt: str = "text",
    debug: bool = False,
    log_file: str | None = None,
    log_file_format: str = "text",
) -> None:
    """Where this command's log goes, from its parsed options. With a --log file
    (runc's), the file gets every record and stderr only the failure, as with runc."""
    global _debug
    _debug = debug
    level = logging.DEBUG if debug else logging.WARNING
    cocoon_log.setup(
        prog,
        fmt,
        level=level,
        stream_level=logging.ERROR if log_file else level,
        file=log_file,
        file_format=log_file_format,
    )


class LazyGroup(click.Group):
    """A command line whose verbs are defined one module each (or one per
    small group) and imported on use: every call is a new process, and
    `cocoon run` should not pay for the registry client's imports, nor
    `cocoon-runtime state` for the sandbox's."""

    def __init__(self, *args: Any, package: str, verbs: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: verb -> the module of ``package`` that defines it
        self.package = package
        self.verbs = verbs

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.verbs))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.verbs:
            importlib.import_module(f"{self.package}.{self.verbs[cmd_name]}")
        return super().get_command(ctx, cmd_name)


def main(cli: click.Group, conv: Conventions) -> NoReturn:
    """Run ``cli`` and turn whatever it raises into one line and an exit code."""
    configure(conv.prog)  # until the group's options say otherwise
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(conv.usage_code(e))
    except click.exceptions.Abort:
        fail("aborted", 130)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except CocoonError as e:
        fail(str(e), conv.error_code(e), e)
    except Exception as e:
        # A bug (ours, or a library's on hostile input): still one line, which
        # names the class, so a shim that reads only the log shows what broke.
        text = f"internal error: {e.__class__.__name__}: {str(e)[:500]}"
        fail(text + conv.internal_hint, conv.internal_code, e)
    sys.exit(0)


def fail(text: str, code: int, e: BaseException | None = None) -> NoReturn:
    """Report a failure (with its traceback under --debug) and exit ``code``."""
    extra = {"exit_code": code, "error": type(e).__name__ if e is not None else ""}
    log.error(text, exc_info=e if _debug and e is not None else None, extra=extra)
    sys.exit(code)
