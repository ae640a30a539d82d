"""Receiving MQTT messages: no reference cycles left behind (the cyclic collector's full passes stop
every thread of the process, the console's and its hosted core's), and a backlog is taken in order
without a task per message and without starving the loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

import aiomqtt
import pytest

from core.mqtt import DRAIN_BATCH, MqttConnection, make_client, parse_broker_url, received

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


async def test_a_backlog_of_messages_is_drained_in_order_without_starving_the_loop(broker: Any) -> None:
    address = parse_broker_url(broker.url)
    async with make_client(MqttConnection(address, "backlog-reader")) as reader, \
            make_client(MqttConnection(address, "backlog-writer")) as writer:
        await reader.subscribe("backlog-test/#", qos=1)
        for i in range(MESSAGES):
            await writer.publish("backlog-test/n", str(i).encode(), qos=1)
        while len(reader.messages) < MESSAGES:  # noqa: ASYNC110 - waiting for the backlog to build up
            await asyncio.sleep(0.01)

        turns = 0

        async def other_work() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(other_work())
        await asyncio.sleep(0)
        turns_before = turns
        seen = []
        async for message in received(reader):
            seen.append(int(message.payload))
            if len(seen) == MESSAGES:
                break
        other.cancel()
    assert seen == list(range(MESSAGES))
    # Every DRAIN_BATCH messages the loop gets a turn, although none of them had to wait.
    assert turns - turns_before >= MESSAGES // DRAIN_BATCH - 1


async def test_a_lost_connection_ends_the_iteration_after_what_had_arrived(own_broker: Any) -> None:
    address = parse_broker_url(own_broker.url)
    reader_cm = make_client(MqttConnection(address, "lost-reader"))
    reader = await reader_cm.__aenter__()
    seen: list[bytes] = []
    try:
        await reader.subscribe("lost-test/#", qos=1)
        async with make_client(MqttConnection(address, "lost-writer")) as writer:
            for i in range(3):
                await writer.publish("lost-test/n", str(i).encode(), qos=1)
        while len(reader.messages) < 3:  # noqa: ASYNC110 - waiting for the messages to arrive
            await asyncio.sleep(0.01)
        messages = received(reader)
        seen.append((await anext(messages)).payload)  # waiting on the queue from here on
        own_broker.kill()
        with pytest.raises(aiomqtt.MqttError, match="Disconnected during message iteration"):
            async with asyncio.timeout(10):
                async for message in messages:
                    seen.append(message.payload)
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await reader_cm.__aexit__(None, None, None)
    assert seen == [b"0", b"1", b"2"]
