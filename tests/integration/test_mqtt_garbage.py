"""Receiving MQTT messages leaves no reference cycles behind (the cyclic collector's full passes
stop every thread of the process: the console's and its hosted core's)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from core.mqtt import MqttConnection, make_client, parse_broker_url

MESSAGES = 500


async def test_receiving_messages_creates_no_cyclic_garbage(broker: Any) -> None:
    address = parse_broker_url(broker.url)
    topic = "garbage-test/c/default/control/proplet/alive"
    async with make_client(MqttConnection(address, "garbage-reader")) as reader, \
            make_client(MqttConnection(address, "garbage-writer")) as writer:
        await reader.subscribe("garbage-test/#", qos=1)
        received = 0

        async def read() -> None:
            nonlocal received
            async for _ in reader.messages:
                received += 1
                if received == MESSAGES:
                    return

        gc.collect()
        gc.disable()
        try:
            reading = asyncio.create_task(read())
            for i in range(MESSAGES):
                await writer.publish(topic, b'{"proplet_id":"p%d"}' % i, qos=1)
            await asyncio.wait_for(reading, 10)
            cyclic = gc.collect()
        finally:
            gc.enable()
    # paho's own topic matcher made ~6 cyclic objects per message received (3,000 here).
    print(f"{cyclic} cyclic objects after {MESSAGES} messages")
    assert received == MESSAGES
    assert cyclic < MESSAGES, f"{cyclic} objects in reference cycles after receiving {MESSAGES} messages"
