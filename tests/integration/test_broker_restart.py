"""Kill the broker under a running manager, start it again: the manager hears everything again."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from core.domain import TaskState
from core.schemas import TaskCreate
from tests.wire import SyntheticProplet, eventually

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
