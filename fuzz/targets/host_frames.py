"""The host's decoding of what a guest writes: frame headers, then each payload
as ``protocol/session.py``'s ``_dispatch`` decodes it (REPLY/REQUEST bodies,
ERROR bodies, CREDIT). Synchronous and fast; ``host_session`` runs the whole
asyncio session on the same kind of input."""

from __future__ import annotations

from cocoon.protocol import framing, messages
from cocoon.protocol.framing import Kind
from targets._frames import SAMPLES, mutate_frames, stream

#: FrameError and the message decoder's ValueError: the session turns both into
#: "protocol violation"/"invalid message" and fails.
EXPECTED: tuple[type[BaseException], ...] = (ValueError,)

mutate = mutate_frames


def run(data: bytes) -> None:
    pos = 0
    while pos < len(data):
        kind, _, length = framing.decode_header(data[pos : pos + framing.HEADER_SIZE])
        payload = data[pos + framing.HEADER_SIZE : pos + framing.HEADER_SIZE + length]
        if len(payload) != length:
            raise framing.FrameError("stream ended inside a frame")
        pos += framing.HEADER_SIZE + length
        if kind is Kind.ERROR:
            messages.decode(payload, (messages.ErrorReply,))
        elif kind in (Kind.REPLY, Kind.REQUEST):
            messages.decode(payload)
        elif kind is Kind.CREDIT:
            framing.decode_credit(payload)


def seeds() -> list[bytes]:
    return [
        stream([(Kind.REPLY, i + 1, msg)]) for i, msg in enumerate(SAMPLES)
    ] + [
        stream([
            (Kind.REPLY, 1, messages.Ok()),
            (Kind.ERROR, 2, messages.ErrorReply("crun_failed", "exit 1")),
            (Kind.DATA, 5, b"hello"),
            (Kind.EOF, 5, b""),
            (Kind.CREDIT, 7, framing.CREDIT.pack(4096)),
        ]),
    ]  # fmt: skip
