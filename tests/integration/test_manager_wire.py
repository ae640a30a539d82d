"""The manager against real MQTT peers speaking upstream's wire format (Mosquitto, real clients)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

import core.service
from core import protocol
from core import topics as t
from core.config import ManagerSettings
from core.domain import TaskState
from core.errors import Unavailable, UpstreamFailed
from core.schemas import TaskCreate
from core.service import RECENT_TASKS_MAX_BYTES
from core.topics import Topics
from tests.conftest import unique
from tests.wire import SyntheticProplet, WireClient, add_inputs, eventually, start_synthetic_process

WASM = b"\0asm\x01\0\0\0"


# A core module that imports WASI (wasi_snapshot_preview1.fd_write), as any wasm32-wasi program does.
WASI_MODULE = (b"\0asm\x01\x00\x00\x00" + b"\x01\x04\x01\x60\x00\x00"
               + b"\x02\x23\x01\x16wasi_snapshot_preview1\x08fd_write\x00\x00")


def add_task(**overrides: Any) -> TaskCreate:
    body: dict[str, Any] = {"name": "add", "file": base64.b64encode(WASM).decode(), "inputs": [2, 40]}
    body.update(overrides)
    return TaskCreate.model_validate(body)


@contextlib.contextmanager
def commits_held(core: Any) -> Iterator[asyncio.Event]:
    """Hold the writer's commits back until the yielded event is set (the database itself is
    untouched): writes stay queued while the test looks at what the manager does meanwhile."""
    gate = asyncio.Event()
    apply = core.store.apply

    async def held_apply(ops: Any) -> None:
        await gate.wait()
        await apply(ops)

    core.store.apply = held_apply
    try:
        yield gate
    finally:
        gate.set()
        core.store.apply = apply


async def run_to_end(core: Any, task_id: str, timeout: float = 5.0) -> Any:
    await core.start_task(task_id)
    return await finished(core, task_id, timeout)


async def finished(core: Any, task_id: str, timeout: float = 5.0) -> Any:
    async def done() -> Any:
        task = await core.get_task(task_id)
        return task if task.state.is_terminal else None
    return await eventually(done, timeout)


async def test_discovery_and_heartbeats_register_a_proplet(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-disc", metadata={"os": "linux", "tags": ["a"]}) as p:
        proplet = await eventually(lambda: manager.proplets.get("p-disc"))
        await eventually(lambda: proplet.online)
        assert proplet.metadata["tags"] == ["a"]
        # A second discovery refreshes the metadata (upstream freezes the first one).
        p.metadata = {"os": "linux", "tags": ["b"]}
        await p.announce()
        await eventually(lambda: proplet.metadata.get("tags") == ["b"])
        await eventually(lambda: len(proplet.alive_history) >= 2)


async def test_telemetry_arrives_at_qos_0_and_everything_else_at_the_configured_qos(manager: Any,
                                                                                   broker: Any) -> None:
    # Heartbeats and metrics need no acknowledgement from the manager (a socket write per message
    # in a large fleet); results and the rest keep QoS 1 even when sent at QoS 1 alike.
    traffic = manager.bus.tap.subscribe()
    received: dict[str | None, int] = {}

    def arrived() -> bool:
        received.update((manager.topics.suffix(r.topic), r.qos) for r in traffic.drain() if r.direction == "in")
        return len(received) >= 3

    try:
        async with WireClient(broker.url, manager.topics) as c:
            assert c.qos == 1
            await c.publish(t.ALIVE, {"proplet_id": "qos-p", "status": "alive", "namespace": "default"})
            await c.publish(t.METRICS, {"proplet_id": "qos-p", "namespace": "default", "timestamp": 1,
                                        "cpu_metrics": {}, "memory_metrics": {}})
            await c.publish(t.CREATE, {"proplet_id": "qos-p", "namespace": "default"})
            await eventually(arrived)
    finally:
        traffic.close()
    assert received == {t.ALIVE: 0, t.METRICS: 0, t.CREATE: 1}


async def test_heartbeat_before_discovery_creates_the_proplet(manager: Any, broker: Any) -> None:
    async with WireClient(broker.url, manager.topics) as c:
        await c.publish(t.ALIVE, {"proplet_id": "early", "status": "alive", "namespace": "default"})
        p = await eventually(lambda: manager.proplets.get("early"))
        assert p.online and p.name


async def test_start_message_is_upstream_json(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-json", answer=None) as proplet, \
            WireClient(broker.url, manager.topics, subscribe=[t.START]) as spy:
        await eventually(lambda: "p-json" in manager.proplets)
        task = await manager.create_task(add_task(env={"A": "1"}, limits={"timeout_s": 3, "memory_bytes": 65536}))
        await manager.start_task(task.id)
        start = await spy.expect(t.START, lambda m: m["id"] == task.id)
        assert start == {
            "id": task.id, "name": "add", "state": 2,
            "file": base64.b64encode(WASM).decode(),
            "inputs": ["2", "40"], "cli_args": None, "broadcast": False, "daemon": False,
            "latent": False, "encrypted": False, "env": {"A": "1"}, "proplet_id": "p-json",
            # extensions, ignored by upstream proplets
            "wasm_digest": protocol.sha256_digest(WASM), "attempt": 1,
            "limits": {"timeout_s": 3.0, "memory_bytes": 65536},
            "traceparent": start["traceparent"],
        }
        assert start["traceparent"].startswith("00-") and len(start["traceparent"]) == 55
        assert proplet.received[t.START], "the proplet got it too"


async def test_result_completes_the_task_and_duplicates_do_not_reapply(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-res") as proplet:
        await eventually(lambda: "p-res" in manager.proplets)
        task = await manager.create_task(add_task())
        done = await run_to_end(manager, task.id)
        assert (done.state, done.results, done.error, done.proplet_id) == (TaskState.COMPLETED, "42", "", "p-res")
        before = manager.metrics.duplicate_results._value.get()
        # The same result again (QoS 1 redelivery) and a different one: neither changes the task.
        for results in ("42", "999"):
            await proplet.publish(t.RESULTS, {"task_id": task.id, "proplet_id": "p-res", "results": results,
                                              "error": None})
        await eventually(lambda: manager.metrics.duplicate_results._value.get() >= before + 2)
        again = await manager.get_task(task.id)
        assert again.results == "42" and again.finish_time == done.finish_time
        events = [e.state for e in await manager.task_events(task.id)]
        assert events == [TaskState.PENDING, TaskState.PENDING, TaskState.RUNNING, TaskState.COMPLETED]


async def test_tasks_no_longer_held_in_memory_are_read_back_together(manager: Any, broker: Any) -> None:
    manager._recent.max_entries = 4  # hold only 4 idle tasks: the others are read back from the database
    async with SyntheticProplet(broker.url, manager.topics, "p-old"):
        await eventually(lambda: "p-old" in manager.proplets)
        ids = [(await manager.create_task(add_task(inputs=[i, 1]))).id for i in range(30)]
        await asyncio.gather(*(manager.start_task(task_id) for task_id in ids))
        assert manager.reader.stats.reads >= 26
        assert manager.reader.stats.queries < manager.reader.stats.reads / 5, "concurrent reads share queries"
        for i, task_id in enumerate(ids):
            assert (await finished(manager, task_id)).results == str(i + 1)


async def test_a_task_that_left_memory_with_writes_queued_is_read_after_them(manager: Any, broker: Any) -> None:
    manager._recent.max_entries = 4
    # 8 others: the first 4 leave memory before the writer is held, so reading them does not wait.
    others = [(await manager.create_task(add_task())).id for _ in range(8)]
    async with SyntheticProplet(broker.url, manager.topics, "p-late", delay=0.3):
        await eventually(lambda: "p-late" in manager.proplets)
        task = await manager.create_task(add_task())
        await manager.start_task(task.id)
        # The result's state change stays queued while the task leaves memory.
        with commits_held(manager) as gate:
            await eventually(lambda: task.id not in manager.active)
            for other in others[:4]:  # reading 4 other tasks pushes it out of the 4 held in memory
                await asyncio.wait_for(manager.get_task(other), 5)
            assert task.id not in manager._recent
            read = asyncio.create_task(manager.get_task(task.id))
            await asyncio.sleep(0.2)
            assert not read.done(), "the read must wait for the queued writes, not return the stored state"
            gate.set()
            assert (await asyncio.wait_for(read, 5)).state is TaskState.COMPLETED


async def test_tasks_with_large_results_are_not_all_kept_in_memory_and_read_back_whole(manager: Any,
                                                                                        broker: Any) -> None:
    """Before: the manager kept its 10,000 most recently used tasks in memory whatever their size:
    with results of 1 MiB (a proplet's output cap) that was up to 10 GB; 80 such tasks were all
    held (80 MiB). Now the kept tasks weigh at most RECENT_TASKS_MAX_BYTES together; the others are
    read back from the database, results whole."""
    def big(start: dict[str, Any]) -> tuple[Any, str | None]:
        return f"{start['id']}:" + "x" * (1024 * 1024), None

    async with SyntheticProplet(broker.url, manager.topics, "p-big", answer=big):
        await eventually(lambda: "p-big" in manager.proplets)
        ids = [(await manager.create_task(add_task())).id for _ in range(80)]
        for task_id in ids:
            await manager.start_task(task_id)
        for task_id in ids:
            await finished(manager, task_id, timeout=20)
    assert manager._recent.bytes <= RECENT_TASKS_MAX_BYTES
    assert sum(task_id in manager._recent for task_id in ids) < 70
    for task_id in ids:
        task = await manager.get_task(task_id)
        assert task.results == f"{task_id}:" + "x" * (1024 * 1024)
    assert manager._recent.bytes <= RECENT_TASKS_MAX_BYTES


async def test_error_result_fails_the_task(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-err", answer=lambda s: ("", "wasm trap: unreachable")):
        await eventually(lambda: "p-err" in manager.proplets)
        task = await manager.create_task(add_task())
        done = await run_to_end(manager, task.id)
        assert (done.state, done.error) == (TaskState.FAILED, "wasm trap: unreachable")


async def test_a_result_over_the_managers_limit_fails_its_task_saying_so(manager_factory: Any, broker: Any) -> None:
    """Before: a result message of any size (Mosquitto passes up to 256 MB) was decoded, stored and
    served whole: a proplet sending one (a defect, another implementation) took the manager's memory
    and disk with it. Now one over MANAGER_MAX_RESULT_BYTES fails its task naming both sizes, is
    counted as rejected, and acknowledged (its proplet stops sending it); one under it is intact."""
    def sized(start: dict[str, Any]) -> tuple[Any, str | None]:
        return "y" * int(start["inputs"][0]), None

    async with manager_factory(max_result_bytes=64 * 1024) as core, \
            SyntheticProplet(broker.url, core.topics, "p-huge", answer=sized):
        await eventually(lambda: "p-huge" in core.proplets)
        small = await run_to_end(core, (await core.create_task(add_task(inputs=[60_000, 0]))).id)
        assert (small.state, small.results) == (TaskState.COMPLETED, "y" * 60_000)
        before = core.metrics.messages_rejected.labels(t.RESULTS, "result_too_large")._value.get()
        huge = await run_to_end(core, (await core.create_task(add_task(inputs=[200_000, 0]))).id)
        assert (huge.state, huge.results) == (TaskState.FAILED, None)
        assert "p-huge was 195.4 KiB, over the manager's limit of 64.0 KiB (MANAGER_MAX_RESULT_BYTES)" in huge.error
        assert core.metrics.messages_rejected.labels(t.RESULTS, "result_too_large")._value.get() == before + 1
        assert (await core.get_task(huge.id)).results is None


async def test_results_from_the_wrong_proplet_or_for_unknown_tasks_are_rejected(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-own", answer=None), \
            WireClient(broker.url, manager.topics) as intruder:
        await eventually(lambda: "p-own" in manager.proplets)
        task = await manager.create_task(add_task())
        await manager.start_task(task.id)
        await eventually(lambda: task.id in manager.active and manager.active[task.id].state is TaskState.RUNNING)
        await intruder.publish(t.RESULTS, {"task_id": task.id, "proplet_id": "p-other", "results": "1"})
        await intruder.publish(t.RESULTS, {"task_id": "00000000-0000-0000-0000-000000000000", "results": "1"})
        await eventually(lambda: manager.metrics.rejections[(t.RESULTS, "wrong_proplet")] == 1
                         and manager.metrics.rejections[(t.RESULTS, "unknown_task")] == 1)
        assert (await manager.get_task(task.id)).state is TaskState.RUNNING


async def test_no_live_proplet_keeps_the_task_pending_with_a_reason(manager: Any, broker: Any) -> None:
    task = await manager.create_task(add_task())
    await manager.start_task(task.id)
    pending = await manager.get_task(task.id)
    assert pending.state is TaskState.PENDING
    assert "no live proplet" in pending.reason
    async with SyntheticProplet(broker.url, manager.topics, "p-late"):
        done = await finished(manager, task.id)
        assert done.state is TaskState.COMPLETED and done.proplet_id == "p-late" and done.reason == ""


async def test_round_robin_spreads_tasks_and_releases_slots(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "rr-a") as a, \
            SyntheticProplet(broker.url, manager.topics, "rr-b") as b:
        await eventually(lambda: {"rr-a", "rr-b"} <= manager.proplets.keys())
        for _ in range(6):
            task = await manager.create_task(add_task())
            await run_to_end(manager, task.id)
        assert len(a.starts) == 3 and len(b.starts) == 3
        # Upstream never releases a finished task's slot; here nothing is held afterwards.
        assert manager.get_proplet("rr-a").task_count == 0
        await manager.delete_proplet("rr-a")
        assert "rr-a" not in manager.proplets


async def test_least_loaded_prefers_the_idle_proplet(manager_factory: Any, broker: Any) -> None:
    async with manager_factory(scheduler="least_loaded") as core, \
            SyntheticProplet(broker.url, core.topics, "ll-busy", answer=None), \
            SyntheticProplet(broker.url, core.topics, "ll-idle", answer=None):
        await eventually(lambda: {"ll-busy", "ll-idle"} <= core.proplets.keys())
        for _ in range(2):
            pinned = await core.create_task(add_task(proplet_id="ll-busy"))
            await core.start_task(pinned.id)
        await eventually(lambda: core.get_proplet("ll-busy").task_count == 2)
        for _ in range(2):
            task = await core.create_task(add_task())
            await core.start_task(task.id)
            running = await eventually(lambda tid=task.id: core.active.get(tid) and core.active[tid].proplet_id)
            assert running == "ll-idle"


async def test_pinned_task_waits_for_its_proplet(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "pin-other") as other:
        await eventually(lambda: "pin-other" in manager.proplets)
        task = await manager.create_task(add_task(proplet_id="pin-me"))
        await manager.start_task(task.id)
        assert "pin-me" in (await manager.get_task(task.id)).reason
        async with SyntheticProplet(broker.url, manager.topics, "pin-me"):
            done = await finished(manager, task.id)
        assert done.proplet_id == "pin-me" and not other.starts


async def test_priority_decides_who_gets_the_next_free_slot(manager: Any, broker: Any) -> None:
    order: list[str] = []

    def answer(start: dict[str, Any]) -> tuple[Any, str | None]:
        order.append(start["id"])
        return "ok", None

    async with SyntheticProplet(broker.url, manager.topics, "prio", answer=answer,
                                metadata={"max_concurrent_tasks": 1}, delay=0.05):
        await eventually(lambda: "prio" in manager.proplets)
        blocker = await manager.create_task(add_task())
        await manager.start_task(blocker.id)
        low = await manager.create_task(add_task(priority=10))
        high = await manager.create_task(add_task(priority=90))
        mid = await manager.create_task(add_task(priority=50))
        for task in (low, high, mid):
            await manager.start_task(task.id)
        queued = await manager.get_task(low.id)
        assert queued.state is TaskState.PENDING and "capacity" in queued.reason
        for task in (blocker, low, high, mid):
            await finished(manager, task.id)
    assert order == [blocker.id, high.id, mid.id, low.id]


# Ours announces max_queued_tasks and keeps those starts waiting for a slot, so it is never idle for
# a round trip between short tasks; the firmware announces none and refuses starts when full.
@pytest.mark.parametrize(("metadata", "in_flight"), [
    ({"max_concurrent_tasks": 1, "max_queued_tasks": 2}, 3),
    ({"max_concurrent_tasks": 1}, 1),
], ids=["queues-starts", "slots-only"])
async def test_a_proplet_gets_as_many_starts_as_its_slots_and_queue_and_no_more(
        manager: Any, broker: Any, metadata: dict[str, int], in_flight: int) -> None:
    name = f"cap-{in_flight}"
    async with SyntheticProplet(broker.url, manager.topics, name, delay=0.5, metadata=metadata) as proplet:
        await eventually(lambda: name in manager.proplets)
        assert manager.proplets[name].max_in_flight == in_flight
        tasks = [await manager.create_task(add_task(proplet_id=name)) for _ in range(in_flight + 1)]
        for task in tasks:
            await manager.start_task(task.id)
        await eventually(lambda: len(proplet.starts) == in_flight)
        await asyncio.sleep(0.2)
        assert len(proplet.starts) == in_flight
        waiting = await manager.get_task(tasks[-1].id)
        assert waiting.state is TaskState.PENDING and "free slot" in waiting.reason
        for task in tasks:
            await finished(manager, task.id)



async def test_deployed_latent_tasks_take_none_of_a_proplets_slots(manager: Any, broker: Any) -> None:
    """Before: each deployed latent task held one of its proplet's slots until stopped, so a proplet
    with one slot that had one function deployed was sent no other task ever again."""
    async with SyntheticProplet(broker.url, manager.topics, "one-slot", answer=None,
                                metadata={"max_concurrent_tasks": 1}) as proplet:
        await eventually(lambda: "one-slot" in manager.proplets)
        functions = [await manager.create_task(add_task(latent=True, proplet_id="one-slot")) for _ in range(3)]
        for task in functions:
            await manager.start_task(task.id)
        await eventually(lambda: len(proplet.starts) == 3)
        plain = await manager.create_task(add_task(proplet_id="one-slot"))
        await manager.start_task(plain.id)
        await eventually(lambda: len(proplet.starts) == 4)
        # The one slot is the plain task's: the next waits for it, the functions still count as held.
        after = await manager.create_task(add_task(proplet_id="one-slot"))
        await manager.start_task(after.id)
        await asyncio.sleep(0.2)
        waiting = await manager.get_task(after.id)
        assert waiting.state is TaskState.PENDING and "free slot" in waiting.reason
        assert manager.get_proplet("one-slot").task_count == 4
        for task in (*functions, plain, after):
            await manager.stop_task(task.id)



async def test_latent_tasks_go_only_to_proplets_that_can_hold_them(manager: Any, broker: Any) -> None:
    """Before: a latent task went to any proplet, the firmware included, which cannot hold one: it
    failed it (ours) or ran it once (upstream's embedded proplet), and there was no function left to
    call, while another proplet could have held it."""
    firmware = {"capabilities": ["task_state", "result_ack"], "environment": "embedded",
                "wasm_runtime": "wasmtime-c-api"}  # its host build
    upstream_embedded = {"environment": "embedded", "wasm_runtime": "wamr", "os": "zephyr"}
    async with SyntheticProplet(broker.url, manager.topics, "lat-fw", answer=None, metadata=firmware) as fw, \
            SyntheticProplet(broker.url, manager.topics, "lat-emb", answer=None, metadata=upstream_embedded) as emb:
        await eventually(lambda: {"lat-fw", "lat-emb"} <= set(manager.proplets))
        function = await manager.create_task(add_task(latent=True))
        await manager.start_task(function.id)
        await asyncio.sleep(0.2)
        waiting = await manager.get_task(function.id)
        assert waiting.state is TaskState.PENDING and "no live proplet can hold a latent task" in waiting.reason
        plain = await manager.create_task(add_task())
        await manager.start_task(plain.id)
        await eventually(lambda: len(fw.starts) + len(emb.starts) == 1)  # a plain task goes anywhere
        # An embedded proplet that says it holds them (none does yet), upstream's Rust one, an earlier ours.
        async with SyntheticProplet(broker.url, manager.topics, "lat-ours", answer=None,
                                    metadata={"capabilities": ["task_state", "latent"], "environment": "embedded"}), \
                SyntheticProplet(broker.url, manager.topics, "lat-rust", answer=None,
                                 metadata={"environment": "docker", "wasm_runtime": "wasmtime-internal"}), \
                SyntheticProplet(broker.url, manager.topics, "lat-older-ours", answer=None,
                                 metadata={"capabilities": ["task_state", "result_ack"], "environment": "binary"}):
            await eventually(lambda: function.id in manager._slots.get(manager.active[function.id].proplet_id, ()))
            assert manager.active[function.id].proplet_id in {"lat-ours", "lat-rust", "lat-older-ours"}
            assert function.id not in {s["id"] for s in fw.starts + emb.starts}
            everywhere = await manager.create_task(add_task(latent=True, broadcast=True))
            await manager.start_task(everywhere.id)
            await eventually(lambda: manager.active[everywhere.id].state is TaskState.RUNNING)
            assert manager._broadcast_waiting[everywhere.id] == {"lat-ours", "lat-rust", "lat-older-ours"}
            for task in (function, plain, everywhere):
                await manager.stop_task(task.id)



async def test_a_task_goes_only_to_a_proplet_that_can_take_its_module(manager: Any, broker: Any) -> None:
    """Before: any live proplet got any task, so with an ESP32 in the fleet a component, a module over
    the board's max_module_bytes, or one that imports WASI could land on it and fail there while a
    Linux proplet sat idle."""
    component = base64.b64encode(b"\0asm\x0d\x00\x01\x00" + bytes(16)).decode()
    wasi = base64.b64encode(WASI_MODULE).decode()
    big = base64.b64encode(WASM + bytes(5000)).decode()  # only its size matters: nothing compiles it here
    firmware = {"capabilities": ["task_state", "result_ack"], "environment": "embedded", "max_module_bytes": 4096}
    async with SyntheticProplet(broker.url, manager.topics, "fit-board", metadata=firmware) as board:
        await eventually(lambda: "fit-board" in manager.proplets)
        comp = await manager.create_task(add_task(file=component))
        large = await manager.create_task(add_task(file=big))
        command = await manager.create_task(add_task(file=wasi))
        # Boards take modules in chunks only: an HTTP URL, asked for in chunks, was answered by no one.
        web = await manager.create_task(TaskCreate(name="add", image_url="http://web.invalid/add.wasm"))
        small = await manager.create_task(add_task())
        for task in (comp, large, command, web, small):
            await manager.start_task(task.id)
        assert (await finished(manager, small.id)).results == "42"  # a small core module runs on the board
        await asyncio.sleep(0.2)
        waiting = {t.id: (await manager.get_task(t.id)) for t in (comp, large, command, web)}
        assert all(t.state is TaskState.PENDING for t in waiting.values())
        assert "its module is a component, and no live proplet runs components" in waiting[comp.id].reason
        assert "larger than every live proplet that could run it takes" in waiting[large.id].reason
        assert "its module imports WASI, and no live proplet provides it" in waiting[command.id].reason
        assert "its module is fetched from an HTTP URL, which no live proplet does" in waiting[web.id].reason
        assert [s["id"] for s in board.starts] == [small.id]
        # Pinned to the board, it goes there (which says why it cannot run it).
        pinned = await manager.create_task(add_task(file=component, proplet_id="fit-board"))
        await manager.start_task(pinned.id)
        await eventually(lambda: pinned.id in {s["id"] for s in board.starts})
        async with SyntheticProplet(broker.url, manager.topics, "fit-linux",
                                    metadata={"environment": "binary", "max_module_bytes": 100 << 20}) as linux:
            for task in (comp, large, command, web):
                assert (await finished(manager, task.id)).proplet_id == "fit-linux"
            assert {s["id"] for s in linux.starts} == {comp.id, large.id, command.id, web.id}



async def test_a_broadcast_goes_to_the_proplets_that_can_take_its_module_one_by_one(manager: Any, broker: Any) -> None:
    """Before: a broadcast of a component was one start that every proplet read, and the boards
    failed it: the broadcast failed, whatever the proplets that could run it answered."""
    component = base64.b64encode(b"\0asm\x0d\x00\x01\x00" + bytes(16)).decode()
    board = {"capabilities": ["task_state", "result_ack"], "environment": "embedded"}
    async with SyntheticProplet(broker.url, manager.topics, "bc-board", metadata=board,
                                answer=lambda s: ("", "components are not supported here")) as on_board, \
            SyntheticProplet(broker.url, manager.topics, "bc-linux-1", metadata={"environment": "binary"}), \
            SyntheticProplet(broker.url, manager.topics, "bc-linux-2", metadata={"environment": "docker"}):
        await eventually(lambda: {"bc-board", "bc-linux-1", "bc-linux-2"} <= set(manager.proplets))
        everywhere = await manager.create_task(add_task(file=component, broadcast=True))
        done = await run_to_end(manager, everywhere.id)
        assert done.state is TaskState.COMPLETED, done.error
        assert set(done.results) == {"bc-linux-1", "bc-linux-2"}
        assert on_board.starts == []
        # A core module any of them runs: one start for all, as upstream's manager sends it.
        core_module = await run_to_end(manager, (await manager.create_task(add_task(broadcast=True))).id)
        assert set(core_module.results) == {"bc-board", "bc-linux-1", "bc-linux-2"}
        assert [s["broadcast"] for s in on_board.starts] == [True]


async def test_broadcast_runs_everywhere_and_collects_every_answer(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "bc-a"), \
            SyntheticProplet(broker.url, manager.topics, "bc-b", answer=lambda s: ("", "boom")):
        await eventually(lambda: {"bc-a", "bc-b"} <= manager.proplets.keys())
        task = await manager.create_task(add_task(broadcast=True))
        done = await run_to_end(manager, task.id)
        assert done.state is TaskState.FAILED
        assert done.results == {"bc-a": {"results": "42", "error": None}, "bc-b": {"results": "", "error": "boom"}}
        assert done.error == "bc-b: boom"


async def test_each_broadcast_answer_is_acknowledged_once_stored_not_when_the_last_one_comes(
        manager: Any, broker: Any) -> None:
    """Left for the end of the broadcast, an answer came again from its outbox every few seconds
    until the slowest proplet had answered; its repeat is acknowledged too."""
    acks = {"capabilities": ["result_ack"]}
    async with SyntheticProplet(broker.url, manager.topics, "bc-fast", metadata=acks) as fast, \
            SyntheticProplet(broker.url, manager.topics, "bc-slow", answer=None, metadata=acks) as slow:
        await eventually(lambda: {"bc-fast", "bc-slow"} <= manager.proplets.keys())
        task = await manager.create_task(add_task(broadcast=True))
        await manager.start_task(task.id)
        ack = await fast.expect(t.RESULT_ACK, lambda m: m["task_id"] == task.id, timeout=2)
        assert (ack["proplet_id"], ack["attempt"]) == ("bc-fast", 1)
        assert manager.active[task.id].state is TaskState.RUNNING  # bc-slow has not answered
        answer = {"task_id": task.id, "proplet_id": "bc-fast", "results": "42", "error": None, "attempt": 1}
        def acks_of(p: SyntheticProplet) -> int:
            return sum(orjson.loads(raw)["task_id"] == task.id for raw in p.received.get(t.RESULT_ACK, []))

        assert acks_of(fast) == 1
        await fast.publish(t.RESULTS, answer)  # the outbox's repeat
        await eventually(lambda: acks_of(fast) == 2, timeout=2)
        start = await slow.expect(t.START)
        await slow.publish(t.RESULTS, {**answer, "proplet_id": "bc-slow", "attempt": start["attempt"]})
        done = await finished(manager, task.id)
        assert done.state is TaskState.COMPLETED and set(done.results) == {"bc-fast", "bc-slow"}
        await slow.expect(t.RESULT_ACK, lambda m: m["task_id"] == task.id, timeout=2)


async def test_last_will_marks_offline_at_once_and_fails_or_retries_its_tasks(manager: Any, broker: Any) -> None:
    doomed = await start_synthetic_process(broker.url, manager.topics.domain, "lw-doomed")
    try:
        await eventually(lambda: "lw-doomed" in manager.proplets)
        once = await manager.create_task(add_task(proplet_id="lw-doomed"))
        retried = await manager.create_task(add_task(max_retries=1))
        for task in (once, retried):
            await manager.start_task(task.id)
        await eventually(lambda: manager.get_proplet("lw-doomed").task_count == 2)
        async with SyntheticProplet(broker.url, manager.topics, "lw-spare", answer=None) as spare:
            await eventually(lambda: "lw-spare" in manager.proplets)
            killed_at = asyncio.get_running_loop().time()
            doomed.kill()  # SIGKILL: no DISCONNECT, so the broker publishes the Last Will
            await eventually(lambda: not manager.proplets["lw-doomed"].online, timeout=5)
            detected_in = asyncio.get_running_loop().time() - killed_at
            assert "Last Will" in manager.proplets["lw-doomed"].offline_reason
            assert detected_in < 1.0, f"offline detected after {detected_in:.2f}s"
            failed = await finished(manager, once.id)
            assert failed.state is TaskState.FAILED and "went offline" in failed.error
            rerun = await eventually(lambda: spare.starts)
            assert rerun[0]["id"] == retried.id and rerun[0]["attempt"] == 2
            requeued = await manager.get_task(retried.id)
            assert (requeued.proplet_id, requeued.retries, requeued.state) == ("lw-spare", 1, TaskState.RUNNING)
    finally:
        doomed.kill()
        doomed.wait()


async def test_liveness_timeout_takes_a_silent_proplet_offline(manager_factory: Any, broker: Any) -> None:
    async with manager_factory(liveness_timeout=0.6) as core:
        async with SyntheticProplet(broker.url, core.topics, "silent", heartbeat=None):
            await eventually(lambda: "silent" in core.proplets and core.proplets["silent"].online)
            await eventually(lambda: not core.proplets["silent"].online, timeout=3)
            assert "no heartbeat" in core.proplets["silent"].offline_reason
        async with SyntheticProplet(broker.url, core.topics, "beating", heartbeat=0.2):
            await eventually(lambda: "beating" in core.proplets)
            await asyncio.sleep(1.2)
            assert core.proplets["beating"].online


async def test_an_upstream_managers_last_will_is_not_a_phantom_proplet(manager: Any, broker: Any) -> None:
    async with WireClient(broker.url, manager.topics) as c:
        await c.publish(t.ALIVE, {"status": "offline", "proplet_id": "some-upstream-manager"})
        await c.publish(t.ALIVE, {"proplet_id": "marker", "status": "alive"})
        await eventually(lambda: "marker" in manager.proplets)
        assert "some-upstream-manager" not in manager.proplets


async def test_stop_sends_upstream_stop_and_interrupts(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-stop", answer=None) as p:
        await eventually(lambda: "p-stop" in manager.proplets)
        task = await manager.create_task(add_task())
        await manager.start_task(task.id)
        await eventually(lambda: p.starts)
        stopped = await manager.stop_task(task.id)
        assert stopped.state is TaskState.INTERRUPTED
        stop = await p.expect(t.STOP)
        assert {k: stop[k] for k in ("id", "broadcast", "proplet_id")} == {
            "id": task.id, "broadcast": False, "proplet_id": "p-stop"}
        assert manager.get_proplet("p-stop").task_count == 0


async def test_acknowledging_proplet_goes_scheduled_then_running(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-ack", answer=None,
                                metadata={"capabilities": ["task_state"]}) as p:
        await eventually(lambda: "p-ack" in manager.proplets)
        task = await manager.create_task(add_task())
        await manager.start_task(task.id)
        start = await p.expect(t.START)
        assert (await manager.get_task(task.id)).state is TaskState.SCHEDULED
        await p.publish(t.TASK_STATE, {"task_id": task.id, "proplet_id": "p-ack", "state": "running",
                                       "attempt": start["attempt"]})
        await eventually(lambda: manager.active[task.id].state is TaskState.RUNNING)
        await p.publish(t.RESULTS, {"task_id": task.id, "proplet_id": "p-ack", "results": "7", "error": None,
                                    "attempt": start["attempt"]})
        done = await finished(manager, task.id)
        assert [e.state for e in await manager.task_events(done.id)][-3:] == [
            TaskState.SCHEDULED, TaskState.RUNNING, TaskState.COMPLETED]


async def test_a_refusing_proplet_hands_the_task_to_another(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "ref-no", answer=None,
                                metadata={"capabilities": ["task_state"]}) as no, \
            SyntheticProplet(broker.url, manager.topics, "ref-yes") as yes:
        await eventually(lambda: {"ref-no", "ref-yes"} <= manager.proplets.keys())
        for _ in range(2):
            task = await manager.create_task(add_task())
            await manager.start_task(task.id)
            proplet = await eventually(lambda tid=task.id: manager.active.get(tid) and manager.active[tid].proplet_id)
            if proplet == "ref-no":
                start = await no.expect(t.START, lambda m, tid=task.id: m["id"] == tid)
                await no.publish(t.TASK_STATE, {"task_id": task.id, "proplet_id": "ref-no", "state": "rejected",
                                                "reason": "busy", "attempt": start["attempt"]})
            done = await finished(manager, task.id)
            assert done.proplet_id == "ref-yes" and done.state is TaskState.COMPLETED
        assert yes.starts


async def test_a_proplet_that_cannot_run_a_task_hands_it_to_one_that_can(manager: Any, broker: Any) -> None:
    """`unsupported` is what a proplet answers for a task it can never run (a module over its size
    limit, a directory or the network it does not grant): a task placed there goes to another
    proplet, and is never sent back to it; before, it failed there while another could run it."""
    async with SyntheticProplet(broker.url, manager.topics, "cant", answer=None,
                                metadata={"capabilities": ["task_state"]}) as cant, \
            SyntheticProplet(broker.url, manager.topics, "can"):
        await eventually(lambda: {"cant", "can"} <= manager.proplets.keys())
        refused_before = manager.metrics.tasks_unsupported._value.get()
        handed_over = 0
        for _ in range(4):
            task = await manager.create_task(add_task())
            await manager.start_task(task.id)
            proplet = await eventually(lambda tid=task.id: manager.active.get(tid) and manager.active[tid].proplet_id)
            if proplet == "cant":
                start = await cant.expect(t.START, lambda m, tid=task.id: m["id"] == tid)
                await cant.publish(t.TASK_STATE, {"task_id": task.id, "proplet_id": "cant", "state": "unsupported",
                                                  "reason": "the module is over 4 KiB", "attempt": start["attempt"]})
                handed_over += 1
            done = await finished(manager, task.id)
            assert done.proplet_id == "can" and done.state is TaskState.COMPLETED, done.error
            if proplet == "cant":
                details = [e.detail for e in await manager.task_events(task.id)]
                assert any("proplet cant cannot run it (the module is over 4 KiB); queued for another proplet" in d
                           for d in details), details
                # Sent once to the proplet that cannot run it, never again.
                assert sum(1 for m in cant.starts if m["id"] == task.id) == 1
        assert handed_over >= 1  # round robin over two proplets: at least one of four went there first
        assert manager.metrics.tasks_unsupported._value.get() == refused_before + handed_over


async def test_a_task_no_proplet_can_run_fails_with_each_reason(manager: Any, broker: Any) -> None:
    """Pinned to a proplet that cannot run it, a task fails with that proplet's reason; unpinned, it
    fails once every live proplet has said it cannot, with each one's reason (a task that waited
    instead would wait for ever, and `tasks create --wait` would say only that it had not finished)."""
    async def refuse_all(proplet: SyntheticProplet, reason: str) -> None:
        answered: set[tuple[str, int]] = set()
        while True:
            start = await proplet.expect(t.START, lambda m: m.get("proplet_id") == proplet.proplet_id
                                         and (m["id"], m["attempt"]) not in answered, timeout=60)
            answered.add((start["id"], start["attempt"]))
            await proplet.publish(t.TASK_STATE, {"task_id": start["id"], "proplet_id": proplet.proplet_id,
                                                 "state": "unsupported", "reason": reason,
                                                 "attempt": start["attempt"]})

    async with SyntheticProplet(broker.url, manager.topics, "board", answer=None) as board, \
            SyntheticProplet(broker.url, manager.topics, "small", answer=None) as small:
        await eventually(lambda: {"board", "small"} <= manager.proplets.keys())
        refusers = [asyncio.create_task(refuse_all(board, "components do not run here")),
                    asyncio.create_task(refuse_all(small, "the module is over its 1 MiB limit"))]
        try:
            pinned = await manager.create_task(add_task(proplet_id="board"))
            await manager.start_task(pinned.id)
            done = await finished(manager, pinned.id)
            assert done.state is TaskState.FAILED
            assert done.error == "proplet board, which the task is pinned to, cannot run it: components do not run here"

            anywhere = await manager.create_task(add_task())
            await manager.start_task(anywhere.id)
            done = await finished(manager, anywhere.id)
            assert done.state is TaskState.FAILED
            assert done.error.startswith("no live proplet can run it: "), done.error
            assert "board: components do not run here" in done.error
            assert "small: the module is over its 1 MiB limit" in done.error
        finally:
            for job in refusers:
                job.cancel()


async def test_large_inline_module_goes_out_in_chunks(manager_factory: Any, broker: Any) -> None:
    big = WASM + bytes(range(256)) * 40  # 10 KB
    async with manager_factory(inline_limit=4096, chunk_size=3000) as core, \
            SyntheticProplet(broker.url, core.topics, "p-big", answer=None), \
            WireClient(broker.url, core.topics, subscribe=[t.START, t.REGISTRY_CHUNK]) as spy:
        await eventually(lambda: "p-big" in core.proplets)
        task = await core.create_task(add_task(file=base64.b64encode(big).decode()))
        await core.start_task(task.id)
        start = await spy.expect(t.START)
        assert "file" not in start and start["image_url"] == "blob:" + protocol.sha256_digest(big)
        assert len(orjson.dumps(start)) < 4096
        await spy.publish(t.REGISTRY_REQUEST, {"app_name": start["image_url"]})
        chunks: dict[int, bytes] = {}
        while len(chunks) < 4:
            raw = await spy.expect(t.REGISTRY_CHUNK, lambda m: m["chunk_idx"] not in chunks)
            msg = protocol.decode_chunk(orjson.dumps(raw))
            assert (msg.total_chunks, msg.digest, msg.size) == (4, protocol.sha256_digest(big), len(big))
            chunks[msg.chunk_idx] = msg.data
        assert b"".join(chunks[i] for i in range(4)) == big
        # Resume: ask for one missing chunk only.
        spy.received[t.REGISTRY_CHUNK].clear()
        await spy.publish(t.REGISTRY_REQUEST, {"app_name": start["image_url"], "missing": [2]})
        again = await spy.expect(t.REGISTRY_CHUNK)
        await asyncio.sleep(0.2)
        assert again["chunk_idx"] == 2 and len(spy.received[t.REGISTRY_CHUNK]) == 1
        # An unknown blob gets an error chunk instead of silence.
        await spy.publish(t.REGISTRY_REQUEST, {"app_name": "blob:sha256:" + "0" * 64})
        err = await spy.expect(t.REGISTRY_CHUNK, lambda m: m.get("error"))
        assert "no task of this manager" in err["error"]


MALFORMED = [
    (t.RESULTS, b"{not json"),
    (t.RESULTS, b"[1, 2, 3]"),
    (t.RESULTS, b'{"results": "no task id"}'),
    (t.RESULTS, b'{"task_id": 42}'),
    (t.ALIVE, b'{"status": "alive"}'),
    (t.ALIVE, b'{"proplet_id": ["x"]}'),
    (t.CREATE, b'{"proplet_id": "x", "metadata": "not an object"}'),
    (t.METRICS, b'{"proplet_id": 3}'),
    (t.TASK_METRICS, b'{"task_id": "t", "metrics": []}'),
    (t.TASK_STATE, b'{"task_id": "t", "proplet_id": "p", "state": "dancing"}'),
    (t.INVOKE_RESULTS, b'{"task_id": "t"}'),
    (t.REGISTRY_REQUEST, b'{"app_name": 5}'),
    (t.RESULTS, b"\xff\xfe\x00garbage"),
    (t.RESULTS, b'{"task_id": "' + b"x" * 2_000_000 + b'"}'),
]


async def test_malformed_messages_are_counted_and_change_nothing(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-mal") as p, \
            WireClient(broker.url, manager.topics) as attacker:
        await eventually(lambda: "p-mal" in manager.proplets)
        task = await manager.create_task(add_task())
        for suffix, payload in MALFORMED:
            await attacker.publish(suffix, payload)
        # All but the last are malformed; the last is valid JSON naming a task that does not exist.
        await eventually(lambda: sum(v for (topic, reason), v in manager.metrics.rejections.items()
                                     if reason == "malformed") == len(MALFORMED) - 1
                         and manager.metrics.rejections[(t.RESULTS, "unknown_task")] == 1)
        # Valid work still flows.
        done = await run_to_end(manager, task.id)
        assert done.state is TaskState.COMPLETED
        assert p.starts


async def test_metrics_are_stored_with_the_proplets_timestamp(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-met") as p:
        await eventually(lambda: "p-met" in manager.proplets)
        await p.publish(t.METRICS, {"proplet_id": "p-met", "namespace": "default",
                                    "timestamp": "2026-11-23T10:00:00Z",
                                    "cpu_metrics": {"user_seconds": 1.0, "system_seconds": 0.5, "percent": 12.5},
                                    "memory_metrics": {"rss_bytes": 1234}})
        await p.publish(t.METRICS, {"proplet_id": "p-met", "timestamp": 123456,
                                    "cpu_metrics": {"percent": 1}, "memory_metrics": {}})
        page = await eventually(lambda: _metrics_with(manager, "p-met", 2))
        stamps = sorted(m.timestamp.isoformat() for m in page.items)
        assert stamps[0] == "2026-11-23T10:00:00+00:00"  # the RFC 3339 one is kept
        assert stamps[1] > "2026-11-23T10:00:00"  # the uptime one falls back to the receive time


async def _metrics_with(manager: Any, pid: str, n: int) -> Any:
    page = await manager.proplet_metrics(pid, 0, 10)
    return page if page.total >= n else None


async def test_latent_task_invoke_round_trip(manager: Any, broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-lat", answer=None) as p:
        await eventually(lambda: "p-lat" in manager.proplets)
        task = await manager.create_task(add_task(latent=True))
        await manager.start_task(task.id)
        await p.expect(t.START)
        call = asyncio.create_task(manager.invoke_task(task.id, ["5", "6"], {"X": "1"}, timeout=5))
        invoke = await p.expect(t.INVOKE)
        assert (invoke["id"], invoke["inputs"], invoke["proplet_id"], invoke["env"]) == (
            task.id, ["5", "6"], "p-lat", {"X": "1"})
        await p.publish(t.INVOKE_RESULTS, {"task_id": task.id, "invocation_id": invoke["invocation_id"],
                                           "proplet_id": "p-lat", "results": "11", "error": None})
        assert await call == "11"
        # Too many calls waiting for answers at once: refused, not piled up.
        monkeypatch.setattr(core.service, "INVOCATIONS_MAX", 1)
        first = asyncio.create_task(manager.invoke_task(task.id, ["1", "1"], {}, timeout=5))
        invoke = await p.expect(t.INVOKE, lambda m: m["invocation_id"] != invoke["invocation_id"])
        with pytest.raises(Unavailable, match="1 invocations already wait for their answers"):
            await manager.invoke_task(task.id, ["2", "2"], {}, timeout=5)
        await p.publish(t.INVOKE_RESULTS, {"task_id": task.id, "invocation_id": invoke["invocation_id"],
                                           "proplet_id": "p-lat", "results": "2", "error": None})
        assert await first == "2"



async def test_a_broadcast_latent_task_is_called_on_one_holder_in_turn_and_passed_on_by_one_without_it(
        manager: Any, broker: Any) -> None:
    """Before: a call of a broadcast latent task went to every proplet (broadcast: true), each ran
    it, and all answers but the first were rejected as unknown. Now one holder answers each call,
    in turn, and one saying it does not hold the task passes the call to the next, as upstream's
    manager does."""
    async with SyntheticProplet(broker.url, manager.topics, "p-bl-a", answer=None) as a, \
            SyntheticProplet(broker.url, manager.topics, "p-bl-b", answer=None) as b:
        await eventually(lambda: {"p-bl-a", "p-bl-b"} <= set(manager.proplets))
        task = await manager.create_task(add_task(latent=True, broadcast=True))
        await manager.start_task(task.id)
        await a.expect(t.START)
        await b.expect(t.START)
        holders = {"p-bl-a": a, "p-bl-b": b}

        seen: set[str] = set()
        asked: list[list[str]] = []

        async def call(answers: dict[str, str]) -> str:
            """One invocation; each proplet asked answers `answers[its id]` (an error if it starts with
            "error: "). Whom it was sent to, in order, goes to `asked`."""
            asked.append([])
            pending = asyncio.create_task(manager.invoke_task(task.id, ["5", "6"], {}, timeout=5))
            while not pending.done():
                for proplet in holders.values():
                    for invoke in proplet.messages(t.INVOKE):
                        if invoke["invocation_id"] in seen:
                            continue
                        seen.add(invoke["invocation_id"])
                        assert invoke["broadcast"] is False
                        asked[-1].append(invoke["proplet_id"])
                        answer = answers[invoke["proplet_id"]]
                        error = answer.removeprefix("error: ") if answer.startswith("error: ") else None
                        await proplet.publish(t.INVOKE_RESULTS, {
                            "task_id": task.id, "invocation_id": invoke["invocation_id"],
                            "proplet_id": invoke["proplet_id"], "results": "" if error else answer,
                            "error": error})
                await asyncio.sleep(0.01)
            return await pending

        both = {"p-bl-a": "11", "p-bl-b": "11"}
        assert [await call(both) for _ in range(4)] == ["11"] * 4
        assert asked == [["p-bl-a"], ["p-bl-b"], ["p-bl-a"], ["p-bl-b"]]
        not_here = f"error: task {task.id} has not been precompiled; deploy it as a latent task first"
        asked.clear()
        assert [await call({"p-bl-a": not_here, "p-bl-b": "11"}) for _ in range(2)] == ["11", "11"]
        assert asked == [["p-bl-a", "p-bl-b"], ["p-bl-b"]]
        asked.clear()
        with pytest.raises(UpstreamFailed, match="has not been precompiled"):
            await call({"p-bl-a": not_here, "p-bl-b": not_here})
        assert asked == [["p-bl-a", "p-bl-b"]]
        unknown = manager.metrics.messages_rejected.labels(t.INVOKE_RESULTS, "unknown_invocation")
        assert unknown._value.get() == 0


def restarted_manager(sqlite_path: Any, **settings: Any) -> tuple[dict[str, Any], Topics]:
    """Settings that two managers started one after the other share (the second is the first
    restarted: same database, tenant and id), and their topics."""
    same = {"sqlite_path": sqlite_path, "tenant_id": unique("t"), "entity_id": unique("manager"), **settings}
    return same, Topics(same["tenant_id"], ManagerSettings().channel_id)


async def test_a_restarted_manager_does_not_judge_proplets_by_heartbeats_it_could_not_hear(
        manager_factory: Any, broker: Any, tmp_path: Any) -> None:
    """Down for longer than the liveness timeout, the manager comes back to stale heartbeat rows:
    a proplet still beating keeps its running task; one that stays silent loses it after a timeout."""
    same, topics = restarted_manager(tmp_path / "restart.db", liveness_timeout=1.0)
    async with SyntheticProplet(broker.url, topics, "beating", answer=None) as beating, \
            SyntheticProplet(broker.url, topics, "vanished", answer=None, last_will=False) as vanished:
        async with manager_factory(**same) as first:
            await beating.announce()
            await vanished.announce()
            await eventually(lambda: {"beating", "vanished"} <= set(first.proplets))
            kept = await first.create_task(add_task(proplet_id="beating"))
            lost = await first.create_task(add_task(proplet_id="vanished"))
            for task in (kept, lost):
                await first.start_task(task.id)
            await eventually(lambda: all(first.active[x.id].state is TaskState.RUNNING for x in (kept, lost)))
        await asyncio.sleep(1.5)  # the manager is down for longer than the liveness timeout
        async with manager_factory(**same) as second:
            assert second.proplets["beating"].online and second.proplets["vanished"].online
            for _ in range(10):  # 2 s of heartbeats from one of them, twice the timeout
                await beating.alive()
                await asyncio.sleep(0.2)
            assert (await second.get_task(kept.id)).state is TaskState.RUNNING
            failed = await finished(second, lost.id, timeout=3)
            assert failed.state is TaskState.FAILED and "vanished went offline" in failed.error
            assert "no heartbeat" in second.proplets["vanished"].offline_reason
            assert second.proplets["beating"].online



async def test_after_a_restart_tasks_still_go_only_to_a_proplet_that_can_take_their_module(
        manager_factory: Any, broker: Any, tmp_path: Any) -> None:
    """The manager knew the size and kind of the modules it received since it started only: after a
    restart, a queued component, or one started then, could go to an embedded proplet. It now reads
    them (size and header) for the tasks it reads back."""
    same, topics = restarted_manager(tmp_path / "needs.db")
    component = base64.b64encode(b"\0asm\x0d\x00\x01\x00" + bytes(16)).decode()
    board = {"capabilities": ["task_state", "result_ack"], "environment": "embedded", "max_module_bytes": 4096}
    async with SyntheticProplet(broker.url, topics, "needs-board", metadata=board) as on_board:
        async with manager_factory(**same) as first:
            await on_board.announce()
            await eventually(lambda: "needs-board" in first.proplets)
            queued = await first.create_task(add_task(file=component))
            await first.start_task(queued.id)
            later = await first.create_task(add_task(file=base64.b64encode(WASM + bytes(5000)).decode()))
            # A WASI program padded past the first 8 bytes' reach: its imports come right after them.
            command = await first.create_task(add_task(file=base64.b64encode(WASI_MODULE + bytes(300)).decode()))
            await eventually(lambda: "no live proplet runs components" in first.active[queued.id].reason)
        async with manager_factory(**same) as second:
            await on_board.announce()
            await eventually(lambda: second.proplets.get("needs-board") is not None
                             and second.proplets["needs-board"].online)
            await second.start_task(later.id)
            await second.start_task(command.id)
            await asyncio.sleep(0.3)
            assert on_board.starts == []
            assert "no live proplet runs components" in (await second.get_task(queued.id)).reason
            assert "larger than every live proplet" in (await second.get_task(later.id)).reason
            assert "imports WASI" in (await second.get_task(command.id)).reason
            async with SyntheticProplet(broker.url, topics, "needs-linux", metadata={"environment": "binary"}):
                for task in (queued, later, command):
                    assert (await finished(second, task.id)).proplet_id == "needs-linux"


async def test_a_proplet_that_said_it_went_offline_just_before_a_restart_is_offline_after_it(
        manager_factory: Any, broker: Any, tmp_path: Any) -> None:
    """Its last heartbeat was recent, but it announced its shutdown: the restarted manager took the
    heartbeat's age alone and showed it online for a liveness timeout (the console's local proplets,
    stopped as it quits, came back as ghosts), sending it tasks that waited for nobody."""
    same, topics = restarted_manager(tmp_path / "restart.db", liveness_timeout=30.0)
    async with SyntheticProplet(broker.url, topics, "staying", answer=None) as staying, \
            SyntheticProplet(broker.url, topics, "leaving", answer=None) as leaving:
        async with manager_factory(**same) as first:
            await staying.announce()
            await leaving.announce()
            await eventually(lambda: {"staying", "leaving"} <= {p.id for p in first.proplets.values() if p.online})
            for _ in range(3):  # heartbeats the manager holds back (it stores one in a while)
                await leaving.alive()
            await leaving.publish(t.ALIVE, {"status": "offline", "proplet_id": "leaving", "namespace": "default"})
            await eventually(lambda: not first.proplets["leaving"].online)
        async with manager_factory(**same) as second:
            assert second.proplets["staying"].online
            assert not second.proplets["leaving"].online
            assert "announced it is offline" in second.proplets["leaving"].offline_reason
            task = await second.create_task(add_task())
            await second.start_task(task.id)
            start = await staying.expect(t.START, lambda m: m["id"] == task.id)
            assert start["proplet_id"] == "staying"


async def test_starts_a_proplet_confirmed_as_waiting_are_reconciled_like_the_others(manager_factory: Any,
                                                                                   broker: Any) -> None:
    """A start the proplet confirmed as `queued` (waiting for a slot there) is still compared with
    its heartbeats: lost by the proplet, it is retried, whether it was still waiting or ran since."""
    caps = {"capabilities": ["task_state"], "max_concurrent_tasks": 1, "max_queued_tasks": 1}
    async with manager_factory(ack_timeout=0.5) as core, \
            SyntheticProplet(broker.url, core.topics, "rq-p", answer=None, metadata=caps) as p:
        await eventually(lambda: "rq-p" in core.proplets)
        ran, waited = [await core.create_task(add_task(max_retries=1)) for _ in range(2)]
        for task in (ran, waited):
            await core.start_task(task.id)
            start = await p.expect(t.START, lambda m, tid=task.id: m["id"] == tid)
            await p.publish(t.TASK_STATE, {"task_id": task.id, "proplet_id": "rq-p", "state": "queued",
                                           "attempt": start["attempt"]})
            await eventually(lambda tid=task.id: _has_event(core, tid, "waiting on rq-p"))
        await p.publish(t.TASK_STATE, {"task_id": ran.id, "proplet_id": "rq-p", "state": "running", "attempt": 1})
        await eventually(lambda: core.active[ran.id].state is TaskState.RUNNING)
        assert core.active[waited.id].state is TaskState.SCHEDULED
        # The proplet restarted and lost both: its heartbeats list no task (past the 3 s grace).
        async def beat_until_retried() -> bool:
            await p.alive()
            return all(any(m["id"] == x.id and m["attempt"] == 2 for m in p.messages(t.START)) for x in (ran, waited))
        await eventually(beat_until_retried, timeout=8, interval=0.3)
        for task in (ran, waited):
            assert (await core.get_task(task.id)).retries == 1


async def _has_event(core: Any, task_id: str, detail: str) -> bool:
    return any(detail in e.detail for e in await core.task_events(task_id))


async def test_a_late_answer_from_a_broadcasts_earlier_run_does_not_answer_the_new_one(manager: Any,
                                                                                     broker: Any) -> None:
    """An outbox sends a result again until it is acknowledged (acks travel at QoS 0): the repeat of
    run 1's answer must not count as this proplet's answer to run 2, nor finish it while queued."""
    async with SyntheticProplet(broker.url, manager.topics, "bc-late") as p:
        await eventually(lambda: "bc-late" in manager.proplets)
        task = await manager.create_task(add_task(broadcast=True))
        first = await run_to_end(manager, task.id)
        assert first.state is TaskState.COMPLETED and first.attempt == 1
        p.answer = None
        await manager.start_task(task.id)
        await p.expect(t.START, lambda m: m["attempt"] == 2)
        stale = {"task_id": task.id, "proplet_id": "bc-late", "results": "42", "error": None, "attempt": 1}
        await p.publish(t.RESULTS, stale)
        await eventually(lambda: manager.metrics.rejections[(t.RESULTS, "stale_attempt")] == 1)
        assert manager.active[task.id].state is TaskState.RUNNING
        await p.publish(t.RESULTS, {**stale, "results": "43", "attempt": 2})
        done = await finished(manager, task.id)
        assert done.state is TaskState.COMPLETED and done.results == {"bc-late": {"results": "43", "error": None}}


async def test_a_result_for_a_task_deleted_meanwhile_is_acknowledged(manager: Any, broker: Any) -> None:
    """Deleted while it ran: its result can never be stored, and unacknowledged it would stay in the
    proplet's outbox for ever (sent again every few seconds, listed in every heartbeat)."""
    async with SyntheticProplet(broker.url, manager.topics, "p-del", answer=None,
                                metadata={"capabilities": ["result_ack"]}) as p:
        await eventually(lambda: "p-del" in manager.proplets)
        task = await manager.create_task(add_task())
        await manager.start_task(task.id)
        start = await p.expect(t.START)
        await manager.delete_task(task.id)
        await p.publish(t.RESULTS, {"task_id": task.id, "proplet_id": "p-del", "results": "42", "error": None,
                                    "attempt": start["attempt"]})
        ack = await p.expect(t.RESULT_ACK, lambda m: m["task_id"] == task.id)
        assert (ack["proplet_id"], ack["attempt"]) == ("p-del", start["attempt"])
        assert manager.metrics.rejections[(t.RESULTS, "unknown_task")] == 1


async def test_a_dispatch_overtaken_by_its_proplet_going_offline_sends_no_start(manager: Any, broker: Any) -> None:
    """The start leaves once the dispatch is committed. A proplet declared offline before that put
    the task back in the queue: the start of that attempt must not leave then, or the proplet (if
    only slow, not gone) runs it while the manager dispatches it again."""
    async with SyntheticProplet(broker.url, manager.topics, "p-slow", answer=None) as p:
        await eventually(lambda: "p-slow" in manager.proplets)
        task = await manager.create_task(add_task(max_retries=1))
        with commits_held(manager):
            starting = asyncio.create_task(manager.start_task(task.id))
            await eventually(lambda: task.id in manager.active
                             and manager.active[task.id].state is TaskState.RUNNING)  # in memory only
            await p.publish(t.ALIVE, {"proplet_id": "p-slow", "status": "offline", "namespace": "default"})
            await eventually(lambda: manager.active[task.id].state is TaskState.PENDING)
        await starting
        await manager.writer.barrier()
        await asyncio.sleep(0.3)
        assert not p.starts, "the start of the requeued attempt went out"
        p.answer = add_inputs
        await p.alive()  # back: the retry is dispatched to it
        done = await finished(manager, task.id)
        assert (done.state, done.attempt, done.retries) == (TaskState.COMPLETED, 2, 1)
        assert [s["attempt"] for s in p.starts] == [2]


async def test_a_dispatch_the_database_refused_goes_back_to_the_queue(manager: Any, broker: Any) -> None:
    """The start leaves only once the dispatch is stored. When the database refuses that write
    (disk full, a lost connection), the task must not keep its slot without a start sent."""
    async with SyntheticProplet(broker.url, manager.topics, "p-db") as p:
        await eventually(lambda: "p-db" in manager.proplets)
        task = await manager.create_task(add_task())
        async with manager.store.transaction() as conn:  # the database refuses to mark it running
            await conn.execute(
                "CREATE TRIGGER refuse_dispatch BEFORE UPDATE ON tasks WHEN NEW.state = 2 "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        failures = manager.writer.stats.failures
        await manager.start_task(task.id)
        await eventually(lambda: manager.writer.stats.failures > failures)
        async with manager.store.transaction() as conn:  # space again
            await conn.execute("DROP TRIGGER refuse_dispatch")
        done = await finished(manager, task.id)
        assert (done.state, done.results, done.retries) == (TaskState.COMPLETED, "42", 0)
        assert [s["attempt"] for s in p.starts] == [2]
        assert manager.get_proplet("p-db").task_count == 0


async def test_a_result_the_database_refused_is_stored_when_it_comes_again(manager: Any, broker: Any) -> None:
    """A result is acknowledged once stored. When the database refuses it, the proplet sends it
    again; that repeat must be stored, not acknowledged as a duplicate of what memory holds."""
    async with SyntheticProplet(broker.url, manager.topics, "p-unst", answer=None,
                                metadata={"capabilities": ["result_ack"]}) as p:
        await eventually(lambda: "p-unst" in manager.proplets)
        task = await manager.create_task(add_task())
        await manager.start_task(task.id)
        start = await p.expect(t.START)
        async with manager.store.transaction() as conn:  # the database refuses to mark it completed
            await conn.execute(
                "CREATE TRIGGER refuse_result BEFORE UPDATE ON tasks WHEN NEW.state = 3 "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        failures = manager.writer.stats.failures
        result = {"task_id": task.id, "proplet_id": "p-unst", "results": "42", "error": None,
                  "attempt": start["attempt"]}
        await p.publish(t.RESULTS, result)
        await eventually(lambda: manager.writer.stats.failures > failures)
        await p.publish(t.RESULTS, result)  # the outbox repeats it; the database still refuses
        await eventually(lambda: manager.writer.stats.failures > failures + 1)
        await asyncio.sleep(0.1)
        assert not p.messages(t.RESULT_ACK), "acknowledged a result that was not stored"
        async with manager.store.transaction() as conn:
            await conn.execute("DROP TRIGGER refuse_result")
        await p.publish(t.RESULTS, result)
        ack = await p.expect(t.RESULT_ACK, lambda m: m["task_id"] == task.id)
        assert ack["attempt"] == start["attempt"]
        stored = await manager.reader.get(task.id)
        assert stored is not None and (stored.state, stored.results) == (TaskState.COMPLETED, "42")


async def test_a_running_report_for_a_task_back_in_the_queue_changes_nothing(manager: Any, broker: Any) -> None:
    """A daemon's `running` report (with where it serves) sent before its proplet was declared
    offline arrives after the task went back to the queue: it must not mark the queued task
    running (outside every slot, where neither a retry nor reconciliation would ever find it)."""
    async with SyntheticProplet(broker.url, manager.topics, "p-dmn", answer=None,
                                metadata={"capabilities": ["task_state"]}) as p:
        await eventually(lambda: "p-dmn" in manager.proplets)
        task = await manager.create_task(add_task(proplet_id="p-dmn", daemon=True, max_retries=1))
        await manager.start_task(task.id)
        start = await p.expect(t.START)
        await p.publish(t.ALIVE, {"proplet_id": "p-dmn", "status": "offline", "namespace": "default"})
        await eventually(lambda: manager.active[task.id].state is TaskState.PENDING)
        await p.publish(t.TASK_STATE, {"task_id": task.id, "proplet_id": "p-dmn", "state": "running",
                                       "reason": "serving on port 8080", "attempt": start["attempt"]})
        await p.publish(t.ALIVE, {"proplet_id": "marker", "status": "alive"})  # handled after the report
        await eventually(lambda: "marker" in manager.proplets)
        queued = manager.active[task.id]
        assert (queued.state, queued.results) == (TaskState.PENDING, None)
        await p.alive()  # back: the retry goes out, and it is tracked on the proplet's slot
        retry = await p.expect(t.START, lambda m: m["attempt"] == 2)
        assert retry["id"] == task.id and manager.get_proplet("p-dmn").task_count == 1


async def test_a_start_refused_by_a_full_proplet_waits_in_the_queue_and_goes_out_again(manager: Any,
                                                                                      broker: Any) -> None:
    """`rejected` is what a full proplet answers (the firmware with every slot busy, ours with a full
    outbox): a passing condition. The only live proplet refusing, or the pinned one, must leave the
    task waiting with the reason, to be sent again after a short back-off, not failed."""
    async with SyntheticProplet(broker.url, manager.topics, "full-p", answer=None,
                                metadata={"capabilities": ["task_state"], "max_concurrent_tasks": 4}) as p:
        await eventually(lambda: "full-p" in manager.proplets)
        free = await manager.create_task(add_task())
        pinned = await manager.create_task(add_task(proplet_id="full-p"))
        for task in (free, pinned):
            await manager.start_task(task.id)
            start = await p.expect(t.START, lambda m, tid=task.id: m["id"] == tid)
            await p.publish(t.TASK_STATE, {"task_id": task.id, "proplet_id": "full-p", "state": "rejected",
                                           "reason": "all 4 task slots of this proplet are busy",
                                           "attempt": start["attempt"]})
            await eventually(lambda tid=task.id: _has_event(manager, tid, "refused it"))
            queued = manager.active.get(task.id)
            assert queued is not None and queued.state is TaskState.PENDING, "a refusal for being full failed it"
            assert "busy" in queued.reason
        for task in (free, pinned):
            again = await p.expect(t.START, lambda m, tid=task.id: m["id"] == tid and m["attempt"] == 2)
            await p.publish(t.RESULTS, {"task_id": task.id, "proplet_id": "full-p", "results": "42", "error": None,
                                        "attempt": again["attempt"]})
            done = await finished(manager, task.id)
            assert (done.state, done.proplet_id) == (TaskState.COMPLETED, "full-p")


async def test_a_refused_start_goes_out_again_as_soon_as_that_proplet_frees_a_slot(
        manager: Any, broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.service

    monkeypatch.setattr(core.service, "REFUSAL_BACKOFF", 60.0)  # only a freed slot can explain a resend
    async with SyntheticProplet(broker.url, manager.topics, "slot-p", answer=None,
                                metadata={"capabilities": ["task_state"]}) as p:
        await eventually(lambda: "slot-p" in manager.proplets)
        running, refused = [await manager.create_task(add_task()) for _ in range(2)]
        await manager.start_task(running.id)
        await p.expect(t.START, lambda m: m["id"] == running.id)
        await manager.start_task(refused.id)
        start = await p.expect(t.START, lambda m: m["id"] == refused.id)
        await p.publish(t.TASK_STATE, {"task_id": refused.id, "proplet_id": "slot-p", "state": "rejected",
                                       "reason": "all 1 task slots of this proplet are busy", "attempt": 1})
        await eventually(lambda: manager.active[refused.id].state is TaskState.PENDING)
        await asyncio.sleep(0.3)
        assert [m["attempt"] for m in p.messages(t.START) if m["id"] == refused.id] == [1]
        await p.publish(t.RESULTS, {"task_id": running.id, "proplet_id": "slot-p", "results": "1", "error": None,
                                    "attempt": start["attempt"]})
        await p.expect(t.START, lambda m: m["id"] == refused.id and m["attempt"] == 2, timeout=2)


# Every task update refused (a full disk), or only the start's `queued` event: then its dispatch,
# which shares the commit, is stored when the writer retries the entries of the batch one by one.
@pytest.mark.parametrize("refused", [
    "BEFORE UPDATE ON tasks",
    "BEFORE INSERT ON task_events WHEN NEW.detail = 'queued'",
], ids=["every-write", "queued-only"])
async def test_a_start_whose_queued_state_the_database_refused_does_not_run(manager: Any, broker: Any,
                                                                            refused: str) -> None:
    """start_task answers with the store's error when it cannot store the task as queued: the task
    must then not run anyway (nor hold a place in the queue), and keep the state it had."""
    from core.store.base import StoreError

    async with SyntheticProplet(broker.url, manager.topics, "p-nostart") as p:
        await eventually(lambda: "p-nostart" in manager.proplets)
        task = await manager.create_task(add_task())
        async with manager.store.transaction() as conn:
            await conn.execute(f"CREATE TRIGGER refuse_start {refused} "
                               "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        with pytest.raises(StoreError):
            await manager.start_task(task.id)
        await manager.writer.barrier()
        async with manager.store.transaction() as conn:  # space again
            await conn.execute("DROP TRIGGER refuse_start")
        await asyncio.sleep(1.5)  # past the pause after which a refused dispatch goes back to the queue
        assert not p.starts, "a start the caller was told failed went out"
        assert task.id not in manager.active and not manager._queued
        assert (await manager.get_task(task.id)).state is TaskState.PENDING
        stored = await manager.reader.get(task.id)
        assert stored is not None and (stored.state, stored.attempt) == (TaskState.PENDING, 0)
        done = await run_to_end(manager, task.id)  # and it can be started again
        assert (done.state, done.attempt, [s["attempt"] for s in p.starts]) == (TaskState.COMPLETED, 1, [1])


async def test_a_broadcast_recovered_with_no_proplet_online_waits_for_every_answer(
        manager_factory: Any, broker: Any, tmp_path: Any) -> None:
    """Down for longer than the liveness timeout, the manager finds no proplet counted online for a
    running broadcast: the first answer after the restart must not finish it."""
    same, topics = restarted_manager(tmp_path / "bc-restart.db", liveness_timeout=1.0)
    async with SyntheticProplet(broker.url, topics, "bcr-a", answer=None) as a, \
            SyntheticProplet(broker.url, topics, "bcr-b", answer=None) as b:
        async with manager_factory(**same) as first:
            for p in (a, b):
                await p.announce()
            await eventually(lambda: {"bcr-a", "bcr-b"} <= set(first.proplets))
            task = await first.create_task(add_task(broadcast=True))
            await first.start_task(task.id)
            await eventually(lambda: len(a.starts) == 1 and len(b.starts) == 1)
        await asyncio.sleep(1.5)  # down for longer than the liveness timeout
        async with manager_factory(**same) as second:
            assert not any(p.online for p in second.proplets.values())
            beats = asyncio.create_task(_beat(a, b, until=3.0))
            await a.publish(t.RESULTS, {"task_id": task.id, "proplet_id": "bcr-a", "results": "1",
                                        "error": None, "attempt": 1})
            await asyncio.sleep(2.0)  # heard for twice the liveness timeout: bcr-b's answer is awaited
            assert second.active[task.id].state is TaskState.RUNNING, "finished by bcr-a's answer alone"
            await b.publish(t.RESULTS, {"task_id": task.id, "proplet_id": "bcr-b", "results": "2",
                                        "error": None, "attempt": 1})
            done = await finished(second, task.id)
            assert done.state is TaskState.COMPLETED and set(done.results) == {"bcr-a", "bcr-b"}
            await beats


@pytest.mark.parametrize("max_retries", [0, 1])
async def test_a_broadcast_recovered_with_no_proplet_left_is_retried_or_fails(
        manager_factory: Any, broker: Any, tmp_path: Any, max_retries: int) -> None:
    """Its proplets gone while the manager was down, a recovered broadcast must not stay running for
    ever: like a task whose proplet stays silent after the restart, it is retried or failed."""
    same, topics = restarted_manager(tmp_path / "bc-gone.db", liveness_timeout=1.0)
    async with SyntheticProplet(broker.url, topics, "bcg-a", answer=None) as a:
        async with manager_factory(**same) as first:
            await a.announce()
            await eventually(lambda: "bcg-a" in first.proplets)
            task = await first.create_task(add_task(broadcast=True, max_retries=max_retries))
            await first.start_task(task.id)
            await eventually(lambda: len(a.starts) == 1)
    await asyncio.sleep(1.5)
    async with manager_factory(**same) as second:
        if max_retries == 0:
            ended = await finished(second, task.id, timeout=5)
            assert ended.state is TaskState.FAILED and "restart" in ended.error
            return
        queued = await eventually(lambda: second.active[task.id].state is TaskState.PENDING
                                  and second.active[task.id], timeout=5)
        assert queued.retries == 1
        async with SyntheticProplet(broker.url, topics, "bcg-new") as new:
            done = await finished(second, task.id)
        assert done.state is TaskState.COMPLETED and new.starts[0]["attempt"] == 2


async def _beat(*proplets: SyntheticProplet, until: float) -> None:
    for _ in range(int(until / 0.2)):
        for p in proplets:
            await p.alive()
        await asyncio.sleep(0.2)


async def test_starting_and_stopping_while_the_fleet_is_full_does_not_grow_the_queue(manager: Any) -> None:
    """With no proplet to take anything, a stopped task's place in the dispatch heap is only skipped
    when the dispatcher reaches it; started and stopped 10,000 times, those places must not pile up."""
    blocker = await manager.create_task(add_task())
    await manager.start_task(blocker.id)  # first in line, and nothing takes it
    tasks = [await manager.create_task(add_task()) for _ in range(100)]
    for _ in range(100):
        await asyncio.gather(*(manager.start_task(x.id) for x in tasks))
        await asyncio.gather(*(manager.stop_task(x.id) for x in tasks))
    assert manager._queued == {blocker.id}
    assert len(manager._heap) <= 1_100, f"{len(manager._heap)} heap entries for 1 queued task"
    async with SyntheticProplet(manager.broker_address.url, manager.topics, "p-heap"):
        assert (await finished(manager, blocker.id)).state is TaskState.COMPLETED


async def test_a_read_that_races_a_change_of_the_task_does_not_leave_the_older_state_behind(
        manager_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A task out of memory is read from the database; a failed turn (or a stop) loads and changes it
    # meanwhile. The read's older row was remembered over the change, and every later read said pending.
    async with manager_factory() as core:
        task = await core.create_task(TaskCreate(name="add", file=base64.b64encode(WASM).decode()))
        core._recent.pop(task.id)  # out of memory, as an older task is
        read_started, release = asyncio.Event(), asyncio.Event()
        read_row = core.reader.get

        async def slow_read(task_id: str) -> Any:
            row = await read_row(task_id)
            read_started.set()
            await release.wait()
            return row

        monkeypatch.setattr(core.reader, "get", slow_read)
        racing = asyncio.create_task(core.get_task(task.id))
        await read_started.wait()
        monkeypatch.setattr(core.reader, "get", read_row)
        await core.fail_unstarted(task.id, "its dependency failed")
        release.set()
        await racing
        assert (await core.get_task(task.id)).state is TaskState.FAILED


class CriticalWorkSeen:
    """A host listening to the core's time-critical work (as the console's StandAside does): what had
    left the manager each time it was told the work began or was through."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.traffic = core.bus.tap.subscribe()
        self.out: list[str] = []  # topics published by the manager, in order
        self.told: list[tuple[str, list[str]]] = []

    def _look(self, what: str) -> None:
        self.out += [record.topic for record in self.traffic.drain() if record.direction == "out"]
        self.told.append((what, list(self.out)))

    def began(self) -> None:
        self._look("began")

    def through(self) -> None:
        self._look("through")


async def test_a_start_and_its_result_are_time_critical_until_they_have_left_the_manager(
        manager: Any, broker: Any) -> None:
    seen = CriticalWorkSeen(manager)
    manager.critical_work.listener = seen
    start, ack = manager.topics.start, manager.topics.result_ack
    async with SyntheticProplet(broker.url, manager.topics, "p-critical",
                                metadata={"capabilities": ["task_state", "result_ack"]}):
        await eventually(lambda: manager.proplets.get("p-critical") and manager.proplets["p-critical"].online)
        task = await manager.create_task(add_task())
        assert seen.told == [], "creating a task is not time-critical"
        done = await run_to_end(manager, task.id)
        assert done.state is TaskState.COMPLETED
        await eventually(lambda: not manager.critical_work.busy)
    told = [what for what, _ in seen.told]
    assert told[0] == "began" and told[-1] == "through"
    assert told == ["began", "through"] * (len(told) // 2), f"began and through do not alternate: {told}"
    # The start had left when the work was first through; the result's acknowledgement when it was
    # last through (the result arrives in a busy period of its own, or in the start's if it is quick).
    first_through = next(out for what, out in seen.told if what == "through")
    assert start in first_through and seen.told[0][1].count(start) == 0
    assert ack in seen.told[-1][1]


async def test_without_a_listener_the_core_keeps_no_critical_work_in_hand(manager: Any, broker: Any) -> None:
    async with SyntheticProplet(broker.url, manager.topics, "p-headless"):
        await eventually(lambda: manager.proplets.get("p-headless") and manager.proplets["p-headless"].online)
        done = await run_to_end(manager, (await manager.create_task(add_task())).id)
        assert done.state is TaskState.COMPLETED
        assert not manager.critical_work.busy
