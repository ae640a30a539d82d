"""Fixtures for runtime tests: real wasmtime (wasmtime-py and the CLI) on wasm built from tests/wasm."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proplet.runtime import ExternalRuntime, Invocation, Outcome, RuntimeConfig, WasmtimeRuntime
from tests.services import need
from tests.wasmfixtures import digest, wasm, wasmtime_cli


@contextlib.contextmanager
def small_disk(path: Path, size: int) -> Iterator[Path]:
    """A file system of `size` bytes mounted at `path` (a tmpfs): a disk that really fills up."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    need(mounted.returncode == 0, "mounting a small tmpfs (a disk that fills up)",
         f"run the tests as root ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "wasm-cache"


@pytest.fixture
async def runtime(cache_dir: Path) -> AsyncIterator[WasmtimeRuntime]:
    rt = WasmtimeRuntime(RuntimeConfig(max_concurrent=4, cache_dir=cache_dir, default_timeout_s=30))
    yield rt
    await rt.close()


@pytest.fixture
async def external(tmp_path: Path) -> AsyncIterator[ExternalRuntime]:
    rt = ExternalRuntime(wasmtime_cli(), RuntimeConfig(max_concurrent=4, cache_dir=tmp_path / "ext-cache",
                                                       default_timeout_s=30))
    yield rt
    await rt.close()


async def load(rt: WasmtimeRuntime | ExternalRuntime, name: str) -> str:
    """Load fixture `name` into `rt` and return its digest."""
    data = wasm(name)
    d = digest(data)
    await rt.load(d, data)
    return d


async def run(rt: WasmtimeRuntime | ExternalRuntime, name: str, function: str = "", *inputs: str,
              **kwargs: object) -> Outcome:
    d = await load(rt, name)
    return await rt.run(d, Invocation(kwargs.pop("task_id", f"task-{name}"), function, tuple(inputs), **kwargs))  # type: ignore[arg-type]
