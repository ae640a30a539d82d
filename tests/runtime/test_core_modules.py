"""Core modules on the internal runtime: calling exports with typed inputs and formatting results."""

from __future__ import annotations

import pytest

from proplet.runtime import Invocation, ModuleError, WasmtimeRuntime
from tests.runtime.conftest import load, run
from tests.wasmfixtures import digest


async def test_add_returns_the_sum(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "add", "add", "2", "40")
    assert outcome.error == ""
    assert outcome.results == "42"
    assert outcome.duration_s > 0


@pytest.mark.parametrize(
    ("function", "inputs", "expected"),
    [
        ("add64", ("9223372036854775807", "-9223372036854775807"), "0"),
        ("add64", ("18446744073709551615", "0"), "-1"),  # u64 max wraps to -1, as the wire spec says
        ("mul64f", ("1.5", "4"), "6"),
        ("mul64f", ("1e300", "1e10"), "inf"),
        ("mul64f", ("0.1", "3"), "0.30000000000000004"),
        ("div32f", ("1", "3"), "0.33333334"),
        ("div32f", ("0", "0"), "NaN"),
        ("mixed", ("1", "2", "0.5", "0.25"), "3.75"),
        ("divmod", ("7", "2"), "3,1"),
        ("nothing", ("5",), ""),
    ],
)
async def test_inputs_are_converted_and_results_formatted_by_type(
        runtime: WasmtimeRuntime, function: str, inputs: tuple[str, ...], expected: str) -> None:
    outcome = await run(runtime, "numeric", function, *inputs)
    assert outcome.error == ""
    assert outcome.results == expected


async def test_i32_accepts_unsigned_spelling_and_wraps(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "add", "add", "4294967295", "0")
    assert outcome.results == "-1"


async def test_reactor_initialize_runs_before_the_export(runtime: WasmtimeRuntime) -> None:
    # add_base returns 40 + x only if _initialize ran the C constructors first.
    outcome = await run(runtime, "reactor", "add_base", "2")
    assert outcome.error == ""
    assert outcome.results == "42"


async def test_missing_export_lists_the_exports(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "numeric", "sub", "1", "2")
    assert outcome.results == ""
    assert "no export named 'sub'" in outcome.error
    assert "add64, mul64f, div32f" in outcome.error


async def test_wrong_input_count_is_explained(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "add", "add", "1")
    assert outcome.error == ("The export `add` takes 2 inputs (i32, i32) but the task gave 1. "
                             "Set the task's inputs to match.")


async def test_wrong_input_type_names_the_input(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "add", "add", "1", "two")
    assert "input 1 ('two') is not an integer, but the parameter is i32" in outcome.error
    outcome = await run(runtime, "add", "add", "1", "99999999999")
    assert "does not fit in i32" in outcome.error


async def test_parameter_a_task_cannot_provide(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "numeric", "takes_ref", "1")
    assert "which a task input cannot provide" in outcome.error


async def test_invalid_module_fails_at_load(runtime: WasmtimeRuntime) -> None:
    broken = b"\0asm\x01\x00\x00\x00\x01\x05\x01\x60\x00"  # a type section cut short
    with pytest.raises(ModuleError, match="not valid WebAssembly"):
        await runtime.load(digest(broken), broken)
    assert not runtime.has_module(digest(broken))


async def test_non_wasm_bytes_fail_at_load_with_a_hint(runtime: WasmtimeRuntime) -> None:
    html = b"<html>404 Not Found</html>"
    with pytest.raises(ModuleError, match=r"not a WebAssembly binary.*3c 68 74 6d"):
        await runtime.load(digest(html), html)


async def test_unknown_imports_fail_at_load(runtime: WasmtimeRuntime) -> None:
    import wasmtime

    needs_env = wasmtime.wat2wasm('(module (import "env" "host_fn" (func)) (func (export "f") call 0))')
    with pytest.raises(ModuleError, match="imports this proplet does not provide"):
        await runtime.load(digest(needs_env), needs_env)


async def test_a_digest_that_is_not_sha256_is_refused(runtime: WasmtimeRuntime) -> None:
    with pytest.raises(ValueError, match="sha256"):
        runtime.has_module("sha256:../../etc/passwd")
    outcome = await runtime.run("md5:abc", Invocation("t", "add"))
    assert "is not a sha256 digest" in outcome.error


async def test_run_of_a_module_never_loaded(runtime: WasmtimeRuntime) -> None:
    outcome = await runtime.run("sha256:" + "0" * 64, Invocation("t", "add"))
    assert "is not loaded on this proplet" in outcome.error


async def test_the_ten_mib_module_loads_and_runs(runtime: WasmtimeRuntime) -> None:
    from tests.wasmfixtures import BIG_MODULE_BYTES, big_module_byte

    d = await load(runtime, "big")
    for offset in (0, 12345, BIG_MODULE_BYTES - 1):
        outcome = await runtime.run(d, Invocation("big", "probe", (str(offset),)))
        assert outcome.error == ""
        assert outcome.results == str(big_module_byte(offset))


async def test_a_result_type_that_cannot_be_reported(runtime: WasmtimeRuntime) -> None:
    import wasmtime

    returns_ref = wasmtime.wat2wasm('(module (func (export "r") (result externref) ref.null extern))')
    await runtime.load(digest(returns_ref), returns_ref)
    outcome = await runtime.run(digest(returns_ref), Invocation("t", "r"))
    assert outcome.error.startswith("The export `r` returns")
