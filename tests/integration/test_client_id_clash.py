"""Two MQTT clients with one client id on a real Mosquitto: each connection takes the session from the
other, and the bus says so instead of reconnecting in a silent loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from typing import Any

import pytest

from core.mqtt import MqttBus, MqttConnection, parse_broker_url
from tests.wire import eventually


async def _nothing(topic: str, payload: bytes) -> None:
    pass


async def test_two_clients_with_one_id_are_named_as_the_likely_cause(
    broker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Two managers (or proplets) given the same entity id: the broker closes the older connection on
    # each connect, and both reconnected about twenty times a second with only "lost the broker".
    client_id = f"clash-{uuid.uuid4().hex[:8]}"
    conn = MqttConnection(parse_broker_url(broker.url), client_id, username=client_id, qos=1, timeout=5.0)
    buses = [MqttBus(conn, subscriptions=["clash/#"], on_message=_nothing, name=f"bus {n}") for n in (1, 2)]
    caplog.set_level(logging.WARNING, logger="core.mqtt")
    tasks = [asyncio.create_task(bus.run()) for bus in buses]
    try:
        warning = await eventually(
            lambda: next((r.getMessage() for r in caplog.records if "same client id" in r.getMessage()), None),
            timeout=20)
        # Each take-over after the warning says so too: the warning alone scrolled away under a log
        # of bare "lost the broker" lines.
        again = await eventually(
            lambda: next((r.getMessage() for r in caplog.records if "again" in r.getMessage()), None), timeout=20)
    finally:
        for bus in buses:
            await bus.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A connection the broker closed while its bus was closing left aiomqtt's "disconnected"
        # future with an error nobody took, which asyncio logs when the future is collected, in
        # whatever test runs then: collected here, it is this test's (tests.conftest).
        del buses, tasks
        gc.collect()
    assert f"Usually another client is connected with the same client id ({client_id})" in warning, warning
    assert "MANAGER_ENTITY_ID" in warning and "PROPLET_ENTITY_ID" in warning
    assert "closed this connection within 5 s of accepting it 3 times in a row" in warning
    assert f"another client probably uses the client id {client_id}" in again, again
