"""`containerd-shim-cocoon-v2`: containerd's runtime ``io.containerd.cocoon.v2``.

containerd runs the binary with Go-style flags and an action, in the task's
bundle dir, with ``TTRPC_ADDRESS`` (its ttrpc socket, for events) set:

- ``-namespace NS -address SOCK -publish-binary BIN -id ID start``: find the
  shim of the task's pod (the bundle's ``io.kubernetes.cri.sandbox-id``
  annotation; a container of no pod is a pod of its own), or start one: a
  socket named by a hash of (containerd's address, namespace, pod), listening
  before the server forks away (detached, its own session; its log goes to
  the bundle's ``log`` fifo, which containerd copies into its own). Either
  way the socket's address, ``unix:///run/containerd/s/<hash>``, is printed
  on stdout (containerd reads stdout and stderr together: nothing else may
  be printed) and written to the bundle's ``address`` file.
- ``... -id ID -bundle DIR delete``: after a shim died, remove what it left
  of the task (its container, VM, binds, rootfs mount) and print a
  DeleteResponse (protobuf) on stdout.

State lives under ``shim.root_dir``/<namespace> (runtime.ocirecords), one
root per containerd namespace as container ids are unique only within one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cocoon import __version__
from cocoon import log as cocoon_log
from cocoon.config import Config, load
from cocoon.errors import CocoonError, ShimError
from cocoon.runtime import pods

if TYPE_CHECKING:
    from cocoon.shim.proto import task_pb2

#: Where containerd's shims put their sockets (containerd's socketRoot + "/s").
SOCKET_DIR = "/run/containerd/s"
#: containerd's rule for namespaces (namespaces.Validate).
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
MAX_NAMESPACE = 76
#: runc's shim groups by these, in this order; the CRI plugin sets the second.
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", pods.SANDBOX_ID)
#: The runtime options containerd writes on `start`'s stdin (ignored), at most.
MAX_OPTIONS = 1 << 20
#: Threads for the library's blocking calls (each pod container's create,
#: start, delete): an idle one costs nothing.
THREADS = 64

log = logging.getLogger(__name__)


def parse(argv: list[str]) -> argparse.Namespace:
    """Go's flag package's command line: -flag value, -flag=value, --flag."""
    p = argparse.ArgumentParser(prog="containerd-shim-cocoon-v2", allow_abbrev=False)
    for name in ("namespace", "address", "publish-binary", "id", "bundle", "socket"):
        p.add_argument(f"-{name}", f"--{name}", default="", dest=name.replace("-", "_"))
    p.add_argument("-debug", "--debug", action="store_true")
    p.add_argument("-v", "--version", action="store_true", dest="version")
    p.add_argument("action", nargs="?", default="")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.version:
        print(f"containerd-shim-cocoon-v2 (cocoon {__version__})")
        return 0
    try:
        if args.action == "start":
            print(start(args), flush=True)
            return 0
        if args.action == "delete":
            sys.stdout.buffer.write(delete(args).SerializeToString())
            sys.stdout.flush()
            return 0
        raise ShimError(f"unknown action {args.action[:40]!r}: start or delete")
    except CocoonError as e:
        print(f"containerd-shim-cocoon-v2: {e}", file=sys.stderr)
        return 1


def shim_config(namespace: str) -> Config:
    if not (NAMESPACE_RE.match(namespace) and len(namespace) <= MAX_NAMESPACE):
        raise ShimError(f"invalid namespace {namespace[:80]!r}")
    base = load()
    cfg = dataclasses.replace(base, root_dir=os.path.join(base.shim.root_dir, namespace))
    cfg.validate()
    return cfg


def group_of(bundle: Path, cid: str) -> str:
    """The pod the bundle's container belongs to (its own id if none)."""
    try:
        spec = json.loads((bundle / "config.json").read_bytes())
        annotations = spec.get("annotations") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise ShimError(f"cannot read the bundle's config.json: {e}") from e
    for key in GROUP_ANNOTATIONS:
        value = annotations.get(key) if isinstance(annotations, dict) else None
        if isinstance(value, str) and value:
            return value
    return cid


def socket_path(address: str, namespace: str, group: str) -> str:
    """One socket per (containerd, namespace, pod): a hash names it, as
    containerd's shims do (``shim.SocketAddress``), ours apart from theirs."""
    key = os.path.normpath(os.path.join(address, namespace, group))
    return os.path.join(SOCKET_DIR, hashlib.sha256(f"cocoon:{key}".encode()).hexdigest())


def _can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _listen(path: str) -> socket.socket | None:
    """A new listening socket at ``path``, or None when a live shim has it."""
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    for _ in range(2):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            if e.errno != errno.EADDRINUSE:
                raise ShimError(f"cannot make the shim's socket {path}: {e.strerror}") from e
            if _can_connect(path):
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a dead shim's
            continue
        os.chmod(path, 0o600)
        s.listen(128)
        return s
    raise ShimError(f"cannot make the shim's socket {path}: it is taken")


def _write_address(bundle: Path, address: str) -> None:
    tmp = bundle / ".address.tmp"
    tmp.write_text(address)
    os.replace(tmp, bundle / "address")


def start(args: argparse.Namespace) -> str:
    """The address of the pod's shim, started here if it has none yet."""
    if not args.id:
        raise ShimError("-id is required")
    cfg = shim_config(args.namespace)
    if not sys.stdin.isatty():
        sys.stdin.buffer.read(MAX_OPTIONS)  # runtime options: nothing of ours in them yet
    bundle = Path.cwd()
    path = socket_path(args.address, args.namespace, group_of(bundle, args.id))
    address = "unix://" + path
    sock = _listen(path)
    if sock is None:  # the pod's shim serves this task too
        _write_address(bundle, address)
        return address
    try:
        _write_address(bundle, address)
        pid = os.fork()
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    if pid == 0:  # pragma: no cover - the shim server, detached
        code = 1
        try:
            os.setsid()
            _detach(bundle / "log")
            log.info(f"shim {os.getpid()} for {args.namespace}/{args.id} on {path}")
            import asyncio  # (the server's: `start` itself needs no event loop)

            code = asyncio.run(serve(cfg, args.namespace, sock, path))
        except BaseException:
            log.exception("the shim failed")
        finally:
            os._exit(code)
    sock.close()
    return address


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


async def serve(cfg: Config, namespace: str, sock: socket.socket, path: str) -> int:
    """The shim's life: serve the Task service until the pod's last task is
    deleted and containerd asks it to go. The service's modules are imported
    here, in the forked server, not by `start`: containerd runs `start` for
    every task, and for all but a pod's first it only finds the pod's shim
    (importing them cost each `start` ~0.13 s under TCG's host here)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from cocoon.shim.events import Publisher
    from cocoon.shim.service import TaskService
    from cocoon.shim.ttrpc import Server

    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(THREADS, thread_name_prefix="shim"))
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), namespace)
    done = asyncio.Event()
    service = TaskService(cfg, publisher, done)
    server = Server(service.methods())
    await server.start(sock)
    try:
        await done.wait()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await publisher.flush(10.0)
        await server.close()
        await service.close()
    log.info(f"shim {os.getpid()} done")
    return 0


def delete(args: argparse.Namespace) -> task_pb2.DeleteResponse:
    """What a dead shim left of a task: its container (its monitor asked to
    end, or its VM reaped), binds and rootfs mount; its socket if no shim
    answers on it any more."""
    from cocoon.runtime import ocicontainer, rootfs
    from cocoon.shim.proto import task_pb2

    if not args.id:
        raise ShimError("-id is required")
    cocoon_log.setup("containerd-shim-cocoon-v2", level=logging.WARNING)
    cfg = shim_config(args.namespace)
    bundle = Path(args.bundle or os.getcwd())
    ocicontainer.delete(cfg, args.id, force=True)
    rootfs.unmount(bundle / "rootfs")
    with contextlib.suppress(ShimError):
        path = socket_path(args.address, args.namespace, group_of(bundle, args.id))
        if os.path.exists(path) and not _can_connect(path):
            os.unlink(path)
    r = task_pb2.DeleteResponse(exit_status=128 + signal.SIGKILL)
    r.exited_at.FromNanoseconds(time.time_ns())
    return r
