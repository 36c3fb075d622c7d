"""One request to a container's monitor, on a blocking socket.

runc's callers exec `cocoon-runtime` once per verb, and `start` and `kill`
are a single request each to the container's monitor. The async channel
(runtime.control) is built for long conversations (streams, many requests,
keepalives); importing asyncio and it cost ~20 ms of each such call here, a
fifth of the verb. This speaks the same frames (protocol.framing) for one
request and its reply, and leaves the connection. It trusts the monitor no
more than the async side does: every frame is checked on decode, every wait
has a deadline.
"""

from __future__ import annotations

import socket
import time
from typing import TypeVar

from cocoon.errors import (
    AgentError,
    CocoonError,
    NotRunning,
    StateError,
    VmExited,
    agent_error,
)
from cocoon.protocol import framing, messages
from cocoon.protocol.framing import Kind
from cocoon.runtime.records import ContainerDir

M = TypeVar("M", bound=messages.Message)

#: A monitor answers these at once; the guest's part (crun start) is quick too.
TIMEOUT_S = 60.0
_HELLO, _REQUEST = 1, 2


def request(cdir: ContainerDir, msg: messages.Message, expect: type[M], *, name: str = "") -> M:
    """Send ``msg`` to the container's monitor and return its reply, or raise
    what runtime.control would (NotRunning when there is no monitor)."""
    who = name or cdir.id[:12]
    if not cdir.life.held():
        raise NotRunning(f"container {who} is not running")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT_S)
            s.connect(str(cdir.ctl_socket))
            hello = messages.Hello(messages.PROTOCOL_VERSION, time.time_ns())
            _send(s, _HELLO, hello)
            _reply(s, _HELLO, messages.HelloReply, deadline)
            _send(s, _REQUEST, msg)
            return _reply(s, _REQUEST, expect, deadline)
    except (ConnectionRefusedError, FileNotFoundError) as e:
        raise NotRunning(f"container {who} is not running") from e
    except _Refused as e:
        raise monitor_error(agent_error(f"{msg.TYPE}: {e.message}", e.code), who) from None
    except TimeoutError:
        raise StateError(
            f"the monitor of container {who} did not answer {msg.TYPE} within {TIMEOUT_S:g} s"
        ) from None
    except (OSError, ValueError) as e:  # framing.FrameError is a ValueError
        raise StateError(f"lost the monitor of container {who} during {msg.TYPE}: {e}") from e


def monitor_error(err: AgentError, who: str) -> CocoonError:
    """A monitor's refusal as the front ends raise it (the async client,
    runtime.control, maps its replies the same way): ``err`` itself unless
    its code names a state of the container."""
    detail = str(err).partition(": ")[2] or str(err)
    if err.code == "vm_exited":
        return VmExited(detail)
    if err.code == "start_failed":
        return AgentError(detail, err.code)
    if err.code == "not_running":
        return NotRunning(f"container {who}: {detail}")
    return err


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _send(s: socket.socket, chan: int, msg: messages.Message) -> None:
    s.sendall(framing.encode(Kind.REQUEST, chan, messages.encode(msg)))


def _reply(s: socket.socket, chan: int, expect: type[M], deadline: float) -> M:
    """Frames until the reply to ``chan``: anything else the monitor may send
    on an idle connection (its keepalive pings) is left unanswered."""
    while True:
        kind, got, length = framing.decode_header(_exactly(s, framing.HEADER_SIZE, deadline))
        payload = _exactly(s, length, deadline)
        if got != chan or kind not in (Kind.REPLY, Kind.ERROR):
            continue
        if kind is Kind.ERROR:
            err = messages.decode(payload, (messages.ErrorReply,))
            assert isinstance(err, messages.ErrorReply)
            raise _Refused(err.code[:64], err.message[:2000])
        reply = messages.decode(payload, (expect,))
        assert isinstance(reply, expect)
        return reply


def _exactly(s: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("it did not answer in time")
        s.settimeout(left)
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the monitor closed the connection")
        buf += chunk
    return bytes(buf)
