"""The compiled-module cache: memory and disk, keyed by digest and engine settings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import wasmtime

from core.domain import TaskLimits
from proplet.runtime import Invocation, RuntimeConfig, WasmtimeRuntime
from proplet.runtime.cache import DiskBudget, UnsafeCacheDir
from tests.runtime.conftest import small_disk
from tests.wasmfixtures import big_module_byte, bytes_on_disk, digest, wasm, with_custom_section
from tests.wire import eventually


@contextlib.asynccontextmanager
async def runtime_on(cache_dir: Path) -> AsyncIterator[WasmtimeRuntime]:
    """A runtime of its own on `cache_dir` (a proplet started again on the same disk), closed after."""
    runtime = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir))
    try:
        yield runtime
    finally:
        await runtime.close()


async def test_second_load_of_a_digest_does_not_compile(runtime: WasmtimeRuntime) -> None:
    data = wasm("hello")
    d = digest(data)
    assert not runtime.has_module(d)
    await runtime.load(d, data)
    assert runtime.has_module(d)
    await runtime.load(d, data)
    assert runtime.compiles == 1


async def test_concurrent_loads_compile_once(runtime: WasmtimeRuntime) -> None:

    data = wasm("fsio")
    await asyncio.gather(*(runtime.load(digest(data), data) for _ in range(5)))
    assert runtime.compiles == 1


async def test_a_fresh_runtime_uses_the_disk_cache(cache_dir: Path) -> None:
    data = wasm("hello")
    d = digest(data)
    async with runtime_on(cache_dir) as first:
        await first.load(d, data)
        assert first.compiles == 1

    async with runtime_on(cache_dir) as second:
        # The agent skips the fetch when has_module() is true, and runs without calling load().
        assert second.has_module(d)
        outcome = await second.run(d, Invocation("t", "", ("cached",)))
        assert outcome.results.startswith("argv: [main] [cached]")
        assert (second.compiles, second.deserializations) == (0, 1)
        await second.run(d, Invocation("t", "", ("again",)))
        assert second.deserializations == 1  # now in memory


async def _keep_only_compiled_code(cache_dir: Path, d: str, data: bytes) -> None:
    """Load `data` into the cache, then delete the kept copy of its bytes (a full disk kept the compiled
    code and not the bytes)."""
    async with runtime_on(cache_dir) as first:
        await first.load(d, data)
    [stored] = [p for p in cache_dir.rglob("*") if p.is_file() and p.read_bytes() == data]  # noqa: ASYNC240
    stored.unlink()


async def test_compiled_code_without_the_modules_bytes_is_not_a_loaded_module(cache_dir: Path) -> None:
    # A fuel task compiles the bytes for the fuel engine: with only the compiled code left on disk
    # (a full disk kept the one and not the other), has_module() said yes, the agent skipped the
    # fetch, and the task failed "not loaded".
    data = wasm("spin")
    d = digest(data)
    await _keep_only_compiled_code(cache_dir, d, data)
    async with runtime_on(cache_dir) as second:
        assert not second.has_module(d)
        await second.load(d, data)  # what the agent does then
        outcome = await second.run(d, Invocation("f", "count", ("10",), limits=TaskLimits(fuel=10_000)))
        assert (outcome.error, outcome.results) == ("", "10")


async def test_a_load_from_compiled_code_reads_signatures_from_the_delivered_bytes(cache_dir: Path) -> None:
    # With the compiled code on disk and the kept bytes gone, the load asked wasmtime-py for the
    # export signatures, which aborts the process on a v128.
    data = bytes(wasmtime.wat2wasm('(module (func (export "take") (param v128)))'))
    d = digest(data)
    await _keep_only_compiled_code(cache_dir, d, data)
    async with runtime_on(cache_dir) as second:
        await second.load(d, data)
        assert (second.compiles, second.deserializations) == (0, 1)
        outcome = await second.run(d, Invocation("t", "take", ("1",)))
        assert outcome.error == ("Cannot call `take`: parameter 0 has type v128, which a task input cannot "
                                 "provide. Fix the task's inputs.")


async def test_fuel_tasks_compile_for_the_fuel_engine_once(runtime: WasmtimeRuntime) -> None:
    data = wasm("spin")
    d = digest(data)
    await runtime.load(d, data)
    for _ in range(2):
        outcome = await runtime.run(d, Invocation("f", "count", ("10",), limits=TaskLimits(fuel=10_000)))
        assert outcome.results == "10"
    assert runtime.compiles == 2  # plain engine at load, fuel engine on first use


async def test_a_damaged_cache_file_is_recompiled_not_loaded(cache_dir: Path) -> None:
    data = wasm("add")
    d = digest(data)
    async with runtime_on(cache_dir) as first:
        await first.load(d, data)
    [compiled] = cache_dir.glob("wasmtime-py-*-nofuel-*/*.cwasm")  # noqa: ASYNC240 - a test's setup
    raw = bytearray(compiled.read_bytes())
    raw[-100] ^= 0xFF  # flip bits inside the native code
    compiled.write_bytes(bytes(raw))

    async with runtime_on(cache_dir) as second:
        outcome = await second.run(d, Invocation("t", "add", ("1", "2")))
        assert outcome.results == "3"
        assert (second.compiles, second.deserializations) == (1, 0)


def test_a_cache_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafeCacheDir, match="chmod 700"):
        WasmtimeRuntime(RuntimeConfig(cache_dir=shared))


async def test_memory_cache_is_bounded(cache_dir: Path) -> None:
    rt = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir, memory_cache_entries=2))
    try:
        for name in ("add", "numeric", "traps"):
            await rt.load(digest(wasm(name)), wasm(name))
        assert len(rt._artifacts) == 2
        # The evicted module still runs, from disk, without recompiling.
        outcome = await rt.run(digest(wasm("add")), Invocation("t", "add", ("2", "3")))
        assert outcome.results == "5"
        assert (rt.compiles, rt.deserializations) == (3, 1)
    finally:
        await rt.close()


async def test_memory_cache_is_bounded_by_the_bytes_of_compiled_code_too(cache_dir: Path) -> None:
    # By count alone, 64 modules of 10 MiB held over 1 GiB: too much for the small boxes proplets run on.
    limit = 25 * 2**20
    rt = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir, memory_cache_bytes=limit))
    modules = [with_custom_section(wasm("big"), "copy", bytes([i])) for i in range(3)]
    try:
        for data in modules:
            await rt.load(digest(data), data)
        # Each holds the 10 MiB data segment: two fit under 25 MiB, the first loaded made room.
        assert len(rt._artifacts) == 2 and 20 * 2**20 < rt._artifacts.bytes <= limit
        assert (digest(modules[0])[7:], False) not in rt._artifacts
        # The evicted module still runs, from disk, without recompiling.
        outcome = await rt.run(digest(modules[0]), Invocation("t", "probe", ("5",)))
        assert outcome.error == "" and outcome.results == str(big_module_byte(5))
        assert (rt.compiles, rt.deserializations) == (3, 1)
    finally:
        await rt.close()


@contextlib.contextmanager
def _files_capped_at(limit: int) -> Iterator[None]:
    """Writes that would take a file past `limit` bytes fail (EFBIG), as on a full disk (ENOSPC)."""
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


async def test_a_full_disk_costs_the_cache_not_the_task(runtime: WasmtimeRuntime) -> None:
    # A compiled module that could not be cached was only logged, but its wasm copy failing to
    # write failed the load, and with it every task of a new module while the disk was full.
    data = wasm("hello")
    d = digest(data)
    with _files_capped_at(64 * 1024):
        await runtime.load(d, data)
    outcome = await runtime.run(d, Invocation("t", "", ("full",)))
    assert (outcome.error, outcome.results[:18]) == ("", "argv: [main] [full")


def _module_files(root: Path, d: str) -> list[Path]:
    return sorted(p for p in root.rglob(f"{d[7:]}.*") if p.is_file())


def _age_files(root: Path, seconds: float) -> float:
    """Set every file's modification time `seconds` back; returns that time."""
    when = time.time() - seconds
    for path in root.rglob("*.*"):
        os.utime(path, (when, when))
    return when


def _padded(n: int) -> bytes:
    """`add` with 200 KiB of its own: distinct modules of about the same size on disk."""
    return with_custom_section(wasm("add"), "padding", bytes([n]) * 200 * 1024)


async def test_the_disk_cache_is_bounded_and_removes_the_module_run_least_recently(cache_dir: Path) -> None:
    # Unbounded, every module a proplet ever ran stayed in cache_dir (bytes and compiled code):
    # an edge box deploying a new version daily filled its disk.
    modules = [_padded(n) for n in range(4)]
    async with runtime_on(cache_dir) as probe:
        await probe.load(digest(modules[0]), modules[0])
    footprint = bytes_on_disk(cache_dir)
    shutil.rmtree(cache_dir)
    limit = int(footprint * 3.5)
    rt = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir, disk_cache_bytes=limit))
    try:
        for data in modules[:3]:
            await rt.load(digest(data), data)
            await asyncio.sleep(0.02)  # past the file system's clock tick: one module clearly older
        # The first is run again: now the second is the one run least recently.
        outcome = await rt.run(digest(modules[0]), Invocation("t", "add", ("2", "3")))
        assert outcome.results == "5"
        await rt.load(digest(modules[3]), modules[3])

        assert rt._budget.evicted == 1
        assert _module_files(cache_dir, digest(modules[1])) == []
        assert all(_module_files(cache_dir, digest(m)) for m in (modules[0], modules[2], modules[3]))
        assert bytes_on_disk(cache_dir) <= limit
        # Forgotten in memory too: the agent asks for it again, and it runs once delivered.
        assert not rt.has_module(digest(modules[1]))
        await rt.load(digest(modules[1]), modules[1])
        outcome = await rt.run(digest(modules[1]), Invocation("t", "add", ("40", "2")))
        assert outcome.results == "42"
        assert rt.compiles == 5
        assert bytes_on_disk(cache_dir) <= limit
    finally:
        await rt.close()


async def test_a_module_run_from_memory_is_not_the_first_to_leave_the_disk(cache_dir: Path) -> None:
    # A run served from memory touches no file; without the touch, the module run all day would be
    # the oldest on disk and the first removed (and, forgotten, fetched and compiled again).
    modules = [_padded(n) for n in range(3)]
    rt = WasmtimeRuntime(RuntimeConfig(cache_dir=cache_dir))
    try:
        for data in modules:
            await rt.load(digest(data), data)
        old = _age_files(cache_dir, 3600)
        await rt.run(digest(modules[0]), Invocation("t", "add", ("1", "1")))
        touched = _module_files(cache_dir, digest(modules[0]))
        assert touched
        await eventually(lambda: all(p.stat().st_mtime > old + 3000 for p in touched), 5)
        assert all(p.stat().st_mtime == old for p in _module_files(cache_dir, digest(modules[1])))
    finally:
        await rt.close()


def _fake_module_file(root: Path, sub: str, hex_digest: str, size: int, age_s: float) -> Path:
    path = root / sub / f"{hex_digest}.module.cwasm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_the_budget_removes_oldest_first_spares_modules_in_use_and_abandoned_temporary_files(tmp_path: Path) -> None:
    oldest, older, newer = ("a" * 64, "b" * 64, "c" * 64)
    stale_engine = _fake_module_file(tmp_path, "wasmtime-py-1.0-x86_64-nofuel-0", oldest, 4000, 300)
    in_use = _fake_module_file(tmp_path, "wasmtime-py-2.0-x86_64-nofuel-0", older, 4000, 200)
    kept = _fake_module_file(tmp_path, "wasm", newer, 4000, 100)
    abandoned = tmp_path / "wasm" / f".{newer}.wasm.x1.tmp"
    abandoned.write_bytes(b"\0" * 10)
    os.utime(abandoned, (time.time() - 7200, time.time() - 7200))
    being_written = tmp_path / "wasm" / f".{newer}.wasm.x2.tmp"
    being_written.write_bytes(b"\0" * 10)
    forgotten: list[str] = []
    budget = DiskBudget(tmp_path, 9000, files_of=lambda h: [], in_use=lambda: {older}, forget=forgotten.append)

    budget.added(0)  # the first write scans: 12,000 bytes, over 9,000

    assert not stale_engine.exists() and in_use.exists() and kept.exists()
    assert forgotten == [oldest] and budget.evicted == 1
    assert not abandoned.exists() and being_written.exists()
    newest = _fake_module_file(tmp_path, "wasm", "d" * 64, 2000, 0)
    budget.added(2000)  # 10,000: down to 8,100 at most, sparing the one in use
    assert in_use.exists() and not kept.exists() and newest.exists()
    assert forgotten == [oldest, newer] and budget.evicted_bytes == 8000


async def test_a_full_disk_makes_room_by_removing_the_modules_run_least_recently(tmp_path: Path) -> None:
    # The disk fills before the cache's bound (something else took it): the cache gives way.
    with small_disk(tmp_path / "disk", 1536 * 1024) as disk:
        cache = disk / "cache"
        rt = WasmtimeRuntime(RuntimeConfig(cache_dir=cache, disk_cache_bytes=2**30))
        modules = [_padded(n) for n in range(12)]  # 200 KiB each and their code: 7 fill the disk
        try:
            for data in modules:
                await rt.load(digest(data), data)
                await asyncio.sleep(0.02)  # past the file system's clock tick: one module clearly older
            assert rt._budget.evicted >= 5
            assert not rt.has_module(digest(modules[0]))
            # Every module loaded has its bytes and code on disk: a fresh proplet would not compile it.
            kinds = {p.name[65:] for p in _module_files(cache, digest(modules[-1]))}
            assert kinds == {"wasm", "module.cwasm"}
            outcome = await rt.run(digest(modules[-1]), Invocation("t", "add", ("40", "2")))
            assert outcome.results == "42"
        finally:
            await rt.close()
