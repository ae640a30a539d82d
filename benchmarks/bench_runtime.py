"""Per-task overhead of WasmtimeRuntime.run over bare wasmtime-py, and live instances per process.

    .venv/bin/python benchmarks/bench_runtime.py [--iterations 2000] [--instances 1000]

Baseline (same process, same Engine, same compiled Module): new Store + epoch deadline +
WasiConfig with captured stdout + Linker.instantiate + one call + dropping the Store. Measured: `await runtime.run(...)`
for the same module and call, which adds the thread hops (not for `add`: a short module whose
imports cannot block runs on the event loop after its first runs), the concurrency slot, the
watchdog, the memory limit, input parsing and result formatting. Printed: p50/p99 of both, the overhead and the
ratio; then the RSS growth of N live instances (one Store each) of a one-page module.
Figures only: this is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wasmtime

from proplet.runtime import Invocation, RuntimeConfig, WasmtimeRuntime
from tests.wasmfixtures import digest, wasm


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bare_call(engine: wasmtime.Engine, linker: wasmtime.Linker, module: wasmtime.Module,
              function: str, args: tuple[int, ...], argv: list[str] | None) -> float:
    started = time.perf_counter()
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1 << 40)
    wasi = wasmtime.WasiConfig()
    if argv is not None:
        wasi.argv = argv
    out: list[bytes] = []
    wasi.stdout_custom = out.append
    store.set_wasi(wasi)
    instance = linker.instantiate(store, module)
    try:
        instance.exports(store)[function](store, *args)
    except wasmtime.ExitTrap:
        pass
    # Dropping the store (its memories, WASI context) is part of every task's cost.
    del instance, store
    return time.perf_counter() - started


async def overhead(rt: WasmtimeRuntime, name: str, function: str, inputs: tuple[str, ...],
                   iterations: int) -> None:
    data = wasm(name)
    d = digest(data)
    await rt.load(d, data)
    artifact = rt._cached(d[7:], False)
    engines = rt._engines[(False, False)]  # (fuel, components): core modules, no fuel
    module = artifact.module  # type: ignore[union-attr]
    command = function in ("", "_start")
    call = "_start" if command else function
    args = tuple(int(i) for i in inputs) if not command else ()
    argv = ["main", *inputs] if command else None
    inv = Invocation("bench", function, inputs)
    # Warm up both paths (thread pool start, first-instantiate costs).
    for _ in range(50):
        bare_call(engines.engine, engines.linker, module, call, args, argv)
        await rt.run(d, inv)
    bare: list[float] = []
    ours: list[float] = []
    # Alternating blocks of 100: drift (CPU frequency, other load) hits both alike, and each path
    # runs warm, as it does on a busy proplet.
    block = 100
    for _ in range(max(1, iterations // block)):
        for _ in range(block):
            bare.append(bare_call(engines.engine, engines.linker, module, call, args, argv))
        for _ in range(block):
            # A turn of the loop between runs, as a proplet has (it receives the next start): what
            # a run left for later (a store freed after a run on the loop) is done there, not
            # piled up into one run's time.
            await asyncio.sleep(0)
            started = time.perf_counter()
            outcome = await rt.run(d, inv)
            ours.append(time.perf_counter() - started)
            assert not outcome.error, outcome.error
    b50, b99 = pct(bare, 0.5) * 1e6, pct(bare, 0.99) * 1e6
    o50, o99 = pct(ours, 0.5) * 1e6, pct(ours, 0.99) * 1e6
    label = f"{name}:{function or '_start'}"
    print(f"{label:<22} bare p50 {b50:7.1f} µs  p99 {b99:7.1f} µs | runtime.run p50 {o50:7.1f} µs  "
          f"p99 {o99:7.1f} µs | overhead p50 {o50 - b50:+7.1f} µs  p99 {o99 - b99:+7.1f} µs | "
          f"ratio p50 {o50 / b50:.2f}x  (mean bare {statistics.mean(bare) * 1e6:.1f} µs)")


def live_instances(count: int, reservation: int | None) -> None:
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    if reservation is not None:
        cfg.memory_reservation = reservation
    engine = wasmtime.Engine(cfg)
    module = wasmtime.Module(engine, '(module (memory (export "memory") 1) '
                                     '(func (export "touch") (i32.store (i32.const 0) (i32.const 1))))')
    before = rss_bytes()
    started = time.perf_counter()
    alive = []
    for _ in range(count):
        store = wasmtime.Store(engine)
        store.set_epoch_deadline(1 << 40)
        instance = wasmtime.Instance(store, module, [])
        instance.exports(store)["touch"](store)
        alive.append((store, instance))
    elapsed = time.perf_counter() - started
    grown = rss_bytes() - before
    shown = "default (4 GiB + guard)" if reservation is None else f"{reservation // 2**20} MiB"
    print(f"{count} live instances, memory_reservation {shown}: RSS +{grown / 2**20:.1f} MiB "
          f"({grown / count / 1024:.1f} KiB each), created in {elapsed * 1e3:.0f} ms "
          f"({elapsed / count * 1e6:.0f} µs each)")
    del alive


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=1000)
    opts = parser.parse_args()
    print(f"wasmtime-py {wasmtime.__name__} / Python {sys.version.split()[0]} / {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as cache:
        rt = WasmtimeRuntime(RuntimeConfig(cache_dir=Path(cache)))
        try:
            await overhead(rt, "add", "add", ("2", "40"), opts.iterations)
            await overhead(rt, "hello", "", ("x",), opts.iterations // 2)
        finally:
            await rt.close()
    live_instances(opts.instances, None)
    live_instances(opts.instances, 64 * 2**20)


if __name__ == "__main__":
    asyncio.run(main())
