"""Guests run in parallel on worker threads, bounded by max_concurrent, without blocking the loop."""

from __future__ import annotations

import asyncio
import itertools
import re

from core.domain import TaskLimits
from proplet.runtime import Invocation, RuntimeConfig, WasmtimeRuntime
from tests.runtime.conftest import load


def _interval(outcome) -> tuple[int, int]:
    # busy.wasm prints the wall-clock (CLOCK_REALTIME) start and end of its busy wait.
    m = re.fullmatch(r"start=(\d+) end=(\d+)\n", outcome.results)
    assert m, (outcome.results, outcome.error)
    return int(m.group(1)), int(m.group(2))


async def _busy_runs(rt: WasmtimeRuntime, n: int, ms: int) -> list[tuple[int, int]]:
    d = await load(rt, "busy")
    outcomes = await asyncio.gather(*(rt.run(d, Invocation(f"busy-{i}", "", (str(ms),))) for i in range(n)))
    return [_interval(o) for o in outcomes]


async def test_guests_run_at_the_same_time(runtime: WasmtimeRuntime) -> None:
    intervals = await _busy_runs(runtime, 4, 300)
    # All four were inside their busy wait at one common instant: the latest start precedes the
    # earliest end. Sequential runs would have each start after the previous end.
    assert max(s for s, _ in intervals) < min(e for _, e in intervals)


async def test_max_concurrent_bounds_the_running_guests(cache_dir) -> None:
    rt = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir, max_concurrent=1))
    try:
        intervals = sorted(await _busy_runs(rt, 3, 100))
        for (_, end), (next_start, _) in itertools.pairwise(intervals):
            assert end <= next_start
    finally:
        await rt.close()


async def test_the_event_loop_keeps_running_while_guests_spin(runtime: WasmtimeRuntime) -> None:
    d = await load(runtime, "spin")
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.ensure_future(heartbeat())
    try:
        outcomes = await asyncio.gather(*(runtime.run(d, Invocation(f"s{i}", "spin", limits=TaskLimits(timeout_s=0.5)))
                                          for i in range(4)))
    finally:
        beat.cancel()
    assert all("0.5 s limit" in o.error for o in outcomes)
    # 0.5 s of 10 ms sleeps: a blocked loop would manage almost none.
    assert ticks >= 10


async def test_many_short_tasks_in_parallel(runtime: WasmtimeRuntime) -> None:
    d = await load(runtime, "add")
    outcomes = await asyncio.gather(*(runtime.run(d, Invocation(f"a{i}", "add", (str(i), "1"))) for i in range(200)))
    assert [o.results for o in outcomes] == [str(i + 1) for i in range(200)]


async def test_a_run_given_up_while_it_waits_for_a_slot_is_forgotten(cache_dir) -> None:
    # Registered for stop() before it waited for a slot, but only forgotten once it had one: a run
    # cancelled while waiting stayed known, and stop() of its task id answered True for ever (the
    # agent then trusts the runtime with a stop and cancels nothing).
    rt = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir, max_concurrent=1))
    try:
        d = await load(rt, "spin")
        busy = asyncio.ensure_future(rt.run(d, Invocation("holder", "spin", limits=TaskLimits(timeout_s=5))))
        await asyncio.sleep(0.2)
        waiting = asyncio.ensure_future(rt.run(d, Invocation("waiter", "spin")))
        await asyncio.sleep(0.1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert not rt.stop("waiter")
        assert rt.stop("holder")
        assert "stopped by request" in (await busy).error
    finally:
        await rt.close()
