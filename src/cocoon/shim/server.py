"""The shim's server side: what a pod's shim server is, whoever forked it.

``start`` (shim.main) forks it, or has the fork server (shim.forkserver) fork
it: either way the child runs ``run_server``, detached, and serves the Task
service (shim.service) on the pod's socket until containerd lets it go.
Imports here stay small (``start`` imports this module); the service's
modules are imported by ``serve``, in the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cocoon import log as cocoon_log
from cocoon.errors import ShimError

if TYPE_CHECKING:
    from cocoon.config import Config
    from cocoon.shim.service import TaskService

#: Where containerd's shims put their sockets (containerd's socketRoot + "/s").
SOCKET_DIR = "/run/containerd/s"
#: containerd's rule for namespaces (namespaces.Validate).
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
MAX_NAMESPACE = 76
#: Threads for the library's blocking calls (each pod container's create,
#: start, delete): an idle one costs nothing.
THREADS = 64

log = logging.getLogger(__name__)


class OwnPool(Protocol):
    """A carrier's one-VM pool, as its pod's shim uses it (shim.carrier)."""

    def drain(self) -> None: ...

    def close(self) -> None: ...


def check_namespace(namespace: str) -> None:
    if not (NAMESPACE_RE.match(namespace) and len(namespace) <= MAX_NAMESPACE):
        raise ShimError(f"invalid namespace {namespace[:80]!r}")


def shim_config(namespace: str) -> Config:
    from cocoon.config import load

    check_namespace(namespace)
    base = load()
    cfg = dataclasses.replace(base, root_dir=os.path.join(base.shim.root_dir, namespace))
    cfg.validate()
    return cfg


def run_server(
    cfg: Config,
    namespace: str,
    cid: str,
    sock: socket.socket,
    path: str,
    bundle: Path,
    own_pool: OwnPool | None = None,
) -> None:
    """In a forked child: become the pod's shim server, detached, and exit
    when it is done (with ``own_pool``, a carrier's: shim.carrier)."""
    code = 1
    try:
        os.setsid()
        _detach(bundle / "log")
        log.info(f"shim {os.getpid()} for {namespace}/{cid} on {path}")
        import asyncio  # (the server's: `start` itself needs no event loop)

        code = asyncio.run(serve(cfg, namespace, sock, path, own_pool))
    except BaseException:
        log.exception("the shim failed")
    finally:
        os._exit(code)


def _detach(log_fifo: Path) -> None:
    """No stdio of containerd's (it waits for `start`'s output to end): the
    log to the bundle's log fifo, non-blocking so a slow reader costs lines,
    never the shim."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        err = os.open(log_fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        err = null
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err, 2)
    for fd in {null, err}:
        if fd > 2:
            os.close(fd)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    sys.stderr = os.fdopen(2, "w", buffering=1)
    cocoon_log.setup_process_log(sys.stderr)
    logging.raiseExceptions = False  # a log line that cannot be written is dropped
    for s in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)


async def serve(
    cfg: Config, namespace: str, sock: socket.socket, path: str, own_pool: OwnPool | None = None
) -> int:
    """The shim's life: serve the Task service until the pod's last task is
    deleted and containerd asks it to go. The service's modules are imported
    here, in the forked server, not by `start`: containerd runs `start` for
    every task, and for all but a pod's first it only finds the pod's shim
    (importing them cost each `start` ~0.06 s here; a fork server has them
    imported already: shim.forkserver)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from cocoon.shim.events import Publisher
    from cocoon.shim.ttrpc import Server

    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(THREADS, thread_name_prefix="shim"))
    from cocoon.shim.service import TaskService

    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), namespace)
    done = asyncio.Event()
    service = TaskService(cfg, publisher, done)
    server = Server(service.methods())
    await server.start(sock)
    if own_pool is not None:
        service.background.spawn(_drain_after_create(service, own_pool), "the carrier's pool")
    try:
        await done.wait()
    finally:
        if own_pool is not None:
            own_pool.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await publisher.flush(10.0)
        await server.close()
        await service.close()
    log.info(f"shim {os.getpid()} done")
    return 0


async def _drain_after_create(service: TaskService, own_pool: OwnPool) -> None:
    """A carrier's pool is for its pod's first task (the one that boots the
    VM): once that is created, a VM the pod did not take goes."""
    import asyncio

    await service.first_created.wait()
    await asyncio.to_thread(own_pool.drain)
