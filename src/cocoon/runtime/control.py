"""Other cocoon commands talking to a container's monitor over ``ctl.sock``.

The monitor speaks the agent's own framed protocol, so the client is the same
AgentChannel and the processes it hands out are the same ``Process`` objects a
Sandbox gives: attach/exec code does not care whether the guest is one hop or two.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, TypeVar

from cocoon.errors import AgentError, GuestError, NotRunning, StateError
from cocoon.protocol import messages
from cocoon.runtime.ctlcall import monitor_error
from cocoon.runtime.records import CONTAINER_ID, ContainerDir
from cocoon.sandbox.channel import AgentChannel, Timeout
from cocoon.sandbox.process import Process

M = TypeVar("M", bound=messages.Message)


class MonitorClient:
    def __init__(self, cdir: ContainerDir, channel: AgentChannel) -> None:
        self.cdir = cdir
        self.channel = channel

    @classmethod
    async def connect(
        cls, cdir: ContainerDir, timeout_s: float = 10.0, *, name: str = ""
    ) -> MonitorClient:
        """``name``: the container as the caller's messages name it (docker's
        short id by default; runc's callers know only the whole id)."""
        if not cdir.life.held():
            raise NotRunning(f"container {name or cdir.id[:12]} is not running")
        deadline = time.monotonic() + timeout_s
        try:
            ch = await AgentChannel.connect(cdir.ctl_socket, deadline=deadline, agent_timeout_s=60)
            await ch.handshake(deadline)
        except GuestError as e:
            raise NotRunning(f"container {name or cdir.id[:12]} is not running") from e
        return cls(cdir, ch)

    async def call(
        self,
        msg: messages.Message,
        expect: type[M],
        *,
        timeout_s: float | None | Timeout = Timeout.AGENT,
    ) -> M:
        try:
            return await self.channel.call(msg, expect, timeout_s=timeout_s)
        except AgentError as e:
            mapped = monitor_error(e, self.cdir.id[:12])
            if mapped is e:
                raise
            raise mapped from e
        except GuestError as e:
            raise StateError(
                f"lost the monitor of container {self.cdir.id[:12]} during {msg.TYPE}"
            ) from e

    async def attach(
        self, *, stdin: bool, tty: bool, rows: int = 0, cols: int = 0, bind: bool = False
    ) -> Process:
        """The container's init process: its output from now on, our stdin to it.
        ``bind``: we stand for it on the host, our end kills it."""
        spec, sin, sout, serr = self.channel.open_stdio(stdin, tty, rows, cols)
        reply = await self.call(messages.Attach(spec, bind), messages.ProcessStarted)
        return Process(self, CONTAINER_ID, "", reply.pid, sin, sout, serr)

    async def exec(
        self,
        process: dict[str, Any],
        *,
        stdin: bool,
        tty: bool,
        rows: int = 24,
        cols: int = 80,
    ) -> Process:
        spec, sin, sout, serr = self.channel.open_stdio(stdin, tty, rows, cols)
        eid = "exec-" + secrets.token_hex(6)
        msg = messages.ExecProcess(CONTAINER_ID, eid, json.dumps(process), spec)
        reply = await self.call(msg, messages.ProcessStarted, timeout_s=120.0)
        return Process(self, CONTAINER_ID, eid, reply.pid, sin, sout, serr)

    async def start(self) -> None:
        await self.call(messages.StartContainer(CONTAINER_ID), messages.Ok)

    async def pause(self) -> None:
        await self.call(messages.PauseContainer(CONTAINER_ID), messages.Ok)

    async def resume(self) -> None:
        await self.call(messages.ResumeContainer(CONTAINER_ID), messages.Ok)

    async def update(self, resources: dict[str, Any]) -> None:
        """New cgroup limits (runtime-spec's linux.resources) for the container."""
        msg = messages.UpdateResources(CONTAINER_ID, json.dumps(resources))
        await self.call(msg, messages.Ok)

    async def shutdown(self) -> None:
        """End the container (killed if it runs) and its VM; for a pod's
        sandbox, the pod's every container."""
        await self.call(messages.Shutdown(), messages.Ok)

    async def add(self, record_dir: str, guest_id: str, rootfs: str, tty: bool) -> None:
        """Create a pod's further container (recorded in ``record_dir``) in this VM."""
        await self.call(messages.AddContainer(record_dir, guest_id, rootfs, tty), messages.Ok)

    async def signal(self, sig: int, *, all_processes: bool = False) -> None:
        await self.call(messages.SignalProcess(CONTAINER_ID, "", sig, all_processes), messages.Ok)

    async def wait(self, timeout_s: float | None = None) -> messages.ProcessExited:
        """The init's exit, once the monitor has recorded it and torn the VM down."""
        msg = messages.WaitProcess(CONTAINER_ID, "")
        return await self.call(msg, messages.ProcessExited, timeout_s=timeout_s)

    async def stats(self) -> messages.StatsReply:
        return await self.call(messages.Stats(CONTAINER_ID), messages.StatsReply)

    async def top(self) -> list[messages.ProcessInfo]:
        return (await self.call(messages.Top(CONTAINER_ID), messages.TopReply)).processes

    async def close(self) -> None:
        await self.channel.close()
