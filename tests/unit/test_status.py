"""A container's status: what each allows, and how the records read it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cocoon.errors import IllegalTransition, StateError
from cocoon.runtime.records import ContainerDir
from cocoon.runtime.status import LIVE, TABLE, Op, Status, allows, check, current


def test_the_table_moves_only_along_its_rows() -> None:
    assert check(Status.CREATED, Op.START) is Status.RUNNING
    assert check(Status.RUNNING, Op.PAUSE) is Status.PAUSED
    assert check(Status.PAUSED, Op.RESUME) is Status.RUNNING
    assert check(Status.PAUSED, Op.EXIT) is Status.EXITED
    assert check(Status.RUNNING, Op.EXEC) is Status.RUNNING
    assert set(TABLE) == set(Op)
    for op, (allowed, after) in TABLE.items():
        assert Status.EXITED not in allowed or op is Op.DELETE
        assert after is None or after != Status.DEAD


@pytest.mark.parametrize(
    ("status", "op"),
    [(Status.RUNNING, Op.START), (Status.PAUSED, Op.EXEC), (Status.EXITED, Op.SIGNAL),
     (Status.DEAD, Op.RESUME), (Status.RUNNING, Op.DELETE)],
)  # fmt: skip
def test_an_illegal_transition_raises_exit_1(status: Status, op: Op) -> None:
    assert not allows(status, op)
    with pytest.raises(IllegalTransition) as e:
        check(status, op)
    assert str(e.value) == f"the container is {status}"
    assert (e.value.exit_code, e.value.status, e.value.op) == (1, status, op)
    with pytest.raises(IllegalTransition, match="^cannot$"):
        check(status, op, "cannot")


def test_a_life_nobody_holds_is_dead_and_an_exit_needs_no_lock_probe() -> None:
    def probe() -> bool:
        raise AssertionError("no probe for an ended container")

    assert current(Status.EXITED, probe) is Status.EXITED
    assert current(Status.RUNNING, lambda: False) is Status.DEAD
    assert current(Status.PAUSED, lambda: True) is Status.PAUSED
    assert {Status.CREATED, Status.RUNNING, Status.PAUSED} == LIVE


@pytest.mark.parametrize("bad", ["dead", "stopped", ["running"], 3])
def test_a_status_not_written_by_a_monitor_is_corrupt(tmp_path: Path, bad: object) -> None:
    d = ContainerDir(tmp_path, "a" * 64)
    d.path.mkdir()
    (d.path / "state.json").write_text(json.dumps({"status": bad}))
    with pytest.raises(StateError, match="is corrupt"):
        d.state()
    (d.path / "state.json").write_text(json.dumps({"status": "paused"}))
    assert d.state().status is Status.PAUSED
    assert d.status() is Status.DEAD  # nobody holds its life lock
