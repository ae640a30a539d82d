"""A proplet told to stop (SIGTERM or SIGINT: `request_shutdown`, what the signal handler calls)
drains: the tasks it runs get `shutdown_grace` seconds to finish, it is sent no new task, and what it
has not finished goes back to the manager, which runs it again elsewhere, not as a retry.

Before, a stopped proplet failed every task it held with "stopped by request": an upgrade or a
reboot of an edge box failed the fleet's work in flight, and nobody had asked for a stop.

Real manager, real Mosquitto, real wasm; `busy` loops for the milliseconds it is given.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

from core import protocol
from core import topics as t
from core.domain import TaskState
from core.schemas import TaskCreate
from tests.proplet.conftest import PropletFactory
from tests.proplet.helpers import b64, run_to_end
from tests.wasmfixtures import wasm
from tests.wire import WireClient, eventually


async def _events(manager: Any, task_id: str) -> list[str]:
    return [e.detail for e in await manager.task_events(task_id)]


async def test_running_tasks_finish_waiting_ones_are_given_back_and_nothing_new_is_sent(
        manager: Any, proplet_factory: PropletFactory) -> None:
    busy = b64(wasm("busy"))
    async with proplet_factory(manager, "p-drain", max_concurrent_tasks=1, max_queued_tasks=2,
                               shutdown_grace=10.0) as agent:
        tasks = [await manager.create_task(TaskCreate(name="_start", file=busy, inputs=["800"])) for _ in range(3)]
        for task in tasks:
            await manager.start_task(task.id)
        await eventually(lambda: len(agent.running) == 3 and any(r.executing for r in agent.running.values()))
        running = next(r.start.id for r in agent.running.values() if r.executing)
        waiting = [task.id for task in tasks if task.id != running]

        agent.request_shutdown()
        # The manager hears it is shutting down, and gets the two waiting tasks back at once.
        await eventually(lambda: manager.proplets["p-drain"].draining, 2)
        await eventually(lambda: all(manager.active[tid].state is TaskState.PENDING for tid in waiting), 2)
        for tid in waiting:
            assert ("given back by proplet p-drain, which is shutting down (not started yet); queued again"
                    in await _events(manager, tid))
        # It is still online, but nothing is sent to it: the tasks wait, saying why.
        assert manager.proplets["p-drain"].online
        await asyncio.sleep(0.3)
        assert all(manager.active[tid].state is TaskState.PENDING for tid in waiting)
        assert manager.active[waiting[0]].reason.startswith("the 1 live proplets are shutting down")
        # The running one finishes, and then the proplet stops, well within its grace.
        drained = time.monotonic()
        await asyncio.wait_for(agent.wait_closed(), 5)
        assert time.monotonic() - drained < 2
        finished = await run_to_end(manager, running, 5)
        assert (finished.state, finished.proplet_id, finished.error) == (TaskState.COMPLETED, "p-drain", "")
    assert agent.counters.given_back == 2
    await eventually(lambda: not manager.proplets["p-drain"].online, 2)

    async with proplet_factory(manager, "p-next"):
        done = [await run_to_end(manager, tid) for tid in waiting]
    # Run again from the start elsewhere, and not counted as retries: nothing went wrong with them.
    assert [(d.state, d.proplet_id, d.retries, d.attempt) for d in done] == [
        (TaskState.COMPLETED, "p-next", 0, 2)] * 2


async def test_a_task_still_running_at_the_end_of_the_grace_runs_again_on_another_proplet(
        manager: Any, proplet_factory: PropletFactory) -> None:
    async with AsyncExitStack() as leaving_stack:
        leaving = await leaving_stack.enter_async_context(proplet_factory(manager, "p-short", shutdown_grace=0.5))
        task = await manager.create_task(TaskCreate(name="_start", file=b64(wasm("busy")), inputs=["3000"]))
        await manager.start_task(task.id)
        await eventually(lambda: manager.active[task.id].state is TaskState.RUNNING)
        async with proplet_factory(manager, "p-stays"):
            leaving.request_shutdown()
            asked = time.monotonic()
            await asyncio.wait_for(leaving.wait_closed(), 3)
            waited = time.monotonic() - asked
            # What the CLI does once closed: leave, giving back what still runs.
            await leaving_stack.aclose()
            done = await run_to_end(manager, task.id, 10)
    assert 0.4 < waited < 2.5  # the grace, not the 3 s task
    assert (done.state, done.proplet_id, done.retries, done.attempt) == (
        TaskState.COMPLETED, "p-stays", 0, 2), done.error
    assert done.results.startswith("start="), "busy prints when it started and ended"
    assert ("given back by proplet p-short, which is shutting down (still running at the end of the 0.5 s "
            "shutdown grace); queued again") in await _events(manager, task.id)
    assert not any("stopped by request" in d for d in await _events(manager, task.id))


async def test_a_second_request_stops_at_once(manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-twice", shutdown_grace=60.0) as agent:
        task = await manager.create_task(TaskCreate(name="spin", file=b64(wasm("spin")), limits={"timeout_s": 60}))
        await manager.start_task(task.id)
        await eventually(lambda: manager.active[task.id].state is TaskState.RUNNING)
        agent.request_shutdown()
        closed = asyncio.ensure_future(agent.wait_closed())
        await eventually(lambda: manager.proplets["p-twice"].draining, 2)
        await asyncio.sleep(0.3)
        assert not closed.done()  # draining: the spinning task has a minute
        agent.request_shutdown()
        await asyncio.wait_for(closed, 1)
    await eventually(lambda: manager.active[task.id].state is TaskState.PENDING, 2)
    assert ("given back by proplet p-twice, which is shutting down (still running when the proplet stopped); "
            "queued again") in await _events(manager, task.id)
    await manager.stop_task(task.id)


async def test_a_start_arriving_while_draining_is_given_back_to_our_manager_and_failed_to_upstreams(
        manager: Any, proplet_factory: PropletFactory, broker: Any) -> None:
    async with proplet_factory(manager, "p-late", shutdown_grace=30.0) as agent, \
            WireClient(broker.url, manager.topics, subscribe=[t.TASK_STATE, t.RESULTS]) as wire:
        hold = await manager.create_task(TaskCreate(name="spin", file=b64(wasm("spin")), limits={"timeout_s": 60}))
        await manager.start_task(hold.id)
        await eventually(lambda: manager.active[hold.id].state is TaskState.RUNNING)
        agent.request_shutdown()
        await eventually(lambda: manager.proplets["p-late"].draining, 2)
        # A start sent before the manager heard (ours number their attempts): handed back, not run.
        ours = protocol.StartMessage(id="late-ours", name="add", file=wasm("add"), inputs=("1", "2"),
                                     proplet_id="p-late", attempt=1)
        await wire.publish(t.START, protocol.encode_start(ours))
        back = await wire.expect(t.TASK_STATE, lambda m: m["task_id"] == "late-ours")
        assert (back["state"], back["attempt"], back["reason"]) == (
            "returned", 1, "it takes no new task while it shuts down")
        # Upstream's manager sends no attempt and cannot take a task back: the task fails, saying why.
        upstream = protocol.StartMessage(id="late-upstream", name="add", file=wasm("add"), inputs=("1", "2"),
                                         proplet_id="p-late")
        await wire.publish(t.START, protocol.encode_start(upstream))
        failed = await wire.expect(t.RESULTS, lambda m: m["task_id"] == "late-upstream")
        assert failed["error"] == ("proplet p-late shut down before the task finished (it takes no new task while "
                                   "it shuts down); start it again")
        assert agent.counters.started == 1  # only the spinning task ran
        agent.request_shutdown()
        await asyncio.wait_for(agent.wait_closed(), 1)
    await manager.stop_task(hold.id)


async def test_a_task_from_upstreams_manager_still_running_at_shutdown_fails_saying_why(
        manager: Any, proplet_factory: PropletFactory, broker: Any) -> None:
    task_id = "0a9c1f3e-3b1e-4c55-9d7e-2f1f5b8f7e21"
    async with WireClient(broker.url, manager.topics, subscribe=[t.RESULTS]) as upstream:
        async with proplet_factory(manager, "p-up-leaves", shutdown_grace=0.3) as agent:
            raw = ('{"id":"' + task_id + '","name":"spin","state":2,"file":"' + b64(wasm("spin"))
                   + '","inputs":[],"cli_args":null,"broadcast":false,"daemon":false,"latent":false,'
                   '"encrypted":false,"proplet_id":"p-up-leaves"}').encode()
            await upstream.publish(t.START, raw)
            await eventually(lambda: task_id in agent.running and agent.running[task_id].executing)
            agent.request_shutdown()
            await asyncio.wait_for(agent.wait_closed(), 2)
        result = await upstream.expect(t.RESULTS, lambda m: m["task_id"] == task_id)
    assert result["error"] == ("proplet p-up-leaves shut down before the task finished (still running at the end "
                               "of the 0.3 s shutdown grace); start it again")


async def test_a_task_given_back_is_not_sent_back_to_a_proplet_whose_draining_the_manager_missed(
        manager: Any, proplet_factory: PropletFactory, broker: Any) -> None:
    """A manager that started while a proplet drained knows it only from heartbeats 10 s apart: the
    task given back is the news, or it would go straight back to that proplet, again and again."""
    async with proplet_factory(manager, "p-missed", liveliness_interval=30.0), \
            WireClient(broker.url, manager.topics) as wire:
        task = await manager.create_task(TaskCreate(name="spin", file=b64(wasm("spin")), limits={"timeout_s": 60}))
        await manager.start_task(task.id)
        await eventually(lambda: manager.active[task.id].state is TaskState.RUNNING)
        assert not manager.proplets["p-missed"].draining
        back = protocol.TaskStateMessage(task.id, "p-missed", protocol.TASK_STATE_RETURNED,
                                         manager.active[task.id].attempt, "still running when the proplet stopped")
        await wire.publish(t.TASK_STATE, protocol.encode_task_state(back))
        await eventually(lambda: manager.active[task.id].state is TaskState.PENDING, 2)
        assert manager.proplets["p-missed"].draining
        await asyncio.sleep(0.3)
        queued = manager.active[task.id]
        assert (queued.state, queued.attempt, queued.retries) == (TaskState.PENDING, 1, 0)
        assert queued.reason.startswith("the 1 live proplets are shutting down")
        await manager.stop_task(task.id)


async def test_a_latent_deployment_moves_to_another_proplet_and_still_answers(
        manager: Any, proplet_factory: PropletFactory) -> None:
    async with AsyncExitStack() as leaving_stack:
        leaving = await leaving_stack.enter_async_context(proplet_factory(manager, "p-lat-leaves"))
        task = await manager.create_task(TaskCreate(name="add", file=b64(wasm("add")), latent=True))
        await manager.start_task(task.id)
        await eventually(lambda: manager.active[task.id].state is TaskState.RUNNING)
        assert await manager.invoke_task(task.id, ["3", "4"], {}) == "7"
        async with proplet_factory(manager, "p-lat-stays"):
            leaving.request_shutdown()  # nothing runs: it stops at once, and gives the deployment back
            await asyncio.wait_for(leaving.wait_closed(), 2)
            await leaving_stack.aclose()
            await eventually(lambda: (manager.active[task.id].state, manager.active[task.id].proplet_id)
                             == (TaskState.RUNNING, "p-lat-stays"), 5)
            assert await manager.invoke_task(task.id, ["10", "20"], {}) == "30"
            await manager.stop_task(task.id)
    assert ("given back by proplet p-lat-leaves, which is shutting down (deployed as latent here); queued again"
            in await _events(manager, task.id))
