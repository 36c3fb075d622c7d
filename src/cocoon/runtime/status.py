"""A container's status, and the one table of what each status allows.

Every front end checks a request against this table before it asks a
container's monitor, and the monitor, which owns the container and is the
only writer of its status, checks it again when it carries the request out:
so no front end can decide on its own that a paused container may be exec'd
in, and no status changes but by a row of the table.

On disk (state.json's ``status``) a container is created, running, paused or
exited. ``dead`` is never written: it is what a record that claims a life
reads as when no monitor holds it any more (killed, crashed), until `rm` or
`delete` removes it. runc's states (creating, created, running, paused,
stopped) are another view of these (runtime.ocistore).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from cocoon.errors import IllegalTransition


class Status(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    DEAD = "dead"


#: What state.json may say (the monitor writes no other).
ON_DISK = frozenset({Status.CREATED, Status.RUNNING, Status.PAUSED, Status.EXITED})
#: A container whose init has not ended: it can still be signalled, and it will exit.
LIVE = frozenset({Status.CREATED, Status.RUNNING, Status.PAUSED})


class Op(StrEnum):
    """What can be asked of a container."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    #: Its init ended, or its VM did.
    EXIT = "exit"
    SIGNAL = "signal"
    EXEC = "exec"
    STATS = "stats"
    TOP = "top"
    #: A pod's further container joins the VM of the pod's sandbox container.
    JOIN = "join"
    #: Deleting it without force.
    DELETE = "delete"


#: op -> (the statuses it may be asked in, the status it leads to; None: it stays).
TABLE: dict[Op, tuple[frozenset[Status], Status | None]] = {
    Op.START: (frozenset({Status.CREATED}), Status.RUNNING),
    Op.PAUSE: (frozenset({Status.RUNNING}), Status.PAUSED),
    Op.RESUME: (frozenset({Status.PAUSED}), Status.RUNNING),
    Op.EXIT: (LIVE, Status.EXITED),
    Op.SIGNAL: (LIVE, None),
    Op.EXEC: (frozenset({Status.RUNNING}), None),
    Op.STATS: (frozenset({Status.RUNNING}), None),
    Op.TOP: (frozenset({Status.RUNNING}), None),
    Op.JOIN: (frozenset({Status.CREATED, Status.RUNNING}), None),
    Op.DELETE: (frozenset({Status.CREATED, Status.EXITED, Status.DEAD}), None),
}


def allows(status: Status, op: Op) -> bool:
    return status in TABLE[op][0]


def check(status: Status, op: Op, refusal: str = "") -> Status:
    """The status ``op`` leads to from ``status``, or IllegalTransition saying
    ``refusal`` (by default the monitor's words: "the container is <status>")."""
    allowed, after = TABLE[op]
    if status not in allowed:
        raise IllegalTransition(refusal or f"the container is {status}", status, op)
    return status if after is None else after


def current(recorded: Status, held: Callable[[], bool]) -> Status:
    """What a container is: what its record says, or dead when the record
    claims a life that no monitor holds (``held``: a probe of its life lock,
    made only when the record does not already say it ended)."""
    if recorded != Status.EXITED and not held():
        return Status.DEAD
    return recorded
