"""Task events, published to containerd the way its own shims do in 1.6.

containerd starts a shim with ``TTRPC_ADDRESS`` (its ttrpc socket) and
``-publish-binary`` (itself, for the `containerd publish` command that shims
before 1.3 exec'd with the event on stdin). 1.6's shim library publishes over
ttrpc: ``containerd.services.events.ttrpc.v1.Events/Forward`` with an
envelope (time, namespace, topic, the event as an Any whose type URL is its
message's full name, e.g. ``containerd.events.TaskExit``), so that is what
we do. containerd's CRI plugin learns a container's exit from the TaskExit
event alone, so events go out in the order they happened, one at a time, and
one that fails is tried again (as 1.6's publisher does, 5 times with a
growing pause) before it is dropped with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf.message import Message

from cocoon.shim.proto import events_pb2
from cocoon.shim.ttrpc import Client, RpcError

SERVICE = "containerd.services.events.ttrpc.v1.Events"
TIMEOUT_S = 5.0
RETRIES = 5
#: Events waiting for containerd, at most (1.6's publisher queues 2048).
QUEUE = 2048

#: Topics (containerd's runtime/events.go) by event.
TOPICS: dict[type[Message], str] = {
    events_pb2.TaskCreate: "/tasks/create",
    events_pb2.TaskStart: "/tasks/start",
    events_pb2.TaskOOM: "/tasks/oom",
    events_pb2.TaskExit: "/tasks/exit",
    events_pb2.TaskDelete: "/tasks/delete",
    events_pb2.TaskExecAdded: "/tasks/exec-added",
    events_pb2.TaskExecStarted: "/tasks/exec-started",
    events_pb2.TaskPaused: "/tasks/paused",
    events_pb2.TaskResumed: "/tasks/resumed",
}

log = logging.getLogger(__name__)


def envelope(namespace: str, event: Message, now: float) -> events_pb2.ForwardRequest:
    req = events_pb2.ForwardRequest()
    env = req.envelope
    env.timestamp.FromNanoseconds(int(now * 1e9))
    env.namespace = namespace
    env.topic = TOPICS[type(event)]
    env.event.type_url = event.DESCRIPTOR.full_name
    env.event.value = event.SerializeToString()
    return req


class Publisher:
    """Sends events to containerd's ttrpc address, in order, from one task."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._queue: asyncio.Queue[events_pb2.ForwardRequest] = asyncio.Queue(QUEUE)
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, event: Message) -> None:
        """Queue ``event`` (stamped now); never blocks, never fails the caller."""
        if not self.address:
            return
        try:
            self._queue.put_nowait(envelope(self.namespace, event, time.time()))
        except asyncio.QueueFull:
            log.error(f"event queue full: dropped {TOPICS[type(event)]}")
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="publisher")

    async def _run(self) -> None:
        while True:
            req = await self._queue.get()
            try:
                await self._forward(req)
            finally:
                self._queue.task_done()

    async def _forward(self, req: events_pb2.ForwardRequest) -> None:
        payload = req.SerializeToString()
        for attempt in range(RETRIES + 1):
            try:
                if self._client is None or self._client.closed:
                    self._client = await Client.connect(self.address)
                await self._client.call(SERVICE, "Forward", payload, TIMEOUT_S)
                return
            except (OSError, RpcError, TimeoutError) as e:
                log.warning(f"forwarding {req.envelope.topic} failed: {e}")
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                if attempt < RETRIES:
                    await asyncio.sleep(attempt + 1)
        log.error(f"dropped event {req.envelope.topic} after {RETRIES + 1} tries")

    async def flush(self, timeout_s: float) -> None:
        """Wait until every queued event has gone out (or ``timeout_s``), then stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._client is not None:
            await self._client.close()
