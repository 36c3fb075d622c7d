"""Turn a clone into a machine of its own (the Identity request).

A sandbox restored from a template wakes up with the template's kernel RNG
state, hostname and NIC MACs, byte for byte the same as every other clone.
Before any user code runs, the host's entropy is mixed into the pool and the
CRNG is forced to reseed from it (RNDADDENTROPY + RNDRESEEDCRNG, as Firecracker
documents for its snapshots), so two clones never read the same /dev/urandom
bytes. The kernel's boot_id is left alone on purpose: nothing in the template
reads it, so each clone draws it fresh from its reseeded pool on first read.
"""

from __future__ import annotations

import fcntl
import os
import struct

from cocoon.agent import network
from cocoon.agent.netlink import Netlink
from cocoon.agent.session import RemoteError
from cocoon.protocol import messages

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MACHINE_ID = "/run/machine-id"


def apply(msg: messages.Identity) -> messages.Ok:
    seed = bytes.fromhex(msg.entropy)
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        try:
            # struct rand_pool_info: entropy_count (bits), buf_size (bytes), buf.
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
    except OSError as e:
        raise RemoteError("identity", f"reseeding the RNG: {e.strerror}") from None
    try:
        _write("/proc/sys/kernel/hostname", msg.hostname.encode(), os.O_WRONLY)
        # In place: nothing in the guest reads it before this request's reply.
        _write(MACHINE_ID, (msg.machine_id + "\n").encode(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    except OSError as e:
        raise RemoteError("identity", f"hostname or machine-id: {e.strerror}") from None
    if msg.macs:
        _rename_macs(msg.macs)
    return messages.Ok()


def _write(path: str, data: bytes, flags: int) -> None:
    """One write through a bare fd: a text file object's layers are code a
    clone has not run yet when this runs, on its restore's path (TCG
    translates each anew)."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _rename_macs(pairs: list[str]) -> None:
    links = network.links_by_mac()
    try:
        with Netlink() as nl:
            for pair in pairs:
                old, _, new = pair.partition("=")
                found = links.get(old)
                if found is None:
                    raise RemoteError("identity", f"no NIC with MAC {old}")
                nl.set_link(found[1], mac=new, up=False)
    except OSError as e:
        raise RemoteError("identity", f"setting a NIC's MAC: {e.strerror or e}") from None
