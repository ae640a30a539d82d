"""Proplet fixtures: real agents on the session broker, and helpers to run tasks through a manager."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from core.schemas import TaskCreate
from proplet.agent import PropletAgent
from proplet.config import PropletSettings
from tests.wire import eventually

PropletFactory = Callable[..., AbstractAsyncContextManager[PropletAgent]]


@pytest.fixture
def proplet_factory(broker: Any, tmp_path: Path) -> PropletFactory:
    @asynccontextmanager
    async def factory(core: Any, proplet_id: str, **overrides: Any) -> AsyncIterator[PropletAgent]:
        values: dict[str, Any] = {
            "mqtt_address": broker.url, "tenant_id": core.topics.domain, "channel_id": core.topics.channel,
            "entity_id": proplet_id, "cache_dir": tmp_path / proplet_id / "cache",
            "state_dir": tmp_path / proplet_id / "state", "liveliness_interval": 1.0, "metrics_interval": 0.5,
        }
        values.update(overrides)
        async with PropletAgent(PropletSettings.load(**values)) as agent:
            await eventually(lambda: proplet_id in core.proplets and core.proplets[proplet_id].online, 10)
            yield agent

    return factory


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def run_task(core: Any, timeout: float = 15.0, **body: Any) -> Any:
    task = await core.create_task(TaskCreate.model_validate(body))
    await core.start_task(task.id)
    return await run_to_end(core, task.id, timeout)


async def run_to_end(core: Any, task_id: str, timeout: float = 15.0) -> Any:
    async def finished() -> Any:
        current = await core.get_task(task_id)
        return current if current.state.is_terminal else None

    return await eventually(finished, timeout)
