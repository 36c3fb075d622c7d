"""cocoon-runtime's containers in runc's terms: each method is what one runc
verb does to a container that exists, refused in runc's words
(runtime.ocirecords.REFUSALS) when its status does not allow it, over the one
lifecycle every front end shares (runtime.container). Making one (create,
run, a pod's further container) is runtime.ocicreate.

runc's callers (containerd's shim, conmon) hold a host process for each
container process; ours are stand-ins (runtime.standin), forked here. Hooks
name host programs and run here too, on the host, never in the guest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cocoon.config import Config
from cocoon.errors import CocoonError, NotRunning, OciError
from cocoon.protocol import messages
from cocoon.runtime import ctlcall, hostcgroup, pods
from cocoon.runtime.container import Container, reap_sandbox
from cocoon.runtime.ocirecords import (
    OciRecord,
    OciStore,
    oci_state,
    record,
    require,
    write_standin,
)
from cocoon.runtime.records import CONTAINER_ID, ContainerDir
from cocoon.runtime.status import Op, Status
from cocoon.util import boundedjson
from cocoon.util.fs import atomic_write
from cocoon.util.proc import parse_signal as parse_signal  # runc kill's signal names
from cocoon.util.proc import run as run_on_host

HOOK_TIMEOUT_S = 30.0
T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Handoff:
    """What runc's caller is handed of a new container process: its host pid
    (the stand-in's) in ``pid_file``, its terminal's master on ``console_socket``."""

    pid_file: str | None = None
    console_socket: str | None = None


@dataclass
class ExecFlags:
    """runc exec's process: ``process_file`` (process.json, ``-``: stdin), or
    one made of the container's own process and the flags below."""

    process_file: str | None = None
    args: list[str] = field(default_factory=list)
    cwd: str | None = None
    env: list[str] = field(default_factory=list)
    #: UID[:GID], numeric.
    user: str | None = None
    additional_gids: list[int] = field(default_factory=list)
    no_new_privs: bool = False
    caps: list[str] = field(default_factory=list)
    tty: bool = False


@dataclass
class ResourceFlags:
    """runc update's limits: a linux.resources file (``-``: stdin), and single
    limits on top of it."""

    resources_file: str | None = None
    memory: int | None = None
    cpu_quota: int | None = None
    cpu_period: int | None = None
    pids_limit: int | None = None


class OciContainer:
    def __init__(self, cfg: Config, d: ContainerDir) -> None:
        self.cfg = cfg
        self.dir = d
        #: runc's callers name a container by its whole id, in messages too.
        self.container = Container(d, name=d.id)

    @classmethod
    def load(cls, cfg: Config, cid: str) -> OciContainer:
        return cls(cfg, OciStore(cfg).get(cid))

    @property
    def id(self) -> str:
        return self.dir.id

    def record(self) -> OciRecord:
        return record(self.dir)

    def state(self) -> dict[str, Any]:
        """runtime-spec's state: ociVersion, id, status, pid, bundle, annotations."""
        return oci_state(self.dir)

    def status(self) -> Status:
        return self.dir.status()

    # -- verbs ---------------------------------------------------------------

    def start(self) -> None:
        require(self.dir, Op.START)
        self.run_hooks("startContainer", strict=True)
        ctlcall.request(self.dir, messages.StartContainer(CONTAINER_ID), messages.Ok, name=self.id)
        self.run_hooks("poststart", strict=False)

    def kill(self, sig: int, *, all_processes: bool) -> None:
        require(self.dir, Op.SIGNAL)
        msg = messages.SignalProcess(CONTAINER_ID, "", sig, all_processes)
        try:
            ctlcall.request(self.dir, msg, messages.Ok, name=self.id)
        except NotRunning as e:
            # It exited between the check and the signal (containerd's force
            # delete kills, then kills --all): runc's words, which the shim
            # takes for "already finished" rather than a failure.
            raise OciError("container not running") from e

    def pause(self) -> None:
        require(self.dir, Op.PAUSE)
        _sync(self.container.pause())

    def resume(self) -> None:
        require(self.dir, Op.RESUME)
        _sync(self.container.resume())

    def update(self, flags: ResourceFlags) -> None:
        res: dict[str, Any] = {}
        if flags.resources_file:
            res = _json_file(flags.resources_file, "resources")
        if flags.memory is not None:
            res.setdefault("memory", {})["limit"] = flags.memory
        if flags.cpu_quota is not None:
            res.setdefault("cpu", {})["quota"] = flags.cpu_quota
        if flags.cpu_period is not None:
            res.setdefault("cpu", {})["period"] = flags.cpu_period
        if flags.pids_limit is not None:
            res.setdefault("pids", {})["limit"] = flags.pids_limit
        _sync(self.container.update(res))

    def processes(self) -> list[messages.ProcessInfo]:
        """The guest's processes of the container."""
        return _sync(self.container.top())

    def stats(self) -> messages.StatsReply:
        return _sync(self.container.stats())

    def exec(self, flags: ExecFlags, handoff: Handoff) -> int:
        """A further process, held on the host by a stand-in: its pid."""
        require(self.dir, Op.EXEC)
        if flags.process_file:
            process = _json_file(flags.process_file, "process")
        else:
            process = self._process(flags)
        terminal = bool(process.get("terminal", False))
        _check_console(terminal, handoff)
        from cocoon.runtime import standin

        pid = standin.spawn(
            self.dir, process=process, console_socket=handoff.console_socket, tty=terminal
        )
        _write_pid(handoff, pid)
        return pid

    def _process(self, flags: ExecFlags) -> dict[str, Any]:
        """runc's: the container's own process, with what the flags change."""
        if not flags.args:
            raise OciError("exec needs --process or a command")
        base = self.dir.config().spec.get("process") or {}
        process: dict[str, Any] = {
            "args": list(flags.args),
            "env": list(base.get("env") or []) + list(flags.env),
            "cwd": flags.cwd or base.get("cwd", "/"),
            "user": dict(base.get("user") or {"uid": 0, "gid": 0}),
            "terminal": flags.tty,
            "capabilities": base.get("capabilities") or {},
            "noNewPrivileges": flags.no_new_privs or base.get("noNewPrivileges", False),
        }
        if flags.user:
            uid, _, gid = flags.user.partition(":")
            process["user"] = {
                "uid": _numeric_id(uid, "uid"),
                "gid": _numeric_id(gid or "0", "gid"),
            }
        if flags.additional_gids:
            process["user"]["additionalGids"] = list(flags.additional_gids)
        if flags.caps:
            for k in ("bounding", "effective", "permitted"):
                process["capabilities"].setdefault(k, [])
                process["capabilities"][k] += list(flags.caps)
        return process

    def delete(self, *, force: bool) -> None:
        """runc delete: a running (or paused) container only with ``force``."""
        require(self.dir, Op.DELETE, force=force)
        if self.record().hooks.get("poststop"):
            with contextlib.suppress(CocoonError):
                self.run_hooks("poststop", strict=False)
        self.destroy()

    def destroy(self) -> None:
        """Kill whatever still runs, reap the VM, undo the binds, drop the
        record: works after any crash, and on a half-made container."""
        d = self.dir
        if d.life.held():
            what = f"asking the monitor of {d.id} to shut down"
            self.container.end_monitor(
                self.container.shutdown, what, log=log, errors=(CocoonError, OSError)
            )
        rec = None
        with contextlib.suppress(CocoonError):
            rec = record(d)
        if rec is not None and rec.binds:
            # A pod member's binds live under <pod dir>/<key>, its rootfs's first.
            top = Path(rec.binds[0]).parent if rec.pod_sandbox else pods.binds_dir(self.cfg, d.id)
            pods.unbind(rec.binds, top)
        sid = ""
        with contextlib.suppress(CocoonError):  # no config: it never had a sandbox
            sid = d.config().sandbox_id
        if sid and (rec is None or not rec.pod_sandbox):
            reap_sandbox(self.cfg, sid, f"reaping the sandbox of {d.id}", log=log)
        if rec is not None and rec.pod_dir:
            pods.remove_pod_dir(Path(rec.pod_dir))
        if rec is not None and rec.host_cgroup:
            hostcgroup.remove(rec.host_cgroup)
        OciStore(self.cfg).remove(d)

    # -- the caller's side: stand-ins and hooks --------------------------------

    def stand_in(self, handoff: Handoff, tty: bool) -> int:
        """The init's stand-in, handed to the caller; then the creation hooks."""
        from cocoon.runtime import standin

        pid = standin.spawn(self.dir, process=None, console_socket=handoff.console_socket, tty=tty)
        write_standin(self.dir, pid)
        _write_pid(handoff, pid)
        self.run_creation_hooks()
        return pid

    def run_creation_hooks(self) -> None:
        """prestart, createRuntime and createContainer, in that order. All on
        the host: a hook names a host binary, and the guest has none of them.
        createContainer runs here too, not in the container's namespaces."""
        self.run_hooks("prestart", strict=True)
        self.run_hooks("createRuntime", strict=True)
        self.run_hooks("createContainer", strict=True)

    def run_hooks(self, kind: str, *, strict: bool) -> None:
        """The caller's hooks of one kind, on the host, with the OCI state on stdin."""
        hooks = record(self.dir).hooks.get(kind) or []
        if not hooks:
            return
        state = json.dumps(oci_state(self.dir)).encode()
        for h in hooks:
            path = h.get("path", "")
            argv = h.get("args") or [path]
            try:
                run_on_host(
                    argv,
                    executable=path,
                    input=state,
                    env=dict(e.split("=", 1) for e in h.get("env", []) if "=" in e),
                    timeout_s=h.get("timeout") or HOOK_TIMEOUT_S,
                )
            except (OSError, CocoonError) as e:
                msg = f"{kind} hook {path} failed: {e}"
                if strict:
                    raise OciError(msg) from e
                log.warning(msg)


def delete(cfg: Config, cid: str, *, force: bool) -> None:
    """runc delete: with ``force``, a container that is not there is no error."""
    try:
        c = OciContainer.load(cfg, cid)
    except OciError:
        if force:
            return
        raise
    c.delete(force=force)


def states(cfg: Config) -> list[dict[str, Any]]:
    """runc list's rows: every readable container's state, its creation time
    and owner."""
    store = OciStore(cfg)
    rows = []
    for cid in store.ids():
        with contextlib.suppress(CocoonError):
            d = store.dir(cid)
            st = oci_state(d)
            rows.append({**st, "created": record(d).created, "owner": "root"})
    return rows


def _sync(aw: Coroutine[Any, Any, T]) -> T:
    """One request of the async client (runtime.control), run to its end.
    Imported here: start and kill (runtime.ctlcall), state and delete do
    without asyncio, ~20 ms of every such call."""
    import asyncio

    return asyncio.run(aw)


def _check_console(terminal: bool, handoff: Handoff) -> None:
    if terminal and not handoff.console_socket:
        raise OciError("process.terminal is true: --console-socket is required")


def _write_pid(handoff: Handoff, pid: int) -> None:
    if handoff.pid_file:
        atomic_write(Path(handoff.pid_file).absolute(), str(pid).encode(), durable=False)


def _json_file(path: str, what: str) -> dict[str, Any]:
    """A JSON object the caller wrote (``-``: stdin), bounded like config.json."""
    from cocoon.runtime.bundle import MAX_CONFIG

    try:
        raw = sys.stdin.buffer.read(MAX_CONFIG + 1) if path == "-" else _read(path)
        doc = boundedjson.loads(raw, max_bytes=MAX_CONFIG)
    except OSError as e:
        raise OciError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except boundedjson.JSONError as e:
        raise OciError(f"{what} {path} is not usable JSON: {e}") from e
    if not isinstance(doc, dict):
        raise OciError(f"{what} must be a JSON object")
    return doc


def _read(path: str) -> bytes:
    from cocoon.runtime.bundle import MAX_CONFIG

    with open(path, "rb") as f:
        return f.read(MAX_CONFIG + 1)


def _numeric_id(text: str, what: str) -> int:
    from cocoon.runtime.bundle import MAX_ID

    if not (text.isascii() and text.isdigit() and len(text) <= 10) or int(text) > MAX_ID:
        raise OciError(f"--user: {what} {text[:20]!r} is not in [0, {MAX_ID}]")
    return int(text)
