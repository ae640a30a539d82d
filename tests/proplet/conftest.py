"""Proplet fixtures: real agents on the session broker (helpers to run tasks: tests/proplet/helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

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
            # Tests run many proplets at once; those of /metrics choose their own port.
            "metrics_enabled": False,
        }
        values.update(overrides)
        async with PropletAgent(PropletSettings.load(**values)) as agent:
            await eventually(lambda: proplet_id in core.proplets and core.proplets[proplet_id].online, 10)
            yield agent

    return factory
