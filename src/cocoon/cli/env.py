"""docker's -e and --env-file, shared by `cocoon run` and `cocoon exec`."""

from __future__ import annotations

import os
from collections.abc import Iterable

from cocoon.errors import UsageError


def env_flags(envs: Iterable[str], env_files: Iterable[str] = ()) -> list[str]:
    """The environment the flags ask for, files first (docker's order): NAME=VALUE
    as given; a bare NAME takes the host's value, and is left out when the host
    has none, so `-e HOME` passes what a script has without spelling it out."""
    out = []
    for item in [x for f in env_files for x in _env_file(f)] + list(envs):
        if "=" in item:
            out.append(item)
        elif item in os.environ:
            out.append(f"{item}={os.environ[item]}")
    return out


def _env_file(path: str) -> list[str]:
    out = []
    try:
        lines = open(path).read().splitlines()  # noqa: SIM115
    except OSError as e:
        raise UsageError(f"cannot read env file {path}: {e.strerror}") from e
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out
