"""TaskSet: the owner of background tasks cancels them on close and waits for their cleanup."""

from __future__ import annotations

import asyncio

import pytest

from router.tasks import TaskSet


def test_close_cancels_every_task_waits_for_its_cleanup_and_refuses_later_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # cleanup that itself awaits (as killing a replica does)
            events.append(f"{name} cleaned up")
            raise

    async def fails() -> None:
        raise RuntimeError("boom")

    async def scenario() -> None:
        tasks = TaskSet()
        tasks.spawn(forever("a"), "a")
        tasks.spawn(forever("b"), "b")
        tasks.spawn(fails(), "fails")
        await asyncio.sleep(0)
        await tasks.close()
        assert sorted(events) == ["a cleaned up", "b cleaned up"]
        late = tasks.spawn(forever("late"), "late")
        with pytest.raises(asyncio.CancelledError):
            await late
        assert "late cleaned up" not in events  # cancelled before it ran

    asyncio.run(scenario())
    assert "task fails failed" in caplog.text and "RuntimeError: boom" in caplog.text
