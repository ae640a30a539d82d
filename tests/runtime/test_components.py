"""Components on the internal runtime: WASI p2 commands and exported functions with WAVE values."""

from __future__ import annotations

import asyncio

import pytest
from wasmtime import component as cm

from core.domain import TaskLimits
from proplet.runtime import Invocation, RuntimeConfig, WasmtimeRuntime, memories, wave
from tests.runtime.conftest import load, run
from tests.wire import eventually


async def test_p2_command_component(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "hello-component", "", "x", "--stderr=note", env={"GREETING": "p2"})
    assert outcome.error == ""
    assert outcome.results == "argv: [main] [x] [--stderr=note]\nGREETING=p2\n\nnote\n"


async def test_p2_command_failure(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "hello-component", "", "--stderr=bad input", "--exit=2")
    # WASI 0.2's exit carries only ok/err, so any failure status arrives as 1.
    assert outcome.error == "The module exited with code 1: bad input."


@pytest.mark.parametrize(
    ("function", "inputs", "expected"),
    [
        ("greet", ("world",), '"Hello, world!"'),  # plain string, as a person types it
        ("greet", ('"world"',), '"Hello, world!"'),  # WAVE-quoted, as upstream sends it
        ("greet", ('"say \\"hi\\"\\n"',), '"Hello, say \\"hi\\"\\n!"'),
        ("propeller:test/api#greet", ("x",), '"Hello, x!"'),
        ("shout", ("abc",), '"ABC"'),
        ("add", ("2", "-5"), "-3"),
        ("is-even", ("18446744073709551614",), "true"),
        ("count-char", ("banana", "a"), "3"),
        ("count-char", ("banana", "'n'"), "2"),
        ("half", ("3",), "1.5"),
        ("half", ("1e20",), "50000000000000000000"),
        ("half", ("inf",), "inf"),
    ],
)
async def test_component_exports(runtime: WasmtimeRuntime, function: str, inputs: tuple[str, ...],
                                 expected: str) -> None:
    outcome = await run(runtime, "greeter-component", function, *inputs)
    assert outcome.error == ""
    assert outcome.results == expected


async def test_component_input_errors(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "greeter-component", "add", "1")
    assert outcome.error == ("The export `propeller:test/api#add` takes 2 inputs (s32, s32) but the task "
                             "gave 1. Set the task's inputs to match.")
    outcome = await run(runtime, "greeter-component", "add", "1", "x")
    assert outcome.error.startswith("Cannot call `propeller:test/api#add`: input 1 ('x') is not a valid s32")
    outcome = await run(runtime, "greeter-component", "add", "1", "3000000000")
    assert "outside s32" in outcome.error
    outcome = await run(runtime, "greeter-component", "nope")
    assert "no export named 'nope'" in outcome.error and "propeller:test/api#greet" in outcome.error


async def test_component_trap_and_timeout_and_stop(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "greeter-component", "fail")
    assert outcome.error.startswith("The module reached an `unreachable` instruction")
    outcome = await run(runtime, "greeter-component", "spin", limits=TaskLimits(timeout_s=0.2))
    assert "longer than its 0.2 s limit" in outcome.error
    d = await load(runtime, "greeter-component")
    task = asyncio.ensure_future(runtime.run(d, Invocation("c-stop", "spin")))
    await asyncio.sleep(0.2)
    assert runtime.stop("c-stop")
    assert (await task).error == "The task was stopped by request."


async def test_a_components_memories_are_freed_with_its_store(runtime: WasmtimeRuntime) -> None:
    # The proplet allocates components' memories itself (proplet/runtime/memories.py).
    for limits in (TaskLimits(), TaskLimits(memory_bytes=16 * 1024 * 1024)):
        assert (await run(runtime, "greeter-component", "add", "2", "3", limits=limits)).results == "5"
        assert "16 MiB limit" in (await run(runtime, "membomb-component", "",
                                             limits=TaskLimits(memory_bytes=16 * 1024 * 1024))).error
    # Each store is dropped on its guest thread just after its outcome is delivered.
    await eventually(lambda: memories.live_memories() == 0)


async def test_a_component_grows_past_a_small_reservation_up_to_its_limit(cache_dir) -> None:
    # Memories reserved smaller than a task's limit still grow to it (a wasmtime memory would move).
    rt = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir, memory_reservation=8 * 1024 * 1024,
                                       memory_guard_size=65536))
    limits = TaskLimits(memory_bytes=32 * 1024 * 1024)
    try:
        outcome = await run(rt, "membomb-component", "", limits=limits)
        assert outcome.error.startswith("The module tried to grow memory past its 32 MiB limit.")
        beyond = await run(rt, "greeter-component", "peek", "16777216", limits=limits)
        assert beyond.error.startswith("The module accessed memory out of bounds")
    finally:
        await rt.close()


async def test_a_component_is_found_on_disk_by_a_new_runtime(cache_dir) -> None:
    first = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir))
    d = await load(first, "membomb-component")
    await first.close()
    again = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir))
    try:
        assert again.has_module(d)
        outcome = await again.run(d, Invocation("from-disk", "", limits=TaskLimits(memory_bytes=16 * 1024 * 1024)))
        assert outcome.error.startswith("The module tried to grow memory past its 16 MiB limit.")
        assert (again.compiles, again.deserializations) == (0, 1)
    finally:
        await again.close()


async def test_a_proxy_component_needs_the_external_runtime(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "http-component", "")
    assert "PROPLET_EXTERNAL_WASM_RUNTIME=wasmtime" in outcome.error
    assert outcome.elsewhere  # a proplet that serves HTTP runs it (the agent tells the manager)
    failed = await run(runtime, "greeter-component", "nope")
    assert failed.error and not failed.elsewhere


@pytest.mark.parametrize(
    ("ty", "text", "value", "encoded"),
    [
        (cm.S32(), "-7", -7, "-7"),
        (cm.U8(), "255", 255, "255"),
        (cm.Bool(), "true", True, "true"),
        (cm.F64(), "-0.5", -0.5, "-0.5"),
        (cm.F32(), "0.1", 0.10000000149011612, "0.1"),
        (cm.Char(), "'\\u{1f600}'", "\U0001f600", "'\U0001f600'"),
        (cm.String(), '"tab\\there"', "tab\there", '"tab\\there"'),
        (cm.String(), '"\\u{7}"', "\x07", '"\\u{7}"'),
    ],
)
def test_wave_round_trip(ty, text: str, value, encoded: str) -> None:
    assert wave.parse(text, ty) == value
    assert wave.encode(value, ty) == encoded


@pytest.mark.parametrize(("ty", "text"), [(cm.U8(), "256"), (cm.S8(), "-129"), (cm.Bool(), "yes"),
                                          (cm.String(), '"open'), (cm.Char(), "'ab'"), (cm.S32(), "1 2")])
def test_wave_rejects(ty, text: str) -> None:
    with pytest.raises(wave.WaveError):
        wave.parse(text, ty)
