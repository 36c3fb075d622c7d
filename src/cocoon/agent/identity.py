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
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write(msg.hostname)
        with open(MACHINE_ID + ".tmp", "w") as f:
            f.write(msg.machine_id + "\n")
        os.replace(MACHINE_ID + ".tmp", MACHINE_ID)
    except OSError as e:
        raise RemoteError("identity", f"hostname or machine-id: {e.strerror}") from None
    if msg.macs:
        _rename_macs(msg.macs)
    return messages.Ok()


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
