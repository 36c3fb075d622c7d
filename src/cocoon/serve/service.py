"""The function service's operations, below HTTP: what each request does.

``Service`` owns the state (store.Store), the code dir, the instances
(instances.Instances) and the asynchronous invocations in flight. Routes
(app.py) check who asks and what they send, then call one method here.
Refusals are ``ApiError`` with the HTTP status they map to and one line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from croniter import croniter

from cocoon.config import Config
from cocoon.errors import CocoonError, CodeError, ImageError
from cocoon.errors import FunctionBusy as Busy
from cocoon.errors import FunctionGone as Gone
from cocoon.serve import code as codes
from cocoon.serve import store as st
from cocoon.serve.instances import (
    Instances,
    Launcher,
    Outcome,
    containers_of,
    remove_container,
)
from cocoon.serve.metrics import Metrics
from cocoon.serve.models import DEFAULTS, FunctionIn, Settings, TriggerIn
from cocoon.serve.runtimes import RUNTIMES
from cocoon.serve.store import Store, Version

log = logging.getLogger(__name__)

#: The namespace every service has from its first start.
DEFAULT_NAMESPACE = "default"
#: The most an invocation's request body may hold.
MAX_PAYLOAD = 6 << 20
#: A chain stops here: A -> B -> A ... would otherwise never end.
MAX_CHAIN_DEPTH = 16
#: How often timers are looked at.
TIMER_TICK_S = 0.25


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def state_dir(cfg: Config) -> Path:
    return Path(cfg.serve.state_dir) if cfg.serve.state_dir else cfg.data / "serve"


def new_invocation_id() -> str:
    return "inv-" + secrets.token_hex(12)


class Service:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.dir = state_dir(cfg)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = Store(self.dir / "state.db")
        self.code_root = codes.code_root(cfg, self.dir)
        sid = self.store.meta("service_id")
        if sid is None:
            sid = secrets.token_hex(8)
            self.store.set_meta("service_id", sid)
        self.id = sid
        self.store.add_namespace(DEFAULT_NAMESPACE)
        self.metrics = Metrics()
        self.metrics.load(self.store.metering())
        self.launcher: Launcher | None = None
        self.instances: Instances | None = None
        #: Code trees are written and collected one request at a time.
        self.code_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()
        self.timers: asyncio.Task[None] | None = None

    # -- life ------------------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """After a crash (or any stop): invocations left unfinished are marked
        failed, and every instance the last run left is removed. (count of
        each)"""
        failed = self.store.fail_unfinished(
            "the service stopped while this invocation was queued or running "
            f"(found at its restart, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})"
        )
        left = len(set(self.store.instances()) | set(containers_of(self.cfg, self.id)))
        self._sweep()
        return failed, left

    def _sweep(self) -> None:
        """Every instance container of this service still there, removed."""
        for cid in sorted(set(self.store.instances()) | set(containers_of(self.cfg, self.id))):
            remove_container(self.cfg, cid)
            self.store.remove_instance(cid)

    async def start(self) -> None:
        self.launcher = Launcher(self.cfg)
        self.launcher.warm_up()
        self.instances = Instances(
            self.cfg, self.store, self.launcher, self.id, lambda v: self.code_dir(v),
            self.dir / "blank",
        )  # fmt: skip
        self.instances.start_prewarming()
        self.timers = asyncio.get_running_loop().create_task(self.run_timers(), name="timers")

    async def stop(self) -> None:
        if self.timers is not None:
            self.timers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.timers
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.instances is not None:
            await self.instances.close()
        if self.launcher is not None:
            await asyncio.to_thread(self.launcher.close)
            # A start a helper finished for a request that went away meanwhile.
            await asyncio.to_thread(self._sweep)
        self.store.fail_unfinished("the service stopped while this invocation was running")
        self.store.close()

    # -- functions -------------------------------------------------------------------

    def code_dir(self, v: Version) -> Path:
        return codes.code_dir(self.code_root, v.code)

    def _namespace(self, ns: str) -> None:
        if not self.store.has_namespace(ns):
            raise ApiError(404, f"no such namespace: {ns}")

    async def _code(self, body: Settings, admin: bool) -> dict[str, Any]:
        c = body.code
        assert c is not None
        if c.host_dir is not None:
            if not admin:
                raise ApiError(403, "code from a host directory is for the admin only")
            return codes.host_dir(c.host_dir)
        assert c.data is not None and c.format is not None
        if len(c.data) > (self.cfg.serve.max_code_bytes * 4 + 2) // 3 + 4:
            raise ApiError(
                413, f"the code archive is over {self.cfg.serve.max_code_bytes >> 20} MiB "
                "(serve.max_code_bytes)"
            )  # fmt: skip
        try:
            data = base64.b64decode(c.data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "code.data is not valid base64") from None
        return await asyncio.to_thread(
            codes.store_archive, self.cfg, self.code_root, data, c.format
        )

    async def create(self, ns: str, body: FunctionIn, admin: bool) -> Version:
        self._namespace(ns)
        if self.store.version(ns, body.name) is not None:
            raise ApiError(409, f"function {body.name} exists: update it instead")
        spec = {k: v for k, v in body.model_dump(exclude={"name", "code"}).items() if v is not None}
        spec = {**DEFAULTS, **spec}
        return await self._add(ns, body.name, spec, body, admin, new=True)

    async def update(self, ns: str, name: str, body: Settings, admin: bool) -> Version:
        self._namespace(ns)
        cur = self.store.version(ns, name)
        if cur is None:
            raise ApiError(404, f"no such function: {name}")
        changes = {k: v for k, v in body.model_dump(exclude={"code"}).items() if v is not None}
        spec = {**cur.spec, **changes}
        return await self._add(ns, name, spec, body, admin, new=False, code=cur.code)

    async def _add(
        self,
        ns: str,
        name: str,
        spec: dict[str, Any],
        body: Settings,
        admin: bool,
        *,
        new: bool,
        code: dict[str, Any] | None = None,
    ) -> Version:
        async with self.code_lock:
            try:
                if body.code is not None:
                    code = await self._code(body, admin)
                assert code is not None
                runtime = RUNTIMES[spec["runtime"]]
                codes.check_handler(
                    codes.code_dir(self.code_root, code), runtime.handler_file(spec["handler"])
                )
                await asyncio.to_thread(runtime.ensure, self.cfg)
            except (CodeError, ImageError) as e:
                if code is not None and not self.store.code_in_use(code):
                    codes.remove_unused(self.code_root, code)
                what = "" if isinstance(e, CodeError) else f"runtime {spec['runtime']}: "
                raise ApiError(400, what + str(e)) from None
            v = self.store.add_version(ns, name, spec, code, new=new)
            if v is None:  # raced with another create or a delete
                if not self.store.code_in_use(code):
                    codes.remove_unused(self.code_root, code)
                raise ApiError(409 if new else 404, f"function {name} changed meanwhile: retry")
        if self.instances is not None:
            self.instances.want(spec["runtime"])
        log.info("function %s/%s version %d", ns, name, v.version)
        return v

    def get(self, ns: str, name: str, version: int | None = None) -> tuple[Version, list[int]]:
        """A function's latest version (or ``version``) and the versions it has."""
        v = self._version(ns, name, version)
        return v, [x.version for x in self.store.versions(ns, name)]

    def functions(self, ns: str) -> list[Version]:
        self._namespace(ns)
        return self.store.functions(ns)

    async def delete(self, ns: str, name: str) -> None:
        self._namespace(ns)
        async with self.code_lock:
            gone = self.store.remove_function(ns, name)
            if gone is None:
                raise ApiError(404, f"no such function: {name}")
            for v in gone:
                if not self.store.code_in_use(v.code):
                    codes.remove_unused(self.code_root, v.code)
        if self.instances is not None:
            await self.instances.retire(ns, name)

    # -- triggers ----------------------------------------------------------------------

    def add_trigger(self, ns: str, name: str, body: TriggerIn) -> dict[str, Any]:
        self._version(ns, name, None)
        if body.kind == "chain":
            assert body.target is not None
            self._version(ns, body.target, None)
            spec: dict[str, Any] = {"target": body.target, "on": body.on}
        else:
            spec = {"cron": body.cron}
        t = self.store.add_trigger("trg-" + secrets.token_hex(6), ns, name, body.kind, spec)
        if t is None:
            raise ApiError(404, f"no such function: {name}")
        return trigger_out(t)

    def triggers(self, ns: str, name: str) -> list[dict[str, Any]]:
        self._version(ns, name, None)
        return [trigger_out(t) for t in self.store.triggers(ns, name)]

    def remove_trigger(self, ns: str, name: str, tid: str) -> None:
        self._namespace(ns)
        if not self.store.remove_trigger(ns, name, tid):
            raise ApiError(404, f"no such trigger of {name}: {tid[:80]}")

    async def run_timers(self) -> None:
        """Fire each timer whose time has come: an asynchronous invocation
        whose input says which timer and when. A timer's firing is recorded
        before it fires; firings missed while the service was down are not
        caught up (the next one after its last firing is due at once)."""
        while True:
            await asyncio.sleep(TIMER_TICK_S)
            try:
                self._fire_timers(time.time())
            except Exception:  # one bad tick (a locked database) must not end the timers
                log.exception("timers")

    def _fire_timers(self, now: float) -> None:
        for t in self.store.triggers(kind="timer"):
            due = next_fire(t["spec"]["cron"], t["last_fired"] or t["created_at"])
            if due > now or not self.store.fired(t["id"], now):
                continue
            payload = json.dumps({"trigger": t["id"], "scheduled": due, "fired": now})
            try:
                self.invoke_async(t["namespace"], t["function"], None, payload.encode(),
                                  trigger=f"timer:{t['id']}")  # fmt: skip
            except ApiError as e:
                log.warning("timer %s: %s", t["id"], e)

    # -- invocations -----------------------------------------------------------------

    def _version(self, ns: str, name: str, version: int | None) -> Version:
        self._namespace(ns)
        v = self.store.version(ns, name, version)
        if v is None:
            what = f"{name} version {version}" if version is not None else name
            raise ApiError(404, f"no such function: {what}")
        return v

    async def _run(
        self, v: Version, payload: bytes, iid: str, env: list[str] | None = None, depth: int = 0
    ) -> Outcome:
        """One invocation to its end, recorded; Busy is the caller's to report."""
        assert self.instances is not None
        try:
            out = await self.instances.invoke(v, payload, iid, env)
        except Busy:
            raise
        except Gone as e:
            out = Outcome(st.FAILED, error=str(e))
        except CocoonError as e:
            out = Outcome(st.FAILED, error=f"no instance could be started: {e}")
        except asyncio.CancelledError:
            self.store.update_invocation(
                iid, status=st.FAILED, error="the service stopped while it ran",
                finished_at=time.time(),
            )  # fmt: skip
            raise
        except Exception as e:
            log.exception("invocation %s", iid)
            out = Outcome(st.FAILED, error=f"internal error: {e.__class__.__name__}: {e}")
        self._finish(iid, v, out)
        self._chain(v, out, iid, depth)
        return out

    def _chain(self, v: Version, out: Outcome, iid: str, depth: int) -> None:
        """The chain triggers of ``v``'s function that ``out`` sets off: each
        target invoked asynchronously with this result as its input."""
        for t in self.store.triggers(v.namespace, v.name, "chain"):
            on, target = t["spec"]["on"], t["spec"]["target"]
            failed = out.status in (st.FAILED, st.TIMEOUT)
            if not (on == "any" or (on == "failed") == failed):
                continue
            if depth >= MAX_CHAIN_DEPTH:
                log.warning("chain %s after %s: stopped at depth %d", t["id"], iid, depth)
                continue
            try:
                self.invoke_async(v.namespace, target, None, out.result,
                                  trigger=f"chain:{t['id']}", depth=depth + 1)  # fmt: skip
            except ApiError as e:
                log.warning("chain %s after %s: %s", t["id"], iid, e)

    def _finish(self, iid: str, v: Version, out: Outcome, *, throttled: bool = False) -> None:
        """Recorded and metered: the record, the metering row, the metrics."""
        gb_s = v.spec["memory_mib"] / 1024 * out.billed_ms / 1000
        fields = out.record()
        if throttled:
            fields["status"] = "throttled"
        self.store.finish_invocation(iid, v, fields, kind=out.start_kind, gb_s=gb_s)
        lv = (v.namespace, v.name, str(v.version))
        if throttled:
            self.metrics.throttled.labels(*lv).inc()
            return
        self.metrics.observe(
            lv, status=out.status, kind=out.start_kind, start_s=out.start_ms / 1000,
            duration_s=out.duration_ms / 1000, billed_s=out.billed_ms / 1000, gb_s=gb_s,
        )  # fmt: skip

    async def invoke_sync(
        self,
        ns: str,
        name: str,
        version: int | None,
        payload: bytes,
        *,
        mode: str = "sync",
        env: list[str] | None = None,
    ) -> tuple[str, Outcome]:
        """``mode`` "http" with ``env``: an HTTP trigger's request (cgi.py)."""
        v = self._version(ns, name, version)
        iid = new_invocation_id()
        # Not fsync'd: a synchronous call's caller is told nothing before its end.
        self.store.add_invocation(iid, v, mode, st.QUEUED, None, durable=False)
        try:
            return iid, await self._run(v, payload, iid, env)
        except Busy as e:
            self._finish(iid, v, Outcome(st.FAILED, error=f"throttled: {e}"), throttled=True)
            raise ApiError(429, str(e)) from None

    def invoke_async(
        self,
        ns: str,
        name: str,
        version: int | None,
        payload: bytes,
        *,
        trigger: str = "",
        depth: int = 0,
    ) -> str:
        v = self._version(ns, name, version)
        iid = new_invocation_id()
        self.store.add_invocation(iid, v, "async", st.QUEUED, payload, trigger=trigger, depth=depth)

        async def run() -> None:
            try:
                await self._run(v, payload, iid, depth=depth)
            except Busy as e:
                self._finish(iid, v, Outcome(st.FAILED, error=f"throttled: {e}"), throttled=True)

        t = asyncio.get_running_loop().create_task(run(), name=f"invocation {iid}")
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return iid

    def invocation(self, ns: str, iid: str) -> dict[str, Any]:
        self._namespace(ns)
        rec = self.store.invocation(ns, iid)
        if rec is None:
            raise ApiError(404, f"no such invocation: {iid[:80]}")
        return rec

    def invocations(self, ns: str, name: str, limit: int) -> list[dict[str, Any]]:
        self._namespace(ns)
        return self.store.invocations(ns, name, limit)


def describe(v: Version, versions: list[int] | None = None) -> dict[str, Any]:
    code = dict(v.code)
    return {
        "namespace": v.namespace,
        "name": v.name,
        "version": v.version,
        **{k: v.spec[k] for k in (*DEFAULTS, "handler")},
        "code": code,
        "created_at": v.created_at,
        "versions": versions or [],
    }


def invocation_out(rec: dict[str, Any], with_result: bool = True) -> dict[str, Any]:
    out = {
        k: rec[k]
        for k in (
            "id", "namespace", "function", "version", "mode", "status", "error", "exit_code",
            "start_kind", "start_ms", "trigger", "depth", "created_at", "started_at",
            "finished_at", "duration_ms", "billed_ms",
        )
    }  # fmt: skip
    if with_result:
        with contextlib.suppress(AttributeError):
            out["result"] = (rec["result"] or b"").decode("utf-8", "replace")
    return out


def next_fire(cron: str, after: float) -> float:
    """When a timer fires next after ``after`` (UTC)."""
    return float(croniter(cron, datetime.fromtimestamp(after, UTC)).get_next(float))


def trigger_out(t: dict[str, Any]) -> dict[str, Any]:
    out = {k: t[k] for k in ("id", "namespace", "function", "kind", "created_at", "last_fired")}
    out.update(t["spec"])
    if t["kind"] == "timer":
        out["next_fire"] = next_fire(t["spec"]["cron"], t["last_fired"] or t["created_at"])
    return out
