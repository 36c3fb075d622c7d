"""Shared by the protocol targets: sample messages, frame streams, frame-aware mutation.

A byte mutation of a frame stream mostly breaks a length field, which the
frame layer refuses at once; so the protocol targets' ``mutate`` edits the
frames (a payload's JSON, a header field, their order) and writes the length
fields back as they now are, most of the time.
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass, replace

import mutate
from cocoon.oci.spec import default_spec
from cocoon.protocol import framing
from cocoon.protocol import messages as m
from cocoon.protocol.framing import Kind

MAC = "52:54:00:12:34:56"
STDIO = m.StdioSpec(1, 2, 3, False, 24, 80)

#: One valid instance of (nearly) every message, both directions.
SAMPLES: list[m.Message] = [
    m.Hello(m.PROTOCOL_VERSION, 1_700_000_000_000_000_000),
    m.Identity("ab" * 32, "box", "0" * 32, [f"{MAC}=52:54:00:12:34:57"]),
    m.HelloReply(m.PROTOCOL_VERSION, "0.1.0", "6.1.0"),
    m.Ping(),
    m.Ok(),
    m.GuestDetails(),
    m.GuestDetailsReply("6.1.0", "#1 SMP", "x86_64", 2, 262144, 1.5, "0.1.0", 2, ["/ erofs"]),
    m.Mount("block", "img0", "/run/cocoon/img", "erofs", ["noatime"], True),
    m.Unmount("/run/cocoon/img"),
    m.CreateContainer("c1", "/run/cocoon/rootfs", json.dumps(default_spec(["sh"])), STDIO),
    m.ProcessStarted(42),
    m.StartContainer("c1"),
    m.ExecProcess("c1", "e1", json.dumps({"args": ["ls"], "cwd": "/"}), STDIO),
    m.SignalProcess("c1", "", 15, False),
    m.WaitProcess("c1", "e1"),
    m.ProcessExited(137, 9, True),
    m.ResizeTty("c1", "", 50, 132),
    m.DeleteContainer("c1"),
    m.ListProcesses("c1"),
    m.ProcessList([1, 7, 42]),
    m.PauseContainer("c1"),
    m.ResumeContainer("c1"),
    m.UpdateResources("c1", json.dumps({"memory": {"limit": 1 << 28}})),
    m.Top("c1"),
    m.TopReply([m.ProcessInfo(1, "root", 120, "sh -c sleep 1")]),
    m.Stats("c1"),
    m.StatsReply(
        1000,
        1 << 20,
        1 << 28,
        3,
        4096,
        8192,
        [m.NetStats("eth0", 1, 2, 3, 4)],
        1 << 19,
        1 << 18,
        1 << 17,
        90,
        2,
    ),
    m.Shutdown(),
    m.ErrorReply("not_found", "no such container"),
    m.ConfigureNetwork(
        [m.NetInterface("eth0", MAC, 1500, ["10.88.0.2/16", "fd00::2/64"])],
        [m.NetRoute("default", "10.88.0.1", "eth0")],
        [m.NetNeighbor("10.88.0.1", MAC, "eth0")],
        "127.0.0.1 localhost\n",
        "nameserver 10.88.0.1\n",
        "box",
        ["net.ipv4.ip_forward=1"],
    ),
    m.AddContainer("/run/cocoon/c2", "c2", "/run/cocoon/pod/c2", False),
    m.Attach(STDIO, True),
]

HEADER = framing.HEADER


def frame(kind: int, chan: int, payload: bytes, flags: int = 0, length: int | None = None) -> bytes:
    """A frame as a peer may write it: any field, any length claim."""
    n = len(payload) if length is None else length
    return HEADER.pack(framing.MAGIC, kind & 0xFF, flags & 0xFF, chan & 0xFFFFFFFF, n) + payload


@dataclass
class Frame:
    kind: int
    flags: int
    chan: int
    payload: bytes


def split(data: bytes) -> list[Frame]:
    """The frames of a stream, leniently (a short tail becomes one more frame)."""
    out: list[Frame] = []
    pos = 0
    while pos + HEADER.size <= len(data):
        _, kind, flags, chan, n = HEADER.unpack_from(data, pos)
        body = data[pos + HEADER.size : pos + HEADER.size + n]
        out.append(Frame(kind, flags, chan, body))
        pos += HEADER.size + len(body)
    if pos < len(data):
        out.append(Frame(Kind.DATA, 0, 1, data[pos:]))
    return out


def join(frames: list[Frame]) -> bytes:
    return b"".join(frame(f.kind, f.chan, f.payload, f.flags) for f in frames)


def stream(kinds_and_messages: list[tuple[Kind, int, m.Message | bytes]]) -> bytes:
    out = b""
    for kind, chan, msg in kinds_and_messages:
        payload = msg if isinstance(msg, bytes) else m.encode(msg)
        out += frame(kind, chan, payload)
    return out


def mutate_frames(data: bytes, rng: random.Random, pool: mutate.Pool) -> bytes | None:
    frames = split(data)
    if not frames:
        return None
    i = rng.randrange(len(frames))
    op = rng.randrange(8)
    f = frames[i]
    if op <= 3:  # the payload's JSON (or bytes)
        f.payload = mutate.mutate_json(f.payload, rng, pool) or mutate.mutate_bytes(f.payload, rng)
    elif op == 4:  # a header field
        value = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 255, rng.randrange(1 << 16)))
        setattr(f, rng.choice(("kind", "flags", "chan")), value)
    elif op == 5:
        frames.insert(rng.randrange(len(frames) + 1), replace(f))
    elif op == 6 and len(frames) > 1:
        del frames[i]
    else:
        kind = rng.choice((Kind.REQUEST, Kind.REPLY, Kind.ERROR))
        new = Frame(kind, 0, rng.choice((1, 2, 3)), m.encode(rng.choice(SAMPLES)))
        frames.insert(rng.randrange(len(frames) + 1), new)
    out = join(frames)
    if rng.random() < 0.1:  # a length that lies
        pos = rng.randrange(len(out) // HEADER.size + 1) * HEADER.size
        if pos + HEADER.size <= len(out):
            out = (
                out[: pos + 8]
                + struct.pack(">I", rng.choice((0, 1, 1 << 20, 1 << 31)))
                + out[pos + 12 :]
            )
    return out
