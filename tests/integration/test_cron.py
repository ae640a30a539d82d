"""Task schedules (cron) over the REST API, against a running manager (SQLite and PostgreSQL), a real
Mosquitto and a synthetic proplet. Waiting for a real minute boundary would make each test a minute
long, so a test that needs a run moves the schedule's due time to now, as the clock would."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from core.cron import next_time
from core.domain import TaskState, utcnow
from tests.conftest import unique
from tests.services import Mosquitto
from tests.wire import SyntheticProplet, eventually

pytestmark = pytest.mark.timeout(60)

B64 = base64.b64encode(b"\0asm\x01\0\0\0").decode()
Managers = Callable[[], AbstractAsyncContextManager[Any]]


def test_times_are_read_in_the_schedules_timezone() -> None:
    winter = datetime(2026, 12, 6, 7, 0, tzinfo=UTC)
    assert next_time("0 9 * * *", "Europe/Paris", winter) == datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
    assert next_time("0 9 * * *", "UTC", winter) == datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    summer = datetime(2026, 7, 1, 7, 0, tzinfo=UTC)
    assert next_time("0 9 * * *", "Europe/Paris", summer) == datetime(2026, 7, 2, 7, 0, tzinfo=UTC)
    assert next_time("@hourly", "", winter) == datetime(2026, 12, 6, 8, 0, tzinfo=UTC)


def test_a_fixed_time_in_the_hour_that_repeats_when_clocks_go_back_runs_once() -> None:
    """Europe/Paris, 2025-10-26: 02:00-03:00 happens twice. A daily 02:30 ran at both (00:30 and
    01:30 UTC); as cron does, a schedule naming its hours runs once, and one whose hour is `*` runs
    in both. A time that does not exist (spring) runs at the first time after the gap."""
    after = datetime(2025, 10, 25, 12, 0, tzinfo=UTC)
    runs = []
    for _ in range(3):
        after = next_time("30 2 * * *", "Europe/Paris", after)
        runs.append(after)
    assert runs == [datetime(2025, 10, 26, 0, 30, tzinfo=UTC), datetime(2025, 10, 27, 1, 30, tzinfo=UTC),
                    datetime(2025, 10, 28, 1, 30, tzinfo=UTC)]
    after = datetime(2025, 10, 26, 0, 10, tzinfo=UTC)
    half_hourly = []
    for _ in range(4):
        after = next_time("*/30 * * * *", "Europe/Paris", after)
        half_hourly.append(after.strftime("%H:%M"))
    assert half_hourly == ["00:30", "01:00", "01:30", "02:00"]
    assert next_time("30 2 * * *", "Europe/Paris", datetime(2025, 3, 29, 12, 0, tzinfo=UTC)) == \
        datetime(2025, 3, 30, 1, 0, tzinfo=UTC)


@pytest.fixture
def managers(managers_on_each_backend: Managers) -> Managers:
    return managers_on_each_backend


@asynccontextmanager
async def api_of(core: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=core.api_url, timeout=10) as client:
        yield client


async def create(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await api.post("/tasks", json={"name": "add", "file": B64, "inputs": [20, 22], **body})
    assert r.status_code == 201, r.text
    return r.json()


def come_due(core: Any, task_id: str) -> None:
    core.cron.schedules[task_id].next_run = utcnow()
    core.cron._changed.set()


@pytest.mark.parametrize(("body", "message"), [
    ({"schedule": "every minute"}, "invalid cron expression"),
    ({"schedule": "0 0 * * * *"}, "5 fields"),  # seconds: not a standard cron expression
    ({"schedule": "61 * * * *"}, "invalid cron expression"),
    ({"schedule": "* * * * *", "timezone": "Mars/Olympus"}, "unknown timezone"),
])
async def test_invalid_schedules_are_refused_with_400(managers: Managers, body: dict[str, Any], message: str) -> None:
    async with managers() as core, api_of(core) as api:
        r = await api.post("/tasks", json={"name": "add", "file": B64, **body})
        assert r.status_code == 400 and message in r.json()["error"], r.text
        assert (await api.get("/tasks")).json()["total"] == 0


async def test_a_one_shot_schedule_starts_its_task_once_then_is_cleared(managers: Managers, broker: Mosquitto) -> None:
    async with managers() as core, api_of(core) as api, \
            SyntheticProplet(broker.url, core.topics, unique("cron-p")) as proplet:
        await eventually(lambda: proplet.proplet_id in core.proplets)
        task = await create(api, schedule="*/5 * * * *", timezone="Europe/Paris")
        assert task["schedule"] == "*/5 * * * *" and task["timezone"] == "Europe/Paris" and not task["is_recurring"]
        next_run = datetime.fromisoformat(task["next_run"])
        assert utcnow() < next_run <= utcnow() + timedelta(minutes=5) and next_run.minute % 5 == 0
        assert task["state_name"] == "pending" and not proplet.starts, "created, not started"

        come_due(core, task["id"])

        async def done() -> dict[str, Any] | None:
            got = (await api.get(f"/tasks/{task['id']}")).json()
            return got if got["state_name"] == "completed" else None

        finished = await eventually(done)
        assert finished["results"] == "42" and len(proplet.starts) == 1
        assert finished["schedule"] == "" and finished["next_run"] == "0001-01-01T00:00:00Z"
        assert await core.store.task_schedules() == []


async def test_a_recurring_schedule_runs_again_and_a_busy_task_is_not_started_twice(
        managers: Managers, broker: Mosquitto) -> None:
    async with managers() as core, api_of(core) as api, \
            SyntheticProplet(broker.url, core.topics, unique("cron-p"), answer=None) as proplet:
        await eventually(lambda: proplet.proplet_id in core.proplets)
        task = await create(api, schedule="@hourly", is_recurring=True)
        come_due(core, task["id"])
        await eventually(lambda: len(proplet.starts) == 1)
        schedule = core.cron.get(task["id"])
        # Moved on to the next hour (it was set in the past): a time still to come, on the hour.
        assert schedule is not None and schedule.next_run > utcnow() and schedule.next_run.minute == 0
        # Due again while the first run has not answered: skipped, not started a second time.
        come_due(core, task["id"])
        await eventually(lambda: core.cron.skipped_busy == 1)
        assert len(proplet.starts) == 1 and core.cron.get(task["id"]) is not None
        stored = await core.store.task_schedules()
        assert [(s.task_id, s.expression, s.recurring) for s in stored] == [(task["id"], "@hourly", True)]


async def test_schedules_survive_a_restart_and_missed_times_are_skipped(managers: Managers) -> None:
    async with managers() as core, api_of(core) as api:
        task = await create(api, schedule="30 6 * * 1-5", timezone="America/New_York", is_recurring=True)
        # As if the manager had been down over its time.
        schedule = core.cron.get(task["id"])
        schedule.next_run = utcnow() - timedelta(hours=1)
        await core.writer.write(core.store.op_put_schedule(schedule))
    async with managers() as core, api_of(core) as api:
        got = (await api.get(f"/tasks/{task['id']}")).json()
        assert got["schedule"] == "30 6 * * 1-5" and got["timezone"] == "America/New_York" and got["is_recurring"]
        assert datetime.fromisoformat(got["next_run"]) > utcnow(), "a time missed while down is skipped"
        assert got["state_name"] == "pending" and core.cron.fired == 0


async def test_an_update_keeps_changes_or_clears_the_schedule(managers: Managers) -> None:
    async with managers() as core, api_of(core) as api:
        task = await create(api, schedule="0 0 * * *")
        path = f"/tasks/{task['id']}"
        r = await api.put(path, json={"inputs": [1, 2]})
        assert r.status_code == 200 and r.json()["schedule"] == "0 0 * * *", "kept (upstream clears it)"
        r = await api.put(path, json={"schedule": "0 12 * * *", "is_recurring": True})
        assert r.json()["schedule"] == "0 12 * * *" and r.json()["is_recurring"]
        assert datetime.fromisoformat(r.json()["next_run"]).hour == 12
        assert (await api.put(path, json={"schedule": "nope"})).status_code == 400
        r = await api.put(path, json={"schedule": ""})
        assert r.json()["schedule"] == "" and core.cron.get(task["id"]) is None
        assert await core.store.task_schedules() == []

        other = await create(api, schedule="0 0 * * *")
        assert (await api.delete(f"/tasks/{other['id']}")).status_code == 204
        assert core.cron.get(other["id"]) is None and await core.store.task_schedules() == []
        assert (await core.get_task(task["id"])).state is TaskState.PENDING
