"""containerd's Task service (``containerd.task.v2.Task``) over cocoon's containers.

One shim serves one pod (or one lone container): every task is a container
of cocoon's runtime library, made by ``runtime.ocicreate.create_task`` from
the bundle containerd prepared, after the snapshotter's mounts are mounted
at its rootfs (``runtime.rootfs``). The pod's first container (CRI's
sandbox, or a container of no pod) boots the VM; the pod's further containers
are created in that VM (runtime.pods). No host process stands for a
container process: the shim attaches to the container's monitor itself,
bound (if the shim dies, the container is killed), and relays its stdio to
and from the fifos containerd named (shim.fifos). Every task's and exec's pid
is the shim's own, as Kata's shim does: a guest pid means nothing on the
host, and containerd only shows it.

The blocking library calls (creating, starting, deleting a container: they
fork its monitor, run hooks, wait for teardown) run in threads; the
streams, waits and signals run on the event loop. Events go out through the
publisher, in the order of what happened: a task's exit is published only
after its start was, and only once its output has been written out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from cocoon.config import Config
from cocoon.errors import (
    BundleError,
    CocoonError,
    IllegalTransition,
    NotRunning,
    OciError,
    VmExited,
)
from cocoon.runtime import hostcgroup, ocicreate, rootfs
from cocoon.runtime.container import InStream, Process
from cocoon.runtime.control import MonitorClient
from cocoon.runtime.ocicontainer import OciContainer
from cocoon.shim import fifos
from cocoon.shim.children import Children
from cocoon.shim.events import Publisher
from cocoon.shim.proto import events_pb2, metrics_pb2, task_pb2
from cocoon.shim.ttrpc import Code, Handler, RpcError
from cocoon.util.tasks import CLOSE_S, TaskSet

SERVICE = "containerd.task.v2.Task"
#: How long a deleted task's end (its output, its exit) may take to arrive.
EXIT_WAIT_S = 30.0
#: The exit status of a process whose end cocoon could not learn (its VM or
#: monitor died): SIGKILL's, as runc's shim reports a process it lost.
LOST_STATUS = 128 + 9
#: A JSON document containerd sends (an exec's process, new resources), at most.
MAX_JSON = 1 << 20

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Message)
#: The requests that name a process's stdio (Create's init, Exec's process).
Stdio = task_pb2.CreateTaskRequest | task_pb2.ExecProcessRequest
T = TypeVar("T")


class Proc:
    """A task's init or one of its execs, as containerd sees it."""

    def __init__(self, task_id: str, exec_id: str, req: Stdio) -> None:
        self.task_id = task_id
        self.exec_id = exec_id
        self.stdin, self.stdout, self.stderr = req.stdin, req.stdout, req.stderr
        self.terminal = req.terminal
        self.status = task_pb2.CREATED
        self.exit_status = 0
        self.exited_at = 0.0
        self.exited = asyncio.Event()
        self.process: Process | None = None
        self.client: MonitorClient | None = None
        self.stdin_task: asyncio.Task[None] | None = None
        #: Set once its start is published: its exit is never published before.
        self.start_done: asyncio.Event | None = None
        #: An exec's OCI process.
        self.spec: dict[str, Any] = {}

    def stopped(self, status: int) -> None:
        self.status = task_pb2.STOPPED
        self.exit_status = status
        self.exited_at = time.time()
        self.exited.set()


class Task:
    """A container of the pod: its bundle, cocoon's container, its processes."""

    def __init__(self, req: task_pb2.CreateTaskRequest, container: OciContainer) -> None:
        self.id = req.id
        self.bundle = req.bundle
        self.container = container
        self.init = Proc(req.id, "", req)
        self.execs: dict[str, Proc] = {}
        self.mounted = len(req.rootfs) > 0


def _stamp(ts: Any, t: float) -> None:
    """A google.protobuf.Timestamp set to ``t`` (left unset for 0: never)."""
    if t:
        ts.FromNanoseconds(int(t * 1e9))


def rpc_error(e: BaseException) -> RpcError:
    """cocoon's errors in the gRPC codes containerd's errdefs read: NotFound
    for a process that has already finished (containerd's force delete and
    kill take it for done), FailedPrecondition for what a status does not
    allow, InvalidArgument for a bundle cocoon cannot run."""
    if isinstance(e, RpcError):
        return e
    text = str(e) or type(e).__name__
    if isinstance(e, (NotRunning, VmExited)) or (
        isinstance(e, OciError) and ("not running" in text or "does not exist" in text)
    ):
        return RpcError(Code.NOT_FOUND, text)
    if isinstance(e, OciError) and "already exists" in text:
        return RpcError(Code.ALREADY_EXISTS, text)
    if isinstance(e, IllegalTransition):
        return RpcError(Code.FAILED_PRECONDITION, text)
    if isinstance(e, BundleError):
        return RpcError(Code.INVALID_ARGUMENT, text)
    return RpcError(Code.UNKNOWN, text)


class TaskService:
    def __init__(self, cfg: Config, publisher: Publisher, shutdown: asyncio.Event) -> None:
        self.cfg = cfg
        self.publisher = publisher
        self.shutdown_requested = shutdown
        self.tasks: dict[str, Task] = {}
        self._creating: set[str] = set()
        self.pid = os.getpid()
        self.background = TaskSet(log)
        #: The pods' monitors, forked as the shim's children (one process tree).
        self.children = Children(asyncio.get_running_loop())
        #: The pod's host cgroup this shim lives in, joined with the task that
        #: boots the pod's VM, and where it came from (runtime.hostcgroup).
        self.cgroup_task = ""
        self.cgroup_home: dict[Path, str] = {}
        #: Set once a Create has ended (a carrier's pool waits for it: shim.carrier).
        self.first_created = asyncio.Event()

    # -- the service's table ---------------------------------------------------

    def methods(self) -> dict[tuple[str, str], Handler]:
        t = task_pb2
        table: list[tuple[str, type[Message], Callable[[Any], Awaitable[Message]]]] = [
            ("State", t.StateRequest, self.state),
            ("Create", t.CreateTaskRequest, self.create),
            ("Start", t.StartRequest, self.start),
            ("Delete", t.DeleteRequest, self.delete),
            ("Pids", t.PidsRequest, self.pids),
            ("Pause", t.PauseRequest, self.pause),
            ("Resume", t.ResumeRequest, self.resume),
            ("Checkpoint", t.CheckpointTaskRequest, self.checkpoint),
            ("Kill", t.KillRequest, self.kill),
            ("Exec", t.ExecProcessRequest, self.exec),
            ("ResizePty", t.ResizePtyRequest, self.resize_pty),
            ("CloseIO", t.CloseIORequest, self.close_io),
            ("Update", t.UpdateTaskRequest, self.update),
            ("Wait", t.WaitRequest, self.wait),
            ("Stats", t.StatsRequest, self.stats),
            ("Connect", t.ConnectRequest, self.connect),
            ("Shutdown", t.ShutdownRequest, self.shutdown),
        ]
        return {(SERVICE, name): _handler(kind, fn) for name, kind, fn in table}

    # -- lookups -----------------------------------------------------------------

    def _task(self, cid: str) -> Task:
        task = self.tasks.get(cid)
        if task is None:
            raise RpcError(Code.NOT_FOUND, f"container {cid[:80]!r} not found")
        return task

    def _proc(self, cid: str, exec_id: str) -> tuple[Task, Proc]:
        task = self._task(cid)
        if not exec_id:
            return task, task.init
        p = task.execs.get(exec_id)
        if p is None:
            raise RpcError(Code.NOT_FOUND, f"process {exec_id[:80]!r} of {cid[:80]!r} not found")
        return task, p

    # -- a task's life -------------------------------------------------------------

    async def create(self, req: task_pb2.CreateTaskRequest) -> task_pb2.CreateTaskResponse:
        if req.id in self.tasks or req.id in self._creating:
            raise RpcError(Code.ALREADY_EXISTS, f"container {req.id[:80]!r} already exists")
        if req.checkpoint:
            raise RpcError(Code.UNIMPLEMENTED, "cocoon does not restore checkpoints")
        self._creating.add(req.id)
        try:
            mounts = [rootfs.Mount(m.type, m.source, list(m.options)) for m in req.rootfs]
            bundle = Path(req.bundle)
            container = await _blocking(
                _create, self.cfg, req.id, bundle, mounts, self.children.reap
            )
            task = Task(req, container)
            try:
                self._join_cgroup(task)
                await self._attach(task)
            except BaseException:
                self._leave_cgroup(task)
                await _blocking(_destroy, task)
                raise
            self.tasks[req.id] = task
        finally:
            self._creating.discard(req.id)
            self.first_created.set()
        ev = events_pb2.TaskCreate(container_id=req.id, bundle=req.bundle, pid=self.pid)
        ev.rootfs.extend(req.rootfs)
        ev.io.stdin, ev.io.stdout, ev.io.stderr = req.stdin, req.stdout, req.stderr
        ev.io.terminal = req.terminal
        self.publisher.publish(ev)
        return task_pb2.CreateTaskResponse(pid=self.pid)

    def _join_cgroup(self, task: Task) -> None:
        """The shim is one of its pod's host processes, counted with its VM
        in the pod's cgroup (kubelet's) for the pod's life."""
        rel = task.container.record().host_cgroup
        if rel and not self.cgroup_task:
            home = hostcgroup.current()
            hostcgroup.enter(rel)
            self.cgroup_task, self.cgroup_home = task.id, home

    def _leave_cgroup(self, task: Task) -> None:
        """Out again before the task's delete removes the cgroup."""
        if task.id == self.cgroup_task:
            hostcgroup.restore(self.cgroup_home)
            self.cgroup_task, self.cgroup_home = "", {}

    async def _attach(self, task: Task) -> None:
        """The init's streams, from before its start: nothing it prints is lost."""
        p = task.init
        client = await task.container.container.connect()
        try:
            proc = await client.attach(stdin=True, tty=p.terminal, bind=True)
            self._relay(p, client, proc)
        except BaseException:
            await client.close()
            raise

    def _relay(self, p: Proc, client: MonitorClient, proc: Process) -> None:
        """``p``'s stdio to its fifos, and its end waited for, from now on."""
        wanted = [(p.stdout, proc.stdout)] + ([] if p.terminal else [(p.stderr, proc.stderr)])
        opened: list[tuple[InStream, int]] = []
        try:
            for path, src in wanted:
                if path and src is not None:
                    opened.append((src, fifos.open_output(path)))
        except BaseException:
            for _, fd in opened:
                os.close(fd)
            raise
        p.process, p.client = proc, client
        for src in (proc.stdout, proc.stderr):
            if src is not None and all(src is not s for s, _ in opened):
                src.discard()
        outs = [fifos.copy_out(src, fd) for src, fd in opened]
        name = f"{p.task_id}/{p.exec_id or 'init'}"
        if p.stdin:
            p.stdin_task = self.background.spawn(fifos.copy_in(p.stdin, proc), f"stdin of {name}")
        else:  # no stdin: the process reads EOF, as runc's does from /dev/null
            self.background.spawn(proc.write_stdin(b"", close=True), f"closing stdin of {name}")
        self.background.spawn(self._wait_for(p, proc, outs), f"waiting for {name}")

    async def _wait_for(
        self, p: Proc, proc: Process, outs: list[Coroutine[Any, Any, None]]
    ) -> None:
        """The process's end, once its output is written: recorded, published."""
        oom = False
        try:
            await asyncio.gather(*outs)
            exited = await proc.wait()
            status, oom = exited.exit_code, exited.oom_killed
        except (CocoonError, ConnectionError) as e:
            log.warning(f"{p.task_id}/{p.exec_id or 'init'}: its end is lost: {e}")
            status = LOST_STATUS
        if p.start_done is not None:
            await p.start_done.wait()
        # Stopped and published with no await between: whoever the stop wakes
        # (a Wait, a Delete and its TaskDelete) comes after the TaskExit.
        p.stopped(status)
        if oom:
            self.publisher.publish(events_pb2.TaskOOM(container_id=p.task_id))
        ev = events_pb2.TaskExit(
            container_id=p.task_id, id=p.exec_id or p.task_id, pid=self.pid, exit_status=status
        )
        _stamp(ev.exited_at, p.exited_at)
        self.publisher.publish(ev)
        if p.stdin_task is not None:
            p.stdin_task.cancel()
        if p.client is not None:
            await p.client.close()

    async def start(self, req: task_pb2.StartRequest) -> task_pb2.StartResponse:
        task, p = self._proc(req.id, req.exec_id)
        if p.status != task_pb2.CREATED or p.start_done is not None:
            raise RpcError(Code.FAILED_PRECONDITION, f"{req.exec_id or req.id} is not created")
        p.start_done = asyncio.Event()
        try:
            if not req.exec_id:
                await _blocking(task.container.start)
            else:
                client = await task.container.container.connect()
                try:
                    proc = await client.exec(p.spec, stdin=True, tty=p.terminal)
                except BaseException:
                    await client.close()
                    raise
                self._relay(p, client, proc)
            if p.status == task_pb2.CREATED:
                p.status = task_pb2.RUNNING
            if req.exec_id:
                self.publisher.publish(
                    events_pb2.TaskExecStarted(
                        container_id=req.id, exec_id=req.exec_id, pid=self.pid
                    )
                )
            else:
                self.publisher.publish(events_pb2.TaskStart(container_id=req.id, pid=self.pid))
        except BaseException:
            if req.exec_id:
                p.start_done = None  # never started: it may be deleted
            raise
        finally:
            if p.start_done is not None:
                p.start_done.set()
        return task_pb2.StartResponse(pid=self.pid)

    async def delete(self, req: task_pb2.DeleteRequest) -> task_pb2.DeleteResponse:
        task, p = self._proc(req.id, req.exec_id)
        if req.exec_id:
            if p.status != task_pb2.STOPPED and p.process is not None:
                raise RpcError(Code.FAILED_PRECONDITION, f"exec {req.exec_id} is running")
            task.execs.pop(req.exec_id, None)
            return self._deleted(p)
        if p.status in (task_pb2.RUNNING, task_pb2.PAUSED):
            raise RpcError(Code.FAILED_PRECONDITION, f"cannot delete running task {req.id}")
        self._leave_cgroup(task)
        await _blocking(_destroy, task)
        if not p.exited.is_set():  # a created task: its monitor killed it just now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_WAIT_S):
                    await p.exited.wait()
            if not p.exited.is_set():
                p.stopped(LOST_STATUS)
        if p.client is not None:
            await p.client.close()
        self.tasks.pop(req.id, None)
        ev = events_pb2.TaskDelete(
            container_id=req.id, id=req.id, pid=self.pid, exit_status=p.exit_status
        )
        _stamp(ev.exited_at, p.exited_at)
        self.publisher.publish(ev)
        return self._deleted(p)

    def _deleted(self, p: Proc) -> task_pb2.DeleteResponse:
        r = task_pb2.DeleteResponse(pid=self.pid, exit_status=p.exit_status)
        _stamp(r.exited_at, p.exited_at)
        return r

    async def exec(self, req: task_pb2.ExecProcessRequest) -> empty_pb2.Empty:
        task = self._task(req.id)
        if not req.exec_id:
            raise RpcError(Code.INVALID_ARGUMENT, "an exec needs an id")
        if req.exec_id in task.execs:
            raise RpcError(Code.ALREADY_EXISTS, f"exec {req.exec_id[:80]!r} already exists")
        if task.init.status != task_pb2.RUNNING:
            raise RpcError(Code.FAILED_PRECONDITION, f"container {req.id} is not running")
        p = Proc(req.id, req.exec_id, req)
        p.spec = _json_object(req.spec.value, "the exec's process")
        task.execs[req.exec_id] = p
        self.publisher.publish(events_pb2.TaskExecAdded(container_id=req.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    async def kill(self, req: task_pb2.KillRequest) -> empty_pb2.Empty:
        task, p = self._proc(req.id, req.exec_id)
        if p.status == task_pb2.STOPPED:
            raise RpcError(Code.NOT_FOUND, "process already finished")
        if not 0 < req.signal < 65:
            raise RpcError(Code.INVALID_ARGUMENT, f"signal {req.signal} is out of range")
        if not req.exec_id:
            await _blocking(task.container.kill, req.signal, all_processes=req.all)
        elif p.process is None:
            raise RpcError(Code.FAILED_PRECONDITION, f"exec {req.exec_id} is not started")
        else:
            await p.process.signal(req.signal)
        return empty_pb2.Empty()

    async def wait(self, req: task_pb2.WaitRequest) -> task_pb2.WaitResponse:
        _, p = self._proc(req.id, req.exec_id)
        await p.exited.wait()
        r = task_pb2.WaitResponse(exit_status=p.exit_status)
        _stamp(r.exited_at, p.exited_at)
        return r

    async def state(self, req: task_pb2.StateRequest) -> task_pb2.StateResponse:
        task, p = self._proc(req.id, req.exec_id)
        r = task_pb2.StateResponse(
            id=req.id, exec_id=req.exec_id, bundle=task.bundle, pid=self.pid, status=p.status,
            stdin=p.stdin, stdout=p.stdout, stderr=p.stderr, terminal=p.terminal,
            exit_status=p.exit_status,
        )  # fmt: skip
        _stamp(r.exited_at, p.exited_at)
        return r

    # -- what a running task is asked ----------------------------------------------

    async def pids(self, req: task_pb2.PidsRequest) -> task_pb2.PidsResponse:
        task = self._task(req.id)
        rows = await _blocking(task.container.processes)
        return task_pb2.PidsResponse(processes=[task_pb2.ProcessInfo(pid=r.pid) for r in rows])

    async def pause(self, req: task_pb2.PauseRequest) -> empty_pb2.Empty:
        task = self._task(req.id)
        await _blocking(task.container.pause)
        task.init.status = task_pb2.PAUSED
        self.publisher.publish(events_pb2.TaskPaused(container_id=req.id))
        return empty_pb2.Empty()

    async def resume(self, req: task_pb2.ResumeRequest) -> empty_pb2.Empty:
        task = self._task(req.id)
        await _blocking(task.container.resume)
        if task.init.status == task_pb2.PAUSED:
            task.init.status = task_pb2.RUNNING
        self.publisher.publish(events_pb2.TaskResumed(container_id=req.id))
        return empty_pb2.Empty()

    async def update(self, req: task_pb2.UpdateTaskRequest) -> empty_pb2.Empty:
        """New limits: the Any holds runtime-spec's LinuxResources as JSON."""
        task = self._task(req.id)
        resources = _json_object(req.resources.value, "the resources")
        await task.container.container.update(resources)
        return empty_pb2.Empty()

    async def stats(self, req: task_pb2.StatsRequest) -> task_pb2.StatsResponse:
        """The container's cgroup in the guest, as a cgroup v2 container's."""
        task = self._task(req.id)
        st = await task.container.container.stats()
        m = metrics_pb2.Metrics()
        m.pids.current = st.pids
        m.cpu.usage_usec = st.cpu_usage_us
        m.memory.usage = st.memory_bytes
        m.memory.usage_limit = st.memory_limit_bytes
        # containerd's CRI: RSS = anon, working set = usage - inactive_file.
        m.memory.anon = st.memory_anon_bytes
        m.memory.file = st.memory_file_bytes
        m.memory.inactive_file = st.memory_inactive_file_bytes
        m.memory.pgfault = st.memory_pgfault
        m.memory.pgmajfault = st.memory_pgmajfault
        m.io.usage.add(rbytes=st.io_read_bytes, wbytes=st.io_write_bytes)
        r = task_pb2.StatsResponse()
        r.stats.type_url = m.DESCRIPTOR.full_name
        r.stats.value = m.SerializeToString()
        return r

    async def resize_pty(self, req: task_pb2.ResizePtyRequest) -> empty_pb2.Empty:
        _, p = self._proc(req.id, req.exec_id)
        if p.process is None:
            raise RpcError(Code.FAILED_PRECONDITION, "the process is not started")
        if req.height and req.width:
            await p.process.resize(req.height, req.width)
        return empty_pb2.Empty()

    async def close_io(self, req: task_pb2.CloseIORequest) -> empty_pb2.Empty:
        _, p = self._proc(req.id, req.exec_id)
        if req.stdin and p.process is not None:
            if p.stdin_task is not None:
                p.stdin_task.cancel()
            with contextlib.suppress(CocoonError):
                await p.process.write_stdin(b"", close=True)
        return empty_pb2.Empty()

    async def checkpoint(self, req: task_pb2.CheckpointTaskRequest) -> empty_pb2.Empty:
        raise RpcError(Code.UNIMPLEMENTED, "cocoon does not checkpoint containers")

    # -- the shim's own life -----------------------------------------------------

    async def connect(self, req: task_pb2.ConnectRequest) -> task_pb2.ConnectResponse:
        task = self.tasks.get(req.id)
        return task_pb2.ConnectResponse(shim_pid=self.pid, task_pid=self.pid if task else 0)

    async def shutdown(self, req: task_pb2.ShutdownRequest) -> empty_pb2.Empty:
        """containerd asks after each task's delete: the shim goes with its
        pod's last task (or at once with ``now``), after this reply is sent."""
        if req.now or not (self.tasks or self._creating):
            asyncio.get_running_loop().call_later(0.05, self.shutdown_requested.set)
        return empty_pb2.Empty()

    async def close(self) -> None:
        await self.background.aclose(CLOSE_S)
        self.children.close()


def _handler(kind: type[R], fn: Callable[[R], Awaitable[Message]]) -> Handler:
    async def handle(payload: bytes) -> bytes:
        req = kind.FromString(payload)
        try:
            reply = await fn(req)
        except (CocoonError, OSError) as e:
            raise rpc_error(e) from e
        return reply.SerializeToString()

    return handle


async def _blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking call of the library (it forks, runs hooks, waits for locks)
    in a thread, so that the loop goes on serving the pod's other tasks."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


def _create(
    cfg: Config,
    cid: str,
    bundle: Path,
    mounts: list[rootfs.Mount],
    reap: Callable[[int], None],
) -> OciContainer:
    if mounts:
        rootfs.mount(mounts, bundle / "rootfs")
    try:
        return ocicreate.create_task(cfg, cid, bundle, reap)
    except BaseException:
        if mounts:
            rootfs.unmount(bundle / "rootfs")
        raise


def _destroy(task: Task) -> None:
    """The container gone (its VM too, for the pod's first one), then its rootfs."""
    try:
        task.container.delete(force=True)
    finally:
        if task.mounted:
            rootfs.unmount(Path(task.bundle) / "rootfs")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_JSON:
        raise RpcError(Code.INVALID_ARGUMENT, f"{what} is larger than {MAX_JSON} bytes")
    try:
        doc = json.loads(raw or b"{}")
    except ValueError as e:
        raise RpcError(Code.INVALID_ARGUMENT, f"{what} is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise RpcError(Code.INVALID_ARGUMENT, f"{what} must be a JSON object")
    return doc
