"""cocoon-runtime's containers: one dir each under ``<root>/oci/<id>``.

They reuse the CLI's container dir (config.json, state.json, the monitor's
life lock and control socket) and add ``oci.json``: the bundle, the caller's
own spec (hooks, annotations) and when it was made, plus ``standin.pid``: the
host pid the OCI state reports, recorded with its start time so a recycled pid
is never mistaken for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cocoon.config import Config
from cocoon.errors import OciError
from cocoon.log import rfc3339
from cocoon.protocol.ids import OCI_ID as OCI_ID_RE
from cocoon.runtime.records import ContainerConfig, ContainerDir, ContainerState
from cocoon.runtime.status import LIVE, Op, Status, check, current
from cocoon.util.fs import atomic_write
from cocoon.util.proc import alive, start_time

#: runc's rule for ids, bounded (they become file names).
OCI_VERSION = "1.0.2"


@dataclass
class OciRecord:
    bundle: str
    created: str
    annotations: dict[str, str]
    hooks: dict[str, Any]
    pod_dir: str = ""  # a pod's sandbox container: the dir shared into its VM
    pod_sandbox: str = ""  # a pod's further container: the sandbox container's id
    binds: list[str] = field(default_factory=list)  # host bind mounts made for it
    host_cgroup: str = ""  # its VM's host cgroup (runtime.hostcgroup), removed with it


class OciStore:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = cfg.root / "oci"

    def dir(self, cid: str) -> ContainerDir:
        if not OCI_ID_RE.fullmatch(cid):
            raise OciError(f"invalid container id {cid[:80]!r}")
        return ContainerDir(self.root, cid, OCI_ID_RE)

    def get(self, cid: str) -> ContainerDir:
        d = self.dir(cid)
        if not (d.path / "config.json").exists():
            raise OciError(f"container {cid} does not exist")
        return d

    def create(self, config: ContainerConfig, record: OciRecord) -> ContainerDir:
        d = self.dir(config.id)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            d.path.mkdir(mode=0o700)
        except FileExistsError:
            raise OciError(f"container with id {config.id} already exists") from None
        atomic_write(d.path / "config.json", json.dumps(asdict(config)).encode(), durable=False)
        atomic_write(d.path / "oci.json", json.dumps(asdict(record)).encode(), durable=False)
        d.write_state(ContainerState())
        return d

    def ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root) if OCI_ID_RE.fullmatch(n))
        except FileNotFoundError:
            return []

    def remove(self, d: ContainerDir) -> None:
        with contextlib.suppress(FileNotFoundError):
            d.ctl_socket.unlink()
        shutil.rmtree(d.path, ignore_errors=True)


def record(d: ContainerDir) -> OciRecord:
    try:
        return OciRecord(**json.loads((d.path / "oci.json").read_bytes()))
    except (OSError, ValueError, TypeError) as e:
        raise OciError(f"state of container {d.id} is unreadable: {e}") from e


def write_standin(d: ContainerDir, pid: int) -> None:
    body = json.dumps({"pid": pid, "start_time": start_time(pid)}).encode()
    atomic_write(d.path / "standin.pid", body, durable=False)


def standin(d: ContainerDir) -> int:
    """The init's stand-in pid while it lives, else 0."""
    try:
        raw = json.loads((d.path / "standin.pid").read_bytes())
        pid, st = int(raw["pid"]), raw.get("start_time")
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return pid if alive(pid, st) else 0


#: runc's words for what a status does not allow.
REFUSALS = {
    Op.START: "cannot start a container that is {status}",
    Op.PAUSE: "cannot pause a container that is {status}",
    Op.RESUME: "cannot resume a container that is {status}",
    Op.EXEC: "cannot exec in a container that is {status}",
    Op.SIGNAL: "container not running",
    Op.DELETE: "cannot delete container {id} that is not stopped: {status}",
    Op.JOIN: "the pod's sandbox {id} is {status}",
}


def view(d: ContainerDir) -> tuple[Status, str]:
    """What the container is, and runc's word for it: creating (recorded, its
    monitor not started yet), created, running, paused or stopped (exited, or
    its monitor died)."""
    st = d.state()
    s = current(st.status, d.life.held)
    if s == Status.EXITED:
        return s, "stopped"
    if s == Status.DEAD:
        return s, "stopped" if st.monitor_pid else "creating"
    return s, str(s)


def status(d: ContainerDir) -> str:
    """The OCI status: creating, created, running, paused or stopped."""
    return view(d)[1]


def require(d: ContainerDir, op: Op, *, force: bool = False) -> None:
    """IllegalTransition in runc's words unless the container's status allows
    ``op``; with ``force`` anything goes (the status is still read: a record
    that cannot be read is refused all the same)."""
    s, word = view(d)
    if not force:
        check(s, op, REFUSALS[op].format(status=word, id=d.id))


def oci_state(d: ContainerDir) -> dict[str, Any]:
    rec = record(d)
    s, word = view(d)
    out: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "id": d.id,
        "status": word,
        "pid": standin(d) if s in LIVE else 0,
        "bundle": rec.bundle,
    }
    if rec.annotations:
        out["annotations"] = rec.annotations
    return out


def now_rfc3339() -> str:
    return rfc3339(time.time())
