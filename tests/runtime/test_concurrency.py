"""Guests run in parallel on worker threads, bounded by max_concurrent, without blocking the loop."""

from __future__ import annotations

import asyncio
import itertools
import re
import time

import wasmtime

from core.domain import TaskLimits
from proplet.runtime import Invocation, RuntimeConfig, WasmtimeRuntime
from tests.runtime.conftest import load
from tests.wasmfixtures import digest


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


async def test_a_short_module_runs_on_the_event_loop_and_one_that_turns_long_goes_back_to_a_thread(
        runtime: WasmtimeRuntime) -> None:
    # A thread hand-over each way cost 0.1-0.3 ms a run, more than a short guest itself.
    d = await load(runtime, "spin")
    for _ in range(10):  # a few short runs in a row on a thread (a first one may be slow)
        assert (await runtime.run(d, Invocation("t", "count", ("10",)))).results == "10"
    inline = runtime.inline_runs
    assert inline >= 1

    # Now a long run: interrupted within an epoch tick, run again from the start on a thread.
    gaps: list[float] = []

    async def beat() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beating = asyncio.ensure_future(beat())
    try:
        outcome = await runtime.run(d, Invocation("t", "count", ("300000000",)))
    finally:
        beating.cancel()
    assert outcome.error == "" and outcome.results == "300000000"
    assert (runtime.inline_runs, runtime.inline_fallbacks) == (inline + 1, 1)
    assert max(gaps) < 0.2, max(gaps)  # the loop held two ticks at most, not the whole 0.3 s or more
    # Back on the threads for good: the next short run does not go on the loop.
    assert (await runtime.run(d, Invocation("t", "count", ("10",)))).results == "10"
    assert runtime.inline_runs == inline + 1


async def test_a_module_that_could_block_never_runs_on_the_event_loop(runtime: WasmtimeRuntime) -> None:
    # It could sleep (poll_oneoff), which no epoch interrupts: the loop would be held.
    data = wasmtime.wat2wasm("""(module
      (import "wasi_snapshot_preview1" "poll_oneoff" (func (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "one") (result i32) i32.const 1))""")
    d = digest(bytes(data))
    await runtime.load(d, bytes(data))
    for _ in range(5):
        assert (await runtime.run(d, Invocation("t", "one", ()))).results == "1"
    assert runtime.inline_runs == 0


async def test_a_short_module_runs_on_a_thread_while_another_guest_runs(runtime: WasmtimeRuntime) -> None:
    # Guests on threads run in parallel; on the loop, one after the other.
    add, spin = await load(runtime, "add"), await load(runtime, "spin")
    for _ in range(10):
        assert (await runtime.run(add, Invocation("t", "add", ("1", "2")))).results == "3"
    inline = runtime.inline_runs
    assert inline >= 1
    long_run = asyncio.ensure_future(runtime.run(spin, Invocation("long", "count", ("300000000",))))
    await asyncio.sleep(0.05)
    assert not long_run.done()
    assert (await runtime.run(add, Invocation("t", "add", ("2", "2")))).results == "4"
    assert runtime.inline_runs == inline
    assert (await long_run).results == "300000000"
    assert (await runtime.run(add, Invocation("t", "add", ("3", "2")))).results == "5"
    assert runtime.inline_runs == inline + 1
