"""Both runtimes fail a task the same way: the same sentence for the same fault, the same clock for
the timeout. An operator should not need to know which runtime a proplet uses to read an error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import wasmtime

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


GREETER_EXPORTS = ", ".join(["shout", *(f"propeller:test/api#{name}" for name in
                                          ("greet", "add", "is-even", "count-char", "half", "spin", "fail", "peek"))])


def _count(function: str, takes: str, given: int) -> str:
    return (f"The export `propeller:test/api#{function}` takes {takes} but the task gave {given}. "
            "Set the task's inputs to match.")


def _bad_input(function: str, why: str) -> str:
    return f"Cannot call `propeller:test/api#{function}`: {why}. Fix the task's inputs."


def _no_export(function: str, exports: str) -> str:
    return (f"The module has no export named {function!r} and no `_start` to run instead. Its exports are: "
            f"{exports}. Set the task's name to one of them.")


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
    # A component's inputs are checked by its parameter types before it runs, on both runtimes.
    ("greeter-component", "add", ("1",), None, _count("add", "2 inputs (s32, s32)", 1)),
    ("greeter-component", "add", ("1", "2", "3"), None, _count("add", "2 inputs (s32, s32)", 3)),
    ("greeter-component", "greet", (), None, _count("greet", "1 input (string)", 0)),
    ("greeter-component", "spin", ("1",), None, _count("spin", "0 inputs", 1)),
    # One input holding two values is still one input, not a second argument of the call.
    ("greeter-component", "add", ("1, 2",), None, _count("add", "2 inputs (s32, s32)", 1)),
    ("greeter-component", "add", ("1", "x"), None,
     _bad_input("add", "input 1 ('x') is not a valid s32: expected an integer but found 'x'")),
    ("greeter-component", "add", ("1", "3000000000"), None,
     _bad_input("add", "input 1 ('3000000000') is not a valid s32: 3000000000 is outside s32 "
                "(-2147483648..2147483647)")),
    ("greeter-component", "is-even", ("-1",), None,
     _bad_input("is-even", "input 0 ('-1') is not a valid u64: -1 is outside u64 (0..18446744073709551615)")),
    ("greeter-component", "half", ("x",), None,
     _bad_input("half", "input 0 ('x') is not a valid f64: expected a number but found 'x'")),
    ("greeter-component", "greet", ('"open',), None,
     _bad_input("greet", "input 0 ('\"open') is not a valid string: missing closing \"")),
    ("greeter-component", "greet", ('"a"), add(1',), None,
     _bad_input("greet", "input 0 ('\"a\"), add(1') is not a valid string: unexpected '), add(1' after the value")),
    ("greeter-component", "nope", (), None, _no_export("nope", GREETER_EXPORTS)),
    ("greeter-component", "propeller:test/api#nope", (), None,
     _no_export("propeller:test/api#nope", GREETER_EXPORTS)),
    ("greeter-component", "nope#add", ("1", "2"), None, _no_export("nope#add", GREETER_EXPORTS)),
    ("greeter-component", 'greet("x")', (), None, _no_export('greet("x")', GREETER_EXPORTS)),
    # No wasi:cli/run to run instead.
    ("greeter-component", "", (), None, _no_export("", GREETER_EXPORTS)),
    ("greeter-component", "run", (), None, _no_export("run", GREETER_EXPORTS)),
    ("hello-component", "a#b", (), None, _no_export("a#b", "wasi:cli/run@0.2.12#run")),
    # More digits than Python converts to an int at once (4,300): still a bad input, not a crash.
    ("greeter-component", "add", ("1" * 5000, "1"), None,
     _bad_input("add", f"input 0 ({'1' * 80!r}… (5,000 characters)) is not a valid s32: {'1' * 24}… is outside "
                "s32 (-2147483648..2147483647)")),
    ("add", "add", ("1" * 5000, "1"), None,
     f"Cannot call `add`: input 0 ({'1' * 80!r}… (5,000 characters)) does not fit in i32. Fix the task's inputs."),
    # An error quotes a long input only in part: whole, it went into the result, the events and the logs.
    ("greeter-component", "greet", ('"' + "a" * 200_000,), None,
     _bad_input("greet", "input 0 ('\"" + "a" * 79 + "'… (200,001 characters)) is not a valid string: missing "
                "closing \"")),
    # A lone surrogate has no UTF-8 form (wasmtime-py's lowering panicked on a char holding one).
    ("greeter-component", "greet", ("\ud800",), None,
     _bad_input("greet", "input 0 ('\\ud800') is not a valid string: it holds a lone surrogate (U+D800), which is "
                "not a Unicode character")),
    ("greeter-component", "count-char", ("a", "\udfff"), None,
     _bad_input("count-char", "input 1 ('\\udfff') is not a valid char: it holds a lone surrogate (U+DFFF), which "
                "is not a Unicode character")),
    ("greeter-component", "greet", ('"\\u{d800}"',), None,
     _bad_input("greet", "input 0 ('\"\\\\u{d800}\"') is not a valid string: it holds a lone surrogate (U+D800), "
                "which is not a Unicode character")),
    ("greeter-component", "greet", ('"\\u{1000000000000000000000}"',), None,
     _bad_input("greet", "input 0 ('\"\\\\u{1000000000000000000000}\"') is not a valid string: bad \\u escape "
                "'{1000000000000000000000}'")),
    # Command lines and environments are C strings.
    ("hello", "", ("a\0b",), None,
     "Input 0 ('a\\x00b') holds a NUL character, which a command's arguments cannot carry. Remove it from the task."),
    ("hello-component", "", ("a\0b",), None,
     "Input 0 ('a\\x00b') holds a NUL character, which a command's arguments cannot carry. Remove it from the task."),
    ("numeric", "takes_ref", ("1",), None,
     "Cannot call `takes_ref`: parameter 0 has type externref, which a task input cannot provide. Fix the "
     "task's inputs."),
]


@pytest.mark.parametrize(("name", "function", "inputs", "limits", "error"), SAME_ERROR,
                         ids=[f"{c[0]}-{c[1] or 'command'}-{i}"[:60] for i, c in enumerate(SAME_ERROR)])
async def test_the_same_fault_gives_the_same_error(either: WasmtimeRuntime | ExternalRuntime, name: str,
                                                   function: str, inputs: tuple[str, ...],
                                                   limits: TaskLimits | None, error: str) -> None:
    outcome = await run(either, name, function, *inputs, limits=limits or TaskLimits())
    assert (outcome.error, outcome.results) == (error, "")


# (fixture, task name, inputs, the result both give)
SAME_RESULT = [
    # A string or char input may be given plain, and any name that is not an export's runs a
    # command with it as argv[0].
    ("greeter-component", "greet", ("world",), '"Hello, world!"'),
    ("greeter-component", "greet", ("",), '"Hello, !"'),
    ("greeter-component", "greet", ('"say \\"hi\\"\\n"',), '"Hello, say \\"hi\\"\\n!"'),
    ("greeter-component", "count-char", ("banana", "a"), "3"),
    ("greeter-component", "count-char", ("banana", "'n'"), "2"),
    ("greeter-component", "propeller:test/api#add", ("2", "-5"), "-3"),
    ("greeter-component", "shout", ("abc",), '"ABC"'),
    ("greeter-component", "half", ("1e20",), "50000000000000000000"),
    ("hello-component", "", ("x",), "argv: [main] [x]\nGREETING=(unset)\n"),
    ("hello-component", "run", ("x",), "argv: [run] [x]\nGREETING=(unset)\n"),
    ("hello-component", "greet", ("x",), "argv: [greet] [x]\nGREETING=(unset)\n"),
    ("hello", "", ("x",), "argv: [main] [x]\nGREETING=(unset)\n"),
    ("hello", "nope", ("x",), "argv: [nope] [x]\nGREETING=(unset)\n"),
]


@pytest.mark.parametrize(("name", "function", "inputs", "results"), SAME_RESULT,
                         ids=[f"{c[0]}-{c[1] or 'command'}-{i}" for i, c in enumerate(SAME_RESULT)])
async def test_the_same_inputs_give_the_same_results(either: WasmtimeRuntime | ExternalRuntime, name: str,
                                                     function: str, inputs: tuple[str, ...], results: str) -> None:
    outcome = await run(either, name, function, *inputs)
    assert (outcome.error, outcome.results) == ("", results)


# The first sentence agrees; what follows may differ (the internal runtime lets the guest go on
# after a refused growth and says what it did then; the CLI traps at the refusal).
SAME_START = [
    ("membomb", (), 16 * MIB, memory_limit_error(16 * MIB)),
    ("membomb-wat", ("bomb",), 16 * MIB, memory_limit_error(16 * MIB)),
    ("hello", (), 64 * 1024, "The module needs more memory at start than its 0.1 MiB limit"),
    ("hello-component", (), 64 * 1024, "The module needs more memory at start than its 0.1 MiB limit"),
    ("membomb-component", (), 16 * MIB, memory_limit_error(16 * MIB)),
]


# Exports of types no task input or result can carry. Asking wasmtime-py for the kind of a v128
# aborted the process (at load, on the internal runtime).
ODD_TYPES = bytes(wasmtime.wat2wasm("""(module
  (func (export "give") (result externref) ref.null extern)
  (func (export "take") (param v128))
  (func (export "vec") (result v128) v128.const i64x2 0 0))"""))


@pytest.mark.parametrize(("function", "inputs", "error"), [
    ("give", (), "The export `give` returns externref, which cannot be put in a task result (only i32, i64, f32 "
     "and f64 can). Export a function returning numbers."),
    ("vec", (), "The export `vec` returns v128, which cannot be put in a task result (only i32, i64, f32 and f64 "
     "can). Export a function returning numbers."),
    ("take", ("1",), "Cannot call `take`: parameter 0 has type v128, which a task input cannot provide. Fix the "
     "task's inputs."),
], ids=["externref-result", "v128-result", "v128-param"])
async def test_exports_of_types_a_task_cannot_use_fail_the_same_way(either: WasmtimeRuntime | ExternalRuntime,
                                                                  function: str, inputs: tuple[str, ...],
                                                                  error: str) -> None:
    d = digest(ODD_TYPES)
    await either.load(d, ODD_TYPES)
    outcome = await either.run(d, Invocation("odd-types", function, inputs))
    assert (outcome.error, outcome.results) == (error, "")


@pytest.mark.parametrize(("name", "function", "inputs"), [("hello", "", ()), ("add", "add", ("1", "2")),
                                                     ("greeter-component", "greet", ("x",))])
async def test_a_nul_in_the_environment_fails_the_same_way(either: WasmtimeRuntime | ExternalRuntime, name: str,
                                                           function: str, inputs: tuple[str, ...]) -> None:
    outcome = await run(either, name, function, *inputs, env={"GREETING": "a\0b"})
    assert (outcome.error, outcome.results) == (
        "The task's environment variable 'GREETING' holds a NUL character, which the environment cannot carry. "
        "Remove it from the task.", "")


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
