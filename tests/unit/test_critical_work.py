"""core.critical.CriticalWork: when the core tells a listener that time-critical work began and is through."""

from __future__ import annotations

import asyncio
import logging

import pytest

from core.critical import CriticalWork


class Recorder:
    def __init__(self) -> None:
        self.told: list[str] = []

    def began(self) -> None:
        self.told.append("began")

    def through(self) -> None:
        self.told.append("through")


class Writes:
    """Stands for the store writer's backlog: drained or not, and an event set when it drains."""

    def __init__(self) -> None:
        self.pending = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def queue(self) -> None:
        self.pending += 1
        self.idle.clear()

    def commit_all(self) -> None:
        self.pending = 0
        self.idle.set()

    def drained(self) -> bool:
        return not self.pending

    async def wait_drained(self) -> None:
        await self.idle.wait()


def critical_work(writes: Writes, listener: Recorder | None) -> CriticalWork:
    work = CriticalWork(writes.drained, writes.wait_drained)
    work.listener = listener
    return work


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_overlapping_sections_are_one_busy_period() -> None:
    writes, heard = Writes(), Recorder()
    work = critical_work(writes, heard)
    with work:
        with work:
            assert heard.told == ["began"]
        await settle()
        assert heard.told == ["began"] and work.busy
    assert heard.told == ["began"], "told on the next turn, after what the commit's callbacks send"
    await settle()
    assert heard.told == ["began", "through"] and not work.busy
    with work:
        pass
    await settle()
    assert heard.told == ["began", "through", "began", "through"]


async def test_what_the_commit_sends_from_its_callbacks_has_left_when_the_work_is_through() -> None:
    writes, heard = Writes(), Recorder()
    work = critical_work(writes, heard)
    loop = asyncio.get_running_loop()
    with work:
        # As the core acknowledges a result: from a callback the commit's future queued before the
        # section ended.
        loop.call_soon(heard.told.append, "acknowledgement sent")
    await settle()
    assert heard.told == ["began", "acknowledgement sent", "through"]


async def test_work_is_through_only_once_its_writes_are_committed() -> None:
    writes, heard = Writes(), Recorder()
    work = critical_work(writes, heard)
    with work:
        writes.queue()  # a dispatch queued for the database; the start leaves from its commit
    await settle()
    assert heard.told == ["began"] and work.busy
    writes.commit_all()
    await settle()
    assert heard.told == ["began", "through"] and not work.busy


async def test_writes_queued_again_as_the_first_commit_ends_are_waited_for_too() -> None:
    writes, heard = Writes(), Recorder()
    work = critical_work(writes, heard)
    with work:
        writes.queue()
    await settle()
    writes.commit_all()
    writes.queue()  # the dispatcher's write, queued in the same turn as the commit ended
    await settle()
    assert heard.told == ["began"]
    writes.commit_all()
    await settle()
    assert heard.told == ["began", "through"]


async def test_a_section_opened_while_writes_drain_ends_the_busy_period_itself() -> None:
    writes, heard = Writes(), Recorder()
    work = critical_work(writes, heard)
    with work:
        writes.queue()
    await settle()
    with work:  # a result arrives while the start's writes are still queued
        writes.commit_all()
        await settle()
        assert heard.told == ["began"], "through told while a section was open"
    await settle()
    assert heard.told == ["began", "through"]


async def test_closing_tells_a_listener_that_still_waits() -> None:
    writes, heard = Writes(), Recorder()
    work = critical_work(writes, heard)
    with work:
        writes.queue()  # never committed: the core is stopping
    await settle()
    await work.close()
    assert heard.told == ["began", "through"]
    with work:  # a section ending as the core stops is not left waiting for writes either
        writes.queue()
    await settle()
    assert heard.told == ["began", "through", "began", "through"]


async def test_without_a_listener_sections_tell_nobody_and_cost_nothing_more() -> None:
    writes = Writes()
    work = critical_work(writes, None)
    with work:
        writes.queue()
    assert not work.busy
    await work.close()


async def test_a_failing_listener_is_logged_and_the_work_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        def began(self) -> None:
            raise RuntimeError("host went away")

    writes, heard = Writes(), Broken()
    work = critical_work(writes, heard)
    done = False
    with caplog.at_level(logging.ERROR, logger="propeller.core"):
        with work:
            done = True
        await settle()
    assert done and heard.told == ["through"]
    assert "the listener of time-critical work failed" in caplog.text
    assert "host went away" in caplog.text
