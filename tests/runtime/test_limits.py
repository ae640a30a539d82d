"""Sandbox limits on the internal runtime: timeout, stop, fuel, memory, traps. The proplet survives."""

from __future__ import annotations

import asyncio
import time

from core.domain import TaskLimits
from proplet.runtime import Invocation, RuntimeConfig, WasmtimeRuntime
from tests.runtime.conftest import load, run


async def test_infinite_loop_times_out_and_the_runtime_keeps_working(runtime: WasmtimeRuntime) -> None:
    started = time.monotonic()
    outcome = await run(runtime, "spin", "spin", limits=TaskLimits(timeout_s=0.3))
    elapsed = time.monotonic() - started
    assert outcome.error == ("The task ran longer than its 0.3 s limit and was stopped. "
                             "Raise the task's timeout or make the module finish sooner.")
    assert 0.3 <= elapsed < 0.3 + 1.0
    after = await run(runtime, "add", "add", "1", "2")
    assert (after.error, after.results) == ("", "3")


async def test_command_loop_times_out_too(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "spin", "_start", limits=TaskLimits(timeout_s=0.2))
    assert "longer than its 0.2 s limit" in outcome.error


async def test_default_timeout_applies_when_the_task_sets_none(cache_dir) -> None:
    rt = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir, default_timeout_s=0.2))
    try:
        outcome = await run(rt, "spin", "spin")
        assert "longer than its 0.2 s limit" in outcome.error
    finally:
        await rt.close()


async def test_stop_interrupts_a_running_loop(runtime: WasmtimeRuntime) -> None:
    d = await load(runtime, "spin")
    other = asyncio.ensure_future(runtime.run(d, Invocation("keeps-running", "spin", limits=TaskLimits(timeout_s=5))))
    victim = asyncio.ensure_future(runtime.run(d, Invocation("victim", "spin", limits=TaskLimits(timeout_s=30))))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    assert runtime.stop("victim") is True
    outcome = await victim
    assert time.monotonic() - started < 1.0
    assert outcome.error == "The task was stopped by request."
    assert not other.done()  # stopping one task leaves the others alone
    assert runtime.stop("keeps-running")
    assert (await other).error == "The task was stopped by request."
    assert runtime.stop("victim") is False  # no longer running


async def test_stop_of_a_queued_task(cache_dir) -> None:
    rt = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir, max_concurrent=1))
    try:
        d = await load(rt, "spin")
        first = asyncio.ensure_future(rt.run(d, Invocation("first", "spin", limits=TaskLimits(timeout_s=5))))
        queued = asyncio.ensure_future(rt.run(d, Invocation("queued", "spin")))
        await asyncio.sleep(0.2)
        assert rt.stop("queued")
        rt.stop("first")
        assert (await first).error == "The task was stopped by request."
        assert (await queued).error == "The task was stopped by request before it started."
    finally:
        await rt.close()


async def test_cancelling_run_stops_the_guest(runtime: WasmtimeRuntime) -> None:
    d = await load(runtime, "spin")
    task = asyncio.ensure_future(runtime.run(d, Invocation("cancelled", "spin", limits=TaskLimits(timeout_s=30))))
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # The guest thread ends at the next tick and frees its slot: all 4 slots serve new work.
    outcomes = await asyncio.gather(*(runtime.run(d, Invocation(f"n{i}", "count", ("10",))) for i in range(4)))
    assert [o.results for o in outcomes] == ["10"] * 4


async def test_fuel_budget_exhausted(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "spin", "count", "100000000", limits=TaskLimits(fuel=100_000))
    assert outcome.error == ("The task exceeded its fuel budget of 100000 and was stopped. "
                             "Raise the task's fuel limit or reduce the work it does.")
    assert outcome.fuel_used == 100_000


async def test_fuel_within_budget_reports_use(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "spin", "count", "1000", limits=TaskLimits(fuel=1_000_000))
    assert (outcome.error, outcome.results) == ("", "1000")
    assert outcome.fuel_used is not None and 1000 < outcome.fuel_used < 1_000_000
    unmetered = await run(runtime, "spin", "count", "1000")
    assert unmetered.fuel_used is None


async def test_fuel_stops_an_infinite_loop(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "spin", "spin", limits=TaskLimits(fuel=1_000_000, timeout_s=30))
    assert "exceeded its fuel budget of 1000000" in outcome.error


MEMORY_MESSAGE = ("The module tried to grow memory past its 16 MiB limit. Raise the task's memory "
                  "limit or reduce what the module allocates.")


async def test_malloc_bomb_is_refused_with_the_limit_in_the_message(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "membomb", "", limits=TaskLimits(memory_bytes=16 * 1024 * 1024))
    assert outcome.error.startswith(MEMORY_MESSAGE)
    assert "exited with code 1: out of memory after 15 MiB" in outcome.error


async def test_malloc_bomb_that_aborts(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "membomb", "", "--abort", limits=TaskLimits(memory_bytes=16 * 1024 * 1024))
    assert outcome.error.startswith(MEMORY_MESSAGE)
    assert "`unreachable`" in outcome.error


async def test_page_by_page_bomb_is_refused(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "membomb-wat", "bomb", limits=TaskLimits(memory_bytes=16 * 1024 * 1024))
    assert outcome.error.startswith(MEMORY_MESSAGE)


async def test_memory_limit_below_the_modules_minimum(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "hello", "", limits=TaskLimits(memory_bytes=64 * 1024))
    assert outcome.error.startswith("The module needs more memory at start than its 0.1 MiB limit")


async def test_deep_recursion_overflows_the_stack(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "traps", "recurse", "0")
    assert outcome.error.startswith("The module overflowed its call stack")
    assert (await run(runtime, "add", "add", "2", "2")).results == "4"


async def test_traps_are_named(runtime: WasmtimeRuntime) -> None:
    boom = await run(runtime, "traps", "boom")
    assert boom.error.startswith("The module reached an `unreachable` instruction")
    div = await run(runtime, "traps", "div", "1", "0")
    assert div.error.startswith("The module divided an integer by zero")
    ok = await run(runtime, "traps", "div", "7", "2")
    assert ok.results == "3"
