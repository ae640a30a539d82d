"""WASI commands on the internal runtime: argv, env, stdout/stderr, exit codes, preopened dirs."""

from __future__ import annotations

from pathlib import Path

from proplet.runtime import WasmtimeRuntime
from tests.runtime.conftest import run


async def test_command_gets_argv_and_env_and_returns_stdout(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "hello", "", "one", "two words", env={"GREETING": "hej"})
    assert outcome.error == ""
    assert outcome.results == "argv: [main] [one] [two words]\nGREETING=hej\n"
    assert outcome.stdout == outcome.results.encode()


async def test_start_and_main_and_unknown_names_run_the_command(runtime: WasmtimeRuntime) -> None:
    for function in ("_start", "main", "not-an-export"):
        outcome = await run(runtime, "hello", function, "x")
        assert outcome.error == ""
        assert outcome.results.startswith(f"argv: [{function or 'main'}] [x]")


async def test_env_is_only_what_the_task_gives(runtime: WasmtimeRuntime, monkeypatch) -> None:
    monkeypatch.setenv("GREETING", "from the proplet's own environment")
    outcome = await run(runtime, "hello", "")
    assert "GREETING=(unset)" in outcome.results


async def test_stderr_is_appended_to_the_result(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "hello", "", "--stderr=careful")
    assert outcome.results == "argv: [main] [--stderr=careful]\nGREETING=(unset)\n\ncareful\n"
    assert outcome.stderr == b"careful\n"


async def test_non_zero_exit_is_an_error_with_the_stderr_tail(runtime: WasmtimeRuntime) -> None:
    outcome = await run(runtime, "hello", "", "--stderr=disk is full", "--exit=3")
    assert outcome.error == "The module exited with code 3: disk is full."
    assert outcome.results == ""
    assert b"argv:" in outcome.stdout


async def test_preopened_dir_can_be_read_and_written(runtime: WasmtimeRuntime, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("input data")
    outcome = await run(runtime, "fsio", "", "read", f"{shared}/in.txt", dirs=(str(shared),))
    assert outcome.error == ""
    assert outcome.results == "input data"
    outcome = await run(runtime, "fsio", "", "write", f"{shared}/out.txt", "written by wasm", dirs=(str(shared),))
    assert outcome.error == ""
    assert (shared / "out.txt").read_text() == "written by wasm"


async def test_no_escape_from_the_preopened_dir(runtime: WasmtimeRuntime, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    (shared / "link").symlink_to(tmp_path / "secret.txt")
    for path in (f"{shared}/../secret.txt", f"{tmp_path}/secret.txt", f"{shared}/link"):
        outcome = await run(runtime, "fsio", "", "read", path, dirs=(str(shared),))
        assert outcome.error.startswith("The module exited with code 2: error: read"), path
        assert b"secret" not in outcome.stdout
    outcome = await run(runtime, "fsio", "", "write", f"{shared}/../planted.txt", "x", dirs=(str(shared),))
    assert outcome.error
    assert not (tmp_path / "planted.txt").exists()


async def test_without_preopens_there_is_no_filesystem(runtime: WasmtimeRuntime, tmp_path: Path) -> None:
    (tmp_path / "visible.txt").write_text("host file")
    outcome = await run(runtime, "fsio", "", "read", f"{tmp_path}/visible.txt")
    assert "exited with code 2" in outcome.error
    outcome = await run(runtime, "fsio", "", "list", "/")
    assert "exited with code 2" in outcome.error


async def test_a_missing_preopen_dir_is_a_clear_error(runtime: WasmtimeRuntime, tmp_path: Path) -> None:
    outcome = await run(runtime, "hello", "", dirs=(str(tmp_path / "nope"),))
    assert outcome.error.startswith(f"Cannot give the task the directory {tmp_path / 'nope'}")


async def test_huge_stdout_is_truncated_at_the_cap_and_fails(runtime: WasmtimeRuntime) -> None:
    cap = runtime.config.capture_bytes
    outcome = await run(runtime, "bigout", "", "8")  # 8 MiB of 'x'
    assert outcome.error.startswith(f"The module wrote {8 * 1024 * 1024} bytes to stdout, more than the 1 MiB")
    kept, _, note = outcome.stdout.partition(b"\n[")
    assert kept == b"x" * cap
    assert note.startswith(str(8 * 1024 * 1024 - cap).encode() + b" more bytes of stdout dropped")
    assert outcome.stderr == b"done\n"
    assert outcome.results.endswith("stdout dropped: the proplet keeps the first 1 MiB]\n\ndone\n")
