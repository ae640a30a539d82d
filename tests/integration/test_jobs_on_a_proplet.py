"""Jobs and workflows run by a real proplet (real wasmtime, the `add` module built from
tests/wasm/add.wat) against a manager on SQLite and on PostgreSQL and a real Mosquitto: stops that
race the start of a sequential job's next task, re-runs of finished jobs and workflows, and a
manager killed in the middle of a job's or a workflow task's re-run."""

from __future__ import annotations

import asyncio
import base64
import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.domain import TaskState, TaskStateChanged, group_state
from core.schemas import JobCreate, WorkflowCreate
from core.store.base import DatabaseTakenOver, StoreError
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
    async with managers_on_each_backend() as manager, proplet_online(manager, broker, tmp_path, "jobs-p"):
        yield manager


@asynccontextmanager
async def proplet_online(manager: Any, broker: Mosquitto, tmp_path: Path, prefix: str) -> AsyncIterator[None]:
    """A real proplet (id `prefix`-...) on `manager`'s domain and channel, running until the block
    ends; the block is entered once `manager` sees it online."""
    proplet_id = unique(prefix)
    settings = PropletSettings.load(mqtt_address=broker.url, tenant_id=manager.topics.domain,
                                    channel_id=manager.topics.channel, entity_id=proplet_id,
                                    cache_dir=tmp_path / "cache", state_dir=tmp_path / "state",
                                    liveliness_interval=1.0)
    async with PropletAgent(settings):
        await eventually(lambda: proplet_id in manager.proplets and manager.proplets[proplet_id].online, 10)
        yield


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


async def finished(core: Any, task_ids: list[str], runs: int) -> dict[str, TaskState]:
    """The tasks' stored states once each has ended `runs` times (completed, failed, skipped or
    interrupted, as their lifecycle events tell) and none is queued or running."""
    async def check() -> dict[str, TaskState] | None:
        if any(tid in core.active for tid in task_ids):
            return None
        for tid in task_ids:
            ends = [e for e in await core.task_events(tid) if e.state.is_terminal]
            if len(ends) < runs:
                return None
        await core.groups.settle()
        return {tid: (await core.get_task(tid)).state for tid in task_ids}

    return await eventually(check, timeout=20)


async def ends_of(core: Any, task_id: str) -> list[str]:
    return [e.state.label for e in await core.task_events(task_id) if e.state.is_terminal]


@pytest.fixture
async def api(core: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=core.api_url, timeout=20) as client:
        yield client


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
async def test_a_finished_job_runs_again_from_its_first_task(core: Any, api: httpx.AsyncClient, mode: str) -> None:
    """Before: starting a job again after it had completed, failed or been stopped answered 409
    ("create a new job"), though a single finished task can be started again and upstream's
    StartJob starts finished tasks again. Now every task is reset and the job runs as the first
    time, in order; each task's lifecycle events keep both runs."""
    first, second = add_task(inputs=(1, 1)), add_task(inputs=(2, 2))
    last = add_task(first["id"], second["id"], inputs=(3, 3)) if mode == "parallel" else add_task(inputs=(3, 3))
    ids = [first["id"], second["id"], last["id"]]
    r = await api.post("/jobs", json={"tasks": [first, second, last], "execution_mode": mode})
    path = f"/jobs/{r.json()['job_id']}"

    # Completed, then run again.
    assert (await api.post(f"{path}/start")).status_code == 200
    assert set((await finished(core, ids, 1)).values()) == {TaskState.COMPLETED}
    r = await api.post(f"{path}/start")
    assert r.status_code == 200, r.text
    assert set((await finished(core, ids, 2)).values()) == {TaskState.COMPLETED}
    body = (await api.get(path)).json()
    assert body["state_name"] == "completed" and [t["results"] for t in body["tasks"]] == ["2", "4", "6"]
    events = {tid: await core.task_events(tid) for tid in ids}
    assert all([e.state.label for e in evs if e.state.is_terminal] == ["completed", "completed"]
               for evs in events.values())
    assert any("runs again" in e.detail for e in events[last["id"]]), events[last["id"]]
    if mode == "sequential":
        # The re-run kept the order: each task queued again only after the one before completed again.
        second_runs = [([e.at for e in evs if e.detail.startswith("queued")][-1],
                        [e.at for e in evs if e.state is TaskState.COMPLETED][-1]) for evs in events.values()]
        for (_, done), (queued, _) in itertools.pairwise(second_runs):
            assert queued >= done

    # Stopped before it ran (everything skipped), then run again.
    r = await api.post("/jobs", json={"tasks": [add_task(), add_task()], "execution_mode": mode})
    stopped = r.json()
    stopped_ids = [t["id"] for t in stopped["tasks"]]
    assert (await api.post(f"/jobs/{stopped['job_id']}/stop")).status_code == 200
    assert set((await finished(core, stopped_ids, 1)).values()) == {TaskState.SKIPPED}
    assert (await api.post(f"/jobs/{stopped['job_id']}/start")).status_code == 200
    assert set((await finished(core, stopped_ids, 2)).values()) == {TaskState.COMPLETED}


async def test_a_failed_job_runs_again_and_a_running_one_is_refused(core: Any, api: httpx.AsyncClient) -> None:
    ok, bad, after = add_task(), add_task(fail=True), add_task()
    ids = [ok["id"], bad["id"], after["id"]]
    r = await api.post("/jobs", json={"tasks": [ok, bad, after], "execution_mode": "sequential"})
    path = f"/jobs/{r.json()['job_id']}"
    await api.post(f"{path}/start")
    want = [TaskState.COMPLETED, TaskState.FAILED, TaskState.SKIPPED]
    assert list((await finished(core, ids, 1)).values()) == want
    assert (await api.post(f"{path}/start")).status_code == 200
    assert list((await finished(core, ids, 2)).values()) == want
    assert await ends_of(core, ok["id"]) == ["completed", "completed"]
    assert await ends_of(core, after["id"]) == ["skipped", "skipped"]

    # While a task of it is queued or running, a job is not started again.
    spin = {"id": str(uuid.uuid4()), "name": "spin", "file": base64.b64encode(wasm("spin")).decode()}
    r = await api.post("/jobs", json={"tasks": [spin, add_task()], "execution_mode": "sequential"})
    running = f"/jobs/{r.json()['job_id']}"
    assert (await api.post(f"{running}/start")).status_code == 200
    r = await api.post(f"{running}/start")
    assert r.status_code == 409 and "stop it" in r.json()["error"], r.text
    assert (await api.post(f"{running}/stop")).status_code == 200


async def test_starting_a_finished_workflow_root_again_runs_its_dependents_again(core: Any,
                                                                                 api: httpx.AsyncClient) -> None:
    """Before: the root ran again but its dependents, finished from the first run, were left as
    they were (upstream too): a workflow could not be run again. Now a start of a finished task of
    a workflow resets the finished tasks downstream of it, which run (or are skipped) again as
    their dependencies finish."""
    root = add_task(inputs=(1, 1))
    middle = add_task(root["id"], inputs=(2, 2))
    on_failure = {**add_task(root["id"]), "run_if": "failure"}
    leaf = add_task(middle["id"], inputs=(3, 3))
    other_root = add_task(inputs=(5, 5))  # not downstream of the root: not run again
    ids = [root["id"], middle["id"], on_failure["id"], leaf["id"], other_root["id"]]
    r = await api.post("/workflows", json={"tasks": [root, middle, on_failure, leaf, other_root]})
    assert r.status_code == 201, r.text
    await api.post(f"/tasks/{root['id']}/start")
    await api.post(f"/tasks/{other_root['id']}/start")
    want = [TaskState.COMPLETED, TaskState.COMPLETED, TaskState.SKIPPED, TaskState.COMPLETED, TaskState.COMPLETED]
    assert list((await finished(core, ids, 1)).values()) == want

    assert (await api.post(f"/tasks/{root['id']}/start")).status_code == 200
    assert list((await finished(core, ids[:4], 2)).values()) == want[:4]
    assert await ends_of(core, leaf["id"]) == ["completed", "completed"]
    assert await ends_of(core, on_failure["id"]) == ["skipped", "skipped"]
    assert await ends_of(core, other_root["id"]) == ["completed"]


async def test_a_workflow_task_is_not_run_again_while_a_task_downstream_of_it_runs(core: Any,
                                                                                  api: httpx.AsyncClient) -> None:
    """Before: a re-run of a finished root left a dependent that was still running (on the root's
    previous result) alone; it then completed on that stale result and was never run again after
    the root's new run, so the workflow ended looking re-run with a middle from the run before.
    Now the re-run is refused (409) naming the running task, and nothing changes; once that task
    is stopped the re-run goes ahead and runs it again."""
    root = add_task(inputs=(1, 1))
    middle = {"id": str(uuid.uuid4()), "name": "spin", "file": base64.b64encode(wasm("spin")).decode(),
              "depends_on": [root["id"]]}
    leaf = add_task(middle["id"], inputs=(3, 3))
    r = await api.post("/workflows", json={"tasks": [root, middle, leaf]})
    assert r.status_code == 201, r.text
    assert (await api.post(f"/tasks/{root['id']}/start")).status_code == 200
    await eventually(lambda: middle["id"] in core.active and core.active[middle["id"]].state is TaskState.RUNNING, 10)

    r = await api.post(f"/tasks/{root['id']}/start")
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert middle["id"] in error and "running" in error and "stop it" in error, error
    assert root["id"] not in core.active
    assert await ends_of(core, root["id"]) == ["completed"]
    assert core.active[middle["id"]].state is TaskState.RUNNING

    assert (await api.post(f"/tasks/{middle['id']}/stop")).status_code == 200
    await eventually(lambda: middle["id"] not in core.active, 10)
    assert (await api.post(f"/tasks/{root['id']}/start")).status_code == 200
    await eventually(lambda: middle["id"] in core.active and core.active[middle["id"]].state is TaskState.RUNNING, 10)
    assert (await finished(core, [root["id"]], 2))[root["id"]] is TaskState.COMPLETED
    assert (await api.post(f"/tasks/{middle['id']}/stop")).status_code == 200


async def test_a_task_without_a_module_fails_its_turn_instead_of_waiting_for_ever(core: Any,
                                                                                   api: httpx.AsyncClient) -> None:
    """Before: when its turn came the coordinator's start was refused (no module), the refusal went
    to the log only, and the task stayed pending for ever: its job neither running nor finished,
    its dependents waiting. Now it fails with that reason, which ends its job or releases its
    workflow's `run_if: failure` branch. A job whose first tasks have no module is refused whole,
    not half started."""
    ok, bare, after = add_task(), {**add_task(), "file": ""}, add_task()
    ids = [ok["id"], bare["id"], after["id"]]
    r = await api.post("/jobs", json={"tasks": [ok, bare, after], "execution_mode": "sequential"})
    assert r.status_code == 201, r.text
    path = f"/jobs/{r.json()['job_id']}"
    assert (await api.post(f"{path}/start")).status_code == 200
    assert list((await finished(core, ids, 1)).values()) == [TaskState.COMPLETED, TaskState.FAILED,
                                                              TaskState.SKIPPED]
    body = (await api.get(path)).json()
    assert body["state_name"] == "failed"
    assert "has no module" in next(t for t in body["tasks"] if t["id"] == bare["id"])["error"]

    root, bare = add_task(), {**add_task(), "file": ""}
    bare["depends_on"] = [root["id"]]
    on_failure = {**add_task(bare["id"]), "run_if": "failure"}
    await api.post("/workflows", json={"tasks": [root, bare, on_failure]})
    await api.post(f"/tasks/{root['id']}/start")
    assert list((await finished(core, [root["id"], bare["id"], on_failure["id"]], 1)).values()) == [
        TaskState.COMPLETED, TaskState.FAILED, TaskState.COMPLETED]

    good, bare = add_task(), {**add_task(), "file": ""}
    r = await api.post("/jobs", json={"tasks": [good, bare], "execution_mode": "parallel"})
    r = await api.post(f"/jobs/{r.json()['job_id']}/start")
    assert r.status_code == 400 and bare["id"] in r.json()["error"] and "no module" in r.json()["error"], r.text
    assert good["id"] not in core.active
    assert (await core.get_task(good["id"])).state is TaskState.PENDING


async def test_a_sequential_job_goes_on_after_a_manager_restart(managers_on_each_backend: Any, broker: Mosquitto,
                                                                 tmp_path: Path) -> None:
    """The manager stops while the job's first task runs; that task finishes while it is down. The
    restarted manager takes its result from the proplet's outbox and runs the rest of the job."""
    busy = {"id": str(uuid.uuid4()), "name": "_start", "file": base64.b64encode(wasm("busy")).decode(),
            "inputs": ["400"]}
    rest = [add_task(inputs=(1, 1)), add_task(inputs=(2, 2))]
    ids = [busy["id"], *(t["id"] for t in rest)]
    first = managers_on_each_backend()
    manager = await first.__aenter__()
    try:
        async with proplet_online(manager, broker, tmp_path, "restart-p"):
            job, _ = await manager.create_job(JobCreate.model_validate(
                {"tasks": [busy, *rest], "execution_mode": "sequential"}))
            await manager.start_job(job.id)

            async def first_running() -> bool:
                return (await manager.get_task(busy["id"])).state is TaskState.RUNNING

            await eventually(first_running, timeout=10)
            await first.__aexit__(None, None, None)
            first = None
            async with managers_on_each_backend() as restarted:
                states = await finished(restarted, ids, 1)
                assert list(states.values()) == [TaskState.COMPLETED] * 3, states
                _, tasks = await restarted.get_job(job.id)
                assert [t.results for t in tasks[1:]] == ["2", "4"]
    finally:
        if first is not None:
            await first.__aexit__(None, None, None)


class Crash:
    """What a SIGKILL of the manager leaves in its database, at a chosen moment: every write
    committed before it and none after. Wraps `manager`'s store: once a batch holding `marker` is
    committed (`after_commit`) or reached (not `after_commit`), no write reaches the database any
    more; `kill()` then stops the manager without storing what it still holds."""

    def __init__(self, manager: Any, marker: str, *, after_commit: bool) -> None:
        self.manager = manager
        self.happened = asyncio.Event()
        real = manager.store.apply

        async def apply(ops: Any) -> None:
            hit = any(isinstance(p, str) and marker in p for op in ops for p in op.params)
            if self.happened.is_set() or (hit and not after_commit):
                self.happened.set()
                await asyncio.Event().wait()  # dead: never stored
            await real(ops)
            if hit:
                self.happened.set()

        manager.store.apply = apply

    async def kill(self, started: Any, *doomed: asyncio.Future[Any]) -> None:
        """Stop the manager (`started`: what started it) without storing anything more."""
        for work in doomed:
            work.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        # As for a manager whose database was taken over: it stops without writing anything more.
        self.manager.taken_over = DatabaseTakenOver("killed by the test")
        await started.__aexit__(None, None, None)


@pytest.mark.parametrize(("mode", "after_commit"), [("sequential", True), ("parallel", True),
                                                    ("sequential", False)],
                         ids=["sequential-killed-after-its-first-write", "parallel-killed-after-its-first-write",
                              "sequential-killed-before-it-wrote"])
async def test_a_manager_killed_while_rerunning_a_job_leaves_it_finished_or_runs_it_again(
        managers_on_each_backend: Any, broker: Mosquitto, tmp_path: Path, mode: str, after_commit: bool) -> None:
    """Before: a re-run (a start of a finished job) reset the job's tasks one commit at a time, then
    queued its first tasks in more commits; a manager killed between two of them left the job half
    reset, its reset tasks pending and never queued, and after a restart nothing started them: the
    job stayed pending. Now the resets and the queueing of the first tasks are one commit, so a
    restart finds either the job as it was (finished, and it can be started again) or the re-run
    under way, which goes on to its end."""
    first, second = add_task(inputs=(1, 1)), add_task(inputs=(2, 2))
    last = add_task(first["id"], second["id"], inputs=(3, 3)) if mode == "parallel" else add_task(inputs=(3, 3))
    ids = [first["id"], second["id"], last["id"]]
    started = managers_on_each_backend()
    manager = await started.__aenter__()
    crash: Crash | None = None
    try:
        async with proplet_online(manager, broker, tmp_path, "rerun-p"):
            job, _ = await manager.create_job(JobCreate.model_validate(
                {"tasks": [first, second, last], "execution_mode": mode}))
            await manager.start_job(job.id)
            assert set((await finished(manager, ids, 1)).values()) == {TaskState.COMPLETED}

            crash = Crash(manager, f"reset: job {job.id} runs again", after_commit=after_commit)
            rerun = asyncio.ensure_future(manager.start_job(job.id))
            await asyncio.wait_for(crash.happened.wait(), 10)
            await crash.kill(started, rerun)
            async with managers_on_each_backend() as restarted:
                async def settled() -> list[int] | None:
                    """How many runs each task has had, once every task has finished."""
                    _, tasks = await restarted.get_job(job.id)
                    if any(t.id in restarted.active or not t.state.is_terminal for t in tasks):
                        return None
                    return [len(await ends_of(restarted, tid)) for tid in ids]

                try:
                    runs = await eventually(settled, timeout=20)
                except AssertionError:
                    _, tasks = await restarted.get_job(job.id)
                    raise AssertionError(f"job {job.id} left unfinished after the restart: "
                                         f"{[(t.state.label, t.reason) for t in tasks]}") from None
                # Killed after the commit that holds the re-run: it went on; before it: as it was.
                assert runs == ([2, 2, 2] if after_commit else [1, 1, 1])
                assert set((await finished(restarted, ids, runs[0])).values()) == {TaskState.COMPLETED}
                if not after_commit:
                    await restarted.start_job(job.id)
                    assert set((await finished(restarted, ids, 2)).values()) == {TaskState.COMPLETED}
                _, tasks = await restarted.get_job(job.id)
                assert [t.results for t in tasks] == ["2", "4", "6"]
    finally:
        if crash is None:
            await started.__aexit__(None, None, None)


@pytest.mark.parametrize(("marker", "after_commit"), [("queued again", True), ("which it depends on", True),
                                                      ("queued again", False)],
                         ids=["killed-after-the-rerun-was-queued", "killed-after-the-first-reset",
                              "killed-before-it-wrote"])
async def test_a_manager_killed_while_rerunning_a_workflow_task_leaves_it_finished_or_reruns_its_downstream(
        managers_on_each_backend: Any, broker: Mosquitto, tmp_path: Path, marker: str, after_commit: bool) -> None:
    """Before: a start of a finished workflow task queued it in one commit, then reset each finished
    task downstream of it in a commit of its own; a manager killed between two of them left the
    workflow inconsistent after a restart: the root ran again while its dependents not yet reset
    kept their old results (they had finished, so nothing started them). Now the re-run and every
    reset downstream are one commit: a restart finds the workflow as it was, or the whole re-run
    stored, which goes on to its end."""
    root = add_task(inputs=(1, 1))
    middle = add_task(root["id"], inputs=(2, 2))
    leaf = add_task(middle["id"], inputs=(3, 3))
    aside = add_task(inputs=(5, 5))  # not downstream of the root: runs once whatever happens
    ids = [root["id"], middle["id"], leaf["id"]]
    started = managers_on_each_backend()
    manager = await started.__aenter__()
    crash: Crash | None = None
    try:
        async with proplet_online(manager, broker, tmp_path, "wf-rerun-p"):
            await manager.create_workflow(WorkflowCreate.model_validate({"tasks": [root, middle, leaf, aside]}))
            await manager.start_task(root["id"])
            await manager.start_task(aside["id"])
            assert set((await finished(manager, [*ids, aside["id"]], 1)).values()) == {TaskState.COMPLETED}

            crash = Crash(manager, marker, after_commit=after_commit)
            rerun = asyncio.ensure_future(manager.start_task(root["id"]))
            await asyncio.wait_for(crash.happened.wait(), 10)
            await crash.kill(started, rerun)
            async with managers_on_each_backend() as restarted:
                async def settled() -> list[int] | None:
                    """How many runs each task has had, once none is queued, running or waiting."""
                    tasks = await restarted.group_tasks(workflow_id=(await restarted.get_task(root["id"])).workflow_id)
                    if any(t.id in restarted.active or not t.state.is_terminal for t in tasks):
                        return None
                    await restarted.groups.settle()
                    return [len(await ends_of(restarted, tid)) for tid in ids]

                try:
                    runs = await eventually(settled, timeout=20)
                except AssertionError:
                    tasks = [await restarted.get_task(tid) for tid in ids]
                    raise AssertionError(f"workflow left unfinished after the restart: "
                                         f"{[(t.state.label, t.reason) for t in tasks]}") from None
                # Killed after the commit that holds the re-run: all of it ran again; before it: as it was.
                want = [2, 2, 2] if after_commit else [1, 1, 1]
                assert runs == want, f"runs of root, middle, leaf after the restart: {runs}, not {want}"
                if not after_commit:
                    await restarted.start_task(root["id"])
                    assert set((await finished(restarted, ids, 2)).values()) == {TaskState.COMPLETED}
                assert [(await restarted.get_task(tid)).results for tid in ids] == ["2", "4", "6"]
                assert await ends_of(restarted, aside["id"]) == ["completed"]
    finally:
        if crash is None:
            await started.__aexit__(None, None, None)


async def test_a_workflow_rerun_the_database_refuses_leaves_the_workflow_as_it_was(
        core: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-run and the resets downstream are one commit: refused, none of it is stored, and
    memory too has the task and its downstream as they were (finished, with their results)."""
    root = add_task(inputs=(1, 1))
    middle = add_task(root["id"], inputs=(2, 2))
    leaf = add_task(middle["id"], inputs=(3, 3))
    ids = [root["id"], middle["id"], leaf["id"]]
    await core.create_workflow(WorkflowCreate.model_validate({"tasks": [root, middle, leaf]}))
    await core.start_task(root["id"])
    assert set((await finished(core, ids, 1)).values()) == {TaskState.COMPLETED}

    real = core.store.apply

    async def apply(ops: Any) -> None:
        if any(isinstance(p, str) and "which it depends on" in p for op in ops for p in op.params):
            raise RuntimeError("the database refuses it (a trigger, a full disk)")
        await real(ops)

    monkeypatch.setattr(core.store, "apply", apply)
    with pytest.raises(StoreError):
        await core.start_task(root["id"])
    await core.writer.barrier()
    monkeypatch.setattr(core.store, "apply", real)
    await asyncio.sleep(0.3)  # a start that went out anyway would be back with its result by now
    await core.groups.settle()
    assert root["id"] not in core.active
    in_memory = [await core.get_task(tid) for tid in ids]
    assert [(t.state, t.results) for t in in_memory] == [(TaskState.COMPLETED, r) for r in ("2", "4", "6")]
    stored = [await core.reader.get(tid) for tid in ids]
    assert [(t.state, t.results) for t in stored] == [(TaskState.COMPLETED, r) for r in ("2", "4", "6")]
    assert [await ends_of(core, tid) for tid in ids] == [["completed"]] * 3

    await core.start_task(root["id"])  # and it can be re-run
    assert set((await finished(core, ids, 2)).values()) == {TaskState.COMPLETED}
    assert [(await core.get_task(tid)).results for tid in ids] == ["2", "4", "6"]


async def test_a_sequential_job_reads_depends_on_and_run_if(core: Any, api: httpx.AsyncClient) -> None:
    """Before: a sequential job started each next task whatever its run_if (a `run_if: failure`
    task ran after its dependency completed), and a task depending on a later one was accepted, its
    start then refused (unmet dependencies) and the job left pending for ever. Now the run_if of the
    next task is read (skipped, and the job goes on, when it does not hold), and a dependency on a
    later task is refused when the job is created."""
    first = add_task(inputs=(1, 1))
    on_failure = {**add_task(first["id"]), "run_if": "failure"}
    on_success = add_task(first["id"], inputs=(2, 2))
    ids = [first["id"], on_failure["id"], on_success["id"]]
    r = await api.post("/jobs", json={"tasks": [first, on_failure, on_success], "execution_mode": "sequential"})
    assert r.status_code == 201, r.text
    await api.post(f"/jobs/{r.json()['job_id']}/start")
    assert list((await finished(core, ids, 1)).values()) == [TaskState.COMPLETED, TaskState.SKIPPED,
                                                              TaskState.COMPLETED]
    assert "run_if failure" in (await core.get_task(on_failure["id"])).reason

    early, late = add_task(), add_task()
    early["depends_on"] = [late["id"]]
    r = await api.post("/jobs", json={"tasks": [add_task(), early, late], "execution_mode": "sequential"})
    assert r.status_code == 400 and "sequential" in r.json()["error"] and late["id"] in r.json()["error"], r.text


async def test_a_dependent_released_while_the_backlog_is_full_starts_once_there_is_room(
        core: Any, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a dependent whose dependency finished while the dispatch backlog was full
    (MANAGER_MAX_BACKLOG tasks waiting for a proplet) was refused with 503 by the coordinator's
    start, the refusal went to the log only, and the dependent stayed pending for ever. Now the
    coordinator tries again until the backlog has room."""
    blocker = {**add_task(), "proplet_id": unique("absent")}  # waits in the queue: nobody is there
    root = add_task()
    dependent = add_task(root["id"], inputs=(20, 22))
    r = await api.post("/tasks", json=blocker)
    assert r.status_code == 201, r.text
    blocker["id"] = r.json()["id"]
    assert (await api.post("/workflows", json={"tasks": [root, dependent]})).status_code == 201
    monkeypatch.setattr(core.settings, "max_backlog", 1)
    with core.events.subscribe() as events:
        assert (await api.post(f"/tasks/{blocker['id']}/start")).status_code == 200
        # The root leaves the queue for the proplet at once; its dependent then finds the queue full.
        monkeypatch.setattr(core.settings, "max_backlog", 2)
        assert (await api.post(f"/tasks/{root['id']}/start")).status_code == 200
        monkeypatch.setattr(core.settings, "max_backlog", 1)
        while not any(isinstance(e, TaskStateChanged) and e.task_id == root["id"] and e.new.is_terminal
                      for e in await events.wait(10)):
            pass
    await core.groups.settle()
    assert (await core.get_task(dependent["id"])).state is TaskState.PENDING  # no room yet
    assert (await api.post(f"/tasks/{blocker['id']}/stop")).status_code == 200
    states = await finished(core, [root["id"], dependent["id"]], 1)
    assert list(states.values()) == [TaskState.COMPLETED, TaskState.COMPLETED]
    assert (await core.get_task(dependent["id"])).results == "42"  # upstream reports results as text
