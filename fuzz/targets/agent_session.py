"""The agent's session (agent/session.py): host bytes decoded in the guest.

The agent's threaded twin of the host session reads frames from its port and
decodes every REQUEST through the same message decoder; requests are served
by a handler that answers Ok. Whatever the bytes, ``run()`` must return with
the session closed (the agent then waits for the next host), never raise.
"""

from __future__ import annotations

import os
import socket
import threading

from cocoon.agent.session import Session
from cocoon.protocol import framing, messages
from cocoon.protocol.framing import Kind
from targets._frames import SAMPLES, mutate_frames, stream

EXPECTED: tuple[type[BaseException], ...] = ()
MAX_INPUT = 256 << 10

mutate = mutate_frames


def _ok(_session: Session, _msg: messages.Message) -> messages.Message:
    return messages.Ok()


def seeds() -> list[bytes]:
    return [stream([(Kind.REQUEST, i + 1, msg)]) for i, msg in enumerate(SAMPLES)] + [
        stream([
            (Kind.REQUEST, 1, messages.Ping()),
            (Kind.DATA, 3, b"stdin bytes"),
            (Kind.EOF, 3, b""),
            (Kind.CREDIT, 2, framing.CREDIT.pack(1024)),
        ]),
    ]  # fmt: skip


def _host(sock: socket.socket, data: bytes) -> None:
    """Write the input, then read what the agent answers until it hangs up
    (a host that does not read would stall the agent's replies)."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass


def run(data: bytes) -> None:
    host, agent = socket.socketpair()
    fd = os.dup(agent.fileno())
    agent.close()
    os.set_blocking(fd, False)
    peer = threading.Thread(target=_host, args=(host, data), daemon=True)
    peer.start()
    try:
        s = Session(fd, _ok, frame_timeout_s=0.5)
        s.run()  # closes fd
        if s.closed is None:
            raise AssertionError("run() returned with the session open")
        peer.join(3.0)
    finally:
        host.close()
