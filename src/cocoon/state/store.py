"""Sandbox state dirs under ``<root_dir>/sandboxes/<id>``.

Two locks per dir, both ``flock``:
- ``owner.lock`` is held for the sandbox's whole life by the process that owns
  its VM. Nobody holding it means the owner died: the sandbox is stale and
  ``cocoon gc`` may reap it.
- ``lock`` is taken for the length of one command that changes the state.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cocoon.errors import SandboxError, StateError
from cocoon.protocol.ids import SANDBOX_ID
from cocoon.util.fs import LifeLock, atomic_write, locked_file

STATUSES = ("creating", "running", "stopping", "stopped")


def check_sandbox_id(sid: str) -> str:
    if not SANDBOX_ID.fullmatch(sid):
        raise SandboxError(
            f"invalid sandbox id {sid[:70]!r}: use 1-64 of [a-z0-9_.-], starting alphanumeric"
        )
    return sid


@dataclass
class ProcessRecord:
    pid: int
    start_time: int | None


@dataclass
class SandboxState:
    id: str
    status: str = "creating"
    created_at: float = field(default_factory=time.time)
    owner_pid: int = field(default_factory=os.getpid)
    hypervisor: str = ""
    accel: str = ""
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    #: Dir of the sandbox's scratch images under the data dir ("" = none).
    scratch_dir: str = ""
    #: What network.attach made on the host (taps' filters, a bridge slot...).
    network: dict[str, Any] = field(default_factory=dict)
    #: The template this sandbox was restored from ("" = booted its own kernel).
    template: str = ""
    #: The uid (and gid) its jailed VMM runs as (0 = not jailed); see hypervisor.jail.
    jail_uid: int = 0
    #: A pooled sandbox's hub on the host ("" = none); see storage/hub.py.
    hub: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SandboxState:
        raw: dict[str, Any] = json.loads(data)
        procs = {k: ProcessRecord(**v) for k, v in raw.pop("processes", {}).items()}
        st = cls(**raw, processes=procs)
        if st.status not in STATUSES:
            raise ValueError(f"bad status {st.status}")
        return st


class SandboxDir:
    def __init__(self, root: Path, sid: str) -> None:
        self.id = check_sandbox_id(sid)
        self.path = root / "sandboxes" / sid
        self._owner = LifeLock(self.path / "owner.lock")

    # paths every layer agrees on
    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def file(self, name: str) -> Path:
        return self.path / name

    def create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            raise SandboxError(f"sandbox {self.id} already exists") from None

    def exists(self) -> bool:
        return self.state_file.exists() or self.path.exists()

    def read(self) -> SandboxState:
        try:
            return SandboxState.from_json(self.state_file.read_bytes())
        except FileNotFoundError:
            raise SandboxError(f"no such sandbox: {self.id}") from None
        except (ValueError, TypeError, KeyError) as e:
            raise StateError(f"state of sandbox {self.id} is corrupt ({e}); run `cocoon gc`") from e

    def write(self, st: SandboxState) -> None:
        # /run is a tmpfs: rename is what makes it atomic; fsync buys nothing.
        atomic_write(self.state_file, st.to_json(), durable=False)

    def take_ownership(self) -> None:
        """Hold owner.lock until release_ownership() or process death."""
        if not self._owner.take():
            raise SandboxError(f"sandbox {self.id} is owned by another process")

    def adopt_ownership(self, fd: int) -> None:
        """Hold owner.lock through ``fd``, handed over by its previous owner
        (the lock belongs to the open file, so it never lapses on the way)."""
        self._owner.adopt(fd)

    def hand_over_ownership(self) -> int:
        return self._owner.hand_over()

    def release_ownership(self) -> None:
        self._owner.release()

    def owned(self) -> bool:
        """True if some live process holds owner.lock."""
        return self._owner.held()

    @contextlib.contextmanager
    def locked(self, timeout_s: float = 10.0) -> Iterator[None]:
        """Exclusive lock for one state-changing command."""
        self.path.mkdir(parents=True, exist_ok=True)
        busy = f"sandbox {self.id} is locked by another command; retry"
        with locked_file(self.file("lock"), timeout_s, busy):
            yield


def list_ids(root: Path) -> list[str]:
    d = root / "sandboxes"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if SANDBOX_ID.fullmatch(n))
