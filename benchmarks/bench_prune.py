"""Metrics pruning on a large history: what one `Store.prune_metrics` costs, and how long a write
waits meanwhile.

Fills a database (SQLite file, and a PostgreSQL database of its own on the shared test server)
with `--tasks` tasks of `--task-samples` task_metrics rows each and `--proplets` proplets of
`--proplet-samples` proplet_metrics rows each, then, on a store opened afresh (as a restarted
manager finds it):

- the first prune after the start, with nothing to prune;
- a second one, nothing to prune (the manager's minute-by-minute case);
- one after 5 new samples per proplet (a little to prune: `--proplets` × 5 rows).

For each it prints the prune's wall time and, from a write probe running alongside (one task event
through `Store.apply` every 5 ms, as the writer's batches do), the probe's p50 and worst latency
during the prune, next to the probe's p50 and worst without a prune in the same run.

    .venv/bin/python benchmarks/bench_prune.py [--tasks 20000] [--task-samples 50]
        [--proplets 200] [--proplet-samples 1000] [--keep 1000] [--backend sqlite|postgres|both]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import asyncpg  # noqa: E402
from bench_dispatch import pct  # noqa: E402

from core.domain import Proplet, PropletMetrics, Task, TaskEvent, TaskState  # noqa: E402
from core.store import Store  # noqa: E402
from core.store.migrate import migrate  # noqa: E402
from core.store.postgres import PostgresStore  # noqa: E402
from core.store.sqlite import SqliteStore  # noqa: E402
from tests.services import create_database, drop_database  # noqa: E402

SQLITE_FILL = {
    "task_metrics": (
        "INSERT INTO task_metrics (task_id, proplet_id, timestamp, metrics) "
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        "SELECT t.id, 'p0', strftime('%Y-%m-%dT%H:%M:%S', '2026-12-01', '+' || n.i || ' seconds') "
        "|| '.000000+00:00', '{\"cpu_percent\": 1.5, \"memory_bytes\": 1048576}' FROM tasks t, n"),
    "proplet_metrics": (
        "INSERT INTO proplet_metrics (proplet_id, namespace, timestamp, cpu_metrics, memory_metrics) "
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        "SELECT p.id, 'default', strftime('%Y-%m-%dT%H:%M:%S', '2026-12-01', '+' || n.i || ' seconds') "
        "|| '.000000+00:00', '{\"percent\": 3.5}', '{\"rss_bytes\": 40000000}' FROM proplets p, n"),
}
POSTGRES_FILL = {
    "task_metrics": (
        "INSERT INTO task_metrics (task_id, proplet_id, timestamp, metrics) "
        "SELECT t.id, 'p0', TIMESTAMPTZ '2026-12-01 00:00:00+00' + make_interval(secs => g), "
        "'{\"cpu_percent\": 1.5, \"memory_bytes\": 1048576}' FROM tasks t, generate_series(1, ?::int) g"),
    "proplet_metrics": (
        "INSERT INTO proplet_metrics (proplet_id, namespace, timestamp, cpu_metrics, memory_metrics) "
        "SELECT p.id, 'default', TIMESTAMPTZ '2026-12-01 00:00:00+00' + make_interval(secs => g), "
        "'{\"percent\": 3.5}', '{\"rss_bytes\": 40000000}' FROM proplets p, generate_series(1, ?::int) g"),
}


async def fill(store: Store, args: argparse.Namespace) -> None:
    now = datetime.now(UTC)
    ops = [store.op_upsert_proplet(Proplet(id=f"p{i}", name=f"p{i}", created_at=now), now)
           for i in range(args.proplets)]
    await store.apply(ops)
    for start in range(0, args.tasks, 1000):
        await store.apply([store.op_insert_task(Task(id=f"t{i:06d}", name="add", created_at=now, updated_at=now))
                           for i in range(start, min(args.tasks, start + 1000))])
    if isinstance(store, PostgresStore):
        # A connection of its own, without the store's statement timeouts: filling takes minutes.
        conn = await asyncpg.connect(store.dsn)
        try:
            for table, sql in POSTGRES_FILL.items():
                samples = args.task_samples if table == "task_metrics" else args.proplet_samples
                await conn.execute(sql.replace("?", "$1"), samples)
                await conn.execute(f"VACUUM ANALYZE {table}")
        finally:
            await conn.close()
        return
    async with store.transaction() as c:
        await c.execute(SQLITE_FILL["task_metrics"], (args.task_samples,))
        await c.execute(SQLITE_FILL["proplet_metrics"], (args.proplet_samples,))


class Probe:
    """One task event through Store.apply every 5 ms; latencies in ms."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.latencies: list[float] = []
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            t0 = time.perf_counter()
            await self.store.apply([self.store.op_task_event(TaskEvent("t000000", TaskState.PENDING,
                                                                        datetime.now(UTC)))])
            self.latencies.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.005)

    async def during(self, work: Coroutine[Any, Any, int] | None) -> tuple[float, list[float], int | None]:
        self.latencies = []
        self.stop = False
        task = asyncio.create_task(self.run())
        await asyncio.sleep(0.05)
        self.latencies = []
        t0 = time.perf_counter()
        result = None
        try:
            if work is None:
                await asyncio.sleep(1.0)
            else:
                result = await work
        finally:
            elapsed = time.perf_counter() - t0
            self.stop = True  # the write under way finishes and counts: it may have waited all along
            await task
        return elapsed, self.latencies, result


def line(label: str, elapsed: float | None, lat: list[float], deleted: int | None = None) -> None:
    took = "" if elapsed is None else f"{elapsed * 1000:9.1f} ms"
    gone = "" if deleted is None else f", deleted {deleted:,}"
    writes = (f"write p50 {pct(lat, 0.5):6.2f} ms, worst {max(lat):8.2f} ms ({len(lat)} writes)" if lat
              else "over before a write finished")
    print(f"  {label:<34}{took:>12}  {writes}{gone}", flush=True)


async def bench(store_factory: Callable[[], Store], args: argparse.Namespace, label: str) -> None:
    store = store_factory()
    await store.open()
    await migrate(store)
    t0 = time.perf_counter()
    await fill(store, args)
    print(f"{label}: filled {args.tasks * args.task_samples:,} task_metrics and "
          f"{args.proplets * args.proplet_samples:,} proplet_metrics rows in {time.perf_counter() - t0:.1f} s",
          flush=True)
    await store.close()

    store = store_factory()
    await store.open()
    await migrate(store)
    await store.reserve_row_ids()
    probe = Probe(store)
    _, lat, _ = await probe.during(None)
    line("no prune (baseline, 1 s)", None, lat)
    for what in ("first prune after start, none due", "next prune, none due"):
        elapsed, lat, deleted = await probe.during(store.prune_metrics(args.keep))
        line(what, elapsed, lat, deleted)
    now = datetime.now(UTC)
    await store.apply([store.op_proplet_metrics(PropletMetrics(f"p{i}", "default", now + timedelta(seconds=k),
                                                               {"percent": 1.0}, {}))
                       for i in range(args.proplets) for k in range(5)])
    elapsed, lat, deleted = await probe.during(store.prune_metrics(args.keep))
    line(f"prune after {args.proplets * 5} new samples", elapsed, lat, deleted)
    await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--task-samples", type=int, default=50)
    parser.add_argument("--proplets", type=int, default=200)
    parser.add_argument("--proplet-samples", type=int, default=1000)
    parser.add_argument("--keep", type=int, default=1000)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    args = parser.parse_args()
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            await bench(lambda: SqliteStore(Path(tmp) / "bench.db"), args, "SQLite")
    if args.backend in ("postgres", "both"):
        db = await create_database()
        try:
            await bench(lambda: PostgresStore(db.dsn), args, "PostgreSQL")
        finally:
            await drop_database(db)


if __name__ == "__main__":
    asyncio.run(main())
