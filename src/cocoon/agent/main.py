"""Agent entry point: find the host channel, serve sessions on it forever.

The channel outlives any one session: the host may disconnect (a restarted
monitor, a restored snapshot) and a new session starts on the same port while
containers keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time

from cocoon import __version__
from cocoon.agent import spawn, system
from cocoon.agent.containers import Containers
from cocoon.agent.reaper import Reaper
from cocoon.protocol import messages
from cocoon.protocol.session import RemoteError, Session

PORT_NAME = "cocoon.agent"


def log(msg: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"cocoon-agent: {msg}\n".encode())


def find_port(timeout_s: float = 10.0) -> str:
    """The virtio-serial port the host named ``cocoon.agent``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            for d in os.listdir("/sys/class/virtio-ports"):
                with contextlib.suppress(OSError), open(f"/sys/class/virtio-ports/{d}/name") as f:
                    if f.read().strip() == PORT_NAME:
                        return f"/dev/{d}"
        if time.monotonic() > deadline:
            raise SystemExit(f"cocoon-agent: no virtio-serial port named {PORT_NAME}")
        time.sleep(0.01)


class Agent:
    def __init__(self) -> None:
        self.reaper = Reaper()
        self.containers = Containers(self.reaper)
        self.shutting_down = False

    async def handle(self, msg: messages.Message) -> messages.Message:
        c = self.containers
        match msg:
            case messages.Hello():
                if msg.protocol_version != messages.PROTOCOL_VERSION:
                    raise RemoteError(
                        "version", f"agent speaks protocol {messages.PROTOCOL_VERSION}"
                    )
                system.set_clock(msg.time_ns)
                return messages.HelloReply(
                    messages.PROTOCOL_VERSION, __version__, os.uname().release
                )
            case messages.Ping():
                return messages.Ok()
            case messages.GuestDetails():
                return system.details(__version__)
            case messages.Mount():
                os.makedirs(msg.target, exist_ok=True)
                code, out = await spawn.run(system.mount_argv(msg), self.reaper)
                if code != 0:
                    raise RemoteError("mount_failed", out.strip()[-300:] or f"mount exited {code}")
                return messages.Ok()
            case messages.Unmount():
                code, out = await spawn.run(["umount", msg.target], self.reaper)
                if code != 0:
                    raise RemoteError("umount_failed", out.strip()[-300:])
                return messages.Ok()
            case messages.CreateContainer():
                return await c.create(msg)
            case messages.StartContainer():
                return await c.start(msg)
            case messages.ExecProcess():
                return await c.exec(msg)
            case messages.SignalProcess():
                return await c.signal(msg)
            case messages.WaitProcess():
                return await c.wait(msg)
            case messages.ResizeTty():
                return await c.resize(msg)
            case messages.DeleteContainer():
                return await c.delete(msg)
            case messages.ListProcesses():
                return await c.list_processes(msg)
            case messages.Stats():
                return await c.stats(msg)
            case messages.Shutdown():
                self.shutting_down = True
                asyncio.get_running_loop().call_later(0.05, self.power_off)
                return messages.Ok()
        raise RemoteError("unsupported", f"agent does not serve {msg.TYPE}")

    def power_off(self) -> None:
        """Never returns: PID 1 exiting would panic the guest instead."""
        os.sync()
        # reboot=t on the kernel command line + QEMU's -no-reboot: QEMU exits.
        with contextlib.suppress(OSError):
            os.execv("/bin/busybox", ["reboot", "-f"])

    async def serve(self, port: str) -> None:
        loop = asyncio.get_running_loop()
        self.reaper.install(loop)
        backoff = 0.01
        while not self.shutting_down:
            fd = os.open(port, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            reader = asyncio.StreamReader(limit=1 << 21)
            rtrans, _ = await loop.connect_read_pipe(
                lambda r=reader: asyncio.StreamReaderProtocol(r),  # type: ignore[misc]
                os.fdopen(fd, "rb", buffering=0),
            )
            wtrans, wproto = await loop.connect_write_pipe(
                lambda: asyncio.streams.FlowControlMixin(),
                os.fdopen(os.dup(fd), "wb", buffering=0),
            )
            writer = asyncio.StreamWriter(wtrans, wproto, None, loop)
            session = Session(reader, writer, handler=self.handle, lazy_streams=True)
            self.containers.session = session
            started = time.monotonic()
            await session.run()
            if session.closed is not None:
                log(f"session ended: {session.closed}")
            rtrans.close()
            wtrans.close()
            # No host on the other end reads as EOF at once: back off a little.
            backoff = 0.01 if time.monotonic() - started > 1 else min(backoff * 2, 0.5)
            await asyncio.sleep(backoff)
        self.power_off()


def main() -> None:
    with open("/proc/uptime") as f:
        log("imports done " + f.read().split()[0])
    port = find_port()
    try:
        asyncio.run(Agent().serve(port))
    except BaseException as e:  # PID 1 must not just vanish: say why, then halt
        log(f"fatal: {e.__class__.__name__}: {e}")
        sys.stderr.flush()
        raise
