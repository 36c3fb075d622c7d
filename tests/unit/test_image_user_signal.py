"""An image config's User and StopSignal: untrusted text that reached int() unchecked."""

from __future__ import annotations

import json

import pytest

from cocoon.errors import StateError
from cocoon.images.manifest import parse_config
from cocoon.oci.spec import parse_user
from cocoon.runtime.lifecycle import parse_signal


def config(user: str, stop_signal: str) -> bytes:
    return json.dumps(
        {"config": {"User": user, "StopSignal": stop_signal, "Cmd": ["sh"]}, "rootfs": {}}
    ).encode()


@pytest.mark.parametrize(
    "user, ids",
    [
        ("1000:1001", (1000, 1001)),
        ("app", (0, 0)),  # a name: the agent resolves it in the image
        ("²", (0, 0)),  # issue 19: "²".isdigit() but int("²") raised ValueError
        ("٣:²", (0, 0)),
        ("4294967295", (0, 0)),  # (uid_t)-1 is no uid
        ("9" * 5000, (0, 0)),  # beyond int()'s digit limit
    ],
)
def test_user_is_numeric_only_in_ascii_and_range(user: str, ids: tuple[int, int]) -> None:
    assert parse_user(parse_config(config(user, "")).user) == ids


@pytest.mark.parametrize("sig", ["²", "SIG²", "65", "0", "9" * 5000, "NOPE"])
def test_bad_stop_signal_is_a_state_error(sig: str) -> None:
    with pytest.raises(StateError, match="invalid signal"):
        parse_signal(parse_config(config("", sig)).stop_signal)


@pytest.mark.parametrize("sig, num", [("9", 9), ("kill", 9), ("SIGQUIT", 3), (" term ", 15)])
def test_signal_forms(sig: str, num: int) -> None:
    assert parse_signal(sig) == num
