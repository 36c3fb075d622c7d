"""The task owner: a failure is logged once, and closing cancels what is left."""

from __future__ import annotations

import asyncio
import logging

import pytest

from cocoon.util.tasks import TaskSet


def test_a_failed_task_is_logged_and_a_pending_one_cancelled_on_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fail() -> None:
        raise ValueError("boom")

    async def main() -> asyncio.Task[None]:
        tasks = TaskSet(logging.getLogger("cocoon.test"), level=logging.WARNING)
        tasks.spawn(fail(), "failing")
        forever = tasks.spawn(asyncio.sleep(3600), "sleeping")
        await asyncio.sleep(0.01)
        assert len(tasks) == 1
        await tasks.aclose(1.0)
        assert len(tasks) == 0
        return forever

    with caplog.at_level(logging.WARNING, logger="cocoon.test"):
        forever = asyncio.run(main())
    assert forever.cancelled()
    assert [r.getMessage() for r in caplog.records] == ["failing failed: boom"]
