"""core.events: bounded fan-out whose subscribers may read on another thread's event loop than the
one that emits (the console hosts the manager core on a thread of its own)."""

from __future__ import annotations

import asyncio
import threading
import time

from core.events import Fanout


async def test_a_slow_reader_loses_the_oldest_items_and_counts_them() -> None:
    fanout: Fanout[int] = Fanout()
    sub = fanout.subscribe(maxlen=3)
    for i in range(5):
        fanout.emit(i)
    assert sub.drain() == [2, 3, 4]
    assert sub.dropped == 2
    sub.close()
    assert not fanout.has_subscribers


async def test_items_emitted_on_another_thread_all_reach_the_reader_in_order() -> None:
    fanout: Fanout[int] = Fanout()
    sub = fanout.subscribe(maxlen=100_000)
    total = 50_000

    def producer() -> None:
        for i in range(total):
            fanout.emit(i)

    thread = threading.Thread(target=producer)
    thread.start()
    received: list[int] = []
    while len(received) < total:
        # Woken by the producer's thread through this loop; a wait without a wake-up would time out.
        received.extend(await asyncio.wait_for(sub.wait(), 1))
    thread.join()
    assert received == list(range(total))
    assert sub.dropped == 0


async def test_a_reader_waiting_on_an_empty_buffer_is_woken_by_a_foreign_thread() -> None:
    fanout: Fanout[str] = Fanout()
    sub = fanout.subscribe()
    waiting = asyncio.ensure_future(sub.wait(timeout=5))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    loop = asyncio.get_running_loop()
    started = loop.time()

    def later() -> None:
        time.sleep(0.05)  # the reader's loop is asleep in its selector by then
        fanout.emit("hello")

    threading.Thread(target=later).start()
    assert await waiting == ["hello"]
    assert loop.time() - started < 1.0


async def test_subscribing_and_closing_while_another_thread_emits_is_safe() -> None:
    fanout: Fanout[int] = Fanout()
    stop = threading.Event()
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            while not stop.is_set():
                fanout.emit(1)
        except BaseException as exc:  # e.g. "Set changed size during iteration"
            errors.append(exc)

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        for _ in range(2_000):
            fanout.subscribe(maxlen=10).close()
        await asyncio.sleep(0)
    finally:
        stop.set()
        thread.join()
    assert not fanout.has_subscribers
    assert errors == []
