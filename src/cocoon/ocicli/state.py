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


class Store:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = cfg.root / "oci"

    def dir(self, cid: str) -> ContainerDir:
        if not OCI_ID_RE.match(cid):
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
            return sorted(n for n in os.listdir(self.root) if OCI_ID_RE.match(n))
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


def status(d: ContainerDir) -> str:
    """The OCI status: creating, created, running, paused or stopped."""
    st = d.state()
    if st.status == "exited":
        return "stopped"
    if not d.life.held():
        return "stopped" if st.monitor_pid else "creating"
    return st.status


def oci_state(d: ContainerDir) -> dict[str, Any]:
    rec = record(d)
    s = status(d)
    out: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "id": d.id,
        "status": s,
        "pid": standin(d) if s in ("created", "running", "paused") else 0,
        "bundle": rec.bundle,
    }
    if rec.annotations:
        out["annotations"] = rec.annotations
    return out


def now_rfc3339() -> str:
    return rfc3339(time.time())
