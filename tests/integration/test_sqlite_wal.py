"""SQLite's write-ahead log stays bounded under writes that never pause (a fleet's heartbeats and
metrics), as the manager's housekeeping runs its checkpoints."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from core.domain import Task, new_task_id
from core.store.migrate import migrate
from core.store.sqlite import SqliteStore


def _task() -> Task:
    now = datetime.now(UTC)
    return Task(id=new_task_id(), name="add", inputs=["x" * 200], file=b"\0asm\x01\0\0\0",
                wasm_digest="sha256:" + "a" * 64, created_at=now, updated_at=now)


async def test_the_write_ahead_log_starts_over_under_writes_that_never_pause(tmp_path: Path) -> None:
    """Before: housekeeping's PASSIVE checkpoint never caught up with a writer that never paused, so
    the log never started over: in benchmarks/bench_soak.py (200 heartbeats/s and 1,000 tasks/s) it
    reached 827 MB beside a 39 MB database after 25,000 tasks, and grew without end. Here it grew
    to 85 MB in 3 s with a restart threshold of 256 KiB. Now past the threshold the last frames are
    copied holding the write lock (at most once per `wal_restart_interval`), so the next write starts
    the log over, and the file is cut back."""
    store = SqliteStore(tmp_path / "wal.db")
    store.wal_restart_bytes = 256 * 1024
    store.wal_restart_interval = 0.2
    await store.open()
    await migrate(store)
    wal = Path(f"{store.path}-wal")
    sizes: list[int] = []
    writes = 0
    stop = time.monotonic() + 3.0

    async def write_without_pause() -> None:
        nonlocal writes
        while time.monotonic() < stop:
            await store.apply([store.op_insert_task(_task()) for _ in range(5)])
            writes += 1
            await asyncio.sleep(0.002)

    async def housekeeping() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(0.05)
            await store.housekeeping()
            sizes.append(os.stat(wal).st_size)

    try:
        await asyncio.gather(write_without_pause(), housekeeping())
    finally:
        await store.close()
    assert writes > 100, writes
    # The threshold and the writes of one restart interval (about 6 MB here), then cut back to the
    # threshold, again and again; without the restarts it passes 80 MB.
    assert max(sizes) < 16 * 1024 * 1024, [s // 1024 for s in sizes]
    cut_back = sum(1 for before, after in itertools.pairwise(sizes) if after < before)
    assert cut_back >= 3, [s // 1024 for s in sizes]
