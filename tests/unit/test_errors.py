"""The error tree's shared parts: which agent refusals are typed, and how a
typed error survives a pipe between our own processes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cocoon import errors
from cocoon.errors import (
    AgentError,
    CocoonError,
    CommandNotExecutable,
    CommandNotFound,
    SandboxError,
    agent_error,
    error_line,
    from_error_line,
)

SRC = Path(__file__).resolve().parents[2] / "src" / "cocoon"


# crun's words, as the agent passes them on (seen from crun 1.x in the guest).
@pytest.mark.parametrize(
    "message, kind",
    [
        ("create_container: executable file `nosuch` not found in $PATH: "
         "No such file or directory", CommandNotFound),
        ("exec_process: executable file `/no/such` not found in $PATH: "
         "No such file or directory", CommandNotFound),
        ("create_container: open executable: Permission denied", CommandNotExecutable),
        ("exec_process: open executable: Operation not permitted", CommandNotExecutable),
        ("exec_process: open executable: Not a directory", CommandNotExecutable),
        ("create_container: mkdir `/scratch`: Read-only file system", AgentError),
        ("create_container: chdir `/nope`: No such file or directory", AgentError),
    ],
)  # fmt: skip
def test_crun_failures_are_typed_by_what_they_mean(message: str, kind: type) -> None:
    e = agent_error(message, "crun_failed")
    assert type(e) is kind and str(e) == message


def test_only_crun_failures_are_read_for_a_command() -> None:
    """Another refusal that happens to name an executable stays what it was."""
    e = agent_error("no process: executable file `x` not found", "not_found")
    assert type(e) is AgentError and e.code == "not_found"


def test_exit_codes_are_the_shells() -> None:
    assert CommandNotFound("x").exit_code == 127
    assert CommandNotExecutable("x").exit_code == 126
    assert AgentError("x").exit_code == 125


@pytest.mark.parametrize("kind", [CommandNotFound, CommandNotExecutable])
def test_a_typed_error_keeps_its_type_across_a_pipe(kind: type[AgentError]) -> None:
    sent = agent_error("create_container: x\nis\nnot", kind.CODE)  # type: ignore[attr-defined]
    line = error_line(sent)
    assert "\n" not in line
    got = from_error_line(line, SandboxError)
    assert type(got) is kind and str(got) == "create_container: x is not"
    # and once more, the way the monitor passes it to a client's channel
    assert type(agent_error(str(got), got.code)) is kind  # type: ignore[attr-defined]


def test_an_untyped_error_on_a_pipe_becomes_the_default() -> None:
    got = from_error_line(error_line(OSError("disk full")), SandboxError)
    assert type(got) is SandboxError and str(got) == "disk full"


def test_every_cocoon_error_lives_in_errors_py() -> None:
    """One place says what each failure is and its exit code."""
    names = {
        n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, CocoonError)
    }
    elsewhere = []
    for path in SRC.rglob("*.py"):
        if path.name == "errors.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                if bases & (names | {"CocoonError"}):
                    elsewhere.append(f"{path.relative_to(SRC)}: {node.name}")
    assert not elsewhere
