"""``-p HOST:CTR``: a host port relayed to the container's address on the bridge.

The container's monitor listens on the host port and relays each connection
(or UDP flow) to the container, like docker's userland proxy. That works for
the host's loopback, which DNAT rules cannot reach without turning on
``route_localnet`` for the whole host, and it dies with the monitor: there is
no rule to leak when anything crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from cocoon.errors import NetworkError
from cocoon.util.tasks import TaskSet

PORT_RE = re.compile(
    r"^(?:(?P<ip>\[[0-9a-fA-F:.]+\]|\d+\.\d+\.\d+\.\d+):)?(?:(?P<host>\d*):)?(?P<ctr>\d+)(?:/(?P<proto>tcp|udp))?$"
)
BUF = 256 << 10
UDP_IDLE_S = 60.0
MAX_UDP_FLOWS = 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PortSpec:
    host_ip: str
    host_port: int  # 0 = any free port
    ctr_port: int
    proto: str = "tcp"

    def __str__(self) -> str:
        ip = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip
        return f"{ip}:{self.host_port}->{self.ctr_port}/{self.proto}"


def parse(text: str) -> PortSpec:
    """docker's forms: CTR, HOST:CTR, IP:HOST:CTR, IP::CTR, each with /tcp or /udp."""
    m = PORT_RE.match(text.strip())
    if not m:
        raise NetworkError(f"bad -p {text!r}: use [IP:]HOST:CTR[/udp] or CTR")
    ip = (m.group("ip") or "0.0.0.0").strip("[]")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise NetworkError(f"bad -p {text!r}: {ip} is not an IP address") from None
    host = int(m.group("host") or 0)
    ctr = int(m.group("ctr"))
    if not 0 <= host <= 65535 or not 1 <= ctr <= 65535:
        raise NetworkError(f"bad -p {text!r}: ports are 1-65535")
    return PortSpec(ip, host, ctr, m.group("proto") or "tcp")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUF):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class _UdpRelay(asyncio.DatagramProtocol):
    """One host socket; one upstream socket per client address, dropped when idle."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: dict[tuple[str, int], tuple[asyncio.DatagramTransport, float]] = {}
        #: Datagrams on their way up (a new flow's socket is being opened).
        self._forwards = TaskSet(log)
        self._name = f"udp relay to {target[0]}:{target[1]}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._forwards.spawn(self._forward(data, addr), self._name)

    async def _forward(self, data: bytes, addr: tuple[str, int]) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            if len(self.flows) >= MAX_UDP_FLOWS:
                self._expire(force=True)
            relay = self

            class Back(asyncio.DatagramProtocol):
                def datagram_received(self, reply: bytes, _a: tuple[str, int]) -> None:
                    if relay.transport is not None:
                        relay.transport.sendto(reply, addr)

            loop = asyncio.get_running_loop()
            try:
                up, _ = await loop.create_datagram_endpoint(Back, remote_addr=self.target)
            except OSError:
                return
            flow = (up, 0.0)
        self.flows[addr] = (flow[0], time.monotonic())
        flow[0].sendto(data)
        self._expire()

    def _expire(self, force: bool = False) -> None:
        now = time.monotonic()
        for a, (t, seen) in list(self.flows.items()):
            if force or now - seen > UDP_IDLE_S:
                t.close()
                del self.flows[a]
                force = False

    def close(self) -> None:
        self._forwards.cancel()
        for t, _ in self.flows.values():
            t.close()
        self.flows.clear()


def _factory(relay: _UdpRelay) -> Callable[[], _UdpRelay]:
    return lambda: relay


class Publisher:
    """The listening sockets of one container's published ports."""

    def __init__(self) -> None:
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: list[tuple[asyncio.DatagramTransport, _UdpRelay]] = []
        self.bound: list[PortSpec] = []

    async def publish(self, specs: list[PortSpec], ctr_ip: str) -> None:
        loop = asyncio.get_running_loop()
        for s in specs:
            target = (ctr_ip, s.ctr_port)
            try:
                if s.proto == "tcp":

                    async def handle(
                        r: asyncio.StreamReader,
                        w: asyncio.StreamWriter,
                        target: tuple[str, int] = target,
                    ) -> None:
                        try:
                            ur, uw = await asyncio.wait_for(asyncio.open_connection(*target), 10)
                        except (OSError, TimeoutError):
                            w.transport.abort()
                            return
                        await asyncio.gather(_pipe(r, uw), _pipe(ur, w))
                        for x in (w, uw):
                            x.close()

                    srv = await asyncio.start_server(
                        handle, s.host_ip, s.host_port, reuse_address=True
                    )
                    self._servers.append(srv)
                    port = srv.sockets[0].getsockname()[1]
                else:
                    relay = _UdpRelay(target)
                    tr, _ = await loop.create_datagram_endpoint(
                        _factory(relay), local_addr=(s.host_ip, s.host_port)
                    )
                    self._udp.append((tr, relay))
                    port = tr.get_extra_info("sockname")[1]
            except OSError as e:
                self.close()
                raise NetworkError(
                    f"cannot publish {s.host_ip}:{s.host_port}/{s.proto}: {e.strerror}"
                ) from e
            self.bound.append(PortSpec(s.host_ip, port, s.ctr_port, s.proto))

    def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for tr, relay in self._udp:
            relay.close()
            with contextlib.suppress(Exception):
                tr.close()
        self._servers.clear()
        self._udp.clear()
