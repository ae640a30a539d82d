"""The manager's PostgreSQL server stops for a while in the middle of a run and comes back.

The server is a private one (tests.services.PrivatePostgres): the shared server on 5432 serves
other tests. Everything else is real too: Mosquitto, `propeller serve`, two `propeller proplet`s.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from core.domain import TaskState
from tests.faults.test_faults import online, report, start_busy_tasks, start_fleet
from tests.fleet import Fleet, assert_no_lost_exceptions, make_fleet
from tests.services import PrivatePostgres
from tests.wire import eventually

pytestmark = [pytest.mark.serial, pytest.mark.slow]

TERMINAL = "completed,failed,interrupted,skipped"


@pytest.fixture
def fleet(tmp_path: Path, private_pg: PrivatePostgres) -> Iterator[Fleet]:
    f = make_fleet(tmp_path)
    f.manager_env.update({
        "MANAGER_STORAGE_TYPE": "postgres", "MANAGER_POSTGRES_HOST": "127.0.0.1",
        "MANAGER_POSTGRES_PORT": str(private_pg.port), "MANAGER_POSTGRES_USER": "postgres",
        "MANAGER_POSTGRES_DB": "postgres",
    })
    try:
        yield f
    finally:
        f.stop_all()
        f.broker.stop()
    assert_no_lost_exceptions(f.workdir)


async def _count(api: httpx.AsyncClient, states: str) -> int:
    """How many tasks are in `states`, or -1 while the manager cannot answer (its database is down)."""
    r = await api.get("/tasks", params={"state": states, "limit": 1})
    return int(r.json()["total"]) if r.status_code == 200 else -1


async def _api_views(api: httpx.AsyncClient, ids: list[str]) -> dict[str, dict[str, Any]]:
    views = {}
    for tid in ids:
        r = await api.get(f"/tasks/{tid}")
        assert r.status_code == 200, r.text
        views[tid] = r.json()
    return views


async def _rows(dsn: str) -> tuple[dict[str, tuple[int, Any]], dict[str, Counter[int]]]:
    """Each task's stored (state, results), and how many events of each state it has."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, state, results FROM tasks")
        events = await conn.fetch("SELECT task_id, state, count(*) AS n FROM task_events GROUP BY task_id, state")
    finally:
        await conn.close()
    stored = {r["id"]: (r["state"], None if r["results"] is None else json.loads(r["results"])) for r in rows}
    history: dict[str, Counter[int]] = {}
    for r in events:
        history.setdefault(r["task_id"], Counter())[r["state"]] = r["n"]
    return stored, history


def _history_gaps(ids: list[str], history: dict[str, Counter[int]]) -> dict[str, dict[str, int]]:
    """Tasks whose stored history lacks a step they went through, or holds their completion twice."""
    steps = (TaskState.PENDING, TaskState.SCHEDULED, TaskState.RUNNING)
    return {tid: {TaskState(s).label: n for s, n in history.get(tid, Counter()).items()} for tid in ids
            if history.get(tid, Counter())[TaskState.COMPLETED] != 1
            or any(not history.get(tid, Counter())[s] for s in steps)}


def _mismatches(views: dict[str, dict[str, Any]], stored: dict[str, tuple[int, Any]]) -> list[Any]:
    return [(tid, (v["state_name"], v["results"]), stored.get(tid)) for tid, v in views.items()
            if stored.get(tid) != (v["state"], v["results"])]


# 2 s: every write waits the outage out. 12 s: longer than the writer's patience (10 s), so the
# dispatches and results waited for are given up, and their callers' handling of that is tested too.
@pytest.mark.parametrize("outage_s", [2.0, 12.0])
async def test_postgres_stopped_mid_run_loses_and_duplicates_nothing(
        fleet: Fleet, private_pg: PrivatePostgres, outage_s: float) -> None:
    proplets = ["db-1", "db-2"]
    await start_fleet(fleet, proplets)
    async with httpx.AsyncClient(base_url=fleet.api, timeout=30) as api:
        ids = await start_busy_tasks(api, proplets, 400, "40")
        await eventually(lambda: _at_least(api, "completed", 60), 120, interval=0.02)
        await asyncio.to_thread(private_pg.stop, "fast")
        stopped = time.monotonic()
        await eventually(lambda: _store_unreachable(api), 10, interval=0.05)
        await asyncio.sleep(outage_s - (time.monotonic() - stopped))
        await asyncio.to_thread(private_pg.start)
        back = time.monotonic()
        store_back = asyncio.create_task(_seconds_until(lambda: _store_connected(api), 30))
        try:
            await eventually(lambda: _at_least(api, TERMINAL, len(ids)), 60, interval=0.2)
        except AssertionError:
            stored, _ = await _rows(private_pg.dsn)
            stuck = [(tid, row) for tid, row in stored.items() if row[0] not in (3, 4, 5, 6)]
            views = await _api_views(api, [tid for tid, _ in stuck[:5]])
            raise AssertionError(f"{len(stuck)} tasks not finished in the database: {stuck[:5]}; "
                                 f"the API says {views}") from None
        all_done_s = time.monotonic() - back
        store_back_s = await store_back
        views = await _api_views(api, ids)
        stored, history = await _rows(private_pg.dsn)
        metrics = (await api.get("/metrics")).text
    runs = fleet.executions(proplets)
    duplicated = sum(1 for n in runs.values() if n > 1)
    completed = sum(1 for v in views.values() if v["state_name"] == "completed")
    mismatched = _mismatches(views, stored)
    gaps = _history_gaps(ids, history)
    outage_lines = [line for _, line in fleet.log_lines("manager", r"database is unreachable")]
    report("PostgreSQL stopped (fast) mid-run", tasks=len(ids),
           outage_s=round(back - stopped, 2), store_reconnected_after_s=store_back_s and round(store_back_s, 2),
           completed=completed, lost=len(ids) - completed, executed=sum(runs.values()), duplicated=duplicated,
           db_rows_differing_from_api=len(mismatched),
           tasks_with_gaps_in_their_stored_history=len(gaps),
           outage_log_lines=len(outage_lines), all_done_after_restart_s=round(all_done_s, 1),
           writer_metrics=[line for line in metrics.splitlines() if line.startswith("manager_store_")])
    assert store_back_s is not None, "the manager's /health never said the database was connected again"
    assert completed == len(ids), [v for v in views.values() if v["state_name"] != "completed"][:3]
    assert len(runs) == len(ids) and duplicated == 0, {k: v for k, v in runs.items() if v > 1}
    assert not mismatched, mismatched[:5]
    assert not gaps, list(gaps.items())[:5]
    assert len(outage_lines) == 1, outage_lines
    # Said once by the writer, not with a traceback every 1-4 s by asyncpg's pool for the whole outage.
    reconnect_tracebacks = fleet.log_lines("manager", r"Failed to restore the pool connection floor")
    assert not reconnect_tracebacks, reconnect_tracebacks[:3]

    # A manager restarted on the same database finds everything finished: nothing runs again.
    fleet.stop_all()
    fleet.procs.clear()
    executed_before = sum(runs.values())
    await start_fleet(fleet, proplets)
    async with httpx.AsyncClient(base_url=fleet.api, timeout=30) as api:
        await online(api, set(proplets))
        await asyncio.sleep(2.0)  # a proplet's heartbeats and outbox have had their turn
        assert await _count(api, "completed") == len(ids)
        views = await _api_views(api, ids)
    assert sum(fleet.executions(proplets).values()) == executed_before
    assert not _mismatches(views, (await _rows(private_pg.dsn))[0])


async def _at_least(api: httpx.AsyncClient, states: str, n: int) -> bool:
    return await _count(api, states) >= n


async def _seconds_until(check: Any, timeout: float) -> float | None:
    started = time.monotonic()
    try:
        await eventually(check, timeout, interval=0.05)
    except AssertionError:
        return None
    return time.monotonic() - started


async def _store_connected(api: httpx.AsyncClient) -> bool:
    return bool((await api.get("/health")).json().get("store_connected"))


async def _store_unreachable(api: httpx.AsyncClient) -> bool:
    return (await api.get("/health")).json().get("store_connected") is False
