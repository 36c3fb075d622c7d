"""A container monitor's stream relays: a container's output fanned out, an
exec's output to its client, a client's input to a process.

A container's stdout and stderr go to its CRI log first, before any client
sees a byte of them, so the log is complete even when the VM dies; then to
every attached client, with backpressure: a client that takes nothing for
``SUBSCRIBER_STALL_S`` is dropped (the log has it all), so a stuck `cocoon run`
cannot stall the container for ever. The relays run as tasks of the monitor's
one owner (runtime.monitor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from cocoon.protocol.session import InStream, OutStream
from cocoon.runtime.logs import CriLogWriter
from cocoon.sandbox.process import Process

#: The monitor's log names one logger, whichever of its modules writes.
log = logging.getLogger("cocoon.runtime.monitor")

#: A client that takes no output for this long is dropped (the log keeps it all),
#: so a stuck `cocoon run` cannot stall the container for ever.
SUBSCRIBER_STALL_S = 60.0

STREAMS = ("stdout", "stderr")


class Fanout:
    """One container's output: its log, and the clients attached to it."""

    def __init__(self, log_writer: CriLogWriter | None) -> None:
        #: The CRI log (None: the OCI runtime's caller keeps the output).
        self.log = log_writer
        self.subscribers: dict[str, list[OutStream]] = {s: [] for s in STREAMS}

    async def subscribe(self, stream: str, out: OutStream, *, ended: bool) -> None:
        """A client's copy of ``stream`` from now on; ``ended``: nothing more
        will come (the container has exited), so its copy ends at once."""
        if ended:
            await out.close()
        else:
            self.subscribers[stream].append(out)

    async def pump(self, stream: str, src: InStream, release: Callable[[InStream], None]) -> None:
        """Agent -> log -> attached clients, in that order, with backpressure;
        ``release``: hand the source back once it ended."""
        subs = self.subscribers[stream]
        try:
            while data := await src.read():
                if self.log is not None:
                    self.log.write(stream, data)
                for sub in list(subs):
                    try:
                        async with asyncio.timeout(SUBSCRIBER_STALL_S):
                            await sub.write(data)
                    except Exception:  # gone or stuck: it loses its copy, the log has it
                        subs.remove(sub)
        except ConnectionError as e:  # the guest went away: what we have is logged
            log.warning(f"{stream} cut off: {e}")
        finally:
            if self.log is not None:
                self.log.end(stream)
            release(src)
            for sub in self.subscribers[stream]:
                with contextlib.suppress(Exception):
                    await sub.close()
            self.subscribers[stream] = []

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()


async def copy(src: InStream, dst: OutStream) -> None:
    """An exec's output to its client; a gone client only drops its copy."""
    try:
        while data := await src.read():
            try:
                await dst.write(data)
            except Exception:
                src.discard()
                return
    except ConnectionError:
        pass
    with contextlib.suppress(Exception):
        await dst.close()


async def feed(src: Callable[[], InStream], proc: Process) -> None:
    """A client's stdin to a process; the client's EOF closes the process's stdin."""
    stream = src()
    try:
        while data := await stream.read():
            await proc.write_stdin(data, close=False)
    except Exception as e:
        log.info(f"stdin relay ended: {e}")
    with contextlib.suppress(Exception):
        await proc.write_stdin(b"", close=True)
