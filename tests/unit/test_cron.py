"""core/cron.py: the schedule loop ends when the manager stops it, whenever the stop comes."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import TYPE_CHECKING, Literal, cast

from core.cron import CronScheduler, Schedule
from core.domain import utcnow

if TYPE_CHECKING:
    from core.service import ManagerCore


class _StoppedAsWoken(asyncio.Event):
    """The cron loop's wake-up. Its wait, once the event is set, cancels the loop's task as the wait
    returns: the manager's stop comes in the same turn as a schedule change, after the change has
    ended the loop's wait and before the loop has run again."""

    def __init__(self) -> None:
        super().__init__()
        self.loop_task: asyncio.Task[None] | None = None

    async def wait(self) -> Literal[True]:
        await super().wait()
        assert self.loop_task is not None
        self.loop_task.cancel()
        return True


async def test_a_stop_in_the_turn_a_schedule_changes_ends_the_loop() -> None:
    """On Python 3.11 asyncio.wait_for returns the result of a wait that has just completed instead
    of raising a cancel that came in the same turn (CPython gh-86296): the loop went on waiting for
    the next change (up to a minute) and the manager's stop gave up on it after 10 s."""
    cron = CronScheduler(cast("ManagerCore", None))  # nothing comes due, so the loop never asks the core
    woken = cron._changed = _StoppedAsWoken()
    loop_task = asyncio.create_task(cron.run())
    woken.loop_task = loop_task
    await asyncio.sleep(0)  # the loop is waiting for a change
    try:
        cron.adopt(Schedule("t1", "@daily", "UTC", recurring=True, next_run=utcnow() + timedelta(days=1)))
        # A bound for a loop that lost the cancel (it would wait for its next change, up to 60 s).
        await asyncio.wait([loop_task], timeout=5)
        assert loop_task.cancelled()
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
