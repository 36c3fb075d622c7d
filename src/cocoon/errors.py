"""The one exception tree of cocoon.

Every error carries the exit code the CLI returns for it, and ``str(e)`` is a
single line a user can act on: what was wrong and what to do. Every front end
reports them through one handler (cocoon.frontend), so a class's exit code is
the one place that decides it.
"""

from __future__ import annotations

from typing import ClassVar


class CocoonError(Exception):
    """Base of every error cocoon raises on purpose."""

    exit_code = 125  # docker's "the runtime itself failed"


class ConfigError(CocoonError):
    """The configuration file, an environment override or a flag is invalid."""


class HostError(CocoonError):
    """The host cannot run cocoon (missing QEMU, assets, /dev/... )."""


class GuestAssetError(CocoonError):
    """A guest kernel or root image is missing or could not be built."""


class HypervisorError(CocoonError):
    """The hypervisor process failed to start, or died."""


class GuestError(CocoonError):
    """The guest broke the protocol, lied, flooded, went silent or died.

    Whoever raises it tears the sandbox down: a guest is never trusted again
    after it misbehaved once.
    """


class AgentError(CocoonError):
    """The agent understood a request and refused it (e.g. crun failed)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        #: the agent's (or monitor's) short machine word, e.g. "not_running"
        self.code = code


class CommandError(AgentError):
    """The container's command could not be run: the user's mistake, not the
    runtime's, so it gets the shell's exit codes (as docker's does) and a script
    can tell a typo from a broken runtime."""

    #: The agent-error code that names the class across a process boundary.
    CODE: ClassVar[str] = ""


class CommandNotFound(CommandError):
    """No such executable in the container (not on the path, or no such file)."""

    exit_code = 127
    CODE = "command_not_found"


class CommandNotExecutable(CommandError):
    """The command exists but cannot be run (no exec bit, a directory, ...)."""

    exit_code = 126
    CODE = "command_not_executable"


def _command_failure(message: str) -> type[CommandError] | None:
    """Which CommandError crun's own words describe, if any.

    crun says why it could not run a command only in text; the agent passes
    that text on as ``crun_failed``. This is the one place that reads it.
    """
    if "executable file `" in message and "not found" in message:
        return CommandNotFound
    if "open executable: " in message or "exec container process" in message:
        if message.endswith("No such file or directory"):
            return CommandNotFound
        return CommandNotExecutable
    return None


def agent_error(message: str, code: str) -> AgentError:
    """The host's error for a refusal from the agent (or from a monitor that
    passed one on): typed when it means the command could not be run."""
    for cls in (CommandNotFound, CommandNotExecutable):
        if code == cls.CODE:
            return cls(message, code)
    kind = _command_failure(message) if code == "crun_failed" else None
    if kind is not None:
        return kind(message, kind.CODE)
    return AgentError(message, code)


def error_line(e: BaseException) -> str:
    """``e`` as the one line a child process reports it by on a pipe (the
    monitor's and the stand-in's ready pipes); a CommandError keeps its type."""
    text = str(e).replace("\n", " ")[:4000]
    return f"error:{e.code} {text}" if isinstance(e, CommandError) else f"error {text}"


def from_error_line(line: str, default: type[CocoonError]) -> CocoonError:
    """The error an ``error_line`` stands for, raised again in the parent."""
    head, _, text = line.partition(" ")
    code = head.partition(":")[2]
    return agent_error(text, code) if code else default(text)


class SandboxError(CocoonError):
    """A sandbox is missing, busy, or in the wrong state for a command."""


class StateError(CocoonError):
    """On-disk state is unreadable or locked by another command."""


class ImageError(CocoonError):
    """An image, a registry, an archive or a layer is missing, invalid or hostile."""


class NetworkError(CocoonError):
    """A network namespace, tap, bridge, NAT rule or published port could not be set up."""


class TemplateError(CocoonError):
    """A VM template is missing, stale, corrupt, or could not be built or restored.

    Never fatal to a container: the sandbox boots cold instead, with a warning.
    """


class UsageError(CocoonError):
    """The command line asks for something impossible (docker's exit 125)."""


class VolumeError(CocoonError):
    """A -v, --mount or --tmpfs value is invalid (docker's exit 125)."""


class NoSuchContainer(CocoonError):
    """No container by that id or name (docker's exit 1)."""

    exit_code = 1


class NotRunning(CocoonError):
    """The container has no monitor: it never started or has exited (docker's exit 1)."""

    exit_code = 1


class IllegalTransition(CocoonError):
    """A container was asked for what its status does not allow (start a
    running one, exec in a paused one): runtime/status.py's table says what
    each status allows. Exit 1, as docker's "not running" and runc's refusals."""

    exit_code = 1

    def __init__(self, message: str, status: str, op: str) -> None:
        super().__init__(message)
        #: The container's status, and what it was asked (runtime.status.Op).
        self.status = status
        self.op = op


class VmExited(CocoonError):
    """The container's VM died under it; the monitor recorded why."""

    exit_code = 137


class OciError(CocoonError):
    """Every failure of a `cocoon-runtime` verb: runc exits 1."""

    exit_code = 1


class ShimError(CocoonError):
    """containerd's shim (`containerd-shim-cocoon-v2`): a `start` or `delete`
    that cannot be done, or a stdio path of containerd's that cannot be used.
    One line on stderr and exit 1 (containerd shows the line)."""

    exit_code = 1


class BundleError(CocoonError):
    """An OCI bundle (config.json, its rootfs or mounts) cannot be run: runc exits 1."""

    exit_code = 1


class ServiceError(CocoonError):
    """The function service refused or failed a request (`cocoon fn`): exit 1,
    as docker's client exits for its daemon's refusals."""

    exit_code = 1


class ServiceUnreachable(CocoonError):
    """`cocoon fn` could not reach the function service at all."""


class FunctionFailed(CocoonError):
    """An invocation ran and failed: `cocoon fn invoke` exits with the
    handler's own exit code when it had one (as `cocoon run` does), 124 when
    it timed out (as timeout(1)), else 1."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class CodeError(CocoonError):
    """A function's code is refused (`cocoon serve`): hostile, oversized,
    corrupt, or not what it claims. Nothing of it is kept."""


class FunctionBusy(CocoonError):
    """Every instance of a function version is busy and its queue is full
    (the service's 429)."""


class FunctionGone(CocoonError):
    """A function was removed while a request for it waited."""
