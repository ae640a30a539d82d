"""Both runtimes fail a task the same way: the same sentence for the same fault, the same clock for
the timeout. An operator should not need to know which runtime a proplet uses to read an error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.domain import TaskLimits
from proplet.runtime import ExternalRuntime, Invocation, ModuleError, Outcome, WasmtimeRuntime
from proplet.runtime.api import STOPPED_ERROR, fault_error, memory_limit_error, timeout_error
from tests.runtime.conftest import load, run
from tests.wasmfixtures import digest

MIB = 1024 * 1024
UNREACHABLE = "reached an `unreachable` instruction, which is how a guest panics or aborts"


@pytest.fixture(params=["internal", "external"])
def either(request: pytest.FixtureRequest) -> WasmtimeRuntime | ExternalRuntime:
    return request.getfixturevalue("runtime" if request.param == "internal" else "external")


# (fixture, task name, inputs, limits, the error both give)
SAME_ERROR = [
    ("traps", "boom", (), None, fault_error(UNREACHABLE)),
    ("traps", "div", ("1", "0"), None, fault_error("divided an integer by zero")),
    ("traps", "recurse", ("0",), None,
     fault_error("overflowed its call stack (unbounded or too deep recursion)", "down")),
    ("spin", "count", ("100000000",), TaskLimits(fuel=100_000),
     "The task exceeded its fuel budget of 100000 and was stopped. Raise the task's fuel limit or reduce "
     "the work it does."),
    ("spin", "spin", (), TaskLimits(timeout_s=0.3), timeout_error(0.3)),
    ("spin", "_start", (), TaskLimits(timeout_s=0.3), timeout_error(0.3)),
    ("add", "sub", (), None, "The module has no export named 'sub' and no `_start` to run instead. Its exports "
     "are: add. Set the task's name to one of them."),
    ("add", "add", ("1",), None,
     "The export `add` takes 2 inputs (i32, i32) but the task gave 1. Set the task's inputs to match."),
    ("add", "add", ("1", "x"), None,
     "Cannot call `add`: input 1 ('x') is not an integer, but the parameter is i32. Fix the task's inputs."),
    ("hello", "", ("--stderr=disk full", "--exit=3"), None, "The module exited with code 3: disk full."),
    ("greeter-component", "fail", (), None, fault_error(UNREACHABLE, "fail")),
    # Past the end of its memory, within the address space reserved for it: a trap, on memories
    # wasmtime allocates (the CLI) and on those the proplet allocates (components, internal).
    ("greeter-component", "peek", ("4294967295",), None, fault_error("accessed memory out of bounds", "peek")),
    ("greeter-component", "peek", ("1114112",), TaskLimits(memory_bytes=16 * MIB),
     fault_error("accessed memory out of bounds", "peek")),
    ("greeter-component", "spin", (), TaskLimits(timeout_s=0.3), timeout_error(0.3)),
    ("greeter-component", "spin", (), TaskLimits(fuel=100_000),
     "The task exceeded its fuel budget of 100000 and was stopped. Raise the task's fuel limit or reduce "
     "the work it does."),
    ("hello-component", "", ("--stderr=bad", "--exit=2"), None, "The module exited with code 1: bad."),
]


@pytest.mark.parametrize(("name", "function", "inputs", "limits", "error"), SAME_ERROR,
                         ids=[f"{c[0]}-{c[1] or 'command'}-{i}" for i, c in enumerate(SAME_ERROR)])
async def test_the_same_fault_gives_the_same_error(either: WasmtimeRuntime | ExternalRuntime, name: str,
                                                   function: str, inputs: tuple[str, ...],
                                                   limits: TaskLimits | None, error: str) -> None:
    outcome = await run(either, name, function, *inputs, limits=limits or TaskLimits())
    assert (outcome.error, outcome.results) == (error, "")


# The first sentence agrees; what follows may differ (the internal runtime lets the guest go on
# after a refused growth and says what it did then; the CLI traps at the refusal).
SAME_START = [
    ("membomb", (), 16 * MIB, memory_limit_error(16 * MIB)),
    ("membomb-wat", ("bomb",), 16 * MIB, memory_limit_error(16 * MIB)),
    ("hello", (), 64 * 1024, "The module needs more memory at start than its 0.1 MiB limit"),
    ("hello-component", (), 64 * 1024, "The module needs more memory at start than its 0.1 MiB limit"),
    ("membomb-component", (), 16 * MIB, memory_limit_error(16 * MIB)),
]


@pytest.mark.parametrize(("name", "call", "memory", "start"), SAME_START,
                         ids=[f"{c[0]}-{c[2]}" for c in SAME_START])
async def test_memory_limits_are_named_the_same_way(either: WasmtimeRuntime | ExternalRuntime, name: str,
                                                    call: tuple[str, ...], memory: int, start: str) -> None:
    function = call[0] if call else ""
    outcome = await run(either, name, function, limits=TaskLimits(memory_bytes=memory))
    assert outcome.error.startswith(start), outcome.error


async def test_a_component_within_its_memory_limit_runs(either: WasmtimeRuntime | ExternalRuntime) -> None:
    outcome = await run(either, "greeter-component", "greet", '"world"', limits=TaskLimits(memory_bytes=16 * MIB))
    assert (outcome.error, outcome.results) == ("", '"Hello, world!"')


async def test_stop_gives_the_same_error(either: WasmtimeRuntime | ExternalRuntime) -> None:
    d = await load(either, "spin")
    task = asyncio.ensure_future(either.run(d, Invocation("agree-stop", "spin", limits=TaskLimits(timeout_s=30))))
    await asyncio.sleep(0.3)
    assert either.stop("agree-stop")
    outcome = await task
    assert (outcome.error, outcome.results) == (STOPPED_ERROR, "")


async def test_an_invalid_module_is_refused_at_load_the_same_way(either: WasmtimeRuntime | ExternalRuntime) -> None:
    broken = b"\0asm\x01\x00\x00\x00\x01\x05\x01\x60\x00"
    with pytest.raises(ModuleError) as refused:
        await either.load(digest(broken), broken)
    text = str(refused.value)
    assert text.startswith("The module is not valid WebAssembly: ")
    assert text.endswith(". Rebuild it, or check that the task points at the right file.")


async def test_the_timeout_counts_the_run_not_the_compile(either: WasmtimeRuntime | ExternalRuntime,
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fuel budget makes both runtimes compile the module again (with fuel metering); that compile
    (about 2 s for slow-compile) happens before the task's clock starts, on both."""
    # A private CLI compilation cache, or a compile done by an earlier test run would hide this one.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    quick: Outcome = await run(either, "slow-compile", "count", "1000", limits=TaskLimits(fuel=10**9, timeout_s=1))
    assert (quick.error, quick.results) == ("", "1000")
    looping = await run(either, "slow-compile", "spin", limits=TaskLimits(fuel=10**15, timeout_s=1))
    assert (looping.error, looping.results) == (timeout_error(1), "")
