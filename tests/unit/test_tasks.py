"""TaskSet: background tasks are kept until done, a failure is logged, join waits for all."""

from __future__ import annotations

import asyncio
import logging

import pytest

from engctl.daemon.tasks import TaskSet


def test_a_failing_task_is_logged_and_dropped_and_on_done_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[int] = []

    async def main() -> None:
        tasks = TaskSet(asyncio.get_running_loop(), "probe task", lambda: done.append(1))

        async def boom() -> None:
            raise RuntimeError("boom")

        tasks.spawn(boom())
        assert len(tasks) == 1
        await tasks.join()
        assert len(tasks) == 0

    with caplog.at_level(logging.ERROR, logger="engctl.daemon"):
        asyncio.run(main())
    assert done == [1]
    assert any("probe task failed" in r.getMessage() for r in caplog.records)


def test_join_waits_for_tasks_started_meanwhile_and_cancel_stops_the_rest() -> None:
    order: list[str] = []

    async def main() -> None:
        tasks = TaskSet(asyncio.get_running_loop(), "step")

        async def second() -> None:
            await asyncio.sleep(0)
            order.append("second")

        async def first() -> None:
            tasks.spawn(second())
            order.append("first")

        tasks.spawn(first())
        await tasks.join()
        assert order == ["first", "second"]
        async def forever_wait() -> None:
            await asyncio.Event().wait()

        forever = tasks.spawn(forever_wait())
        tasks.cancel()
        await tasks.join()
        assert forever.cancelled()

    asyncio.run(main())
