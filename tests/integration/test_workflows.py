"""Workflows and jobs over the REST API, against a running manager (SQLite and PostgreSQL), a real
Mosquitto and a synthetic proplet: dependents start or are skipped as their dependencies finish."""

from __future__ import annotations

import base64
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from core.domain import TaskState
from tests.conftest import unique
from tests.services import Mosquitto
from tests.wire import SyntheticProplet, eventually

pytestmark = pytest.mark.timeout(60)

B64 = base64.b64encode(b"\0asm\x01\0\0\0").decode()


def answer(start: dict[str, Any]) -> tuple[Any, str | None]:
    """`fail` fails, `hang` never answers (see the proplet below), the rest add their inputs."""
    if start["name"] == "fail":
        return "", "it failed on purpose"
    return str(sum(int(x) for x in start.get("inputs", []))), None


class Proplet(SyntheticProplet):
    async def on_message(self, suffix: str, payload: bytes) -> None:
        if b'"name":"hang"' in payload:
            self.starts.append({"hang": True})
            return
        await super().on_message(suffix, payload)


@pytest.fixture
async def manager(managers_on_each_backend: Any, broker: Mosquitto) -> AsyncIterator[Any]:
    """A manager on SQLite, then on PostgreSQL, with a synthetic proplet online."""
    async with managers_on_each_backend() as core, \
            Proplet(broker.url, core.topics, unique("wf-p"), answer=answer) as proplet:
        await eventually(lambda: proplet.proplet_id in core.proplets)
        yield core


@pytest.fixture
async def api(manager: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=manager.api_url, timeout=10) as client:
        yield client


def task(name: str = "add", *deps: str, run_if: str = "", inputs: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "name": name, "file": B64, "inputs": list(inputs),
            "depends_on": list(deps), "run_if": run_if}


async def states(api: httpx.AsyncClient, path: str) -> dict[str, str]:
    body = (await api.get(path)).json()
    return {t["id"]: t["state_name"] for t in body["tasks"]}


async def settled(api: httpx.AsyncClient, path: str, want: dict[str, str]) -> dict[str, Any]:
    async def check() -> bool:
        return await states(api, path) == want

    try:
        await eventually(check, timeout=10)
    except AssertionError:
        raise AssertionError(f"{path}: wanted {want}, have {await states(api, path)}") from None
    return (await api.get(path)).json()


async def test_a_workflow_runs_dependents_by_run_if_and_skips_the_rest(api: httpx.AsyncClient) -> None:
    root = task("add")
    ok = task("add", root["id"], inputs=(2, 3))
    on_failure = task("add", root["id"], run_if="failure")
    after_ok = task("add", ok["id"], inputs=(4, 4))
    after_skip = task("add", on_failure["id"])  # its only dependency is skipped: skipped too
    r = await api.post("/workflows", json={"tasks": [root, ok, on_failure, after_ok, after_skip]})
    assert r.status_code == 201, r.text
    created = r.json()
    workflow = created["workflow_id"]
    assert r.headers["location"] == f"/workflows/{workflow}"
    assert [t["id"] for t in created["tasks"]] == [root["id"], ok["id"], on_failure["id"], after_ok["id"],
                                                   after_skip["id"]]
    assert {t["workflow_id"] for t in created["tasks"]} == {workflow} and created["state_name"] == "pending"

    # A dependent cannot be started by hand before its dependencies have finished.
    r = await api.post(f"/tasks/{ok['id']}/start")
    assert r.status_code == 409 and "unmet dependencies" in r.json()["error"] and root["id"] in r.json()["error"]

    assert (await api.post(f"/tasks/{root['id']}/start")).status_code == 200
    body = await settled(api, f"/workflows/{workflow}", {
        root["id"]: "completed", ok["id"]: "completed", on_failure["id"]: "skipped",
        after_ok["id"]: "completed", after_skip["id"]: "skipped"})
    assert body["state_name"] == "completed"
    results = {t["id"]: t["results"] for t in body["tasks"]}
    assert results[ok["id"]] == "5" and results[after_ok["id"]] == "8"
    skipped = next(t for t in body["tasks"] if t["id"] == on_failure["id"])
    assert "run_if failure" in skipped["reason"]
    events = (await api.get(f"/tasks/{on_failure['id']}/events")).json()["events"]
    assert events[-1]["state_name"] == "skipped" and "wanted one to fail" in events[-1]["detail"]


async def test_a_failed_dependency_runs_the_failure_branch(api: httpx.AsyncClient) -> None:
    root = task("fail")
    on_success, on_failure = task("add", root["id"]), task("add", root["id"], run_if="failure", inputs=(7,))
    both = task("add", on_success["id"], on_failure["id"], run_if="failure")  # one failed? none did: skip
    r = await api.post("/workflows", json={"tasks": [root, on_success, on_failure, both]})
    workflow = r.json()["workflow_id"]
    await api.post(f"/tasks/{root['id']}/start")
    body = await settled(api, f"/workflows/{workflow}", {
        root["id"]: "failed", on_success["id"]: "skipped", on_failure["id"]: "completed", both["id"]: "skipped"})
    assert body["state_name"] == "failed"  # upstream's rule: any failed task fails the group


@pytest.mark.parametrize(("tasks", "message"), [
    (lambda a, b: [{**a, "depends_on": [a["id"]]}], "depends on itself"),
    (lambda a, b: [{**a, "depends_on": [b["id"]]}, {**b, "depends_on": [a["id"]]}], "cycle"),
    (lambda a, b: [{**a, "depends_on": [str(uuid.uuid4())]}], "not a task of workflow"),
    (lambda a, b: [a, {**b, "id": a["id"]}], "unique"),
    (lambda a, b: [{**a, "id": "not-a-uuid"}], "UUID"),
    (lambda a, b: [], "tasks"),
    # A deployed latent task never finishes: what waits for it would wait for ever.
    (lambda a, b: [{**a, "latent": True}, {**b, "depends_on": [a["id"]]}], "a latent task: deployed, it never"),
])
async def test_invalid_workflows_are_refused_with_400(api: httpx.AsyncClient, tasks: Any, message: str) -> None:
    r = await api.post("/workflows", json={"tasks": tasks(task(), task())})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert (await api.get("/tasks")).json()["total"] == 0, "nothing of a refused workflow is stored"


async def test_a_task_can_be_appended_to_a_workflow(api: httpx.AsyncClient) -> None:
    root = task()
    workflow = (await api.post("/workflows", json={"tasks": [root]})).json()["workflow_id"]
    r = await api.post("/tasks", json={"name": "add", "file": B64, "inputs": [5], "depends_on": [root["id"]],
                                       "workflow_id": workflow})
    assert r.status_code == 201, r.text
    appended = r.json()["id"]
    r = await api.post("/tasks", json={"name": "add", "file": B64, "depends_on": [str(uuid.uuid4())],
                                       "workflow_id": workflow})
    assert r.status_code == 400 and "not a task of workflow" in r.json()["error"]
    await api.post(f"/tasks/{root['id']}/start")
    await settled(api, f"/workflows/{workflow}", {root["id"]: "completed", appended: "completed"})
    assert (await api.get(f"/workflows/{uuid.uuid4()}")).status_code == 404


async def test_deleting_a_dependency_skips_its_dependents(api: httpx.AsyncClient) -> None:
    root, dependent = task(), task()
    dependent["depends_on"] = [root["id"]]
    workflow = (await api.post("/workflows", json={"tasks": [root, dependent]})).json()["workflow_id"]
    assert (await api.delete(f"/tasks/{root['id']}")).status_code == 204
    body = await settled(api, f"/workflows/{workflow}", {dependent["id"]: "skipped"})
    assert f"dependencies {root['id']} were deleted" in body["tasks"][0]["reason"]


async def test_a_parallel_job_starts_its_roots_and_then_their_dependents(api: httpx.AsyncClient) -> None:
    a, b = task(inputs=(1,)), task(inputs=(2,))
    c = task("add", a["id"], b["id"], inputs=(3,))
    r = await api.post("/jobs", json={"name": "nightly", "tasks": [a, b, c], "execution_mode": " Parallel "})
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['job_id']}"
    assert job["name"] == "nightly" and job["execution_mode"] == "parallel" and job["state_name"] == "pending"
    path = f"/jobs/{job['job_id']}"
    r = await api.post(f"{path}/start")
    assert r.json() == {"message": "job started", "job_id": job["job_id"]}
    body = await settled(api, path, {a["id"]: "completed", b["id"]: "completed", c["id"]: "completed"})
    assert body["state_name"] == "completed" and body["finish_time"] >= body["start_time"] > "0001"
    r = await api.post(f"{path}/start")  # a finished job runs again (tests/integration/test_jobs_on_a_proplet.py)
    assert r.status_code == 200, r.text
    await settled(api, path, {a["id"]: "completed", b["id"]: "completed", c["id"]: "completed"})

    listed = (await api.get("/jobs")).json()
    assert listed["total"] == 1 and listed["jobs"][0]["job_id"] == job["job_id"]
    assert (await api.get("/jobs", params={"status": "completed"})).json()["total"] == 1
    assert (await api.get("/jobs", params={"status": "running"})).json()["total"] == 0
    assert (await api.get("/jobs", params={"status": "sleepy"})).status_code == 400
    assert (await api.get(f"/jobs/{uuid.uuid4()}")).status_code == 404
    assert (await api.post(f"/jobs/{uuid.uuid4()}/start")).status_code == 404


async def test_a_sequential_job_runs_each_task_after_the_one_before_completed(api: httpx.AsyncClient,
                                                                            manager: Any) -> None:
    tasks = [task(inputs=(i,)) for i in range(4)]
    job = (await api.post("/jobs", json={"tasks": tasks, "execution_mode": "sequential"})).json()
    await api.post(f"/jobs/{job['job_id']}/start")
    await settled(api, f"/jobs/{job['job_id']}", {t["id"]: "completed" for t in tasks})
    # Each task was queued only once the one before it had completed.
    timeline = []
    for t in tasks:
        events = (await api.get(f"/tasks/{t['id']}/events")).json()["events"]
        timeline.append((next(e["at"] for e in events if e["detail"] == "queued"),
                         next(e["at"] for e in events if e["state_name"] == "completed")))
    for (_, done), (queued, _) in itertools.pairwise(timeline):
        assert queued >= done


async def test_a_latent_task_may_end_a_sequential_job_but_not_come_before_another(api: httpx.AsyncClient) -> None:
    first, last = task(), {**task(), "latent": True}
    refused = await api.post("/jobs", json={"tasks": [last, first], "execution_mode": "sequential"})
    assert refused.status_code == 400, refused.text
    assert f"task {last['id']} is latent: deployed, it never finishes" in refused.json()["error"]
    assert (await api.get("/tasks")).json()["total"] == 0
    # Last in a sequential job, or anywhere in a parallel one, it is deployed with the job.
    assert (await api.post("/jobs", json={"tasks": [first, last], "execution_mode": "sequential"})).status_code == 201
    assert (await api.post("/jobs", json={"tasks": [{**last, "id": str(uuid.uuid4())}, task()]})).status_code == 201


async def test_a_failed_task_ends_its_job(api: httpx.AsyncClient) -> None:
    first, second, third = task(), task("fail"), task()
    job = (await api.post("/jobs", json={"tasks": [first, second, third], "execution_mode": "sequential"})).json()
    await api.post(f"/jobs/{job['job_id']}/start")
    body = await settled(api, f"/jobs/{job['job_id']}", {
        first["id"]: "completed", second["id"]: "failed", third["id"]: "skipped"})
    assert body["state_name"] == "failed"
    third_view = next(t for t in body["tasks"] if t["id"] == third["id"])
    assert f"its task {second['id']} failed" in third_view["reason"]

    # In parallel: the failure stops what still runs.
    hang, fail, later = task("hang"), task("fail"), task()
    later["depends_on"] = [hang["id"]]
    job = (await api.post("/jobs", json={"tasks": [hang, fail, later]})).json()
    await api.post(f"/jobs/{job['job_id']}/start")
    await settled(api, f"/jobs/{job['job_id']}", {
        hang["id"]: "interrupted", fail["id"]: "failed", later["id"]: "skipped"})


async def test_stopping_a_job_stops_what_runs_and_skips_what_waits(api: httpx.AsyncClient) -> None:
    hang, after = task("hang"), task()
    after["depends_on"] = [hang["id"]]
    job = (await api.post("/jobs", json={"tasks": [hang, after]})).json()
    path = f"/jobs/{job['job_id']}"
    await api.post(f"{path}/start")
    async def dispatched() -> bool:
        now = await states(api, path)
        return now[hang["id"]] in ("scheduled", "running") and now[after["id"]] == "pending"

    await eventually(dispatched, timeout=10)
    r = await api.post(f"{path}/stop")
    assert r.json() == {"message": "job stopped", "job_id": job["job_id"]}
    body = (await api.get(path)).json()
    assert {t["id"]: t["state_name"] for t in body["tasks"]} == {hang["id"]: "interrupted", after["id"]: "skipped"}
    assert body["state_name"] == "failed"


async def test_a_dependent_released_while_the_manager_was_down_starts_after_a_restart(
        managers_on_each_backend: Any, broker: Mosquitto) -> None:
    from core.schemas import WorkflowCreate

    root, dependent = task(), task()
    dependent["depends_on"] = [root["id"]]
    async with managers_on_each_backend() as core:
        tasks = await core.create_workflow(WorkflowCreate.model_validate({"tasks": [root, dependent]}))
        # The root finishes as if its result had been stored just before the manager stopped.
        stored = await core.store.group_tasks(workflow_id=tasks[0].workflow_id)
        finished = stored[0]
        finished.state = TaskState.COMPLETED
        await core.writer.write(core.store.op_update_task_state(finished))
    async with managers_on_each_backend() as core, Proplet(broker.url, core.topics, unique("p"), answer=answer):
        async def dependent_done() -> bool:
            return (await core.get_task(dependent["id"])).state is TaskState.COMPLETED

        await eventually(dependent_done, timeout=10)
        assert core.groups.advances >= 1 and core.groups.errors == 0


async def test_stopping_a_job_with_nothing_running_skips_its_tasks(api: httpx.AsyncClient) -> None:
    """Before: only queued and running tasks were stopped and the coordinator skipped the rest once
    one of them ended; with none (a job not started yet) the stop answered 200, its tasks stayed
    pending and the job could still be started."""
    first, second = task(), task()
    second["depends_on"] = [first["id"]]
    job = (await api.post("/jobs", json={"tasks": [first, second]})).json()
    path = f"/jobs/{job['job_id']}"
    r = await api.post(f"{path}/stop")
    assert r.status_code == 200, r.text
    body = await settled(api, path, {first["id"]: "skipped", second["id"]: "skipped"})
    assert all(f"job {job['job_id']} was stopped" in t["reason"] for t in body["tasks"])
    # Started again, a stopped job runs from the start.
    assert (await api.post(f"{path}/start")).status_code == 200
    await settled(api, path, {first["id"]: "completed", second["id"]: "completed"})


async def test_deleting_the_running_task_of_a_sequential_job_ends_the_job(api: httpx.AsyncClient) -> None:
    """Before: the deleted task never finished, and the next one, now first of the job, was left for
    start_job to start: it stayed pending for ever (the job running)."""
    hang, after = task("hang"), task()
    job = (await api.post("/jobs", json={"tasks": [hang, after], "execution_mode": "sequential"})).json()
    path = f"/jobs/{job['job_id']}"
    await api.post(f"{path}/start")

    async def dispatched() -> bool:
        return (await states(api, path))[hang["id"]] in ("scheduled", "running")

    await eventually(dispatched, timeout=10)
    assert (await api.delete(f"/tasks/{hang['id']}")).status_code == 204
    await settled(api, path, {after["id"]: "skipped"})
