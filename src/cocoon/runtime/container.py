"""One container as every front end drives it: its record, its status and its
monitor's requests, and how it is torn down after any crash.

A container's life belongs to its monitor (runtime.monitor), the only writer
of its status; a front end holds only the record dir. ``Container`` is what a
front end calls: docker's verbs (runtime.lifecycle) and runc's
(runtime.ocicontainer) are this one lifecycle in their own words, and a shim
or a function service would call it the same way. Requests are async (a
long-lived front end serves many containers from one event loop); tearing
down blocks (it waits for locks and kills processes), so an async caller runs
it in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from cocoon.config import Config
from cocoon.errors import CocoonError
from cocoon.log import teardown_step
from cocoon.protocol import messages
from cocoon.runtime.records import ContainerConfig, ContainerDir, ContainerState
from cocoon.runtime.status import Status
from cocoon.util.proc import alive

if TYPE_CHECKING:
    # ``X as X``: re-exported, what a front end holds of a container process
    # (the Process an attach or exec gives, its output streams), so that it
    # needs nothing below runtime/. Loaded on first use (``__getattr__``),
    # with the async client: runc's verbs that never talk to a monitor, or
    # talk to it once (runtime.ctlcall), do without asyncio (~20 ms a call).
    from cocoon.protocol.session import InStream as InStream
    from cocoon.runtime.control import MonitorClient
    from cocoon.sandbox.process import Process as Process

T = TypeVar("T")

#: How long a monitor gets to tear its VM down once asked to end.
TEARDOWN_S = 30.0


class Container:
    def __init__(self, cdir: ContainerDir, *, name: str = "") -> None:
        self.dir = cdir
        #: The container as messages name it: docker's short id unless told.
        self.name = name or cdir.id[:12]

    @property
    def id(self) -> str:
        return self.dir.id

    def config(self) -> ContainerConfig:
        return self.dir.config()

    def state(self) -> ContainerState:
        return self.dir.state()

    def status(self) -> Status:
        return self.dir.status()

    # -- requests to the monitor (NotRunning when it is gone) ------------------

    async def connect(self) -> MonitorClient:
        """A connection of the caller's own, for what outlives one request (an
        attached or exec'd process's stdio)."""
        from cocoon.runtime.control import MonitorClient

        return await MonitorClient.connect(self.dir, name=self.name)

    async def _request(self, call: Callable[[MonitorClient], Awaitable[T]]) -> T:
        client = await self.connect()
        try:
            return await call(client)
        finally:
            await client.close()

    async def start(self) -> None:
        await self._request(lambda c: c.start())

    async def signal(self, sig: int, *, all_processes: bool = False) -> None:
        await self._request(lambda c: c.signal(sig, all_processes=all_processes))

    async def pause(self) -> None:
        await self._request(lambda c: c.pause())

    async def resume(self) -> None:
        await self._request(lambda c: c.resume())

    async def update(self, resources: dict[str, Any]) -> None:
        await self._request(lambda c: c.update(resources))

    async def stats(self) -> messages.StatsReply:
        return await self._request(lambda c: c.stats())

    async def top(self) -> list[messages.ProcessInfo]:
        return await self._request(lambda c: c.top())

    async def shutdown(self) -> None:
        await self._request(lambda c: c.shutdown())

    async def add(self, member: ContainerDir, guest_id: str, rootfs: str, tty: bool) -> None:
        """Create a pod's further container, ``member``, in this one's VM."""
        await self._request(lambda c: c.add(str(member.path), guest_id, rootfs, tty))

    # -- teardown (blocking) -----------------------------------------------------

    def end_monitor(
        self,
        ask: Callable[[], Coroutine[Any, Any, object]],
        what: str,
        *,
        log: logging.Logger,
        errors: tuple[type[BaseException], ...],
    ) -> None:
        """``ask`` the monitor to end the container and wait until it lets go
        of its life; one that does not (or cannot be asked) is killed by pid."""
        left = "its monitor, killed next"
        with teardown_step(log, what, left, level=logging.INFO, errors=errors):
            import asyncio

            asyncio.run(ask())
        if not self.dir.life.wait_released(TEARDOWN_S):
            pid = self.dir.state().monitor_pid
            if pid and alive(pid, None):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.dir.life.wait_released(5.0)


def reap_sandbox(cfg: Config, sid: str, what: str, *, log: logging.Logger) -> None:
    """Whatever of a container's sandbox its monitor left (all of it, after a
    crash): VM processes, network, dirs, as `cocoon gc` would."""
    from cocoon.state.store import SandboxDir

    if not SandboxDir(cfg.root, sid).path.exists():
        # Nothing left: a sandbox's dir is made before its first process and
        # removed after its last one is dead (Sandbox.destroy, gc). The
        # common case of runc's delete, after a monitor's own teardown.
        return
    # Imported here: the reaper pulls in the network and hypervisor layers,
    # which `start`, `state` and `kill` never need (~10 ms of each call).
    from cocoon.state import gc

    left = f"sandbox {sid} (VM, dir, network): `cocoon gc` reaps it"
    with teardown_step(log, what, left, errors=(CocoonError,)):
        gc.reap(cfg.root, only=sid)


def __getattr__(name: str) -> Any:
    """The re-exported process types, imported when a front end first asks."""
    if name == "InStream":
        from cocoon.protocol.session import InStream

        return InStream
    if name == "Process":
        from cocoon.sandbox.process import Process

        return Process
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
