"""Frames on the host<->guest byte stream (virtio-serial or vsock).

The channel is one ordered byte stream, so frames carry their own length and a
channel id; that is what multiplexes concurrent requests and process streams.
Every limit here is enforced on decode: the peer (the guest, for the host) is
hostile, and a length field is the first thing a hostile peer lies about.

Layout, big-endian, 12-byte header then payload::

    magic  2s  b"CO"
    kind   B   Kind
    flags  B   0 (reserved; non-zero is a protocol error)
    chan   I   request id (REQUEST/REPLY/ERROR) or stream id (DATA/EOF/CREDIT)
    length I   payload bytes, <= MAX_FRAME
"""

from __future__ import annotations

import enum
import struct

MAGIC = b"CO"
HEADER = struct.Struct(">2sBBII")
HEADER_SIZE = HEADER.size

#: Upper bound of any payload. Control messages are far smaller; a request that
#: needs more (an OCI spec) is refused rather than chunked.
MAX_FRAME = 1 << 20
#: Largest DATA payload either side sends; receivers accept up to MAX_FRAME.
MAX_DATA = 64 << 10
#: Bytes a stream sender may have in flight before the receiver grants more.
#: Bounds what one slow consumer can make the other side buffer.
STREAM_WINDOW = 1 << 20
MAX_CHAN = 0xFFFFFFFF


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3
    DATA = 4
    EOF = 5
    CREDIT = 6


class FrameError(ValueError):
    """The byte stream is not a valid frame sequence; the channel is dead."""


def encode(kind: Kind, chan: int, payload: bytes = b"") -> bytes:
    if not 0 <= chan <= MAX_CHAN:
        raise FrameError(f"channel id {chan} out of range")
    if len(payload) > MAX_FRAME:
        raise FrameError(f"payload {len(payload)} B > {MAX_FRAME}")
    return HEADER.pack(MAGIC, kind, 0, chan, len(payload)) + payload


#: Kind by value: a dict lookup instead of the Enum's call (pure Python,
#: and on the path of every frame).
_KINDS = {k.value: k for k in Kind}


def decode_header(header: bytes, max_frame: int = MAX_FRAME) -> tuple[Kind, int, int]:
    """Return (kind, chan, length) or raise FrameError; never trusts a field."""
    if len(header) != HEADER_SIZE:
        raise FrameError(f"short header ({len(header)} B)")
    magic, kind, flags, chan, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: the peer is not speaking the cocoon protocol")
    k = _KINDS.get(kind)
    if k is None:
        raise FrameError(f"unknown frame kind {kind}")
    if flags != 0:
        raise FrameError(f"reserved flags set ({flags:#x})")
    if length > max_frame:
        raise FrameError(f"frame of {length} B exceeds the {max_frame} B limit")
    if k is Kind.EOF and length != 0:
        raise FrameError("EOF frame with a payload")
    if k is Kind.CREDIT and length != 4:
        raise FrameError("CREDIT frame payload must be 4 bytes")
    return k, chan, length


CREDIT = struct.Struct(">I")


def encode_credit(chan: int, nbytes: int) -> bytes:
    return encode(Kind.CREDIT, chan, CREDIT.pack(nbytes))


def decode_credit(payload: bytes) -> int:
    (n,) = CREDIT.unpack(payload)
    if n > STREAM_WINDOW:
        raise FrameError(f"credit {n} B larger than the stream window")
    return int(n)
