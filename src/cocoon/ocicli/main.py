"""`cocoon-runtime`: runc's command line, each container in its own VM.

containerd's runc shim, conmon (podman) and docker drive it exactly as they
drive runc. Errors are one line on stderr and, with --log, a runc-style
``{"level","msg","time"}`` JSON line there (the shim shows the last one); the
exit code is 1 as with runc (cocoon.frontend). Warnings go to --log, or to
stderr without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from cocoon import __version__, frontend
from cocoon.config import Config, load
from cocoon.errors import CocoonError, NotRunning, OciError
from cocoon.hypervisor.base import Share
from cocoon.log import teardown_step
from cocoon.network import NetworkPlan
from cocoon.oci.spec import default_spec
from cocoon.ocicli import bundle as bundles
from cocoon.ocicli import pod, standin
from cocoon.ocicli.state import (
    OCI_VERSION,
    OciRecord,
    Store,
    now_rfc3339,
    oci_state,
    record,
    status,
    write_standin,
)
from cocoon.protocol import messages
from cocoon.runtime.control import MonitorClient
from cocoon.runtime.lifecycle import parse_signal
from cocoon.runtime.monitor import CONTAINER_ID, LaunchPlan, spawn
from cocoon.runtime.records import ContainerConfig, ContainerDir
from cocoon.state import gc
from cocoon.util import boundedjson
from cocoon.util.fs import atomic_write
from cocoon.util.proc import alive
from cocoon.util.proc import run as run_on_host

DEFAULT_ROOT = "/run/cocoon-runtime"
HOOK_TIMEOUT_S = 30.0


logger = logging.getLogger(__name__)


class Ctx:
    def __init__(self, root: str) -> None:
        self.root = root
        self._cfg: Config | None = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = load(None, overrides={"root_dir": self.root})
        return self._cfg

    @property
    def store(self) -> Store:
        return Store(self.cfg)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cocoon-runtime")
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="State dir.")
@click.option("--log", default=None, help="Log file (runc's --log).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--debug", is_flag=True)
@click.option("--systemd-cgroup", is_flag=True,
              help="Accepted for compatibility: cgroups live inside each VM, where the "
                   "guest's crun manages them; the host sees one VM process.")  # fmt: skip
@click.option("--criu", default=None, hidden=True)
@click.option("--rootless", default=None, hidden=True)
@click.pass_context
def cli(
    ctx: click.Context,
    root: str,
    log: str | None,
    log_format: str,
    debug: bool,
    systemd_cgroup: bool,
    criu: str | None,
    rootless: str | None,
) -> None:
    """A runc-compatible OCI runtime that runs every container in its own VM."""
    frontend.configure("cocoon-runtime", debug=debug, log_file=log, log_file_format=log_format)
    ctx.obj = Ctx(os.path.abspath(root))


def _ctx() -> Ctx:
    obj = click.get_current_context().obj
    assert isinstance(obj, Ctx)
    return obj


def _client(d: ContainerDir) -> MonitorClient:
    try:
        return asyncio.run(MonitorClient.connect(d))
    except NotRunning as e:
        raise OciError(f"container {d.id} is not running") from e


def _call(d: ContainerDir, msg: messages.Message, expect: type[messages.Message]) -> Any:
    async def go() -> Any:
        try:
            client = await MonitorClient.connect(d)
        except NotRunning as e:
            raise OciError(f"container {d.id} is not running") from e
        try:
            return await client.call(msg, expect)
        finally:
            await client.close()

    return asyncio.run(go())


def _json_file(path: str, what: str) -> dict[str, Any]:
    """A JSON object the caller wrote (``-``: stdin), bounded like config.json."""
    try:
        raw = sys.stdin.buffer.read(bundles.MAX_CONFIG + 1) if path == "-" else _read(path)
        doc = boundedjson.loads(raw, max_bytes=bundles.MAX_CONFIG)
    except OSError as e:
        raise OciError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except boundedjson.JSONError as e:
        raise OciError(f"{what} {path} is not usable JSON: {e}") from e
    if not isinstance(doc, dict):
        raise OciError(f"{what} must be a JSON object")
    return doc


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(bundles.MAX_CONFIG + 1)


def _numeric_id(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 10) or int(text) > bundles.MAX_ID:
        raise OciError(f"--user: {what} {text[:20]!r} is not in [0, {bundles.MAX_ID}]")
    return int(text)


# -- hooks -------------------------------------------------------------------


def run_hooks(d: ContainerDir, kind: str, *, strict: bool) -> None:
    """The caller's hooks of one kind, on the host, with the OCI state on stdin."""
    hooks = record(d).hooks.get(kind) or []
    if not hooks:
        return
    state = json.dumps(oci_state(d)).encode()
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
            logger.warning(msg)


# -- lifecycle verbs -----------------------------------------------------------


@cli.command()
@click.option("--bundle", "-b", default=".", help="Path to the bundle.")
@click.option("--pid-file", default=None)
@click.option("--console-socket", default=None)
@click.option("--no-pivot", is_flag=True)
@click.option("--no-new-keyring", is_flag=True)
@click.option("--preserve-fds", type=int, default=0)
@click.argument("container_id")
def create(
    bundle: str,
    pid_file: str | None,
    console_socket: str | None,
    no_pivot: bool,
    no_new_keyring: bool,
    preserve_fds: int,
    container_id: str,
) -> None:
    """Create a container (its VM boots; the process waits for `start`)."""
    do_create(container_id, Path(bundle), pid_file, console_socket)


def _mounts_dev(spec: dict[str, Any]) -> bool:
    mounts = spec.get("mounts") or []
    return any(isinstance(m, dict) and m.get("destination") in ("/dev", "/dev/") for m in mounts)


def container_config(cid: str, p: bundles.BundlePlan) -> ContainerConfig:
    """The container record of a planned bundle (its spec as ``bundles.load`` checked it)."""
    proc = p.spec.get("process") or {}
    res = (p.spec.get("linux") or {}).get("resources") or {}
    return ContainerConfig(
        id=cid,
        name=cid,
        image="",
        image_id="",
        command=list(proc.get("args") or []),
        spec=p.spec,
        tty=p.terminal,
        stdin=True,
        read_only=p.readonly_rootfs,
        memory_bytes=int((res.get("memory") or {}).get("limit") or 0),
        vcpus=p.vcpus,
        vm_memory_mib=p.memory_mib,
    )


def annotations_of(spec: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (spec.get("annotations") or {}).items()}


def do_create(cid: str, bundle: Path, pid_file: str | None, console_socket: str | None) -> int:
    c = _ctx()
    cfg = c.cfg
    spec = bundles.load(bundle)
    p = bundles.plan(
        bundle,
        spec,
        binds_dir=pod.binds_dir(cfg, cid),
        default_vcpus=cfg.hypervisor.vcpus,
        default_mib=cfg.hypervisor.memory_mib,
    )
    if p.terminal and not console_socket:
        raise OciError("process.terminal is true: --console-socket is required")
    for w in p.warnings:
        logger.warning(w)
    config = container_config(cid, p)
    annotations = annotations_of(spec)
    kind, sandbox_ref = pod.role(annotations)
    if kind == "container" and sandbox_ref:
        return create_member(cid, bundle, spec, annotations, sandbox_ref, pid_file, console_socket)
    rec = OciRecord(
        str(p.bundle), now_rfc3339(), annotations, spec.get("hooks") or {},
        binds=[str(b.target) for b in p.binds],
    )  # fmt: skip
    if kind == "sandbox":
        pdir = pod.pod_dir(cfg, cid)
        rec.pod_dir = str(pdir)
        # Members' roots are bound under it later: its file server must follow.
        p.shares.append(Share("pod", pdir, readonly=False, propagate=True))
        p.guest_mounts.append(("pod", bundles.POD_GUEST, False))
    d = c.store.create(config, rec)
    fs = cfg.hypervisor.shared_fs

    async def setup(sb: Any) -> str:
        return await p.setup(sb, fs)

    plan = LaunchPlan(
        cfg=cfg,
        cdir=d,
        config=config,
        setup=setup,
        shares=p.shares,
        start="request",
        log_max_bytes=0,
        annotations={"cocoon.oci.bundle": str(p.bundle)},
        # A template clone serves the rootfs over 9p, where QEMU 7.2 fails to
        # make device nodes (ENXIO): a bundle without its own /dev (podman and
        # containerd always mount one) gets crun's nodes in its rootfs, and
        # so a cold boot with virtio-fs.
        template=None if _mounts_dev(p.spec) else False,
        # The caller's namespace (CNI, podman, containerd) is plumbed to the
        # VM's NICs; the caller keeps its own hosts/resolv.conf files.
        network=NetworkPlan(
            networks=[f"ns:{p.netns_path}"],
            model=cfg.network.model,
            files=False,
            allow_empty=True,
            sysctls=p.net_sysctls,
        )
        if p.netns_path
        else None,
    )
    try:
        if rec.pod_dir:
            pod.make_pod_dir(Path(rec.pod_dir))
        for b in p.binds:  # recorded above: delete undoes them, whatever happens now
            pod.bind(b.source, b.target, b.readonly, b.recursive)
        spawn(plan)
        return _stand_in(d, pid_file, console_socket, p.terminal)
    except BaseException:
        _destroy(d)
        raise


def _stand_in(d: ContainerDir, pid_file: str | None, console: str | None, tty: bool) -> int:
    pid = standin.spawn(d, process=None, console_socket=console, tty=tty)
    write_standin(d, pid)
    if pid_file:
        atomic_write(Path(pid_file).absolute(), str(pid).encode(), durable=False)
    # All on the host: a hook names a host binary, and the guest has none of
    # them. createContainer runs here too, not in the container's namespaces.
    run_hooks(d, "prestart", strict=True)
    run_hooks(d, "createRuntime", strict=True)
    run_hooks(d, "createContainer", strict=True)
    return pid


def create_member(
    cid: str,
    bundle: Path,
    spec: dict[str, Any],
    annotations: dict[str, str],
    sandbox_ref: str,
    pid_file: str | None,
    console_socket: str | None,
) -> int:
    """A further container of a pod, created in the pod's running VM."""
    c = _ctx()
    sandbox = c.store.get(sandbox_ref)
    srec = record(sandbox)
    if not srec.pod_dir:
        raise OciError(f"container {sandbox_ref} is not a pod sandbox")
    if status(sandbox) not in ("created", "running"):
        raise OciError(f"the pod's sandbox {sandbox_ref} is {status(sandbox)}")
    k = pod.key(cid)
    mp = bundles.plan_member(bundle, spec, Path(srec.pod_dir), k)
    if mp.plan.terminal and not console_socket:
        raise OciError("process.terminal is true: --console-socket is required")
    for w in mp.plan.warnings:
        logger.warning(w)
    proc = mp.plan.spec.get("process") or {}
    config = ContainerConfig(
        id=cid,
        name=cid,
        image="",
        image_id="",
        command=list(proc.get("args") or []),
        spec=mp.plan.spec,
        tty=mp.plan.terminal,
        stdin=True,
        read_only=mp.plan.readonly_rootfs,
    )
    rec = OciRecord(
        str(mp.plan.bundle), now_rfc3339(), annotations, spec.get("hooks") or {},
        pod_sandbox=sandbox_ref, binds=[str(b.target) for b in mp.binds],
    )  # fmt: skip
    d = c.store.create(config, rec)
    try:
        for b in mp.binds:
            pod.bind(b.source, b.target, b.readonly, b.recursive)
        msg = messages.AddContainer(str(d.path), f"c-{k}", mp.rootfs_guest, mp.plan.terminal)
        _call(sandbox, msg, messages.Ok)
        return _stand_in(d, pid_file, console_socket, mp.plan.terminal)
    except BaseException:
        _destroy(d)
        raise


@cli.command()
@click.argument("container_id")
def start(container_id: str) -> None:
    """Start a created container's process."""
    d = _ctx().store.get(container_id)
    if status(d) != "created":
        raise OciError(f"cannot start a container that is {status(d)}")
    run_hooks(d, "startContainer", strict=True)
    _call(d, messages.StartContainer(CONTAINER_ID), messages.Ok)
    run_hooks(d, "poststart", strict=False)


@cli.command("state")
@click.argument("container_id")
def state_cmd(container_id: str) -> None:
    """The container's OCI state as JSON."""
    click.echo(json.dumps(oci_state(_ctx().store.get(container_id)), indent=2))


@cli.command()
@click.option("--all", "-a", "all_processes", is_flag=True, help="Every process, not just init.")
@click.argument("container_id")
@click.argument("sig", default="SIGTERM")
def kill(all_processes: bool, container_id: str, sig: str) -> None:
    """Send a signal to the container's init (or every process with --all)."""
    d = _ctx().store.get(container_id)
    num = parse_signal(sig)
    if status(d) not in ("created", "running", "paused"):
        raise OciError("container not running")
    try:
        _call(d, messages.SignalProcess(CONTAINER_ID, "", num, all_processes), messages.Ok)
    except NotRunning as e:
        # It exited between the check and the signal (containerd's force
        # delete kills, then kills --all): runc's words, which the shim
        # takes for "already finished" rather than a failure.
        raise OciError("container not running") from e


def _destroy(d: ContainerDir) -> None:
    """Kill whatever still runs, reap the VM, drop the state: works after any crash."""
    if d.life.held():
        with teardown_step(
            logger, f"asking the monitor of {d.id} to shut down", "its monitor, killed next",
            level=logging.INFO, errors=(CocoonError, OSError),
        ):  # fmt: skip
            _call(d, messages.Shutdown(), messages.Ok)
        if not d.life.wait_released(30.0):
            pid = d.state().monitor_pid
            if pid and alive(pid, None):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            d.life.wait_released(5.0)
    rec = None
    with contextlib.suppress(CocoonError):
        rec = record(d)
    if rec is not None and rec.binds:
        # A pod member's binds live under <pod dir>/<key>, its rootfs's first.
        top = Path(rec.binds[0]).parent if rec.pod_sandbox else pod.binds_dir(_ctx().cfg, d.id)
        pod.unbind(rec.binds, top)
    sid = ""
    with contextlib.suppress(CocoonError):  # no config: it never had a sandbox
        sid = d.config().sandbox_id
    if sid and (rec is None or not rec.pod_sandbox):
        left = f"sandbox {sid} (VM, dir, network): `cocoon gc` reaps it"
        with teardown_step(logger, f"reaping the sandbox of {d.id}", left, errors=(CocoonError,)):
            gc.reap(_ctx().cfg.root, only=sid)
    if rec is not None and rec.pod_dir:
        pod.remove_pod_dir(Path(rec.pod_dir))
    _ctx().store.remove(d)


@cli.command()
@click.option("--force", "-f", is_flag=True, help="Kill it first if it runs.")
@click.argument("container_id")
def delete(force: bool, container_id: str) -> None:
    """Delete a container (its VM and state)."""
    try:
        d = _ctx().store.get(container_id)
    except OciError:
        if force:
            return
        raise
    s = status(d)
    if s in ("running", "paused") and not force:
        raise OciError(f"cannot delete container {container_id} that is not stopped: {s}")
    rec_hooks = bool(record(d).hooks.get("poststop"))
    if rec_hooks:
        with contextlib.suppress(CocoonError):
            run_hooks(d, "poststop", strict=False)
    _destroy(d)


@cli.command()
@click.option("--bundle", "-b", default=".")
@click.option("--pid-file", default=None)
@click.option("--console-socket", default=None)
@click.option("--detach", "-d", is_flag=True)
@click.option("--no-pivot", is_flag=True)
@click.option("--no-new-keyring", is_flag=True)
@click.option("--preserve-fds", type=int, default=0)
@click.argument("container_id")
def run(
    bundle: str,
    pid_file: str | None,
    console_socket: str | None,
    detach: bool,
    no_pivot: bool,
    no_new_keyring: bool,
    preserve_fds: int,
    container_id: str,
) -> None:
    """create + start (+ wait and delete unless --detach)."""
    pid = do_create(container_id, Path(bundle), pid_file, console_socket)
    d = _ctx().store.get(container_id)
    _call(d, messages.StartContainer(CONTAINER_ID), messages.Ok)
    run_hooks(d, "poststart", strict=False)
    if detach:
        return
    code = _wait_child(pid)
    left = "its record and whatever of its VM remains: `delete` removes them"
    with teardown_step(logger, f"deleting container {d.id}", left, errors=(CocoonError,)):
        _destroy(d)
    sys.exit(code)


def _wait_child(pid: int) -> int:
    """Our stand-in's status the shell's way (128+N for signal N)."""
    while True:
        try:
            _, st = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0
    return os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("--process", "-p", "process_file", default=None, help="process.json")
@click.option("--console-socket", default=None)
@click.option("--tty", "-t", is_flag=True)
@click.option("--detach", "-d", is_flag=True)
@click.option("--pid-file", default=None)
@click.option("--cwd", default=None)
@click.option("--env", "-e", "envs", multiple=True)
@click.option("--user", "-u", default=None, metavar="UID[:GID]")
@click.option("--additional-gids", "-g", multiple=True, type=int)
@click.option("--no-new-privs", is_flag=True)
@click.option("--cap", "-c", "caps", multiple=True)
@click.option("--preserve-fds", type=int, default=0)
@click.option("--process-label", default=None)
@click.option("--apparmor", default=None)
@click.option("--ignore-paused", is_flag=True)
@click.argument("container_id")
@click.argument("command", nargs=-1)
def exec_cmd(
    process_file: str | None,
    console_socket: str | None,
    tty: bool,
    detach: bool,
    pid_file: str | None,
    cwd: str | None,
    envs: tuple[str, ...],
    user: str | None,
    additional_gids: tuple[int, ...],
    no_new_privs: bool,
    caps: tuple[str, ...],
    preserve_fds: int,
    process_label: str | None,
    apparmor: str | None,
    ignore_paused: bool,
    container_id: str,
    command: tuple[str, ...],
) -> None:
    """Run a further process in a running container."""
    d = _ctx().store.get(container_id)
    if status(d) != "running":
        raise OciError(f"cannot exec in a container that is {status(d)}")
    if process_file:
        process = _json_file(process_file, "process")
    else:
        if not command:
            raise OciError("exec needs --process or a command")
        base = d.config().spec.get("process") or {}
        process = {
            "args": list(command),
            "env": list(base.get("env") or []) + list(envs),
            "cwd": cwd or base.get("cwd", "/"),
            "user": dict(base.get("user") or {"uid": 0, "gid": 0}),
            "terminal": tty,
            "capabilities": base.get("capabilities") or {},
            "noNewPrivileges": no_new_privs or base.get("noNewPrivileges", False),
        }
        if user:
            uid, _, gid = user.partition(":")
            ids = {"uid": _numeric_id(uid, "uid"), "gid": _numeric_id(gid or "0", "gid")}
            process["user"] = ids
        if additional_gids:
            process["user"]["additionalGids"] = list(additional_gids)
        if caps:
            for k in ("bounding", "effective", "permitted"):
                process["capabilities"].setdefault(k, [])
                process["capabilities"][k] += list(caps)
    terminal = bool(process.get("terminal", False))
    if terminal and not console_socket:
        raise OciError("process.terminal is true: --console-socket is required")
    pid = standin.spawn(d, process=process, console_socket=console_socket, tty=terminal)
    if pid_file:
        atomic_write(Path(pid_file).absolute(), str(pid).encode(), durable=False)
    if detach:
        return
    sys.exit(_wait_child(pid))


@cli.command()
@click.argument("container_id")
def pause(container_id: str) -> None:
    """Freeze every process of the container."""
    d = _ctx().store.get(container_id)
    if status(d) != "running":
        raise OciError(f"cannot pause a container that is {status(d)}")
    _call(d, messages.PauseContainer(CONTAINER_ID), messages.Ok)


@cli.command()
@click.argument("container_id")
def resume(container_id: str) -> None:
    """Thaw a paused container."""
    d = _ctx().store.get(container_id)
    if status(d) != "paused":
        raise OciError(f"cannot resume a container that is {status(d)}")
    _call(d, messages.ResumeContainer(CONTAINER_ID), messages.Ok)


@cli.command()
@click.option("--resources", "-r", default=None, help="linux.resources JSON file, - for stdin")
@click.option("--memory", default=None, type=int)
@click.option("--cpu-quota", default=None, type=int)
@click.option("--cpu-period", default=None, type=int)
@click.option("--pids-limit", default=None, type=int)
@click.argument("container_id")
def update(
    resources: str | None,
    memory: int | None,
    cpu_quota: int | None,
    cpu_period: int | None,
    pids_limit: int | None,
    container_id: str,
) -> None:
    """New cgroup limits for a running container (applied in its guest)."""
    d = _ctx().store.get(container_id)
    res: dict[str, Any] = {}
    if resources:
        res = _json_file(resources, "resources")
    if memory is not None:
        res.setdefault("memory", {})["limit"] = memory
    if cpu_quota is not None:
        res.setdefault("cpu", {})["quota"] = cpu_quota
    if cpu_period is not None:
        res.setdefault("cpu", {})["period"] = cpu_period
    if pids_limit is not None:
        res.setdefault("pids", {})["limit"] = pids_limit
    _call(d, messages.UpdateResources(CONTAINER_ID, json.dumps(res)), messages.Ok)


@cli.command()
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.argument("container_id")
@click.argument("ps_args", nargs=-1)
def ps(fmt: str, container_id: str, ps_args: tuple[str, ...]) -> None:
    """The container's processes: host pids (json) or the guest's table."""
    d = _ctx().store.get(container_id)
    if fmt == "json":
        pid = oci_state(d)["pid"]
        click.echo(json.dumps([pid] if pid else []))
        return
    procs = _call(d, messages.Top(CONTAINER_ID), messages.TopReply).processes
    click.echo("PID   USER     TIME  COMMAND")
    for p in procs:
        click.echo(f"{p.pid:<5} {p.user:<8} {p.cpu_ms // 1000:>4}s {p.command}")


def _stats_event(d: ContainerDir) -> dict[str, Any]:
    st = _call(d, messages.Stats(CONTAINER_ID), messages.StatsReply)
    return {
        "type": "stats",
        "id": d.id,
        "data": {
            "cpu": {"usage": {"total": st.cpu_usage_us * 1000}},
            "memory": {"usage": {"usage": st.memory_bytes, "limit": st.memory_limit_bytes}},
            "pids": {"current": st.pids},
            "blkio": {
                "ioServiceBytesRecursive": [
                    {"op": "Read", "value": st.io_read_bytes},
                    {"op": "Write", "value": st.io_write_bytes},
                ]
            },
            "network_interfaces": [
                {"name": n.name, "rx_bytes": n.rx_bytes, "tx_bytes": n.tx_bytes} for n in st.net
            ],
        },
    }


@cli.command()
@click.option("--stats", is_flag=True, help="One stats event, then exit.")
@click.option("--interval", default="5s", help="Time between stats events.")
@click.argument("container_id")
def events(stats: bool, interval: str, container_id: str) -> None:
    """Stats events as JSON lines, read from the guest."""
    d = _ctx().store.get(container_id)
    secs = float(interval.rstrip("s")) if interval.rstrip("s") else 5.0
    if stats:
        click.echo(json.dumps(_stats_event(d)))
        return
    while status(d) in ("running", "paused", "created"):
        with contextlib.suppress(CocoonError):
            click.echo(json.dumps(_stats_event(d)), nl=True)
            sys.stdout.flush()
        time.sleep(secs)


@cli.command("list")
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--quiet", "-q", is_flag=True)
def list_cmd(fmt: str, quiet: bool) -> None:
    """Every container this runtime knows."""
    store = _ctx().store
    rows = []
    for cid in store.ids():
        with contextlib.suppress(CocoonError):
            d = store.dir(cid)
            st = oci_state(d)
            rows.append({**st, "created": record(d).created, "owner": "root"})
    if quiet:
        for r in rows:
            click.echo(r["id"])
    elif fmt == "json":
        click.echo(json.dumps(rows))
    else:
        click.echo(f"{'ID':<20} {'PID':<8} {'STATUS':<10} {'BUNDLE':<40} CREATED")
        for r in rows:
            click.echo(
                f"{r['id']:<20} {r['pid']:<8} {r['status']:<10} {r['bundle']:<40} {r['created']}"
            )


@cli.command("spec")
@click.option("--bundle", "-b", default=".")
@click.option("--rootless", is_flag=True)
def spec_cmd(bundle: str, rootless: bool) -> None:
    """Write a starting config.json (busybox sh on a terminal, like runc's)."""
    path = Path(bundle) / "config.json"
    if path.exists():
        raise OciError(f"{path} exists: remove it first")
    spec = default_spec(["sh"], terminal=True, hostname="cocoon")
    spec["ociVersion"] = OCI_VERSION
    path.write_text(json.dumps(spec, indent=2) + "\n")


@cli.command()
def features() -> None:
    """What this runtime supports (runtime-spec features.md)."""
    click.echo(
        json.dumps(
            {
                "ociVersionMin": "1.0.0",
                "ociVersionMax": OCI_VERSION,
                "hooks": [
                    "prestart",
                    "createRuntime",
                    "createContainer",
                    "startContainer",
                    "poststart",
                    "poststop",
                ],  # fmt: skip
                "mountOptions": ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec"],
                "linux": {
                    "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts", "user"],
                    "cgroup": {"v1": False, "v2": True, "systemd": False},
                    "seccomp": {"enabled": True},
                },
                "annotations": {
                    "io.cocoon.runtime": "every container in its own VM",
                    "org.opencontainers.runc.version": "compatible CLI",
                },
            },
            indent=2,
        )
    )


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def checkpoint(args: tuple[str, ...]) -> None:
    """Not supported (VM snapshots are not wired to checkpoint/restore yet)."""
    raise OciError("checkpoint is not supported by cocoon-runtime")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def restore(args: tuple[str, ...]) -> None:
    """Not supported (VM snapshots are not wired to checkpoint/restore yet)."""
    raise OciError("restore is not supported by cocoon-runtime")


def main() -> None:
    frontend.main(cli, frontend.RUNC)
