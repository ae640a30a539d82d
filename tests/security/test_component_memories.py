"""Components' linear memories, which the proplet allocates itself (proplet/runtime/memories.py):
hostile guest code reaches no byte outside its memory, whatever the reservation, guard or limit,
and a refused growth is charged to its own run when many run at once."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import wasmtime

from core.domain import TaskLimits
from proplet.runtime import Invocation, RuntimeConfig, WasmtimeRuntime, memories
from tests.wasmfixtures import digest
from tests.wire import eventually

MIB = 1 << 20

# probe(grow, at): grow the memory by `grow` pages, then read the byte at `at` (and `at` + a
# constant offset in `far`): past the memory's end it must trap. limit: grow one page at a time
# until refused, then fail.
PROBE = """(component
  (core module $m (memory 1)
    (func $grow (param i32) (if (i32.ne (local.get 0) (i32.const 0))
      (then (if (i32.eq (memory.grow (local.get 0)) (i32.const -1)) (then unreachable)))))
    (func (export "probe") (param i32 i32) (result i32) (call $grow (local.get 0)) (i32.load8_u (local.get 1)))
    (func (export "far") (param i32 i32) (result i32) (call $grow (local.get 0))
      (i32.load8_u offset=0x1000 (local.get 1)))
    (func (export "store") (param i32 i32) (result i32) (call $grow (local.get 0))
      (i32.store (local.get 1) (i32.const -1)) (memory.size))
    (func (export "limit") (param i32 i32) (result i32)
      (loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) unreachable))
  (core instance $i (instantiate $m))
  (func (export "probe") (param "grow" u32) (param "at" u32) (result u32) (canon lift (core func $i "probe")))
  (func (export "far") (param "grow" u32) (param "at" u32) (result u32) (canon lift (core func $i "far")))
  (func (export "store") (param "grow" u32) (param "at" u32) (result u32) (canon lift (core func $i "store")))
  (func (export "limit") (param "grow" u32) (param "at" u32) (result u32) (canon lift (core func $i "limit"))))"""

# The same probe on a 64-bit memory.
PROBE64 = """(component
  (core module $m (memory i64 1)
    (func (export "probe") (param i64 i64) (result i32)
      (if (i64.eq (memory.grow (local.get 0)) (i64.const -1)) (then unreachable))
      (i32.load8_u (local.get 1))))
  (core instance $i (instantiate $m))
  (func (export "probe") (param "grow" u64) (param "at" u64) (result u32) (canon lift (core func $i "probe"))))"""

OUT_OF_BOUNDS = "The module accessed memory out of bounds"

RESERVATIONS = {
    "default": {},
    "small": {"memory_reservation": 8 * MIB, "memory_guard_size": 65536},
    "none": {"memory_reservation": 0, "memory_guard_size": 0},
}


@pytest.fixture(params=list(RESERVATIONS))
async def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[WasmtimeRuntime]:
    rt = WasmtimeRuntime(RuntimeConfig(cache_dir=tmp_path / "cache", max_concurrent=8, default_timeout_s=60,
                                       **RESERVATIONS[request.param]))
    yield rt
    await rt.close()


async def load(rt: WasmtimeRuntime, text: str) -> str:
    data = bytes(wasmtime.wat2wasm(text))
    await rt.load(digest(data), data)
    return digest(data)


async def call(rt: WasmtimeRuntime, d: str, function: str, *inputs: int, memory: int = 16 * MIB) -> tuple[str, str]:
    outcome = await rt.run(d, Invocation(f"t-{function}", function, tuple(str(i) for i in inputs),
                                         limits=TaskLimits(memory_bytes=memory)))
    return outcome.results, outcome.error


async def test_no_access_past_the_end_of_a_memory_reaches_anything(runtime: WasmtimeRuntime) -> None:
    # Memories of tests run before in this process may not be collected yet (the count is the process's).
    # The garbage collector is off: a trapped run's memories must be freed without it (a store kept in
    # a cycle through the trap's frames waited for the next collection).
    gc.disable()
    try:
        live_before = memories.live_memories()
        d = await load(runtime, PROBE)
        end = 16 * MIB  # after growing by 255 pages, the memory is the whole 16 MiB limit
        assert await call(runtime, d, "probe", 0, 65535) == ("0", "")
        assert (await call(runtime, d, "probe", 255, end - 1)) == ("0", "")
        assert (await call(runtime, d, "store", 255, end - 4)) == ("256", "")
        for function, grow, at in [
            ("probe", 0, 65536), ("store", 0, 65533), ("far", 0, 65535 - 0x1000 + 1), ("probe", 0, 0xFFFFFFF0),
            ("probe", 0, 0xFFFFFFFF), ("far", 0, 0xFFFFFFFF), ("probe", 255, end), ("store", 255, end - 3),
            ("far", 255, end - 0x1000), ("probe", 255, 0xFFFFFFF0), ("far", 255, 0xFFFFF000), ("probe", 100, 8 * MIB),
        ]:
            results, error = await call(runtime, d, function, grow, at)
            assert (results, error.startswith(OUT_OF_BOUNDS)) == ("", True), (function, grow, hex(at), error)
        # Each run's thread drops its store just after handing over the outcome: under load the last
        # runs' may still be on their way out when the loop reads the count, so it is given a moment.
        await eventually(lambda: memories.live_memories() <= live_before, timeout=5)
    finally:
        gc.enable()  # also when an assertion above fails: the rest of the session needs it
    await eventually(lambda: memories.live_memories() == 0)


async def test_each_run_is_charged_its_own_refused_growth(runtime: WasmtimeRuntime) -> None:
    # Runs at once on the guest threads, each with its own limit: every failure names its own.
    d = await load(runtime, PROBE)
    limits = [4 * MIB, 8 * MIB, 12 * MIB, 20 * MIB]
    outcomes = await asyncio.gather(*(call(runtime, d, "limit", 0, 0, memory=limits[i % 4]) for i in range(32)))
    for i, (_, error) in enumerate(outcomes):
        assert f"grow memory past its {limits[i % 4] // MIB} MiB limit" in error, (i, error)
    await eventually(lambda: memories.live_memories() == 0)


async def test_a_64_bit_memory_under_a_limit_past_the_address_space_is_refused(runtime: WasmtimeRuntime) -> None:
    # Its reservation plus guard was more than 2**64 bytes, which mmap received modulo 2**64: a
    # mapping of a few MiB, which growing the memory then extended by mprotect over the proplet's
    # own memory next to it (the guest read it; before the fix "probe 1024 pages" returned "0").
    d = await load(runtime, PROBE64)
    results, error = await call(runtime, d, "probe", 1024, 64 * MIB, memory=2**64 - 1)
    assert results == ""
    assert "cannot reserve" in error
    # Within what the machine can address, the same memory works and ends where it should.
    assert await call(runtime, d, "probe", 255, 16 * MIB - 1) == ("0", "")
    results, error = await call(runtime, d, "probe", 255, 16 * MIB)
    assert error.startswith(OUT_OF_BOUNDS)
    await eventually(lambda: memories.live_memories() == 0)


def many_memories(per_module: int, instances: int) -> str:
    memories_ = " ".join("(memory 1)" for _ in range(per_module))
    more = " ".join(f"(core instance $i{k} (instantiate $m))" for k in range(1, instances))
    return f"""(component
  (core module $m {memories_} (func (export "f") (param i32) (result i32) (i32.load8_u (local.get 0))))
  (core instance $i (instantiate $m)) {more}
  (func (export "f") (param "at" u32) (result u32) (canon lift (core func $i "f"))))"""


async def test_a_run_creates_at_most_100_memories(runtime: WasmtimeRuntime) -> None:
    # Each memory reserves its address space (4 GiB + guard by default): 100 instances of a
    # 100-memory module took 40 TiB, and three such runs at once made every other run's memories
    # (and the proplet's own mmaps) fail. Before the limit, the 110 memories below were all made.
    assert memories.MAX_MEMORIES_PER_RUN == 100
    d = await load(runtime, many_memories(10, 10))
    assert await call(runtime, d, "f", 65535) == ("0", "")
    d = await load(runtime, many_memories(10, 11))
    results, error = await call(runtime, d, "f", 65535)
    assert results == ""
    assert "creates more than 100 linear memories" in error
    await eventually(lambda: memories.live_memories() == 0)
