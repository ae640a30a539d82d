"""Jobs and workflows run by a real proplet (real wasmtime, the `add` module built from
tests/wasm/add.wat) against a manager on SQLite and on PostgreSQL and a real Mosquitto: stops that
race the start of a sequential job's next task, and re-runs of finished jobs and workflows."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.domain import TaskState, TaskStateChanged, group_state
from core.schemas import JobCreate
from proplet.agent import PropletAgent
from proplet.config import PropletSettings
from tests.conftest import unique
from tests.services import Mosquitto
from tests.wasmfixtures import wasm
from tests.wire import eventually

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def core(managers_on_each_backend: Any, broker: Mosquitto, tmp_path: Path) -> AsyncIterator[Any]:
    """A manager (SQLite, then PostgreSQL) with one real proplet online."""
    async with managers_on_each_backend() as manager:
        proplet_id = unique("jobs-p")
        settings = PropletSettings.load(mqtt_address=broker.url, tenant_id=manager.topics.domain,
                                        channel_id=manager.topics.channel, entity_id=proplet_id,
                                        cache_dir=tmp_path / "cache", state_dir=tmp_path / "state",
                                        liveliness_interval=1.0)
        async with PropletAgent(settings):
            await eventually(lambda: proplet_id in manager.proplets and manager.proplets[proplet_id].online, 10)
            yield manager


def add_task(*deps: str, inputs: tuple[int, int] = (1, 2), fail: bool = False) -> dict[str, Any]:
    """`fail` calls an export the module lacks, so the proplet reports a failure."""
    return {"id": str(uuid.uuid4()), "name": "no_such_export" if fail else "add",
            "file": base64.b64encode(wasm("add")).decode(), "inputs": list(inputs), "depends_on": list(deps)}


async def stored_states(core: Any, job_id: str) -> dict[str, TaskState]:
    await core.writer.barrier()
    return {t.id: t.state for t in await core.store.group_tasks(job_id=job_id)}


async def test_a_stopped_sequential_job_starts_no_further_task(core: Any) -> None:
    """Before: a stop that arrived while task k's result was being handled found k finished and
    k+1 not started yet, stopped nothing, and waited for the coordinator, which then started k+1;
    the stop's own skip pass left k+1 alone (no longer pending), so the job ran on to its end after
    the stop had answered 200. Stopped here at each task's result, and again at each next task's
    queueing, with every pairing of a result and a stop."""
    size = 4
    moments = [(k, TaskState.COMPLETED) for k in range(size - 1)] + [(k, TaskState.PENDING) for k in range(1, size)]
    for k, at_state in moments:
        tasks = [add_task(inputs=(i, 1)) for i in range(size)]
        job, _ = await core.create_job(JobCreate.model_validate({"tasks": tasks, "execution_mode": "sequential"}))
        with core.events.subscribe() as events:
            await core.start_job(job.id)
            seen: list[TaskStateChanged] = []
            while not any(e.task_id == tasks[k]["id"] and e.new is at_state for e in seen):
                seen += [e for e in await events.wait(10) if isinstance(e, TaskStateChanged)]
            await core.stop_job(job.id)
            during = [e for e in events.drain() if isinstance(e, TaskStateChanged)]
            assert not any(t["id"] in core.active for t in tasks), f"stopped at task {k} {at_state.label}: " \
                                                                    "a task of the job is still queued or running"
            answered = await stored_states(core, job.id)
            # Anything wrongly started after the stop would be queued, dispatched and finished by now.
            await asyncio.sleep(0.5)
            await core.groups.settle()
            late = [e for e in events.drain() if isinstance(e, TaskStateChanged) and e.new is TaskState.PENDING]
        assert late == [], f"stopped at task {k} {at_state.label}: started after the stop: {late}; during: {during}"
        final = await stored_states(core, job.id)
        assert final == answered, f"stopped at task {k} {at_state.label}"
        assert all(s.is_terminal for s in final.values()), final
        in_memory = {t["id"]: (await core.get_task(t["id"])).state for t in tasks}
        assert in_memory == final
        _, job_tasks = await core.get_job(job.id)
        assert group_state([t.state for t in job_tasks]) is group_state(list(final.values()))
