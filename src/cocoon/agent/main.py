"""Agent entry point: find the host channel, serve sessions on it forever.

The channel outlives any one session: the host may disconnect (a restarted
monitor, a restored snapshot) and a new session starts on the same port while
containers keep running.

Plain threads and blocking calls, no asyncio: under TCG importing asyncio (and
the logging, concurrent.futures, subprocess, inspect... it pulls in) cost ~1 s
of a boot budget of 1.2 s.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable

from cocoon import __version__
from cocoon.agent import identity, mounts, network, system
from cocoon.agent.containers import Containers
from cocoon.agent.reaper import Reaper
from cocoon.agent.session import WORKERS, RemoteError, Session
from cocoon.protocol import messages

PORT_NAME = "cocoon.agent"
#: Must equal cocoon.hypervisor.base.AGENT_VSOCK_PORT (the agent cannot import it).
VSOCK_PORT = 1024
#: Request threads started with the agent (so a template's clones have them).
WORKER_THREADS = 4
#: The guest kernel's release, read once: the hello's reply is on a
#: clone's restore path, where every call not made before is translated anew.
KERNEL = os.uname().release
#: Reconnect backoff while no host is on the port (reads then hit EOF at once).
BACKOFF_MIN_S = 0.01
BACKOFF_MAX_S = 0.5


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

    def handle(self, session: Session, msg: messages.Message) -> messages.Message:
        """Serve one request (on its own thread); RemoteError becomes an ERROR frame."""
        c = self.containers
        match msg:
            case messages.Hello():
                if msg.protocol_version != messages.PROTOCOL_VERSION:
                    raise RemoteError(
                        "version", f"agent speaks protocol {messages.PROTOCOL_VERSION}"
                    )
                system.set_clock(msg.time_ns)
                return messages.HelloReply(messages.PROTOCOL_VERSION, __version__, KERNEL)
            case messages.Identity():
                return identity.apply(msg)
            case messages.Ping():
                return messages.Ok()
            case messages.GuestDetails():
                return system.details(__version__)
            case messages.Mount():
                os.makedirs(msg.target, exist_ok=True)
                source, fstype, options = system.mount_args(msg)
                mounts.mount(source, msg.target, fstype, options)
                if msg.kind == "bind" and msg.readonly:
                    mounts.mount("none", msg.target, "", ["bind", "ro", "remount"])
                return messages.Ok()
            case messages.Unmount():
                mounts.umount(msg.target)
                return messages.Ok()
            case messages.CreateContainer():
                return c.create(session, msg)
            case messages.StartContainer():
                return c.start(msg)
            case messages.ExecProcess():
                return c.exec(session, msg)
            case messages.SignalProcess():
                return c.signal(msg)
            case messages.WaitProcess():
                return c.wait(session, msg)
            case messages.ResizeTty():
                return c.resize(msg)
            case messages.DeleteContainer():
                return c.delete(msg)
            case messages.ListProcesses():
                return c.list_processes(msg)
            case messages.Stats():
                return c.stats(msg)
            case messages.Top():
                return c.top(msg)
            case messages.PauseContainer():
                return c.pause(msg)
            case messages.ResumeContainer():
                return c.resume(msg)
            case messages.UpdateResources():
                return c.update(msg)
            case messages.ConfigureNetwork():
                return network.configure(msg)
            case messages.Shutdown():
                self.shutting_down = True
                return messages.Ok()
        raise RemoteError("unsupported", f"agent does not serve {msg.TYPE}")

    def after_reply(self, msg: messages.Message) -> None:
        """Power off only once the Shutdown reply is on the wire (or undeliverable)."""
        if isinstance(msg, messages.Shutdown):
            self.power_off()

    def power_off(self) -> None:
        """Never returns: PID 1 exiting would panic the guest instead."""
        os.sync()
        # reboot=t on the kernel command line + QEMU's -no-reboot: QEMU exits.
        try:
            os.execv("/bin/busybox", ["reboot", "-f"])
        except OSError as e:
            log(f"cannot power off: {e}")
        while True:
            time.sleep(3600)

    def serve(self, open_channel: Callable[[], int]) -> None:
        """Serve one session after another on the channel until a Shutdown."""
        self.reaper.start()
        WORKERS.start(WORKER_THREADS)
        backoff = BACKOFF_MIN_S
        while not self.shutting_down:
            fd = open_channel()
            session = Session(fd, self.handle, after_reply=self.after_reply)
            started = time.monotonic()
            session.run()  # closes fd
            if session.closed is not None:
                log(f"session ended: {session.closed}")
            # No host on the other end reads as EOF at once: back off a little.
            if time.monotonic() - started > 1:
                backoff = BACKOFF_MIN_S
            else:
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            time.sleep(backoff)
        self.power_off()


def open_port(port: str) -> Callable[[], int]:
    return lambda: os.open(port, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def vsock_listener() -> Callable[[], int]:
    """Hosts with vhost-vsock connect to us on AGENT_VSOCK_PORT; one session per connection."""
    import _socket  # only here: `socket` costs ~30 ms of boot under TCG

    lst = _socket.socket(_socket.AF_VSOCK, _socket.SOCK_STREAM)
    lst.bind((_socket.VMADDR_CID_ANY, VSOCK_PORT))
    lst.listen(1)

    def accept() -> int:
        fd, _ = lst._accept()  # type: ignore[attr-defined]
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        return int(fd)

    return accept


def channel_kind() -> str:
    with open("/proc/cmdline") as f:
        return "vsock" if "cocoon.channel=vsock" in f.read().split() else "virtio-serial"


def main() -> None:
    with open("/proc/uptime") as f:
        log("imports done " + f.read().split()[0])
    opener = vsock_listener() if channel_kind() == "vsock" else open_port(find_port())
    try:
        Agent().serve(opener)
    except BaseException as e:  # PID 1 must not just vanish: say why, then halt
        log(f"fatal: {e.__class__.__name__}: {e}")
        sys.stderr.flush()
        raise
