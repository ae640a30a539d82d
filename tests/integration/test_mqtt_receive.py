"""Receiving MQTT messages: no reference cycles left behind (the cyclic collector's full passes stop
every thread of the process, the console's and its hosted core's), and a backlog is taken in order
without a task per message and without starving the loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from typing import Any

import aiomqtt
import pytest

from core.mqtt import DRAIN_BATCH, BufferedReceive, MqttConnection, make_client, parse_broker_url, received

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


async def test_a_publish_from_the_loop_is_written_before_the_loop_turns(broker: Any) -> None:
    """paho hands a queued packet to the event loop to write; aiomqtt's answer took three turns of
    the loop and two epoll calls per message. It is written at once now, as paho does itself."""
    address = parse_broker_url(broker.url)
    async with make_client(MqttConnection(address, "at-once-reader")) as reader, \
            make_client(MqttConnection(address, "at-once-writer")) as writer:
        await reader.subscribe("at-once/#", qos=1)
        paho = writer._client
        info = paho.publish("at-once/n", b"now", qos=1)
        # Nothing left to write and no writability watch: the bytes are in the kernel already.
        assert not paho.want_write()
        assert not paho._registered_write
        assert info.is_published() is False  # the broker's PUBACK comes later, on a later turn
        messages = received(reader)
        got = await asyncio.wait_for(anext(messages), 5)
        assert got.payload == b"now"


async def test_a_message_larger_than_the_socket_buffer_is_written_through_the_loop(own_broker: Any) -> None:
    """A send that the socket does not take whole falls back to waiting for writability."""
    address = parse_broker_url(own_broker.url)
    big = bytes(range(256)) * (64 * 1024)  # 16 MiB
    async with make_client(MqttConnection(address, "big-reader")) as reader, \
            make_client(MqttConnection(address, "big-writer")) as writer:
        await reader.subscribe("big/#", qos=1)
        paho = writer._client
        # A small send buffer, and a broker that does not read meanwhile, so that the first send
        # cannot take the whole message: a broker reading on the other core, with a receive buffer
        # that grows to tcp_rmem's maximum (32 MiB on some machines), took it all in one send().
        paho.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        own_broker.process.send_signal(signal.SIGSTOP)
        try:
            paho.publish("big/n", big, qos=1)
        finally:
            own_broker.process.send_signal(signal.SIGCONT)
        assert paho.want_write(), "the socket took 16 MiB at once; the fallback is not exercised"
        await asyncio.wait_for(writer.publish("big/after", b"after", qos=1), 20)
        messages = received(reader)
        first = await asyncio.wait_for(anext(messages), 20)
        second = await asyncio.wait_for(anext(messages), 20)
        assert (first.topic.value, first.payload) == ("big/n", big)
        assert (second.topic.value, second.payload) == ("big/after", b"after")


async def test_packets_that_arrive_together_are_read_together_and_none_is_left_in_the_buffer(broker: Any) -> None:
    address = parse_broker_url(broker.url)
    async with make_client(MqttConnection(address, "together-reader")) as reader, \
            make_client(MqttConnection(address, "together-writer")) as writer:
        await reader.subscribe("together-test/#", qos=1)
        big = bytes(range(256)) * 800  # 200 KiB: read straight from the socket, between small ones
        payloads = [b"%d" % i for i in range(300)] + [big] + [b"%d" % i for i in range(300, 350)]
        # Published back to back without giving the loop a turn, so they wait in the reader's socket
        # together; then nothing more arrives to make the socket readable again.
        for payload in payloads:
            writer._client.publish("together-test/n", payload, qos=1)
        got = []
        async with asyncio.timeout(10):
            async for message in received(reader):
                got.append(message.payload)
                if len(got) == len(payloads):
                    break
        reads = reader._client.loop_read.__self__.socket_reads
    assert got == payloads
    # paho alone makes three or more recv() calls per packet (over a thousand here).
    print(f"{reads} recv() calls for {len(payloads)} packets")
    assert reads < len(payloads) / 2


FLOOD = """
import sys, time
import paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=sys.argv[2])
client.connect("127.0.0.1", int(sys.argv[1]))
client.loop_start()
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    client.publish("flood-test/n", b"x" * 100, qos=0)
client.loop_stop()
"""


async def test_a_steady_flood_still_gives_the_loop_its_turns(broker: Any) -> None:
    """Reading what is buffered must not turn into reading the socket for as long as data keeps
    coming: timers, keep-alive pings and the application's own work need their turns."""
    import sys

    address = parse_broker_url(broker.url)
    async with make_client(MqttConnection(address, "flood-reader")) as reader:
        await reader.subscribe("flood-test/#", qos=0)
        floods = [await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOD, str(broker.port), f"flood-{i}",
                                                       "3") for i in range(3)]
        gaps = []
        taken = 0

        async def consume() -> None:
            nonlocal taken
            async for _ in received(reader):
                taken += 1

        consuming = asyncio.create_task(consume())
        loop = asyncio.get_running_loop()
        last = loop.time()
        try:
            while any(f.returncode is None for f in floods):
                await asyncio.sleep(0.005)
                now = loop.time()
                gaps.append(now - last)
                last = now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*(f.wait() for f in floods)), 0.001)
        finally:
            consuming.cancel()
            for f in floods:
                if f.returncode is None:
                    f.kill()
                    await f.wait()
    print(f"{len(gaps)} timer turns, longest gap {max(gaps) * 1000:.0f} ms, {taken} messages taken")
    assert max(gaps) < 0.5, f"the loop went {max(gaps):.2f} s without a turn under the flood"
    assert taken > 1000


async def test_acknowledgements_leave_together_and_each_is_received(
        broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PUBACKs of messages that arrived together go out in few send() calls, and the broker has
    every one: a persistent session reconnecting afterwards gets nothing delivered again."""
    address = parse_broker_url(broker.url)
    session = MqttConnection(address, "acks-reader", clean_session=False)
    async with make_client(session) as reader, make_client(MqttConnection(address, "acks-writer")) as writer:
        await reader.subscribe("acks-test/#", qos=1)
        sends = 0
        paho_send = reader._client._sock_send

        def counting_send(data: bytes) -> int:
            nonlocal sends
            sends += 1
            return paho_send(data)

        reader._client._sock_send = counting_send
        # Turns that read packets: on the socket's readiness (paho's loop_read, which aiomqtt calls),
        # or on a turn of their own for what an earlier read left buffered (BufferedReceive._next_turn).
        turns = 0
        buffered = reader._client.loop_read.__self__
        on_readiness = reader._client.loop_read
        on_own_turn = BufferedReceive.loop_read

        def counting_readiness(max_packets: int = 1) -> Any:
            nonlocal turns
            turns += 1
            return on_readiness(max_packets)

        def counting_own_turn(self: BufferedReceive, max_packets: int = 1) -> Any:
            nonlocal turns
            turns += self is buffered
            return on_own_turn(self, max_packets)

        reader._client.loop_read = counting_readiness
        monkeypatch.setattr(BufferedReceive, "loop_read", counting_own_turn)
        for i in range(MESSAGES):
            writer._client.publish("acks-test/n", b"%d" % i, qos=1)
        got = 0
        async with asyncio.timeout(10):
            async for _ in received(reader):
                got += 1
                if got == MESSAGES:
                    break
        await asyncio.sleep(0.2)  # the last acknowledgements leave at the end of their turn
    print(f"{sends} send() calls for {MESSAGES} acknowledgements read in {turns} turns")
    assert got == MESSAGES
    # Without joining, each PUBACK is a send() of its own: 500. Joined, the acknowledgements of one
    # turn's packets (up to 9) leave in one send(). How many packets a turn finds depends on the
    # machine's load (52 sends on a quiet machine, 149 and 261 under the full suite in CI: a bound on
    # the sends alone failed there), so the bound is on sends per turn; a few more for the SUBSCRIBE.
    assert turns < MESSAGES, "every packet was read alone: nothing to join"
    assert sends <= turns + 3
    async with make_client(session) as again:
        redelivered = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for _ in received(again):
                    redelivered += 1
    assert redelivered == 0, f"{redelivered} messages delivered again: their acknowledgements were lost"
