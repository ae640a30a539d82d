"""The proplet agent with a real manager, a real Mosquitto and real wasm (in one process)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

import core.service
from core import protocol
from core import topics as t
from core.domain import TaskState
from core.errors import UpstreamFailed
from core.schemas import TaskCreate
from proplet.agent import FINISHED_RESULTS_MAX_BYTES, PropletAgent
from proplet.config import PropletSettings, generated_entity_id, parse_duration, unused_variables
from tests.proplet.conftest import PropletFactory
from tests.proplet.helpers import b64, run_task, run_to_end
from tests.sources.test_http import HttpServer, serve
from tests.wasmfixtures import bytes_on_disk, digest, wasm, with_custom_section
from tests.wire import WireClient, eventually


async def test_add_with_inputs(manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-add"):
        done = await run_task(manager, name="add", file=b64(wasm("add")), inputs=[40, 2])
        assert (done.state, done.results, done.error) == (TaskState.COMPLETED, "42", "")
        events = [(e.state, e.detail) for e in await manager.task_events(done.id)]
        assert [s for s, _ in events] == [TaskState.PENDING, TaskState.PENDING, TaskState.SCHEDULED,
                                          TaskState.RUNNING, TaskState.COMPLETED]
        assert (TaskState.SCHEDULED, "dispatched to p-add") in events
        # A fast task is confirmed by its result, which says when it started.
        assert events[3][1] == "running on p-add (reported with its result)"
        assert done.start_time is not None and done.start_time <= done.finish_time


async def test_numeric_types_and_wrong_inputs(manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-num"):
        bad = await run_task(manager, name="add", file=b64(wasm("add")), inputs=["1", "two"])
        assert bad.state is TaskState.FAILED and "two" in bad.error
        few = await run_task(manager, name="add", file=b64(wasm("add")), inputs=["1"])
        assert few.state is TaskState.FAILED and "2" in few.error
        missing = await run_task(manager, name="nope", file=b64(wasm("add")))
        assert missing.state is TaskState.FAILED and "add" in missing.error, "lists the exports that exist"


async def test_wasi_command_args_env_and_stdout(manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-wasi"):
        done = await run_task(manager, name="_start", file=b64(wasm("hello")), inputs=["one", "two words"],
                              env={"GREETING": "hej"})
        assert done.state is TaskState.COMPLETED, done.error
        assert done.results == "argv: [_start] [one] [two words]\nGREETING=hej\n"


async def test_trap_timeout_memory_bomb_and_the_proplet_survives(manager: Any, proplet_factory: PropletFactory
                                                                 ) -> None:
    async with proplet_factory(manager, "p-hostile", task_memory_limit=32 * 1024 * 1024) as agent:
        trap = await run_task(manager, name="boom", file=b64(wasm("traps")))
        assert trap.state is TaskState.FAILED and "unreachable" in trap.error
        loop = await run_task(manager, name="spin", file=b64(wasm("spin")), limits={"timeout_s": 0.5})
        assert loop.state is TaskState.FAILED and "0.5 s limit" in loop.error
        bomb = await run_task(manager, name="_start", file=b64(wasm("membomb")))
        assert bomb.state is TaskState.FAILED and "memory" in bomb.error and "32 MiB" in bomb.error
        fine = await run_task(manager, name="add", file=b64(wasm("add")), inputs=[1, 2])
        assert fine.results == "3" and agent.counters.failed == 3


async def test_a_task_asking_for_more_memory_than_the_proplet_allows_fails_naming_both(
        manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-small", task_memory_max=64 * 1024 * 1024):
        greedy = await run_task(manager, name="_start", file=b64(wasm("membomb")),
                                limits={"memory_bytes": 4 * 1024**3})
        assert greedy.state is TaskState.FAILED
        # The only live proplet: the task fails (not waits) with its reason.
        assert greedy.error == ("proplet p-small cannot run it, and no other live proplet can: "
                                f"task {greedy.id} asks for 4096 MiB of memory (limits.memory_bytes); proplet "
                                "p-small allows at most 64 MiB per task (PROPLET_TASK_MEMORY_MAX)")
        within = await run_task(manager, name="_start", file=b64(wasm("membomb")),
                                limits={"memory_bytes": 16 * 1024 * 1024})
        assert within.state is TaskState.FAILED and "16 MiB" in within.error  # its own limit stopped it
        fine = await run_task(manager, name="add", file=b64(wasm("add")), inputs=[1, 2],
                              limits={"memory_bytes": 64 * 1024 * 1024})
        assert fine.results == "3"


async def test_stop_interrupts_an_infinite_loop_for_real(manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-stop") as agent:
        task = await manager.create_task(TaskCreate(name="spin", file=b64(wasm("spin"))))
        await manager.start_task(task.id)
        await eventually(lambda: task.id in agent.running and manager.active[task.id].state is TaskState.RUNNING)
        await asyncio.sleep(0.2)
        await manager.stop_task(task.id)
        # The guest really stops: the agent's task ends and the slot is free for the next one.
        await eventually(lambda: task.id not in agent.running, 5)
        done = await run_task(manager, name="add", file=b64(wasm("add")), inputs=[2, 2])
        assert done.results == "4"
        stopped = await manager.get_task(task.id)
        assert stopped.state is TaskState.INTERRUPTED


async def test_a_repeated_start_is_not_run_twice(manager: Any, proplet_factory: PropletFactory,
                                                  broker: Any) -> None:
    async with proplet_factory(manager, "p-dup") as agent, \
            WireClient(broker.url, manager.topics, subscribe=[t.RESULTS]) as spy:
        done = await run_task(manager, name="add", file=b64(wasm("add")), inputs=[5, 5])
        assert done.results == "10"
        start = protocol.StartMessage(id=done.id, name="add", file=wasm("add"), inputs=("5", "5"),
                                      proplet_id="p-dup", attempt=done.attempt)
        await spy.publish(t.START, protocol.encode_start(start))
        await eventually(lambda: agent.counters.duplicate_starts == 1)
        # The stored result is sent again (the manager may have lost it), not recomputed.
        await eventually(lambda: len([m for m in spy.messages(t.RESULTS) if m["task_id"] == done.id]) == 2)
        assert agent.counters.started == 1


async def test_remembered_results_are_bounded_by_bytes_and_the_latest_still_answer_repeats(
        manager: Any, proplet_factory: PropletFactory, broker: Any) -> None:
    """Before: a proplet remembered its last 2,000 results for repeated starts whatever their size:
    with 1 MiB of output each (the capture cap) up to 2 GB on an edge box; 24 were all held.
    Now they weigh at most FINISHED_RESULTS_MAX_BYTES together, and a repeat of a recent task is
    still answered with its result instead of a second run."""
    async with proplet_factory(manager, "p-bigout") as agent, \
            WireClient(broker.url, manager.topics, subscribe=[t.RESULTS]) as spy:
        done = [await run_task(manager, name="_start", file=b64(wasm("bigout"))) for _ in range(24)]
        assert all(len(task.results) >= 1024 * 1024 for task in done), [len(task.results) for task in done]
        assert agent._finished.bytes <= FINISHED_RESULTS_MAX_BYTES
        assert len(agent._finished) < 24
        last = done[-1]
        start = protocol.StartMessage(id=last.id, name="_start", file=wasm("bigout"), proplet_id="p-bigout",
                                      attempt=last.attempt)
        await spy.publish(t.START, protocol.encode_start(start))
        await eventually(lambda: agent.counters.duplicate_starts == 1)
        await eventually(lambda: any(m["task_id"] == last.id for m in spy.messages(t.RESULTS)))
        assert agent.counters.started == 24


async def test_starts_for_other_proplets_are_ignored(manager: Any, proplet_factory: PropletFactory,
                                                     broker: Any) -> None:
    async with proplet_factory(manager, "p-me") as agent, \
            WireClient(broker.url, manager.topics, subscribe=[t.RESULTS, t.TASK_STATE]) as spy:
        other = protocol.StartMessage(id="x-1", name="add", file=wasm("add"), inputs=("1", "1"), proplet_id="p-other")
        await spy.publish(t.START, protocol.encode_start(other))
        stop = protocol.StopMessage(id="x-1", proplet_id="p-other")
        await spy.publish(t.STOP, protocol.encode_stop(stop))
        mine = protocol.StartMessage(id="x-2", name="add", file=wasm("add"), inputs=("1", "1"), proplet_id="p-me")
        await spy.publish(t.START, protocol.encode_start(mine))
        result = await spy.expect(t.RESULTS, lambda m: m["task_id"] == "x-2")
        assert result["results"] == "2"
        assert agent.counters.started == 1
        assert not [m for m in spy.messages(t.RESULTS) if m["task_id"] == "x-1"]


async def test_invalid_start_naming_this_proplet_gets_a_failed_result(manager: Any, proplet_factory: PropletFactory,
                                                                      broker: Any) -> None:
    async with proplet_factory(manager, "p-inv") as agent, \
            WireClient(broker.url, manager.topics, subscribe=[t.RESULTS]) as spy:
        await spy.publish(t.START, {"id": "bad-1", "name": "add", "proplet_id": "p-inv"})  # no module
        await spy.publish(t.START, {"id": "bad-2", "name": "add", "proplet_id": "p-inv", "file": "%%%"})
        for tid in ("bad-1", "bad-2"):
            result = await spy.expect(t.RESULTS, lambda m, tid=tid: m["task_id"] == tid)
            assert "invalid" in result["error"]
        assert agent.counters.rejected_messages == 2 and agent.counters.started == 0


async def test_upstream_manager_interop(broker: Any, manager: Any, proplet_factory: PropletFactory) -> None:
    """A start byte-for-byte as upstream's Go manager publishes it; the result as it parses it."""
    async with proplet_factory(manager, "p-up"), \
            WireClient(broker.url, manager.topics, subscribe=[t.RESULTS]) as upstream:
        raw = (
            '{"id":"8f14e45f-ceea-467f-a8f5-5a0c4a1e0b11","name":"add","state":2,"file":"' + b64(wasm("add")) +
            '","inputs":["19","23"],"cli_args":null,"broadcast":false,"daemon":false,"latent":false,'
            '"encrypted":false,"proplet_id":"p-up"}'
        ).encode()
        await upstream.publish(t.START, raw)
        result = await upstream.expect(t.RESULTS)
        # Upstream's manager reads task_id (string), results (any) and error (string or null).
        assert result["task_id"] == "8f14e45f-ceea-467f-a8f5-5a0c4a1e0b11"
        assert result["results"] == "42" and result["error"] is None
        assert result["proplet_id"] == "p-up"



async def test_upstream_manager_latent_and_invoke_interop(broker: Any, manager: Any,
                                                          proplet_factory: PropletFactory) -> None:
    """The FaaS path byte for byte as upstream's Go manager speaks it: a start with latent: true (no
    result follows: the task stays running), then invokes; each answer as it parses one (results a
    string, error a string or null), and its redeploy trigger for a task the proplet does not hold."""
    async with proplet_factory(manager, "p-up-lat"), \
            WireClient(broker.url, manager.topics, subscribe=[t.RESULTS, t.INVOKE_RESULTS]) as upstream:
        task_id = "c9f0f895-fb98-4b91-9c3e-0b4e4a0cf1a2"
        raw = (
            '{"id":"' + task_id + '","name":"add","state":2,"file":"' + b64(wasm("add")) +
            '","inputs":null,"cli_args":null,"broadcast":false,"daemon":false,"latent":true,'
            '"encrypted":false,"proplet_id":"p-up-lat"}'
        ).encode()
        await upstream.publish(t.START, raw)
        # Called at once, as upstream's manager allows (it marks the task running on publish): the call
        # waits for the deployment under way instead of failing as "not precompiled".
        for n, inputs in enumerate((["19", "23"], ["1", "2"])):
            invocation = f"0d6b7c1e-5a3f-4e2b-8c9d-00000000000{n}"
            await upstream.publish(t.INVOKE, (
                '{"id":"' + task_id + '","broadcast":false,"proplet_id":"p-up-lat","invocation_id":"' + invocation +
                '","inputs":["' + '","'.join(inputs) + '"]}').encode())
            answer = await upstream.expect(t.INVOKE_RESULTS, lambda m, i=invocation: m["invocation_id"] == i)
            assert answer == {"task_id": task_id, "invocation_id": invocation, "proplet_id": "p-up-lat",
                              "results": str(sum(map(int, inputs))), "error": None}
        await upstream.publish(t.INVOKE, b'{"id":"not-deployed","broadcast":false,"proplet_id":"p-up-lat",'
                                         b'"invocation_id":"x-1","inputs":[]}')
        refused = await upstream.expect(t.INVOKE_RESULTS, lambda m: m["invocation_id"] == "x-1")
        assert refused["results"] == "" and "has not been precompiled" in refused["error"]
        assert upstream.messages(t.RESULTS) == []  # a deployment publishes no result
        # A deployment that fails: a call made meanwhile says why, not "not precompiled".
        broken = base64.b64encode(b"\0asm\x01\0\0\0 not wasm").decode()
        await upstream.publish(t.START, ('{"id":"broken-fn","name":"add","file":"' + broken + '","latent":true,'
                                         '"proplet_id":"p-up-lat"}').encode())
        await upstream.publish(t.INVOKE, b'{"id":"broken-fn","broadcast":false,"proplet_id":"p-up-lat",'
                                         b'"invocation_id":"x-2","inputs":["1","2"]}')
        failed = await upstream.expect(t.INVOKE_RESULTS, lambda m: m["invocation_id"] == "x-2")
        assert failed["error"].startswith("task broken-fn could not be deployed here: "), failed
        assert (await upstream.expect(t.RESULTS))["task_id"] == "broken-fn"  # its start's failure, as upstream


async def test_only_a_start_with_an_attempt_says_the_manager_acknowledges_results(broker: Any, tmp_path: Path
                                                                                 ) -> None:
    """Only this project's manager numbers attempts, and it acknowledges every result: from its first
    start the proplet sends results again until confirmed. Upstream's starts (no attempt) leave it
    sending each once, as a manager that never acknowledges needs. Nobody acknowledges here."""
    from core.topics import Topics
    from tests.conftest import unique

    topics = Topics(unique("t"), "default")
    settings = PropletSettings.load(mqtt_address=broker.url, tenant_id=topics.domain, entity_id="p-acks",
                                    cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", metrics_enabled=False)
    async with PropletAgent(settings) as agent, WireClient(broker.url, topics, subscribe=[t.RESULTS]) as manager:
        assert agent.bus is not None
        await agent.bus.wait_connected(10)
        start = {"name": "add", "state": 2, "file": b64(wasm("add")), "inputs": ["1", "2"], "proplet_id": "p-acks"}
        await manager.publish(t.START, {**start, "id": "upstream-1"})
        assert (await manager.expect(t.RESULTS, lambda m: m["task_id"] == "upstream-1"))["results"] == "3"
        assert not agent.outbox.acks_seen
        await manager.publish(t.START, {**start, "id": "ours-1", "attempt": 1})
        assert (await manager.expect(t.RESULTS, lambda m: m["task_id"] == "ours-1"))["results"] == "3"
        assert agent.outbox.acks_seen
        assert set(agent.outbox.task_ids()) == {"upstream-1", "ours-1"}  # both still wait for a confirmation


async def test_latent_task_deploys_then_answers_invocations(manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-lat"):
        task = await manager.create_task(TaskCreate(name="add", file=b64(wasm("add")), latent=True))
        await manager.start_task(task.id)
        await eventually(lambda: manager.active[task.id].state is TaskState.RUNNING)
        assert await manager.invoke_task(task.id, ["3", "4"], {}) == "7"
        assert await manager.invoke_task(task.id, ["10", "20"], {}) == "30"
        await manager.stop_task(task.id)




async def test_a_latent_task_stays_deployed_past_the_managers_reconciliation(
        manager_factory: Any, proplet_factory: PropletFactory) -> None:
    """Before: heartbeats listed running tasks and unconfirmed results, not deployed latent ones, so
    the manager's reconciliation failed every latent task a few seconds after its deployment
    ("proplet ... no longer has the task")."""
    async with manager_factory(ack_timeout=0.5) as core, proplet_factory(core, "p-lat-long"):
        task = await core.create_task(TaskCreate(name="add", file=b64(wasm("add")), latent=True))
        await core.start_task(task.id)
        await eventually(lambda: core.active[task.id].state is TaskState.RUNNING)
        await asyncio.sleep(4.5)  # heartbeats every second, past the reconciliation's 3 s grace
        assert core.active[task.id].state is TaskState.RUNNING, (await core.get_task(task.id)).error
        assert await core.invoke_task(task.id, ["3", "4"], {}) == "7"
        await core.stop_task(task.id)



async def test_calls_beyond_the_slots_and_the_queue_are_answered_busy(manager: Any,
                                                                      proplet_factory: PropletFactory) -> None:
    """Before: every invocation became a job waiting for the runtime, however many came (a flood of
    calls piled up in memory). Now the slots and the queue bound them, as they bound starts."""
    async with proplet_factory(manager, "p-calls", max_concurrent_tasks=1, max_queued_tasks=1) as agent:
        task = await manager.create_task(TaskCreate(name="spin", file=b64(wasm("spin")), latent=True,
                                                    limits={"timeout_s": 0.5}))
        await manager.start_task(task.id)
        await eventually(lambda: manager.active[task.id].state is TaskState.RUNNING)
        calls = [asyncio.ensure_future(manager.invoke_task(task.id, [], {})) for _ in range(2)]
        await eventually(lambda: agent.calls_in_flight == 2)
        with pytest.raises(UpstreamFailed, match=r"p-calls is busy: 2 calls of latent tasks run or wait already "
                                                 r"\(at most 2\)"):
            await manager.invoke_task(task.id, [], {})
        for call in calls:  # the two taken each ran into the task's limit, one after the other
            with pytest.raises(UpstreamFailed, match=r"0\.5 s limit"):
                await call
        assert agent.counters.calls_refused == 1 and agent.calls_in_flight == 0
        with pytest.raises(UpstreamFailed, match=r"0\.5 s limit"):  # room again
            await manager.invoke_task(task.id, [], {})
        await manager.stop_task(task.id)


async def test_a_broadcast_latent_task_runs_once_per_call_on_its_proplets_in_turn(
        manager: Any, proplet_factory: PropletFactory, broker: Any) -> None:
    async with WireClient(broker.url, manager.topics, subscribe=[t.INVOKE_RESULTS]) as spy, \
            proplet_factory(manager, "p-fan-1") as first:
        async with proplet_factory(manager, "p-fan-2") as second:
            task = await manager.create_task(TaskCreate(name="add", file=b64(wasm("add")), latent=True,
                                                        broadcast=True))
            await manager.start_task(task.id)
            await eventually(lambda: task.id in first._latent and task.id in second._latent)
            assert [await manager.invoke_task(task.id, [str(n), "1"], {}) for n in range(4)] == ["1", "2", "3", "4"]
            await eventually(lambda: len(spy.messages(t.INVOKE_RESULTS)) >= 4)
            await asyncio.sleep(0.2)  # time for a second answer to any call to arrive
            answers = spy.messages(t.INVOKE_RESULTS)
            assert sorted(m["proplet_id"] for m in answers) == ["p-fan-1", "p-fan-1", "p-fan-2", "p-fan-2"]
        # The second one left (handing its deployment back): the calls go to the first alone.
        await eventually(lambda: not manager.proplets["p-fan-2"].online)
        assert await manager.invoke_task(task.id, ["20", "22"], {}) == "42"
        assert await manager.invoke_task(task.id, ["1", "1"], {}) == "2"
        await eventually(lambda: len(spy.messages(t.INVOKE_RESULTS)) >= 6)
        assert [m["proplet_id"] for m in spy.messages(t.INVOKE_RESULTS)[4:]] == ["p-fan-1", "p-fan-1"]
        details = [e.detail for e in await manager.task_events(task.id)]
        assert any(d.startswith("p-fan-2 no longer holds it (went offline") and d.endswith("; 1 still do")
                   for d in details), details
        await manager.stop_task(task.id)



async def test_a_broadcast_latent_task_is_deployed_on_proplets_that_come_online_later(
        manager: Any, proplet_factory: PropletFactory, broker: Any) -> None:
    """Before: a broadcast function was deployed on the proplets live when it started, and never on
    one that joined later or came back after a restart, so the fleet's new members never ran it."""
    async with WireClient(broker.url, manager.topics, subscribe=[t.INVOKE_RESULTS]) as spy, \
            proplet_factory(manager, "p-early") as early:
        task = await manager.create_task(TaskCreate(name="add", file=b64(wasm("add")), latent=True, broadcast=True))
        await manager.start_task(task.id)
        await eventually(lambda: task.id in early._latent)
        for round_ in range(2):  # a proplet joining, then the same one restarted
            async with proplet_factory(manager, "p-late") as late:
                await eventually(lambda late=late: task.id in late._latent)
                before = len(spy.messages(t.INVOKE_RESULTS))
                assert [await manager.invoke_task(task.id, [str(n), "1"], {}) for n in range(4)] == ["1", "2", "3", "4"]
                await eventually(lambda before=before: len(spy.messages(t.INVOKE_RESULTS)) == before + 4)
                answered = sorted(m["proplet_id"] for m in spy.messages(t.INVOKE_RESULTS)[before:])
                assert answered == ["p-early", "p-early", "p-late", "p-late"], (round_, answered)
            await eventually(lambda: not manager.proplets["p-late"].online)
        events = [e.detail for e in await manager.task_events(task.id)]
        assert events.count("deployed on p-late too (it came online)") == 2, events
        assert manager.active[task.id].state is TaskState.RUNNING
        await manager.stop_task(task.id)


async def test_large_module_arrives_in_chunks_and_is_verified(manager_factory: Any, proplet_factory: PropletFactory
                                                              ) -> None:
    from tests.wasmfixtures import big_module_byte

    big = wasm("big")
    assert len(big) > 10 * 1024 * 1024
    async with manager_factory(chunk_size=512_000) as core, proplet_factory(core, "p-big") as agent:
        done = await run_task(core, name="probe", file=b64(big), inputs=["123456"], timeout=60)
        assert done.state is TaskState.COMPLETED, done.error
        assert done.results == str(big_module_byte(123456))
        assert agent.chunks is not None and agent.chunks.counters.completed == 1
        # Run it again: the proplet has the compiled module and fetches nothing.
        again = await run_task(core, name="probe", file=b64(big), inputs=["7"])
        assert again.results == str(big_module_byte(7)) and agent.chunks.counters.completed == 1


async def test_a_module_the_proplet_ran_before_is_named_by_reference_not_resent(
        broker: Any, manager: Any, proplet_factory: PropletFactory, tmp_path: Path) -> None:
    module = wasm("hello")  # 140 KB: each inline start carries ~190 KB of base64
    assert len(module) > 16 * 1024
    async with WireClient(broker.url, manager.topics, subscribe=[t.START]) as spy:
        async with proplet_factory(manager, "p-ref") as agent:
            first = await run_task(manager, name="_start", file=b64(module), proplet_id="p-ref")
            second = await run_task(manager, name="_start", file=b64(module), proplet_id="p-ref")
            assert first.state is second.state is TaskState.COMPLETED, (first.error, second.error)
            assert agent.chunks is not None and agent.chunks.counters.completed == 0
        starts = spy.messages(t.START)
        assert starts[0]["file"] and not starts[0].get("image_url")
        assert not starts[1].get("file") and starts[1]["image_url"].startswith("blob:sha256:")
        assert starts[1]["wasm_digest"] == starts[0]["wasm_digest"]
        # The same proplet without its cache (a new disk): it fetches the module in chunks and runs it.
        async with proplet_factory(manager, "p-ref", cache_dir=tmp_path / "p-ref" / "new-cache") as fresh:
            third = await run_task(manager, name="_start", file=b64(module), proplet_id="p-ref")
            assert third.state is TaskState.COMPLETED, third.error
            assert fresh.chunks is not None and fresh.chunks.counters.completed == 1


async def test_the_module_cache_stays_within_its_bound_and_a_removed_module_is_fetched_again(
        broker: Any, manager: Any, proplet_factory: PropletFactory, tmp_path: Path) -> None:
    modules = [with_custom_section(wasm("add"), "padding", bytes([n]) * 300 * 1024) for n in range(5)]
    limit = 2**20  # room for three of them at most (the bytes and the compiled code of each)
    cache = tmp_path / "p-bound" / "cache"
    async with proplet_factory(manager, "p-bound", cache_max_bytes=limit) as agent:
        assert agent.settings.disk_cache_bytes == limit
        for n, module in enumerate(modules):
            done = await run_task(manager, name="add", file=b64(module), inputs=[n, 1], proplet_id="p-bound")
            assert done.state is TaskState.COMPLETED and done.results == str(n + 1), done.error
            await asyncio.sleep(0.02)  # past the file system's clock tick: one module clearly older
        assert 0 < bytes_on_disk(cache) <= limit
        assert not agent.runtime.has_module(digest(modules[0]))
        # The manager names the module by its digest (this proplet ran it): the proplet no longer
        # has it, so it asks for the chunks, and the task runs.
        assert agent.chunks is not None
        fetched = agent.chunks.counters.completed
        again = await run_task(manager, name="add", file=b64(modules[0]), inputs=[40, 2], proplet_id="p-bound")
        assert again.state is TaskState.COMPLETED and again.results == "42", again.error
        assert agent.chunks.counters.completed == fetched + 1
        assert bytes_on_disk(cache) <= limit


async def test_a_task_whose_module_left_the_cache_while_it_waited_for_a_slot_fetches_it_again(
        broker: Any, manager: Any, proplet_factory: PropletFactory) -> None:
    # One slot: while `busy` runs, three tasks of other modules wait on the proplet, fetched and
    # loaded; a cache with room for two removes the first of them before its turn comes.
    busy = with_custom_section(wasm("busy"), "padding", bytes(200 * 1024))
    modules = [with_custom_section(wasm("add"), "padding", bytes([n]) * 200 * 1024) for n in range(3)]
    async with proplet_factory(manager, "p-slot", max_concurrent_tasks=1, max_queued_tasks=3,
                               cache_max_bytes=500 * 1024) as agent:
        running = await manager.create_task(TaskCreate(name="_start", file=b64(busy), inputs=["1500"],
                                                       proplet_id="p-slot"))
        await manager.start_task(running.id)
        await eventually(lambda: manager.active[running.id].state is TaskState.RUNNING, 10)
        waiting = []
        for n, module in enumerate(modules):
            task = await manager.create_task(TaskCreate(name="add", file=b64(module), inputs=[n, 1],
                                                        proplet_id="p-slot"))
            await manager.start_task(task.id)
            waiting.append(task.id)
            await eventually(lambda m=module: agent.runtime.has_module(digest(m)), 10)  # taken in and loaded
        assert agent.runtime._budget.evicted >= 1  # type: ignore[attr-defined]
        for n, task_id in enumerate(waiting):
            done = await run_to_end(manager, task_id, 30)
            assert done.state is TaskState.COMPLETED and done.results == str(n + 1), done.error
        assert (await run_to_end(manager, running.id)).state is TaskState.COMPLETED


async def test_a_latent_task_whose_module_left_the_cache_is_fetched_again_when_invoked(
        manager: Any, proplet_factory: PropletFactory) -> None:
    others = [with_custom_section(wasm("add"), "padding", bytes([n]) * 200 * 1024) for n in range(3)]
    async with proplet_factory(manager, "p-lat2", cache_max_bytes=500 * 1024) as agent:
        task = await manager.create_task(TaskCreate(name="add", file=b64(wasm("add")), latent=True))
        await manager.start_task(task.id)
        await eventually(lambda: manager.active[task.id].state is TaskState.RUNNING)
        for n, module in enumerate(others):
            await asyncio.sleep(0.02)  # past the file system's clock tick: the latent one clearly older
            done = await run_task(manager, name="add", file=b64(module), inputs=[n, 1], proplet_id="p-lat2")
            assert done.state is TaskState.COMPLETED, done.error
        assert not agent.runtime.has_module(digest(wasm("add")))
        assert await manager.invoke_task(task.id, ["3", "4"], {}) == "7"
        await manager.stop_task(task.id)


async def test_a_result_is_acknowledged_by_the_next_start_to_its_proplet_or_alone_soon_after(
        broker: Any, manager: Any, proplet_factory: PropletFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # An acknowledgement of its own cost the manager a send (~0.1 ms) on the way of the next start,
    # and the proplet a message to read, for every task of a client submitting one after another.
    # A wait of 1 s instead of 20 ms: a loaded test machine must not send the first one alone.
    monkeypatch.setattr(core.service, "ACK_RIDE_S", 1.0)
    async with WireClient(broker.url, manager.topics, subscribe=[t.START, t.RESULT_ACK]) as spy, \
            proplet_factory(manager, "p-ride") as agent:
        body = {"name": "add", "file": b64(wasm("add")), "inputs": [1, 2], "proplet_id": "p-ride"}
        first = await run_task(manager, **body)
        await manager.writer.wait_idle()  # its result stored: the acknowledgement waits for a start
        assert len(agent.outbox) == 1
        second = await run_task(manager, **body)
        assert first.state is second.state is TaskState.COMPLETED
        start = next(m for m in spy.messages(t.START) if m["id"] == second.id)
        assert start["result_acks"] == [[first.id, first.attempt]]
        # Nothing follows the second task: its acknowledgement goes alone (after ACK_RIDE_S).
        await eventually(lambda: len(agent.outbox) == 0, 5)
        assert [m["task_id"] for m in spy.messages(t.RESULT_ACK)] == [second.id]


async def test_digest_mismatch_fails_before_anything_runs(manager: Any, proplet_factory: PropletFactory,
                                                          broker: Any) -> None:
    async with proplet_factory(manager, "p-dig") as agent, \
            WireClient(broker.url, manager.topics, subscribe=[t.RESULTS]) as spy:
        start = protocol.StartMessage(id="dig-1", name="add", file=wasm("add"), inputs=("1", "1"),
                                      proplet_id="p-dig", wasm_digest=protocol.sha256_digest(b"something else"))
        await spy.publish(t.START, protocol.encode_start(start))
        result = await spy.expect(t.RESULTS)
        assert "sha256" in result["error"] and result["results"] == ""
        assert not agent.runtime.has_module(protocol.sha256_digest(wasm("add")))


async def test_heartbeats_metrics_and_clean_goodbye(manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-beat", liveliness_interval=0.3) as agent:
        p = manager.proplets["p-beat"]
        assert p.metadata["wasm_runtime"] == agent.runtime.name and "task_state" in p.metadata["capabilities"]
        assert p.metadata["heartbeat_interval"] == 0.3 and p.metadata["os"] == "linux"
        # It queues starts beyond its running slots (3x by default): the manager keeps it busy.
        slots = agent.settings.max_concurrent_tasks
        assert p.metadata["max_queued_tasks"] == 3 * slots and p.max_in_flight == 4 * slots
        await eventually(lambda: len(p.alive_history) >= 3, 5)
        page = await eventually(lambda: _metrics(manager, "p-beat"), 5)
        sample = page.items[0]
        assert sample.memory_metrics["rss_bytes"] > 10_000_000 and "percent" in sample.cpu_metrics
    # Leaving says "offline" at once, without waiting for the liveness timeout.
    await eventually(lambda: not manager.proplets["p-beat"].online, 2)


async def _metrics(core: Any, pid: str) -> Any:
    page = await core.proplet_metrics(pid, 0, 5)
    return page if page.total else None


def test_settings_accept_upstream_names_durations_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPLET_LIVELINESS_INTERVAL", "10s")
    monkeypatch.setenv("PROPLET_METRICS_INTERVAL", "500ms")
    monkeypatch.setenv("PROPLET_DIRS", "/srv/a:/srv/b")
    monkeypatch.setenv("PROPLET_TAGS", "edge, lab")
    monkeypatch.setenv("PROPLET_MQTT_QOS", "2")
    toml = tmp_path / "config.toml"
    toml.write_text('[proplet]\ntenant_id = "t1"\nentity_id = "e1"\napi_key = "k1"\nchannel_id = "c1"\n')
    monkeypatch.setenv("PROPLET_CONFIG_FILE", str(toml))
    s = PropletSettings.load(state_dir=tmp_path / "state")
    assert (s.liveliness_interval, s.metrics_interval, s.dirs, s.tags, s.mqtt_qos) == (
        10.0, 0.5, ["/srv/a", "/srv/b"], ["edge", "lab"], 2)
    assert (s.tenant_id, s.entity_id, s.api_key, s.channel_id) == ("t1", "e1", "k1", "c1")
    monkeypatch.setenv("PROPLET_LIVELINESS_INTERVAL", "ten")
    with pytest.raises(ValueError, match="not a duration"):
        PropletSettings.load(state_dir=tmp_path / "state")
    assert parse_duration("2m") == 120.0


def test_settings_precedence_booleans_and_errors_naming_the_variable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("proplet:\n  tenant_id: from-file\n  location: lab\n  allow_network: true\n"
                      "  unknown_key: 1\nmanager:\n  tenant_id: other\n")
    monkeypatch.setenv("PROPELLER_CONFIG", str(config))
    monkeypatch.setenv("proplet_location", "rack 4")  # variable names are case-insensitive
    monkeypatch.setenv("PROPLET_OUTBOX_FSYNC", "on")
    monkeypatch.setenv("PROPLET_MAX_CONCURRENT_TASKS", "3")
    s = PropletSettings.load(state_dir=tmp_path / "state", max_concurrent_tasks=5, entity_id=None)
    # overrides > environment > config file > defaults; None means "not given".
    assert (s.tenant_id, s.location, s.allow_network, s.outbox_fsync, s.max_concurrent_tasks) == (
        "from-file", "rack 4", True, True, 5)
    assert s.entity_id.startswith("proplet-") and isinstance(s.state_dir, Path)
    assert s.queued_tasks == 15
    for variable, value, message in (("PROPLET_MAX_CONCURRENT_TASKS", "0", "PROPLET_MAX_CONCURRENT_TASKS='0'"),
                                     ("PROPLET_HTTP_PROXY_PORT", "70000", "<= 65535"),
                                     ("PROPLET_MQTT_QOS", "3", "PROPLET_MQTT_QOS=3: must be one of 0, 1, 2"),
                                     ("PROPLET_ALLOW_NETWORK", "perhaps", "PROPLET_ALLOW_NETWORK")):
        monkeypatch.setenv(variable, value)
        with pytest.raises(ValueError, match=re.escape(message)):
            PropletSettings.load(state_dir=tmp_path / "state")
        monkeypatch.delenv(variable)
    config.write_text("proplet: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        PropletSettings.load(state_dir=tmp_path / "state")


def test_generated_id_is_kept(tmp_path: Path) -> None:
    first = generated_entity_id(tmp_path)
    assert first.startswith("proplet-") and generated_entity_id(tmp_path) == first


@pytest.mark.parametrize("runtime", ["internal", "external"])
async def test_directories_need_both_the_task_and_the_proplet(manager: Any, proplet_factory: PropletFactory,
                                                              tmp_path: Path, runtime: str) -> None:
    # The external runtime passed the task's cli_args to wasmtime as they came, `--dir X` with
    # them: a directory PROPLET_DIRS refused was opened to the guest all the same.
    from tests.wasmfixtures import wasmtime_cli

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "in.txt").write_text("from the host")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "in.txt").write_text("must not be read")
    extra = {"external_wasm_runtime": wasmtime_cli()} if runtime == "external" else {}
    async with proplet_factory(manager, f"p-dirs-{runtime}", dirs=[str(allowed)], **extra):
        ok = await run_task(manager, name="_start", file=b64(wasm("fsio")),
                            inputs=["read", str(allowed / "in.txt")], cli_args=["--dir", str(allowed)])
        assert ok.state is TaskState.COMPLETED and "from the host" in ok.results, ok.error
        for cli_args in (["--dir", str(secret)], [f"--dir={secret}"]):
            refused = await run_task(manager, name="_start", file=b64(wasm("fsio")),
                                     inputs=["read", str(secret / "in.txt")], cli_args=cli_args)
            assert "must not be read" not in (refused.results or ""), cli_args
            assert refused.state is TaskState.FAILED
            # It said only the guest's 'error: read …/in.txt: Capabilities insufficient', the refusal
            # being in the proplet's log: now it names the directory and the setting, as for the network.
            assert (f"asks for directory {secret} (`--dir` in cli_args), which proplet p-dirs-{runtime} does not "
                    "share" in refused.error and "PROPLET_DIRS" in refused.error), refused.error
        unasked = await run_task(manager, name="_start", file=b64(wasm("fsio")),
                                 inputs=["read", str(allowed / "in.txt")])
        assert unasked.state is TaskState.FAILED


async def test_a_task_a_proplet_cannot_run_runs_on_one_that_can(manager: Any, proplet_factory: PropletFactory,
                                                                 tmp_path: Path) -> None:
    """Two real proplets, one sharing the directory the task asks for: each task lands on the other
    first as often as round robin sends it there, and completes on the one that shares it (it used
    to fail there, saying the directory was not shared). A module over a proplet's size limit goes
    the same way."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from the host")
    big = with_custom_section(wasm("add"), "padding", bytes(300 * 1024))
    async with proplet_factory(manager, "p-shares", dirs=[str(shared)]) as shares, \
            proplet_factory(manager, "p-small", wasm_fetch_max_bytes=256 * 1024) as small:
        for _ in range(4):
            done = await run_task(manager, name="_start", file=b64(wasm("fsio")),
                                  inputs=["read", str(shared / "in.txt")], cli_args=["--dir", str(shared)])
            assert done.state is TaskState.COMPLETED and "from the host" in done.results, done.error
            assert done.proplet_id == "p-shares"
        refused_dirs = small.counters.unsupported
        assert refused_dirs >= 1  # round robin sent some there first
        assert small.counters.started == refused_dirs and small.counters.failed == 0
        tasks = (await manager.list_tasks(limit=100)).items
        events = [e.detail for task in tasks for e in await manager.task_events(task.id)]
        assert any("proplet p-small cannot run it (task" in d and "PROPLET_DIRS" in d for d in events), events
        # A module the manager stores is placed by the size the proplet announced; one it does not
        # (an http URL, an OCI reference) is found too large by the proplet that fetches it.
        async with HttpServer({"/big.wasm": serve(big)}) as server:
            for _ in range(2):
                done = await run_task(manager, name="add", image_url=server.url("/big.wasm"), inputs=["1", "2"])
                assert done.state is TaskState.COMPLETED and done.results == "3", done.error
                assert done.proplet_id == "p-shares"
        assert small.counters.unsupported > refused_dirs
        assert shares.counters.unsupported == 0


async def test_upstream_manager_gets_a_failed_result_for_a_task_the_proplet_cannot_run(
        broker: Any, manager: Any, proplet_factory: PropletFactory, tmp_path: Path) -> None:
    """Upstream's manager reads no task_state: a start it sends (no attempt) that this proplet cannot
    run is answered with a failed result, as before, not with `unsupported`."""
    async with proplet_factory(manager, "p-up-dir"), \
            WireClient(broker.url, manager.topics, subscribe=[t.RESULTS, t.TASK_STATE]) as upstream:
        raw = orjson.dumps({"id": "4e0f7a1c-2b9d-4c55-9f0e-7d1a3b5c6e70", "name": "_start", "state": 2,
                            "file": b64(wasm("fsio")), "inputs": ["read", "/etc/hostname"],
                            "cli_args": ["--dir", "/etc"], "broadcast": False, "daemon": False, "latent": False,
                            "encrypted": False, "proplet_id": "p-up-dir"})
        await upstream.publish(t.START, raw)
        result = await upstream.expect(t.RESULTS)
        assert result["task_id"] == "4e0f7a1c-2b9d-4c55-9f0e-7d1a3b5c6e70"
        assert "asks for directory /etc" in result["error"] and "PROPLET_DIRS" in result["error"]
        assert not [m for m in upstream.messages(t.TASK_STATE) if m["state"] == "unsupported"]


async def test_network_is_refused_however_the_task_spells_the_wasi_option(
        manager: Any, proplet_factory: PropletFactory) -> None:
    # Only `-S http` and `-S inherit-network` were recognised: `-S inherit-network=y`, a list such
    # as `-S cli,http` or the long `--wasi` ran unrefused, and the external runtime handed the flag
    # to wasmtime, giving the guest the host's network on a proplet that does not allow it.
    from tests.wasmfixtures import wasmtime_cli

    async with proplet_factory(manager, "p-ext-net", external_wasm_runtime=wasmtime_cli()):
        for cli_args in (["-S", "inherit-network=y"], ["-Scli,http"], ["--wasi", "inherit-network"],
                         ["--wasi=http=yes"]):
            done = await run_task(manager, name="_start", file=b64(wasm("hello")), cli_args=cli_args)
            assert done.state is TaskState.FAILED and "network access" in done.error, (cli_args, done.error)
        unasked = await run_task(manager, name="_start", file=b64(wasm("hello")), cli_args=["-S", "http=n"])
        assert unasked.state is TaskState.COMPLETED, unasked.error


async def test_component_export_and_command(manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-comp"):
        greet = await run_task(manager, name="greet", file=b64(wasm("greeter-component")), inputs=['"world"'])
        assert (greet.state, greet.results) == (TaskState.COMPLETED, '"Hello, world!"'), greet.error
        command = await run_task(manager, name="_start", file=b64(wasm("hello-component")), inputs=["x"],
                                 env={"GREETING": "p2"})
        assert "[x]\nGREETING=p2\n" in command.results, command.error


async def test_daemon_serves_wasi_http_until_stopped(manager: Any, proplet_factory: PropletFactory) -> None:
    import httpx

    from tests.wasmfixtures import wasmtime_cli

    async with proplet_factory(manager, "p-web", external_wasm_runtime=wasmtime_cli(), http_enabled=True):
        task = await manager.create_task(TaskCreate(name="serve", file=b64(wasm("http-component")), daemon=True))
        await manager.start_task(task.id)

        async def serving() -> Any:
            events = await manager.task_events(task.id)
            return next((e for e in events if e.detail.startswith("running on p-web: serving HTTP on port")), None)

        event = await eventually(serving, 60)
        port = int(event.detail.rsplit(" ", 1)[1])
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/hello")
        assert response.status_code == 200
        running = await manager.get_task(task.id)
        assert running.state is TaskState.RUNNING, "a daemon keeps running"
        assert running.results == f"serving HTTP on port {port}", "its port is in its results"
        await manager.stop_task(task.id)

        async def closed() -> bool:
            try:
                async with httpx.AsyncClient() as client:
                    await client.get(f"http://127.0.0.1:{port}/", timeout=0.5)
            except httpx.HTTPError:
                return True
            return False

        await eventually(closed, 10)


async def test_a_daemon_web_component_goes_to_the_proplet_that_serves_http(
        manager: Any, proplet_factory: PropletFactory) -> None:
    """Two proplets, one serving wasi:http (the wasmtime CLI, PROPLET_HTTP_ENABLED) and one that
    cannot (the internal runtime): daemon web components sent to the second failed there, "the
    internal runtime cannot serve HTTP", while the first could serve them. Now each is served."""
    import httpx

    from tests.wasmfixtures import wasmtime_cli

    async with proplet_factory(manager, "p-no-web") as no_web, \
            proplet_factory(manager, "p-web-2", external_wasm_runtime=wasmtime_cli(), http_enabled=True):
        for _ in range(2):  # round robin: one of the two lands on p-no-web first
            task = await manager.create_task(TaskCreate(name="serve", file=b64(wasm("http-component")),
                                                        daemon=True))
            await manager.start_task(task.id)

            async def serving(tid: str = task.id) -> Any:
                events = await manager.task_events(tid)
                assert not any(e.state is TaskState.FAILED for e in events), events
                return next((e for e in events if e.detail.startswith("running on p-web-2: serving HTTP")), None)

            event = await eventually(serving, 60)
            port = int(event.detail.rsplit(" ", 1)[1])
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{port}/hello")).status_code == 200
            await manager.stop_task(task.id)
        assert no_web.counters.unsupported >= 1 and no_web.counters.failed == 0
    # Not a daemon, it is no task to serve: it fails wherever it lands, as before.
    async with proplet_factory(manager, "p-no-web-2"):
        done = await run_task(manager, name="serve", file=b64(wasm("http-component")))
        assert done.state is TaskState.FAILED and "cannot serve HTTP" in done.error


async def test_starts_beyond_the_slots_wait_on_the_proplet_as_scheduled_then_run(
        manager: Any, proplet_factory: PropletFactory) -> None:
    # One slot and two queue places: the manager sends all three at once; two wait on the proplet,
    # shown as scheduled ("waiting on ...: its one slot is busy"), not as running, and are not sent again.
    async with proplet_factory(manager, "p-queue", max_concurrent_tasks=1, max_queued_tasks=2) as agent:
        # Compiled beforehand: on a loaded machine a compile outlasts the 50 ms before the
        # confirmation, which then says so (the test below) instead of waiting for the slot.
        await agent.runtime.load(digest(wasm("busy")), wasm("busy"))
        busy = b64(wasm("busy"))
        tasks = [await manager.create_task(TaskCreate(name="_start", file=busy, inputs=["400"])) for _ in range(3)]
        for task in tasks:
            await manager.start_task(task.id)
        await eventually(lambda: len(agent.running) == 3)
        await eventually(lambda: sum(manager.active[t.id].state is TaskState.RUNNING for t in tasks) == 1)
        await asyncio.sleep(0.2)
        states = [manager.active[t.id].state for t in tasks]
        assert states.count(TaskState.RUNNING) == 1 and states.count(TaskState.SCHEDULED) == 2
        waiting = next(t for t in tasks if manager.active[t.id].state is TaskState.SCHEDULED)
        events = await manager.task_events(waiting.id)
        assert "waiting on p-queue: its one slot is busy" in [e.detail for e in events]
        done = [await run_to_end(manager, t.id) for t in tasks]
    assert all(d.state is TaskState.COMPLETED for d in done)
    # One after the other, each start time when it got the slot (not when the start arrived).
    starts = sorted(d.start_time for d in done)
    assert all((b - a).total_seconds() >= 0.35 for a, b in itertools.pairwise(starts))
    assert agent.counters.duplicate_starts == 0


async def test_a_start_whose_module_is_still_compiling_is_confirmed_as_waiting_for_it(
        manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-compiling"):
        task = await manager.create_task(TaskCreate(name="count", file=b64(wasm("slow-compile")), inputs=["10"]))
        await manager.start_task(task.id)
        await eventually(lambda: _detail_seen(manager, task.id, "waiting on p-compiling: getting its module "
                                              "(fetch and compile)"), 10)
        done = await run_to_end(manager, task.id, 30)
    assert (done.state, done.results) == (TaskState.COMPLETED, "10")


async def _detail_seen(core: Any, task_id: str, detail: str) -> bool:
    return detail in [e.detail for e in await core.task_events(task_id)]


async def test_a_proplet_deleted_while_online_announces_itself_again_once_results_wait(
        manager: Any, proplet_factory: PropletFactory) -> None:
    # Deleted while online, the proplet came back from its heartbeats alone: no capabilities, so its
    # results were never confirmed and were sent every 5 s until its outbox filled.
    async with proplet_factory(manager, "p-deleted", result_resend=0.5) as agent:
        await run_task(manager, name="add", file=b64(wasm("add")), inputs=[1, 2], proplet_id="p-deleted")
        await eventually(lambda: len(agent.outbox) == 0, 5)  # the manager confirms results
        await manager.delete_proplet("p-deleted")
        await eventually(lambda: "p-deleted" in manager.proplets, 5)  # back by its next heartbeat
        assert not manager.proplets["p-deleted"].metadata
        done = await run_task(manager, name="add", file=b64(wasm("add")), inputs=[40, 2], proplet_id="p-deleted")
        assert done.results == "42"
        await eventually(lambda: len(agent.outbox) == 0, 5)
        assert "result_ack" in manager.proplets["p-deleted"].metadata["capabilities"]


async def test_a_manager_started_after_its_proplets_learns_their_discovery(
        manager_factory: Any, broker: Any, tmp_path: Path) -> None:
    # `propeller serve` and two `propeller proplet` started together: the proplets announced
    # themselves before the manager subscribed, so it knew them from heartbeats only: `proplets list`
    # showed no runtime, OS or tags, and without the capabilities it sent no acknowledgements.
    from core.topics import Topics
    from tests.conftest import unique

    tenant = unique("t")
    settings = PropletSettings.load(mqtt_address=broker.url, tenant_id=tenant, entity_id="early-p",
                                    cache_dir=tmp_path / "cache", state_dir=tmp_path / "state",
                                    liveliness_interval=0.5, tags=["rack-3"])
    async with PropletAgent(settings) as agent:
        assert agent.bus is not None
        await agent.bus.wait_connected(10)
        async with manager_factory(tenant_id=tenant) as core:
            assert core.topics == Topics(tenant, "default")
            await eventually(lambda: "early-p" in core.proplets and core.proplets["early-p"].online, 10)
            metadata = await eventually(lambda: core.proplets["early-p"].metadata or None, 5)
            assert metadata["tags"] == ["rack-3"] and "task_state" in metadata["capabilities"], metadata


async def test_a_daemon_serves_on_the_first_free_port_from_http_proxy_port(
        manager: Any, proplet_factory: PropletFactory) -> None:
    # PROPLET_HTTP_PROXY_PORT ("First port tried for a served wasi:http component") was read and
    # never used: with it set to 58222 the component served on a random port (56305).
    from tests.services import free_port
    from tests.wasmfixtures import wasmtime_cli

    first = free_port()
    async with proplet_factory(manager, "p-web-port", external_wasm_runtime=wasmtime_cli(), http_enabled=True,
                               http_proxy_port=first):
        ports, task_ids = [], []
        for _ in range(2):
            task = await manager.create_task(TaskCreate(name="serve", file=b64(wasm("http-component")), daemon=True))
            task_ids.append(task.id)
            await manager.start_task(task.id)

            async def serving(task_id: str = task.id) -> Any:
                results = (await manager.get_task(task_id)).results
                return results if isinstance(results, str) and results.startswith("serving HTTP on port") else None

            ports.append(int((await eventually(serving, 60)).rsplit(" ", 1)[1]))
        # The first on the port the setting names, the next one after it (the first is taken).
        assert ports[0] == first and ports[1] > first, ports
        for task_id in task_ids:
            await manager.stop_task(task_id)


async def test_an_encrypted_task_fails_saying_it_needs_a_tee(manager: Any, proplet_factory: PropletFactory) -> None:
    async with proplet_factory(manager, "p-no-tee") as agent:
        # An OCI reference no proxy serves: refused before any fetch, which would only time out.
        done = await run_task(manager, name="add", image_url="registry.invalid/secret:1", inputs=[1, 2],
                              encrypted=True)
    assert done.state is TaskState.FAILED
    assert f"task {done.id} is encrypted: it needs a TEE runtime, which proplet p-no-tee" in done.error
    # Another proplet (upstream's, with a TEE) may run it: ours says it cannot, rather than failing it.
    assert agent.counters.unsupported == 1 and agent.counters.failed == 0


def test_upstream_variables_that_do_nothing_here_and_misspelt_ones_are_named() -> None:
    environ = {"PROPLET_HAL_ENABLED": "true", "PROPLET_MQTT_ADRESS": "mqtt://x", "PROPLET_TENANT_ID": "t",
               "PROPLET_CONFIG_FILE": "/etc/upstream.toml", "PROPLET_WHATEVER": "1", "PATH": "/bin"}
    assert unused_variables(environ) == [
        "PROPLET_HAL_ENABLED (upstream's) has no effect here: this proplet gives guests no HAL.",
        "PROPLET_MQTT_ADRESS is not a setting of this proplet and is ignored. Did you mean PROPLET_MQTT_ADDRESS? "
        "`propeller proplet --help` lists them.",
        "PROPLET_WHATEVER is not a setting of this proplet and is ignored. `propeller proplet --help` lists them.",
    ]
