"""A default OCI runtime spec (config.json) for a process in a guest container.

The same shape crun/runc generate with `spec`, trimmed to what matters inside a
VM: the VM is the security boundary, the namespaces and capabilities keep one
container from its sibling containers in a pod.
"""

from __future__ import annotations

from typing import Any

DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"]


def default_spec(
    args: list[str],
    *,
    env: list[str] | None = None,
    cwd: str = "/",
    uid: int = 0,
    gid: int = 0,
    terminal: bool = False,
    hostname: str = "cocoon",
    readonly_rootfs: bool = False,
) -> dict[str, Any]:
    caps = list(DEFAULT_CAPS)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env if env is not None else list(DEFAULT_ENV),
            "cwd": cwd,
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": readonly_rootfs},
        "hostname": hostname,
        # runc's default mounts (`runc spec`), one literal each: alike in shape
        # because they are data, written out as runc's readers expect them.
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
            },
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777"],
            },
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/sched_debug",
                "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }


#: The agent resolves a user name against the container's /etc/passwd and
#: /etc/group (the host cannot read inside the image cheaply; the guest has it mounted).
USER_ANNOTATION = "io.cocoon.user"


def merge_env(base: list[str], extra: list[str]) -> list[str]:
    """Docker's rule: later KEY=VALUE replaces an earlier KEY, order kept."""
    out: dict[str, str] = {}
    for item in [*base, *extra]:
        key = item.split("=", 1)[0]
        out.pop(key, None)
        out[key] = item
    return list(out.values())


def process_args(
    entrypoint: list[str], cmd: list[str], *, entrypoint_override: str | None, args: list[str]
) -> list[str]:
    """argv as docker builds it from the image and the command line."""
    if entrypoint_override is not None:
        ep = [entrypoint_override] if entrypoint_override else []
        return ep + args  # --entrypoint drops the image's Cmd
    return entrypoint + (args or cmd)


def parse_user(user: str) -> tuple[int, int]:
    """Numeric best effort for ``uid[:gid]``; names (and a uid's primary group) are
    resolved by the agent against the container's own /etc/passwd (USER_ANNOTATION)."""
    u, _, g = user.partition(":")
    return _numeric_id(u), _numeric_id(g)


#: The highest uid/gid: (uid_t)-1 means "unchanged" to the kernel.
MAX_ID = 0xFFFFFFFE


def _numeric_id(text: str) -> int:
    """ASCII digits in range, else 0 (the agent resolves it, or says it is not there):
    str.isdigit() is true for "²", which int() refuses, and for other scripts' digits."""
    if text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_ID:
        return int(text)
    return 0
