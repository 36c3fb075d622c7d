"""The containers of the `cocoon` CLI: one dir each under ``<root_dir>/containers/<id>``.

A container's dir holds what it was asked to be (``config.json``, written once),
what it is (``state.json``, written only by its monitor), its logs, and the
monitor's control socket and life lock. Liveness is the lock, never a pid: a
container whose state says running but whose monitor lock nobody holds lost its
monitor (killed, crashed) and shows as ``dead`` until ``cocoon rm`` cleans it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import CocoonError, NoSuchContainer, StateError
from cocoon.protocol import ids
from cocoon.runtime.status import ON_DISK, Status, current
from cocoon.util.fs import LifeLock, atomic_write, locked_file

#: unix socket paths are limited to 107 bytes; the dir path must leave room.
MAX_SOCKET_PATH = 107
#: The container's id inside its VM: the one a VM was booted for (a pod's
#: further containers get ids of their own).
CONTAINER_ID = "main"

_ADJECTIVES = (
    "brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid", "merry",
    "nimble", "proud", "quiet", "rapid", "sharp", "tidy", "vivid", "witty", "zesty", "bold",
)  # fmt: skip
_NOUNS = (
    "ant", "bee", "cocoon", "crane", "finch", "gecko", "heron", "ibis", "koala", "lark",
    "moth", "newt", "otter", "panda", "quail", "robin", "swift", "tern", "vole", "wren",
)  # fmt: skip


@dataclass
class ContainerConfig:
    """What the container was asked to be; fixed at creation."""

    id: str
    name: str
    image: str
    image_id: str
    command: list[str]
    spec: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    labels: dict[str, str] = field(default_factory=dict)
    auto_remove: bool = False
    tty: bool = False
    stdin: bool = False
    read_only: bool = False
    memory_bytes: int = 0
    cpus: float = 0.0
    vcpus: int = 1
    vm_memory_mib: int = 0
    stop_signal: str = "SIGTERM"
    volumes: list[str] = field(default_factory=list)
    #: network.NetworkPlan as a dict ({} = no networking: OCI pods' members).
    network: dict[str, Any] = field(default_factory=dict)
    #: -p as given, e.g. "127.0.0.1:8080:80/tcp".
    ports: list[str] = field(default_factory=list)

    @property
    def sandbox_id(self) -> str:
        """Our 64-hex ids give their first 12; any other id (an OCI runtime
        caller's) is hashed into the sandbox id alphabet."""
        if ids.CONTAINER_ID.fullmatch(self.id):
            return self.id[:12]
        return hashlib.sha256(self.id.encode()).hexdigest()[:12]


@dataclass
class ContainerState:
    """What the container is; written by its monitor only."""

    status: Status = Status.CREATED
    monitor_pid: int = 0
    pid: int = 0  # the init process's pid in the guest
    started_at: float = 0.0
    finished_at: float = 0.0
    exit_code: int = 0
    oom_killed: bool = False
    error: str = ""
    boot_s: float = 0.0
    accel: str = ""
    #: The VM template its sandbox was cloned from ("" = it booted cold).
    template: str = ""
    #: The uid its sandbox's VMM runs as (0 = not jailed: security.jail).
    jail_uid: int = 0
    #: Its sandbox, when not the one named after it (taken from a warm pool).
    sandbox_id: str = ""
    #: The container's addresses (CIDR) and its published ports as bound.
    addresses: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)


class ContainerDir:
    def __init__(self, root: Path, cid: str, id_re: re.Pattern[str] = ids.CONTAINER_ID) -> None:
        if not id_re.fullmatch(cid):
            raise StateError(f"invalid container id {cid[:70]!r}")
        self.id = cid
        self.path = root / cid
        self.life = LifeLock(self.path / "monitor.lock")

    @property
    def ctl_socket(self) -> Path:
        """Beside, not inside, the container dir: a unix socket path must stay
        under 108 bytes whatever the root dir and id, so it is named by a hash."""
        name = hashlib.sha256(str(self.path).encode()).hexdigest()[:16]
        return self.path.parent.parent / "ctl" / f"{name}.sock"

    @property
    def log_path(self) -> Path:
        return self.path / "container.log"

    def config(self) -> ContainerConfig:
        try:
            raw = json.loads((self.path / "config.json").read_bytes())
            return ContainerConfig(**raw)
        except FileNotFoundError:
            raise NoSuchContainer(f"no such container: {self.id[:12]}") from None
        except (ValueError, TypeError) as e:
            raise StateError(f"config of container {self.id[:12]} is corrupt: {e}") from e

    def state(self) -> ContainerState:
        try:
            raw = json.loads((self.path / "state.json").read_bytes())
            st = ContainerState(**raw)
        except FileNotFoundError:
            return ContainerState()
        except (ValueError, TypeError) as e:
            raise StateError(f"state of container {self.id[:12]} is corrupt: {e}") from e
        if not isinstance(st.status, str) or st.status not in ON_DISK:
            raise StateError(f"state of container {self.id[:12]} is corrupt: {st.status!r}")
        st.status = Status(st.status)
        return st

    def write_state(self, st: ContainerState) -> None:
        atomic_write(self.path / "state.json", json.dumps(asdict(st)).encode(), durable=False)

    def status(self) -> Status:
        """What the record says, or dead when it claims a life nobody holds."""
        return current(self.state().status, self.life.held)


class ContainerStore:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = cfg.root / "containers"

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return locked_file(self.root / ".lock", 10.0, "the container list is locked; retry")

    def new_id(self) -> str:
        cid = secrets.token_hex(32)
        if len(str(ContainerDir(self.root, cid).ctl_socket)) > MAX_SOCKET_PATH:
            raise StateError(f"root_dir {self.cfg.root} is too long for a control socket path")
        return cid

    def create(self, config: ContainerConfig) -> ContainerDir:
        """Reserve the name and make the dir, atomically against parallel `cocoon run`s."""
        with self._lock():
            names = {c.name: c.id for c in self._configs()}
            if not config.name:
                config.name = self._fresh_name(set(names))
            if not ids.NAME.fullmatch(config.name):
                raise StateError(
                    f"invalid container name {config.name[:70]!r}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*"
                )
            if config.name in names:
                raise StateError(
                    f'the name "{config.name}" is already used by container '
                    f"{names[config.name][:12]}: remove it or pick another name"
                )
            d = ContainerDir(self.root, config.id)
            d.path.mkdir(mode=0o700)
            atomic_write(d.path / "config.json", json.dumps(asdict(config)).encode(), durable=False)
            d.write_state(ContainerState())
        return d

    @staticmethod
    def _fresh_name(taken: set[str]) -> str:
        while True:
            name = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NOUNS)}"
            if name in taken:
                name += f"_{secrets.randbelow(1000)}"
            if name not in taken:
                return name

    def ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if ids.CONTAINER_ID.fullmatch(n))
        except FileNotFoundError:
            return []

    def _configs(self) -> list[ContainerConfig]:
        out = []
        for cid in self.ids():
            with contextlib.suppress(CocoonError):
                out.append(ContainerDir(self.root, cid).config())
        return out

    def all(self) -> list[tuple[ContainerDir, ContainerConfig]]:
        """Every readable container, newest first."""
        out = []
        for cid in self.ids():
            d = ContainerDir(self.root, cid)
            with contextlib.suppress(CocoonError):
                out.append((d, d.config()))
        out.sort(key=lambda x: x[1].created_at, reverse=True)
        return out

    def resolve(self, ref: str) -> ContainerDir:
        """A container by name, full id or unique id prefix (docker's rules)."""
        configs = self._configs()
        for c in configs:
            if c.name == ref or c.id == ref:
                return ContainerDir(self.root, c.id)
        matches = [c for c in configs if ref and c.id.startswith(ref.lower())]
        if len(matches) == 1:
            return ContainerDir(self.root, matches[0].id)
        if len(matches) > 1:
            raise StateError(f"{ref!r} matches {len(matches)} containers: give more of the id")
        raise NoSuchContainer(f"no such container: {ref[:80]}")

    def remove(self, d: ContainerDir) -> None:
        """Drop the dir (logs included); the caller made sure nothing runs."""
        with contextlib.suppress(FileNotFoundError):
            d.ctl_socket.unlink()
        shutil.rmtree(d.path, ignore_errors=True)
