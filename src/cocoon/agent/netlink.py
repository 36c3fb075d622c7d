"""Just enough rtnetlink for the agent to configure NICs in a few syscalls.

Spawning busybox ``ip`` once per link, address and route cost ~0.1 s each
under TCG (fork + exec + a static binary's start-up); a netlink request is a
sendmsg. Only the four requests the network setup needs are here, each
acknowledged (NLM_F_ACK) so a refusal becomes the kernel's errno.
"""

from __future__ import annotations

import _socket  # not `socket`: its import costs ~30 ms of boot under TCG
import os
import struct

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWNEIGH = 16, 20, 24, 28
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_REPLACE = 1, 4, 0x200, 0x400, 0x100
IFF_UP = 1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RTN_UNICAST = 254, 3, 0, 253, 1


class NetlinkError(OSError):
    pass


def _attr(kind: int, data: bytes) -> bytes:
    body = struct.pack("HH", 4 + len(data), kind) + data
    return body + b"\0" * (-len(body) % 4)


def _family(addr: str) -> int:
    return _socket.AF_INET6 if ":" in addr else _socket.AF_INET


def _pton(addr: str) -> bytes:
    return _socket.inet_pton(_family(addr), addr)


class Netlink:
    def __init__(self) -> None:
        self.sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW, NETLINK_ROUTE)
        self.sock.settimeout(10)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, kind: int, flags: int, body: bytes) -> None:
        self.seq += 1
        hdr = struct.pack("IHHII", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags,
                          self.seq, 0)  # fmt: skip
        self.sock.send(hdr + body)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _, seq, _ = struct.unpack_from("IHHII", data, off)
                if length < 16:
                    raise NetlinkError(0, "malformed netlink reply")
                if mtype == NLMSG_ERROR and seq == self.seq:
                    (err,) = struct.unpack_from("i", data, off + 16)
                    if err:
                        raise NetlinkError(-err, os.strerror(-err))
                    return
                off += (length + 3) & ~3

    def set_link(
        self, index: int, *, name: str = "", mtu: int = 0, up: bool = True, mac: str = ""
    ) -> None:
        body = struct.pack("BxHiII", _socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP)
        if mac:
            body += _attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        if name:
            body += _attr(IFLA_IFNAME, name.encode() + b"\0")
        if mtu:
            body += _attr(IFLA_MTU, struct.pack("I", mtu))
        self._request(RTM_NEWLINK, 0, body)

    def add_address(self, index: int, cidr: str) -> None:
        addr, _, plen = cidr.partition("/")
        fam = _family(addr)
        flags = IFA_F_NODAD if fam == _socket.AF_INET6 else 0
        body = struct.pack("BBBBi", fam, int(plen), flags, RT_SCOPE_UNIVERSE, index)
        raw = _pton(addr)
        body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)

    def add_route(self, index: int, dest: str, gateway: str) -> None:
        fam = _family(gateway or dest)
        if dest == "default":
            net, plen = "", 0
        else:
            net, _, p = dest.partition("/")
            plen = int(p)
        scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
        body = struct.pack("BBBBBBBBI", fam, plen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope,
                           RTN_UNICAST, 0)  # fmt: skip
        if net:
            body += _attr(RTA_DST, _pton(net))
        if gateway:
            body += _attr(RTA_GATEWAY, _pton(gateway))
        body += _attr(RTA_OIF, struct.pack("i", index))
        self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)

    def set_neighbor(self, index: int, address: str, mac: str) -> None:
        body = struct.pack("BxxxiHBB", _family(address), index, NUD_PERMANENT, 0, 0)
        body += _attr(NDA_DST, _pton(address))
        body += _attr(NDA_LLADDR, bytes(int(x, 16) for x in mac.split(":")))
        self._request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)
