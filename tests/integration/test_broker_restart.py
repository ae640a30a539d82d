"""Kill the broker under a running manager, start it again: the manager hears everything again."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from core.domain import TaskState
from core.schemas import TaskCreate
from tests.wire import SyntheticProplet, eventually, start_synthetic_process

pytestmark = pytest.mark.serial

WASM = base64.b64encode(b"\0asm\x01\0\0\0").decode()


async def test_manager_resubscribes_after_a_broker_crash(manager_factory: Any, own_broker: Any) -> None:
    async with manager_factory(mqtt_address=own_broker.url) as core:
        async with SyntheticProplet(own_broker.url, core.topics, "before"):
            await eventually(lambda: "before" in core.proplets)
        connects = core.bus.counters.connects

        own_broker.kill()
        await eventually(lambda: not core.bus.connected.is_set(), timeout=5)
        # Work submitted while the broker is down waits and goes out after the reconnect.
        task = await core.create_task(TaskCreate(name="add", file=WASM, inputs=["20", "22"]))
        await core.start_task(task.id)

        own_broker.start()
        back = asyncio.get_running_loop().time()
        await eventually(lambda: core.bus.counters.connects > connects, timeout=10)
        reconnected_in = asyncio.get_running_loop().time() - back
        print(f"manager reconnected and re-subscribed {reconnected_in * 1000:.0f} ms after the broker came back")

        # Mosquitto ran without persistence, so the old session and its subscriptions are gone:
        # heartbeats and results arrive only because the manager subscribed again.
        async with SyntheticProplet(own_broker.url, core.topics, "after"):
            await eventually(lambda: "after" in core.proplets and core.proplets["after"].online, timeout=5)

            async def completed() -> Any:
                t = await core.get_task(task.id)
                return t if t.state is TaskState.COMPLETED else None

            done = await eventually(completed, timeout=10)
        assert done.results == "42" and done.proplet_id == "after"
        assert core.bus.counters.disconnects >= 1


async def test_a_proplet_back_after_a_broker_outage_on_a_longer_backoff_keeps_its_running_task(
        manager_factory: Any, own_broker: Any) -> None:
    # After a broker restart, proplets come back on their own reconnect backoff, which grows with the
    # outage (the firmware's up to 30 s). Silence was counted from the manager's own reconnect, so a
    # proplet slower to return than its liveness timeout found its running task failed as "offline".
    from core import topics as t

    async with manager_factory(mqtt_address=own_broker.url, liveness_timeout=1.5) as core:
        # A process of its own, killed with the broker: it says no goodbye and leaves no Last Will.
        proplet = await start_synthetic_process(own_broker.url, core.topics.domain, "slow-back", heartbeat=0.3)
        try:
            await eventually(lambda: "slow-back" in core.proplets and core.proplets["slow-back"].online)
            task = await core.create_task(TaskCreate(name="add", file=WASM, inputs=["1", "2"],
                                                     proplet_id="slow-back"))
            await core.start_task(task.id)
            await eventually(lambda: task.id in core.active and core.active[task.id].state is TaskState.RUNNING)
            own_broker.kill()
        finally:
            proplet.kill()
            proplet.wait()
        await asyncio.sleep(4)  # the outage
        own_broker.start()
        await eventually(core.bus.connected.is_set, timeout=10)
        await asyncio.sleep(2.5)  # the proplet's backoff: longer than its liveness timeout (1.5 s)
        now = await core.get_task(task.id)
        assert now.state is TaskState.RUNNING, now.error
        assert core.proplets["slow-back"].online

        async with SyntheticProplet(own_broker.url, core.topics, "slow-back", answer=None, heartbeat=0.3) as back:
            await back.publish(t.RESULTS, {"task_id": task.id, "proplet_id": "slow-back", "results": "3",
                                           "error": None})

            async def finished() -> Any:
                current = await core.get_task(task.id)
                return current if current.state.is_terminal else None

            done = await eventually(finished, timeout=5)
        assert (done.state, done.results) == (TaskState.COMPLETED, "3"), done.error
