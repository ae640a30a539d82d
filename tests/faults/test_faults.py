"""Fault injection against real processes: broker, manager and proplets are killed, frozen and
restarted while tasks run. Every test prints what it injected and what it counted; the figures
are collected in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fleet import Fleet, assert_no_lost_exceptions, make_fleet
from tests.wasmfixtures import wasm
from tests.wire import eventually

pytestmark = [pytest.mark.serial, pytest.mark.slow]

TERMINAL = "completed,failed,interrupted,skipped"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = make_fleet(tmp_path, persistence=True)
    try:
        yield f
    finally:
        f.stop_all()
        f.broker.stop()
    assert_no_lost_exceptions(f.workdir)


async def online(api: httpx.AsyncClient, names: set[str], timeout: float = 30) -> None:
    async def check() -> bool:
        body = (await api.get("/proplets", params={"status": "active", "limit": 1000})).json()
        return names <= {p["id"] for p in body["proplets"]}
    await eventually(check, timeout, interval=0.1)


async def create_many(api: httpx.AsyncClient, n: int, body: dict[str, Any]) -> list[str]:
    created = []
    for _ in range(n):
        r = await api.post("/tasks", json=body)
        assert r.status_code == 201, r.text
        created.append(r.json()["id"])
    return created


async def start_all(api: httpx.AsyncClient, ids: list[str], concurrency: int = 16) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def start(tid: str) -> None:
        async with slots:
            r = await api.post(f"/tasks/{tid}/start")
            assert r.status_code == 200, r.text

    await asyncio.gather(*(start(tid) for tid in ids))


async def start_fleet(fleet: Fleet, proplets: list[str]) -> None:
    """The manager (returns once its API answers), then `proplets` with two task slots each."""
    await asyncio.to_thread(fleet.start_manager)
    for name in proplets:
        fleet.start_proplet(name, PROPLET_MAX_CONCURRENT_TASKS="2")


def busy_task(loops: str) -> dict[str, Any]:
    """A task's body: the `busy` module looping `loops` times."""
    return {"name": "_start", "file": base64.b64encode(wasm("busy")).decode(), "inputs": [loops]}


async def start_busy_tasks(api: httpx.AsyncClient, proplets: list[str], n: int, loops: str) -> list[str]:
    """Once `proplets` are online, `n` busy tasks (`busy_task(loops)`) created and started; their ids."""
    await online(api, set(proplets))
    ids = await create_many(api, n, busy_task(loops))
    await start_all(api, ids)
    return ids


async def in_flight(api: httpx.AsyncClient) -> dict[str, int]:
    return {s: await count(api, s) for s in ("pending", "scheduled", "running", "completed")}


async def count(api: httpx.AsyncClient, states: str) -> int:
    return int((await api.get("/tasks", params={"state": states, "limit": 1})).json()["total"])


async def all_tasks(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = (await api.get("/tasks", params={"offset": len(out), "limit": 100})).json()
        out += page["tasks"]
        if len(out) >= page["total"] or not page["tasks"]:
            return out


def reconnect_delays(fleet: Fleet, names: list[str], since: datetime) -> dict[str, float]:
    delays = {}
    for name in names:
        lines = [ts for ts, _ in fleet.log_lines(name, r": connected to ") if ts >= since]
        delays[name] = (lines[0] - since).total_seconds() if lines else float("inf")
    return delays


def report(fault: str, **figures: Any) -> None:
    text = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\nFAULT {fault}: {text}")


async def test_broker_killed_with_1000_tasks_in_flight(fleet: Fleet) -> None:
    proplets = ["bk-1", "bk-2", "bk-3"]
    await start_fleet(fleet, proplets)
    async with httpx.AsyncClient(base_url=fleet.api, timeout=30) as api:
        await online(api, set(proplets))
        ids = await create_many(api, 1000, busy_task("20"))
        starting = asyncio.create_task(start_all(api, ids))
        await eventually(lambda: _at_least(api, "completed", 100), 120, interval=0.02)
        at_kill = await in_flight(api)
        fleet.broker.kill()
        killed = time.monotonic()
        await asyncio.sleep(1.0)
        fleet.broker.start()
        back_at = datetime.now()
        back = time.monotonic()
        await starting
        await eventually(lambda: _at_least(api, TERMINAL, len(ids)), 240, interval=0.2)
        recovered_in = time.monotonic() - back
        tasks = await all_tasks(api)
    states = {t["state_name"] for t in tasks}
    runs = fleet.executions(proplets)
    duplicated = sum(1 for n in runs.values() if n > 1)
    lost = len(ids) - sum(1 for t in tasks if t["state_name"] == "completed")
    delays = reconnect_delays(fleet, ["manager", *proplets], back_at)
    report("broker SIGKILL", tasks=len(ids), at_kill=at_kill,
           broker_down_s=round(back - killed, 2), completed=len(ids) - lost, lost=lost,
           executed=sum(runs.values()), duplicated=duplicated,
           reconnect_after_restart_s={k: round(v, 2) for k, v in delays.items()},
           all_done_after_restart_s=round(recovered_in, 1))
    assert states == {"completed"}, fleet.logs()
    assert len(runs) == len(ids) and duplicated == 0, {k: v for k, v in runs.items() if v > 1}
    assert max(delays.values()) <= 2.0, delays


async def _at_least(api: httpx.AsyncClient, states: str, n: int) -> bool:
    return await count(api, states) >= n


async def test_manager_killed_mid_run_recovers_from_its_database(fleet: Fleet) -> None:
    proplets = ["mk-1", "mk-2"]
    await start_fleet(fleet, proplets)
    async with httpx.AsyncClient(base_url=fleet.api, timeout=30) as api:
        ids = await start_busy_tasks(api, proplets, 300, "30")
        await eventually(lambda: _at_least(api, "completed", 60), 120, interval=0.02)
        at_kill = await in_flight(api)
        fleet.signal("manager", signal.SIGKILL)
        await asyncio.sleep(1.0)
        answered_in = await asyncio.to_thread(fleet.start_manager)
        back = time.monotonic()
        await eventually(lambda: _at_least(api, TERMINAL, len(ids)), 240, interval=0.2)
        tasks = await all_tasks(api)
    runs = fleet.executions(proplets)
    duplicated = sum(1 for n in runs.values() if n > 1)
    completed = sum(1 for t in tasks if t["state_name"] == "completed")
    report("manager SIGKILL", tasks=len(ids), at_kill=at_kill,
           api_answered_after_restart_s=round(answered_in, 2), completed=completed, lost=len(ids) - completed,
           executed=sum(runs.values()), duplicated=duplicated,
           all_done_after_restart_s=round(time.monotonic() - back, 1))
    assert completed == len(ids), [t for t in tasks if t["state_name"] != "completed"][:3]
    assert len(runs) == len(ids) and duplicated == 0
    # A bound on a broken restart (one that replays or blocks for many seconds), not a measurement:
    # the figure is reported above (0.6-0.8 s on an idle 2-core VM, 2.0 s once with another test
    # suite running beside it).
    assert answered_in < 10.0


async def test_proplet_killed_mid_task_fails_or_retries_by_policy(fleet: Fleet) -> None:
    await asyncio.to_thread(fleet.start_manager)
    fleet.start_proplet("pk-doomed")
    busy = base64.b64encode(wasm("busy")).decode()
    async with httpx.AsyncClient(base_url=fleet.api, timeout=30) as api:
        await online(api, {"pk-doomed"})
        once = (await api.post("/tasks", json={"name": "_start", "file": busy, "inputs": ["10000"]})).json()["id"]
        retried = (await api.post("/tasks", json={"name": "_start", "file": busy, "inputs": ["3000"],
                                                   "max_retries": 1})).json()["id"]
        for tid in (once, retried):
            await api.post(f"/tasks/{tid}/start")
        await eventually(lambda: _both_running(api, once, retried), 20, interval=0.05)
        fleet.start_proplet("pk-spare")
        await online(api, {"pk-spare"})
        killed = time.monotonic()
        fleet.signal("pk-doomed", signal.SIGKILL)

        async def offline() -> bool:
            return not (await api.get("/proplets/pk-doomed")).json()["alive"]

        await eventually(offline, 5, interval=0.01)
        detected = time.monotonic() - killed
        failed = await eventually(lambda: _terminal(api, once), 20)
        rerun = await eventually(lambda: _terminal(api, retried), 30)
    report("proplet SIGKILL", offline_after_s=round(detected, 3), no_retry_task=failed["state_name"],
           retried_task=f"{rerun['state_name']} on {rerun['proplet_id']} (attempt {rerun['attempt']})")
    assert detected < 1.0
    assert failed["state_name"] == "failed" and "went offline" in failed["error"]
    assert (rerun["state_name"], rerun["proplet_id"], rerun["retries"]) == ("completed", "pk-spare", 1)


async def test_proplet_stopped_with_sigterm_finishes_short_tasks_and_hands_over_the_rest(fleet: Fleet) -> None:
    """SIGTERM (systemctl stop, an upgrade, a reboot): the proplet finishes what it can within its
    grace and gives back the rest, which runs on another proplet, not failed and not as a retry; a
    second SIGTERM stops it at once. Before, both tasks failed "stopped by request"."""
    await asyncio.to_thread(fleet.start_manager)
    fleet.start_proplet("pt-leaving", PROPLET_SHUTDOWN_GRACE="60s")
    busy = base64.b64encode(wasm("busy")).decode()
    async with httpx.AsyncClient(base_url=fleet.api, timeout=30) as api:
        await online(api, {"pt-leaving"})
        short = (await api.post("/tasks", json={"name": "_start", "file": busy, "inputs": ["1500"]})).json()["id"]
        long = (await api.post("/tasks", json={"name": "_start", "file": busy, "inputs": ["20000"]})).json()["id"]
        for tid in (short, long):
            await api.post(f"/tasks/{tid}/start")
        await eventually(lambda: _both_running(api, short, long), 20, interval=0.05)
        fleet.start_proplet("pt-spare")
        await online(api, {"pt-spare"})
        fleet.signal("pt-leaving", signal.SIGTERM)

        async def draining() -> bool:
            return bool((await api.get("/proplets/pt-leaving")).json()["draining"])

        await eventually(draining, 5, interval=0.05)
        finished = await eventually(lambda: _terminal(api, short), 10)
        await asyncio.sleep(0.5)
        assert fleet.procs["pt-leaving"].poll() is None, "the long task keeps it draining"
        second = time.monotonic()
        fleet.signal("pt-leaving", signal.SIGTERM)
        code = await asyncio.to_thread(fleet.procs["pt-leaving"].wait, 10)
        stopped_after = time.monotonic() - second
        moved = await eventually(lambda: _running_on(api, long, "pt-spare"), 10)
        events = (await api.get(f"/tasks/{long}/events")).json()["events"]
    report("proplet SIGTERM", short_task=f"{finished['state_name']} on {finished['proplet_id']}",
           second_sigterm_exit_s=round(stopped_after, 3), long_task=f"running on {moved['proplet_id']} "
           f"(attempt {moved['attempt']}, retries {moved['retries']})")
    assert (finished["state_name"], finished["proplet_id"], finished["error"]) == ("completed", "pt-leaving", "")
    assert code == 0 and stopped_after < 3
    assert (moved["attempt"], moved["retries"]) == (2, 0)
    assert any(e["detail"] == "given back by proplet pt-leaving, which is shutting down (still running when the "
               "proplet stopped); queued again" for e in events), events
    assert not any("stopped by request" in e["detail"] or e["state_name"] == "failed" for e in events)


async def _running_on(api: httpx.AsyncClient, tid: str, proplet: str) -> Any:
    task = (await api.get(f"/tasks/{tid}")).json()
    return task if (task["state_name"], task["proplet_id"]) == ("running", proplet) else None


async def _both_running(api: httpx.AsyncClient, *ids: str) -> bool:
    states = [(await api.get(f"/tasks/{tid}")).json()["state_name"] for tid in ids]
    return states == ["running"] * len(ids)


async def _terminal(api: httpx.AsyncClient, tid: str) -> Any:
    task = (await api.get(f"/tasks/{tid}")).json()
    return task if task["state_name"] in TERMINAL.split(",") else None


async def test_frozen_proplet_is_detected_and_rejoins(fleet: Fleet) -> None:
    keepalive = 2
    await asyncio.to_thread(fleet.start_manager)
    # Heartbeats every half keep-alive: the manager's liveness timeout (3 heartbeats) is then
    # 1.5 keep-alives, the same as the broker's own keep-alive check.
    fleet.start_proplet("fz-1", PROPLET_MQTT_KEEP_ALIVE=str(keepalive),
                        PROPLET_LIVELINESS_INTERVAL=str(keepalive / 2))
    add = base64.b64encode(wasm("add")).decode()
    async with httpx.AsyncClient(base_url=fleet.api, timeout=30) as api:
        await online(api, {"fz-1"})
        frozen = time.monotonic()
        fleet.signal("fz-1", signal.SIGSTOP)

        async def offline() -> bool:
            return not (await api.get("/proplets/fz-1")).json()["alive"]

        await eventually(offline, 10, interval=0.05)
        detected = time.monotonic() - frozen
        fleet.signal("fz-1", signal.SIGCONT)
        resumed = time.monotonic()
        await online(api, {"fz-1"}, timeout=15)
        rejoined = time.monotonic() - resumed
        tid = (await api.post("/tasks", json={"name": "add", "file": add, "inputs": [2, 2]})).json()["id"]
        await api.post(f"/tasks/{tid}/start")
        task = await eventually(lambda: _terminal(api, tid), 20)
    report("proplet SIGSTOP", keepalive_s=keepalive, offline_after_s=round(detected, 2),
           rejoined_after_sigcont_s=round(rejoined, 2), task_after_rejoin=task["state_name"])
    # The manager declares it offline after 3 missed heartbeats = 1.5 keep-alives (plus its
    # liveness check's tick); the broker's Last Will follows once it notices the silence too.
    assert detected <= 1.5 * keepalive + 0.5
    assert task["state_name"] == "completed" and task["results"] == "4"
