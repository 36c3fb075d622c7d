"""A container monitor's control endpoint: each container's ``ctl.sock``.

Other cocoon commands (attach, exec, signals, stats, top; cocoon-runtime's
stand-ins and verbs) speak the agent's own framed protocol here. The endpoint
only turns each request into a call of the supervisor (runtime.supervisor),
which checks and carries it out, and each outcome into the reply or the
error code clients have always had; it also connects a client's streams to
the process a call gives it. The peer is another root cocoon command, but a
confused one must not hurt the container: the same bounds as with a guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from cocoon.errors import (
    AgentError,
    CocoonError,
    CommandError,
    GuestError,
    IllegalTransition,
    SandboxError,
)
from cocoon.protocol import messages
from cocoon.protocol.errors import RemoteError
from cocoon.protocol.session import Session
from cocoon.runtime import fanout
from cocoon.runtime.records import CONTAINER_ID
from cocoon.runtime.status import Op, Status
from cocoon.sandbox.process import Process
from cocoon.util.tasks import TaskSet

if TYPE_CHECKING:
    from cocoon.runtime.supervisor import Member, Supervisor

#: After the exit is known, how long clients get to collect it before we go.
CLIENT_GRACE_S = 5.0


class ControlEndpoint:
    def __init__(self, sup: Supervisor, tasks: TaskSet) -> None:
        self.sup = sup
        self.tasks = tasks
        self.clients: set[Session] = set()
        self._servers: dict[str, asyncio.AbstractServer] = {}

    # -- the supervisor's side (runtime.supervisor.Endpoint) ---------------------

    async def open(self, m: Member) -> None:
        m.cdir.ctl_socket.parent.mkdir(mode=0o700, exist_ok=True)

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await self._serve_client(m, r, w)

        self._servers[m.guest_id] = await asyncio.start_unix_server(
            serve, path=str(m.cdir.ctl_socket), limit=1 << 21
        )

    def close(self, m: Member) -> None:
        server = self._servers.pop(m.guest_id, None)
        if server is not None:
            server.close()
        with contextlib.suppress(FileNotFoundError):
            m.cdir.ctl_socket.unlink()

    async def let_clients_go(self) -> None:
        deadline = time.monotonic() + CLIENT_GRACE_S
        while self.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for s in list(self.clients):
            s.close("the container exited")

    # -- the clients' side ---------------------------------------------------

    async def _serve_client(
        self, m: Member, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The session must exist before its handler can name it: a one-slot holder.
        holder: list[Session] = []

        async def handler(msg: messages.Message) -> messages.Message:
            try:
                return await self._dispatch(m, holder[0], msg)
            except IllegalTransition as e:
                # The words older clients know: a start is refused as not_created.
                code = "not_created" if e.op == Op.START else "not_running"
                raise RemoteError(code, str(e)) from e
            except (AgentError, GuestError, SandboxError) as e:
                if m.state.status == Status.EXITED or m.exited.done():
                    # raced with the container's own exit and the VM's teardown
                    raise RemoteError("not_running", "the container has exited") from e
                # A command that could not be run keeps its type for the client.
                code = e.code if isinstance(e, CommandError) else "failed"
                raise RemoteError(code, str(e)) from e
            except (ValueError, KeyError, CocoonError) as e:
                raise RemoteError("invalid", str(e)[:300]) from e

        session = Session(reader, writer, handler=handler, lazy_streams=True)
        holder.append(session)
        self.clients.add(session)
        try:
            await session.run()
        finally:
            self.clients.discard(session)
            with contextlib.suppress(Exception):
                writer.close()

    async def _dispatch(
        self, m: Member, session: Session, msg: messages.Message
    ) -> messages.Message:
        """Requests name the container "main": the socket they came on says which."""
        sup = self.sup
        if sup.sb is None or m.proc is None:
            raise RemoteError("not_running", "the container is not running")
        cid = getattr(msg, "container_id", CONTAINER_ID)
        if not isinstance(msg, messages.AddContainer) and cid != CONTAINER_ID:
            raise RemoteError("not_found", f"no container {str(cid)[:40]!r} on this socket")
        match msg:
            case messages.Hello():
                return messages.HelloReply(messages.PROTOCOL_VERSION, "monitor", "")
            case messages.Ping():
                return messages.Ok()
            case messages.Attach():
                return messages.ProcessStarted(await self._attach(m, session, msg))
            case messages.AddContainer():
                if m.guest_id != CONTAINER_ID:
                    raise RemoteError("invalid", "add containers through the pod's sandbox")
                await sup.add(msg.record_dir, msg.container_id, msg.rootfs, msg.tty)
                return messages.Ok()
            case messages.StartContainer():
                await sup.start(m)
                return messages.Ok()
            case messages.PauseContainer():
                await sup.pause(m)
                return messages.Ok()
            case messages.ResumeContainer():
                await sup.resume(m)
                return messages.Ok()
            case messages.UpdateResources():
                return await sup.update(m, msg.resources_json)
            case messages.Shutdown():
                sup.shutdown(m)
                return messages.Ok()
            case messages.ExecProcess():
                st = msg.stdio
                proc = await sup.exec(
                    m, msg.exec_id, msg.process_json, stdin=bool(st.stdin), tty=st.terminal,
                    rows=st.rows or 24, cols=st.cols or 80,
                )  # fmt: skip
                self._relay(proc, session, msg.stdio)
                return messages.ProcessStarted(proc.pid)
            case messages.WaitProcess(exec_id=""):
                return await sup.wait(m)
            case messages.WaitProcess():
                return await sup.wait_exec(m, msg.exec_id)
            case messages.ResizeTty():
                return await sup.resize(m, msg.exec_id, msg.rows, msg.cols)
            case messages.SignalProcess():
                return await sup.signal(m, msg.exec_id, msg.signal, msg.all)
            case messages.Stats():
                return await sup.stats(m)
            case messages.Top():
                return await sup.top(m)
        raise RemoteError("unsupported", f"the monitor does not serve {msg.TYPE}")

    async def _attach(self, m: Member, session: Session, msg: messages.Attach) -> int:
        """The client's streams for the init: its output from now on, its stdin
        (opened when the relay starts); ``bind``: the client's end is the init's."""
        stdio = msg.stdio
        outs = {
            stream: session.open_out(chan)
            for stream, chan in (("stdout", stdio.stdout), ("stderr", stdio.stderr))
            if chan
        }
        stdin = stdio.stdin
        return await self.sup.attach(
            m,
            outs=outs,
            stdin=(lambda: session.in_stream(stdin)) if stdin else None,
            rows=stdio.rows,
            cols=stdio.cols,
            bound=session.done if msg.bind else None,
        )

    def _relay(self, proc: Process, session: Session, stdio: messages.StdioSpec) -> None:
        """An exec'd process's streams to and from the client that asked for it."""
        name = f"exec {proc.exec_id}"
        for src, chan in ((proc.stdout, stdio.stdout), (proc.stderr, stdio.stderr)):
            if src is None:
                continue
            if not chan:
                src.discard()
                continue
            self.tasks.spawn(fanout.copy(src, session.open_out(chan)), f"output of {name}")
        stdin = stdio.stdin
        if stdin:
            self.tasks.spawn(
                fanout.feed(lambda: session.in_stream(stdin), proc), f"stdin of {name}"
            )
