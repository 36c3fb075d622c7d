"""The one exception tree of cocoon.

Every error carries the exit code the CLI returns for it, and ``str(e)`` is a
single line a user can act on: what was wrong and what to do.
"""

from __future__ import annotations


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


class VmExited(CocoonError):
    """The container's VM died under it; the monitor recorded why."""

    exit_code = 137


class OciError(CocoonError):
    """Every failure of a `cocoon-runtime` verb: runc exits 1."""

    exit_code = 1


class BundleError(CocoonError):
    """An OCI bundle (config.json, its rootfs or mounts) cannot be run: runc exits 1."""

    exit_code = 1
