"""console.hosting.StandAside: the console's thread stops while the core it hosts has time-critical
work in hand, in the middle of a frame (a signal) or on waking in its loop (the selector), for a
bounded time and a bounded share of its time. The "core" here is a real second thread calling the
listener as core.critical does; the "frame" is Python running on the main thread."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator

import pytest

from console import hosting
from console.hosting import StandAside


@pytest.fixture
async def stand_aside() -> AsyncIterator[StandAside]:
    aside = StandAside(asyncio.get_running_loop())
    assert aside.install(), "pytest runs tests on the main thread, on a selector event loop"
    try:
        yield aside
    finally:
        aside.close(core_thread_ended=True)


@pytest.fixture
def long_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    # Long enough that a slow CI machine cannot end a wait by its limit while the test looks.
    monkeypatch.setattr(hosting, "STAND_ASIDE_MAX_WAIT", 5.0)


def busy_frame(progress: list[int], until: threading.Event, limit: float = 10.0) -> None:
    """Python running without a pause on the main thread, as Textual does while it renders a frame."""
    deadline = time.monotonic() + limit
    while not until.is_set() and time.monotonic() < deadline:
        progress[0] += 1


async def test_a_frame_in_progress_stops_until_the_core_is_through(stand_aside: StandAside,
                                                                   long_waits: None) -> None:
    progress = [0]
    frame_over = threading.Event()
    seen: dict[str, int] = {}

    def core() -> None:
        while progress[0] < 10_000:  # the frame is under way
            time.sleep(0.001)
        stand_aside.began()
        time.sleep(0.05)  # the signal's handler has run by now
        seen["standing"] = progress[0]
        time.sleep(0.2)  # the GIL is free all this time: a frame not standing aside runs on
        seen["stood"] = progress[0]
        stand_aside.through()
        time.sleep(0.2)
        seen["resumed"] = progress[0]
        frame_over.set()

    thread = threading.Thread(target=core)
    thread.start()
    busy_frame(progress, frame_over)
    thread.join()
    assert seen["stood"] == seen["standing"], "the frame went on while the core had work in hand"
    assert seen["resumed"] > seen["stood"] + 10_000, "the frame did not go on once the core was through"
    assert stand_aside.signals == 1
    assert stand_aside.waits == 1 and 0.2 <= stand_aside.waited_s < 2.0


async def test_a_wait_ends_by_itself_when_the_core_never_says_it_is_through(stand_aside: StandAside) -> None:
    progress = [0]
    frame_over = threading.Event()
    seen: dict[str, float] = {}

    def core() -> None:
        while progress[0] < 10_000:
            time.sleep(0.001)
        stand_aside.began()  # and never through(): a core stuck, or a listener that lost track
        seen["began"] = time.monotonic()
        at = progress[0]
        while progress[0] == at and time.monotonic() - seen["began"] < 5:
            time.sleep(0.0005)
        seen["resumed"] = time.monotonic()
        frame_over.set()

    thread = threading.Thread(target=core)
    thread.start()
    busy_frame(progress, frame_over)
    thread.join()
    assert seen["resumed"] - seen["began"] < 1.0
    assert stand_aside.waits == 1
    assert hosting.STAND_ASIDE_MAX_WAIT * 0.8 <= stand_aside.waited_s < 1.0


async def test_waits_stop_for_the_rest_of_a_window_once_they_took_its_share(
        stand_aside: StandAside, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosting, "STAND_ASIDE_MAX_WAIT", 0.05)
    monkeypatch.setattr(hosting, "STAND_ASIDE_WINDOW", 30.0)
    monkeypatch.setattr(hosting, "STAND_ASIDE_MAX_SHARE", 0.001)  # 30 ms of each 30 s window
    progress = [0]
    frame_over = threading.Event()

    def core() -> None:
        while progress[0] < 10_000:
            time.sleep(0.001)
        stand_aside.began()  # never through: the wait takes its 50 ms, over the window's share
        time.sleep(0.3)
        stand_aside.began()  # a core busy without a break: the screen is not frozen again
        time.sleep(0.1)
        frame_over.set()

    thread = threading.Thread(target=core)
    thread.start()
    busy_frame(progress, frame_over)
    thread.join()
    assert stand_aside.waits == 1 and stand_aside.skipped == 1 and stand_aside.signals == 1


async def test_a_console_waiting_for_events_stands_aside_when_it_wakes(stand_aside: StandAside,
                                                                      long_waits: None) -> None:
    loop = asyncio.get_running_loop()
    ran = loop.create_future()
    told: dict[str, float] = {}

    def core() -> None:
        time.sleep(0.1)  # the console's loop is idle in its selector by now
        stand_aside.began()
        # Wakes the console's loop, as the core's events do; its callbacks wait for the core.
        loop.call_soon_threadsafe(lambda: ran.set_result(time.monotonic()))
        time.sleep(0.2)
        told["through"] = time.monotonic()
        stand_aside.through()

    thread = threading.Thread(target=core)
    thread.start()
    woke = await asyncio.wait_for(ran, 10)
    thread.join()
    assert woke >= told["through"]
    assert stand_aside.signals == 0, "a thread waiting in its selector needs no signal"
    assert stand_aside.waits == 1


async def test_it_is_not_installed_off_the_main_thread_nor_over_a_handler_in_use() -> None:
    loop = asyncio.get_running_loop()
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(StandAside(loop).install()))
    thread.start()
    thread.join()
    assert results == [False]

    def theirs(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGUSR2, theirs)
    try:
        assert not StandAside(loop).install()
        assert signal.getsignal(signal.SIGUSR2) is theirs
    finally:
        signal.signal(signal.SIGUSR2, previous)


async def test_closing_puts_the_signal_and_the_selector_back() -> None:
    loop = asyncio.get_running_loop()
    selector = loop._selector  # type: ignore[attr-defined]
    before = signal.getsignal(signal.SIGUSR2)
    aside = StandAside(loop)
    assert aside.install()
    assert signal.getsignal(signal.SIGUSR2) is not before and "select" in vars(selector)
    aside.close(core_thread_ended=True)
    assert signal.getsignal(signal.SIGUSR2) is before and "select" not in vars(selector)
    aside.began()  # after close: nothing is sent (the default action would end the process)
    assert aside.signals == 0
    await asyncio.sleep(0.01)  # the loop still runs on the selector's own method


async def test_a_core_thread_still_running_when_the_console_closes_cannot_kill_it_with_the_signal() -> None:
    loop = asyncio.get_running_loop()
    before = signal.getsignal(signal.SIGUSR2)
    aside = StandAside(loop)
    assert aside.install()
    aside.close(core_thread_ended=False)
    try:
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)  # a late one, from a core not yet gone
        await asyncio.sleep(0.01)
    finally:
        signal.signal(signal.SIGUSR2, before)
