"""Soak: does a long-running manager or proplet grow? Memory after each round of tasks, as a gateway
runs for weeks.

A manager (in this process, SQLite, as `propeller serve` runs it) and 2 `propeller proplet`
processes (metrics every second) on a Mosquitto of their own, while a separate process publishes
heartbeats for 200 more proplet ids (a fleet's chatter). Each round submits `--round` tasks (one in
ten calls an export the module lacks, so failures and their errors go through too) through the
same path as the REST API, waits for all to end, then collects garbage and samples:

- the manager's resident memory, as it is and once glibc has handed its free heap pages back
  (`malloc_trim`), by kind (anonymous, file-backed, shared), and its Python heap blocks
  (`sys.getallocatedblocks()`: live Python objects, not the allocator's free lists);
- the database and its write-ahead log on disk, and the memory SQLite's allocator holds;
- the manager's in-memory task state (queued or running, kept recent, results not yet stored);
- each proplet's resident memory.

The first rounds fill caches that are bounded by design (recent tasks kept, connection buffers,
compiled modules); growth is read from the second half of the run, per 10,000 tasks. Nothing is
asserted: a bounded process shows growth near zero, a leak a steady climb.

    .venv/bin/python benchmarks/bench_soak.py [--rounds 10] [--round 5000] [--large-results]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import ctypes.util
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_e2e import proplet_processes, rss_mb, wait_online  # noqa: E402

from core.config import ManagerSettings  # noqa: E402
from core.domain import TaskStateChanged  # noqa: E402
from core.schemas import TaskCreate  # noqa: E402
from core.service import ManagerCore  # noqa: E402
from tests.services import Mosquitto  # noqa: E402
from tests.wasmfixtures import wasm  # noqa: E402

DOMAIN = "soak"
FLEET = 200


def start_flood(broker: Mosquitto, rate: int) -> subprocess.Popen[str]:
    """bench_console's heartbeat flood (its own process), for FLEET proplet ids at `rate`/s."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bench_console.py"), "--flood",
                             "--port", str(broker.port), "--rate", str(rate), "--proplets", str(FLEET)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def heap_blocks() -> int:
    gc.collect()
    return sys.getallocatedblocks()


def sqlite_mb() -> float:
    """Memory SQLite's own allocator holds in this process (page caches, statements, schema)."""
    try:
        library = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    except OSError:
        return float("nan")
    library.sqlite3_memory_used.restype = ctypes.c_int64
    return float(library.sqlite3_memory_used()) / 2**20


def rss_kinds() -> str:
    """Resident memory by kind: anonymous (heaps), file-backed (code, mapped files), shared memory
    (SQLite's WAL index is a mapped -shm file)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return " ".join(f"{name[3:].lower()} {int(fields[name].split()[0]) / 1024:.1f}"
                    for name in ("RssAnon", "RssFile", "RssShmem") if name in fields)


def trimmed_rss_mb() -> float:
    """Resident memory once the C heap's free pages are handed back (glibc's malloc_trim): what is
    left is memory in use, not memory freed and kept for reuse by the allocator."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
    return rss_mb(os.getpid())


def in_memory(core: ManagerCore) -> str:
    path = Path(str(core.settings.sqlite_path))
    wal = Path(f"{path}-wal")
    files = f"db {path.stat().st_size / 2**20:.0f} MB wal {wal.stat().st_size / 2**20 if wal.exists() else 0:.1f} MB"
    return (f"{files}  {rss_kinds()}  SQLite {sqlite_mb():5.1f} MB  active {len(core.active):>4}  "
            f"recent {len(core._recent):>5}  unstored results {len(core._unstored_results):>3}")


async def one_round(core: ManagerCore, bodies: list[TaskCreate], window: int) -> tuple[float, int]:
    """Create and start every task (at most `window` starting at once), wait for all to end; the
    seconds it took and how many failed."""
    sub = core.events.subscribe(maxlen=len(bodies) * 6)
    ended = failed = 0
    slots = asyncio.Semaphore(window)
    started = time.perf_counter()

    async def submit(body: TaskCreate) -> None:
        async with slots:
            task = await core.create_task(body)
            await core.start_task(task.id)

    jobs = [asyncio.create_task(submit(b)) for b in bodies]
    try:
        while ended < len(bodies):
            for ev in await sub.wait(10):
                if isinstance(ev, TaskStateChanged) and ev.new.is_terminal:
                    ended += 1
                    failed += ev.new.label == "failed"
        await asyncio.gather(*jobs)
    finally:
        sub.close()
    return time.perf_counter() - started, failed


# tasks so far, manager RSS MB, the same trimmed, heap blocks, proplets' RSS MB
Sample = tuple[int, float, float, int, list[float]]


async def rounds(core: ManagerCore, procs: list[subprocess.Popen[bytes]], bodies: list[TaskCreate],
                 count: int, window: int) -> list[Sample]:
    print(f"round  tasks   seconds  failed   manager RSS MB (trimmed)  heap blocks   in memory{'':31}proplet RSS MB")
    samples: list[Sample] = []
    for n in range(1, count + 1):
        seconds, failed = await one_round(core, bodies, window)
        await core.writer.wait_idle()
        blocks = heap_blocks()
        rss = rss_mb(os.getpid())
        trimmed = trimmed_rss_mb()
        proplets = [rss_mb(p.pid) for p in procs]
        samples.append((n * len(bodies), rss, trimmed, blocks, proplets))
        print(f"{n:>5}  {n * len(bodies):>6}  {seconds:>7.1f}  {failed:>6}   {rss:>14.1f} ({trimmed:>6.1f})  "
              f"{blocks:>11,}   "
              f"{in_memory(core)}   " + "  ".join(f"{r:.1f}" for r in proplets), flush=True)
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round", type=int, default=5000, help="tasks per round")
    parser.add_argument("--window", type=int, default=64, help="tasks being submitted at once")
    parser.add_argument("--heartbeats", type=int, default=200, help="flood heartbeats per second")
    parser.add_argument("--large-results", action="store_true",
                        help="every task writes 4 MiB to stdout: a result of 1 MiB (the capture cap) each")
    args = parser.parse_args()

    if args.large_results:
        large = base64.b64encode(wasm("bigout")).decode()
        bodies = [TaskCreate(name="_start", file=large) for _ in range(args.round)]
    else:
        module = base64.b64encode(wasm("add")).decode()
        bodies = [TaskCreate(name="no_such_export" if i % 10 == 9 else "add", file=module, inputs=[i, 1])
                  for i in range(args.round)]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir / "broker")
        broker.start()
        flood = start_flood(broker, args.heartbeats)
        try:
            settings = ManagerSettings(mqtt_address=broker.url, tenant_id=DOMAIN, entity_id="soak-manager",
                                       sqlite_path=workdir / "soak.db", http_enabled=False, _env_file=None)
            names = ["soak-0", "soak-1"]
            with proplet_processes(broker, DOMAIN, names, workdir, PROPLET_METRICS_INTERVAL="1") as procs:
                async with ManagerCore(settings) as core:
                    await wait_online(core, names)
                    samples = await rounds(core, procs, bodies, args.rounds, args.window)
        finally:
            assert flood.stdin is not None
            flood.stdin.close()
            flood.wait(10)
            broker.stop()

    half = samples[len(samples) // 2 - 1]
    last = samples[-1]
    per = 10_000 / (last[0] - half[0])
    print()
    print(f"growth over the second half ({half[0]:,} -> {last[0]:,} tasks), per 10,000 tasks:")
    print(f"  manager RSS        {(last[1] - half[1]) * per:+.2f} MB   (at the end {last[1]:.1f} MB)")
    print(f"  ... trimmed        {(last[2] - half[2]) * per:+.2f} MB   (at the end {last[2]:.1f} MB)")
    print(f"  manager heap       {(last[3] - half[3]) * per:+,.0f} blocks   (at the end {last[3]:,})")
    for i, (before, after) in enumerate(zip(half[4], last[4], strict=True)):
        print(f"  proplet soak-{i} RSS {(after - before) * per:+.2f} MB   (at the end {after:.1f} MB)")


if __name__ == "__main__":
    asyncio.run(main())
