"""`cocoon serve` in the foreground: listen, recover, serve, clean up.

At start: the database is opened (made at first start, with the admin token's
file), invocations a previous run left unfinished are marked failed with the
reason, and every instance it left (recorded, or carrying its label) is
removed. Then uvicorn serves the API on the unix socket (root-only: made under
umask 0177, so it is 0600 from its first moment) and, if asked, on TCP. SIGTERM
or SIGINT: stop accepting, let requests in flight end (a few seconds), cancel
what is left, remove every instance, mark what did not finish failed. Nothing
of it outlives the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import uvicorn

from cocoon.config import Config
from cocoon.errors import ConfigError, StateError
from cocoon.serve import auth
from cocoon.serve.app import BodyLimit, make_app, tagged
from cocoon.serve.service import MAX_PAYLOAD, Service, state_dir

log = logging.getLogger(__name__)

#: Seconds requests in flight get to finish once the service is told to stop.
GRACE_S = 5.0


def socket_path(cfg: Config) -> Path:
    return Path(cfg.serve.socket) if cfg.serve.socket else cfg.root / "serve.sock"


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) for the TCP listener."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(text)
    except ValueError:
        raise ConfigError(f"--listen {text[:80]!r}: use IP:PORT, e.g. 127.0.0.1:8700") from None
    return host, int(port)


def _unix_socket(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        # A socket nobody answers on is a dead service's; a live one is refused.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        else:
            raise StateError(f"{path}: another `cocoon serve` is listening there")
        finally:
            probe.close()
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(512)
    return s


def _tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    s.listen(512)
    return s


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service has two listeners
    and its own shutdown, so signals are ours."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.contextmanager
def _lock(state: Path) -> Iterator[None]:
    """One service per state dir (the database, the instances)."""
    import fcntl

    fd = os.open(state / "serve.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(f"another `cocoon serve` uses {state}") from None
        yield
    finally:
        os.close(fd)


def serve(cfg: Config, listen: str, say: Callable[[str], None]) -> None:
    """Run the service until SIGTERM/SIGINT; ``say`` prints its few lines.
    Its state dir is locked and its listeners bound before anything is
    touched: a second service on either is refused and changes nothing."""
    tcp = parse_listen(listen) if listen else None
    state = state_dir(cfg)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _lock(state):
        path = socket_path(cfg)
        listeners: list[tuple[Literal["unix", "tcp"], socket.socket]] = []
        if tcp:  # first: a port in use then leaves no socket file behind
            listeners.append(("tcp", _tcp_socket(*tcp)))
        try:
            listeners.insert(0, ("unix", _unix_socket(path)))
        except BaseException:
            for _, sock in listeners:
                sock.close()
            raise
        try:
            service = Service(cfg)
            token_file = service.dir / "admin.token"
            if auth.ensure_admin_token(service.store, token_file):
                say(f"admin token written to {token_file} (0600)")
            failed, removed = service.recover()
            if failed or removed:
                say(f"recovered: {failed} unfinished invocation(s) marked failed, "
                    f"{removed} instance(s) removed")  # fmt: skip
            asyncio.run(_main(cfg, service, listeners, path, say))
        finally:
            for _, sock in listeners:
                sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


async def _main(
    cfg: Config,
    service: Service,
    listeners: list[tuple[Literal["unix", "tcp"], socket.socket]],
    path: Path,
    say: Callable[[str], None],
) -> None:
    limit = max(MAX_PAYLOAD, cfg.serve.max_code_bytes * 4 // 3 + (1 << 20))
    app = BodyLimit(make_app(service), limit)
    servers = []
    for kind, sock in listeners:
        config = uvicorn.Config(
            tagged(app, kind),
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=int(GRACE_S),
        )
        servers.append((_Server(config), sock))
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for srv, _ in servers:
            srv.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    await service.start()
    assert service.instances is not None
    reaper = loop.create_task(service.instances.reap_idle(), name="keep-alive")
    where = [str(path)]
    for kind, sock in listeners:
        if kind == "tcp":
            host, port = sock.getsockname()[:2]
            where.append(f"http://{f'[{host}]' if ':' in host else host}:{port}")
    say("listening on " + " and ".join(where))
    try:
        await asyncio.gather(*(srv.serve(sockets=[sock]) for srv, sock in servers))
    finally:
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        await service.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        say("stopped: every instance removed")
