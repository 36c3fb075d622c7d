"""Frames and messages: every field the peer sends is checked."""

from __future__ import annotations

import pytest

from cocoon.protocol import framing, messages
from cocoon.protocol.framing import FrameError, Kind


def test_frame_roundtrip() -> None:
    frame = framing.encode(Kind.DATA, 7, b"abc")
    kind, chan, length = framing.decode_header(frame[: framing.HEADER_SIZE])
    assert (kind, chan, length) == (Kind.DATA, 7, 3)
    assert frame[framing.HEADER_SIZE :] == b"abc"


@pytest.mark.parametrize(
    "header, why",
    [
        (b"XX" + bytes(10), "bad magic"),
        (framing.HEADER.pack(b"CO", 99, 0, 1, 0), "unknown frame kind"),
        (framing.HEADER.pack(b"CO", 1, 1, 1, 0), "reserved flags"),
        (framing.HEADER.pack(b"CO", 2, 0, 1, framing.MAX_FRAME + 1), "exceeds"),
        (framing.HEADER.pack(b"CO", 5, 0, 1, 3), "EOF frame with a payload"),
        (framing.HEADER.pack(b"CO", 6, 0, 1, 8), "CREDIT frame"),
    ],
)
def test_bad_headers_are_refused(header: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        framing.decode_header(header)


def test_encode_refuses_oversize() -> None:
    with pytest.raises(FrameError):
        framing.encode(Kind.REPLY, 1, bytes(framing.MAX_FRAME + 1))


def test_credit_bounded() -> None:
    with pytest.raises(FrameError):
        framing.decode_credit(framing.CREDIT.pack(framing.STREAM_WINDOW + 1))


def test_message_roundtrip_nested() -> None:
    msg = messages.CreateContainer(
        "c1", "/run/rootfs", "{}", messages.StdioSpec(0, 1, 2, False, 24, 80)
    )
    assert messages.decode(messages.encode(msg)) == msg
    stats = messages.StatsReply(
        1, 2, 3, 4, 5, 6, [messages.NetStats("eth0", 1, 2, 3, 4)], 7, 8, 9, 10, 11
    )
    assert messages.decode(messages.encode(stats)) == stats


def test_messages_are_immutable() -> None:
    m = messages.Hello(1, 2)
    with pytest.raises(AttributeError):
        m.time_ns = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "body, why",
    [
        (b"\xff\xfe", "not valid JSON"),
        (b'{"type": "ok", "x": ' + b"[" * 5 + b"]" * 5 + b"}", "nested 6 deep, more than the 4"),
        (b'{"type": "hello", "protocol_version": NaN, "time_ns": 0}', "NaN is not a JSON number"),
        (b"[]", "not an object"),
        (b'{"type": "nope"}', "unknown message type"),
        (b'{"type": "ping", "extra": 1}', "unexpected field"),
        (b'{"type": "hello", "protocol_version": 1}', "missing field"),
        (b'{"type": "hello", "protocol_version": "1", "time_ns": 0}', "expected int"),
        (b'{"type": "hello", "protocol_version": true, "time_ns": 0}', "expected int"),
        (b'{"type": "hello", "protocol_version": 1, "time_ns": 1e400}', "out of range"),
        # An int too large for a float field overflowed float() (OverflowError escaped).
        (
            b'{"type":"guest_details_reply","kernel_release":"","kernel_version":"","machine":"",'
            b'"cpus":1,"mem_total_kib":1,"uptime_s":1' + b"0" * 400 + b',"agent_version":"",'
            b'"cgroup_version":2,"mounts":[]}',
            "uptime_s: number out of range",
        ),
        (
            b'{"type":"process_exited","exit_code":300,"signal":0,"oom_killed":false}',
            "outside",
        ),
        (b'{"type":"wait_process","container_id":"../x","exec_id":""}', "invalid container id"),
        (
            b'{"type":"mount","kind":"block","source":"s","target":"/a/../b","fstype":"",'
            b'"options":[],"readonly":false}',
            "must not contain",
        ),
        (
            b'{"type":"mount","kind":"nfs","source":"s","target":"/a","fstype":"",'
            b'"options":[],"readonly":false}',
            "unknown mount kind",
        ),
        (b'{"type":"process_list","pids":[[1]]}', "expected int"),
    ],
)
def test_hostile_messages_are_refused(body: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        messages.decode(body)


def test_list_length_bounded() -> None:
    body = b'{"type":"process_list","pids":[' + b",".join([b"1"] * 5000) + b"]}"
    with pytest.raises(ValueError, match="list too long"):
        messages.decode(body)


def test_expect_restricts_type() -> None:
    with pytest.raises(ValueError, match="expected"):
        messages.decode(messages.encode(messages.Ok()), (messages.HelloReply,))


@pytest.mark.parametrize(
    "msg, why",
    [
        (messages.WaitProcess("../x", ""), "invalid container id"),
        # A regex's `$` matches before a final newline: every field is matched whole.
        (messages.WaitProcess("c1\n", ""), "invalid container id"),
        (messages.Identity("ab" * 32, "box\n", "0" * 32, []), "bad hostname"),
        (messages.ResizeTty("c1", "", 0, 80), "rows 0 outside"),
        (messages.ProcessExited(300, 0, False), "exit code 300 outside"),
        (messages.Mount("nfs", "s", "/a", "", [], False), "unknown mount kind"),
        (messages.Unmount("/a/../b"), "must not contain"),
        # Nested: a bad stream id inside the create request.
        (
            messages.CreateContainer("c1", "/r", "{}", messages.StdioSpec(-1, 0, 0, False, 0, 0)),
            "stream id -1 outside",
        ),
        # Between fields: a route on a NIC the message does not configure.
        (
            messages.ConfigureNetwork(
                [messages.NetInterface("eth0", "02:cc:00:00:00:01", 1500, [])],
                [messages.NetRoute("default", "", "eth1")],
                [],
                "",
                "",
                "",
                [],
            ),
            "unknown interface",
        ),
    ],
)
def test_check_applies_the_decoders_rules(msg: messages.Message, why: str) -> None:
    """A message built on this side is checked by the same field types as one decoded."""
    with pytest.raises(ValueError, match=why):
        msg.check()
    with pytest.raises(ValueError, match=why):
        messages.decode(messages.encode(msg))


def test_every_field_type_is_plain_a_message_or_a_kind() -> None:
    """A field's annotation is its check: each names a type the decoder knows."""
    plain = {"bool", "int", "float", "str"}
    classes = {c.__name__ for c in messages.REGISTRY.values()}
    for cls in messages.REGISTRY.values():
        for name, tp in cls.FIELDS:
            while tp.startswith("list["):
                tp = tp[5:-1]
            known = tp in plain or tp in messages.KINDS or tp in classes
            assert known, f"{cls.TYPE}.{name}: {tp}"
