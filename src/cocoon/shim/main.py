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
- ``-address SOCK fork-server``: a warm process that forks pods' shim
  servers for ``start`` (shim.forkserver), started once, as the warm pool is.
- ``... -id ID -bundle DIR delete``: after a shim died, remove what it left
  of the task (its container, VM, binds, rootfs mount) and print a
  DeleteResponse (protobuf) on stdout.

State lives under ``shim.root_dir``/<namespace> (runtime.ocirecords), one
root per containerd namespace as container ids are unique only within one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cocoon import __version__
from cocoon import log as cocoon_log
from cocoon.errors import CocoonError, ShimError
from cocoon.shim.server import SOCKET_DIR, check_namespace, run_server, shim_config

if TYPE_CHECKING:
    from cocoon.shim.proto import task_pb2

#: runc's shim groups by these, in this order; the CRI plugin sets the second.
#: (the second is runtime.pods.SANDBOX_ID, not imported: see ``start``)
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
#: The runtime options containerd writes on `start`'s stdin (ignored), at most.
MAX_OPTIONS = 1 << 20
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
        if args.action == "fork-server":
            from cocoon.shim import forkserver

            return forkserver.run(args.address)
        if args.action == "delete":
            sys.stdout.buffer.write(delete(args).SerializeToString())
            sys.stdout.flush()
            return 0
        raise ShimError(f"unknown action {args.action[:40]!r}: start, delete or fork-server")
    except CocoonError as e:
        print(f"containerd-shim-cocoon-v2: {e}", file=sys.stderr)
        return 1


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
    """The address of the pod's shim, started here if it has none yet.

    containerd runs it for every task, and for all but a pod's first it only
    finds the pod's shim: so it imports and reads no more than that needs
    (not the configuration, not the library: ~0.06 s of each pod container's
    start here); the server imports the rest once forked."""
    if not args.id:
        raise ShimError("-id is required")
    check_namespace(args.namespace)
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
        cfg = shim_config(args.namespace)
        _write_address(bundle, address)
        from cocoon.shim import forkserver  # (small: what asking it takes)

        forked = forkserver.ask(cfg, args.address, args.namespace, args.id, sock, path, bundle)
        pid = 1 if forked else os.fork()
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    if pid == 0:  # pragma: no cover - the shim server, detached
        run_server(cfg, args.namespace, args.id, sock, path, bundle)
    sock.close()
    return address


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
