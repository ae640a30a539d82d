"""Two MQTT clients with one client id on a real Mosquitto: each connection takes the session from the
other, and the bus says so instead of reconnecting in a silent loop."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from core.mqtt import MqttBus, MqttConnection, parse_broker_url
from tests.services import TcpProxy, free_port
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
    assert f"Usually another client is connected with the same client id ({client_id})" in warning, warning
    assert "MANAGER_ENTITY_ID" in warning and "PROPLET_ENTITY_ID" in warning
    assert "closed this connection within 5 s of accepting it 3 times in a row" in warning
    assert f"another client probably uses the client id {client_id}" in again, again


class _CutAfterConnack(TcpProxy):
    """A TCP proxy in front of the broker that passes a connection's CONNACK and closes that connection
    in the same write (its FIN right behind the CONNACK), for the first `cuts` connections: a broker
    that drops a client as it accepts it (a session taken over at once, a broker going down, an
    authorisation plugin that changes its mind). Later connections pass."""

    def __init__(self, upstream_port: int, cuts: int) -> None:
        super().__init__(upstream_port)
        self.cuts = cuts
        self.connections = 0

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        cut = self.connections <= self.cuts
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            await asyncio.gather(self._pipe(client_r, server_w, cut=False), self._pipe(server_r, client_w, cut=cut))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (client_w, server_w):
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, cut: bool) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            if cut and data[0] == 0x20:  # CONNACK
                writer.close()  # the FIN leaves with the CONNACK
                raise ConnectionError("cut after CONNACK")
            await writer.drain()
        raise ConnectionError("closed")


async def test_a_connection_the_broker_drops_as_it_accepts_it_is_made_again(broker: Any) -> None:
    """aiomqtt sets the loss on its "disconnected" future and then, still connecting, replaces that future
    with a new one: the loss's error was never taken, and asyncio logged it as lost. The bus learns of
    the loss when its SUBSCRIBE fails on the dead connection, and must connect again."""
    proxy = _CutAfterConnack(broker.port, cuts=3)
    port = await proxy.start()
    client_id = f"cut-{uuid.uuid4().hex[:8]}"
    conn = MqttConnection(parse_broker_url(f"mqtt://127.0.0.1:{port}"), client_id, qos=1, timeout=5.0)
    got: list[bytes] = []

    async def keep(topic: str, payload: bytes) -> None:
        got.append(payload)

    bus = MqttBus(conn, subscriptions=[f"{client_id}/#"], on_message=keep, name="cut bus",
                  backoff_initial=0.05, backoff_max=0.2)
    task = asyncio.create_task(bus.run())
    try:
        await eventually(lambda: proxy.connections > proxy.cuts and bus.connected.is_set(), timeout=15)
        await bus.publish(f"{client_id}/x", b"through")
        await eventually(lambda: got == [b"through"], timeout=5)
    finally:
        await bus.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await proxy.close()


async def test_a_bus_retrying_an_absent_broker_holds_no_more_with_each_attempt() -> None:
    """aiomqtt keeps one "disconnected" future over every connect that fails: watched anew on each
    attempt, it took a callback more each time (31 after 3 s of retries here, without bound)."""
    conn = MqttConnection(parse_broker_url(f"mqtt://127.0.0.1:{free_port()}"), f"absent-{uuid.uuid4().hex[:8]}",
                          qos=1, timeout=1.0)
    bus = MqttBus(conn, subscriptions=["absent/#"], on_message=_nothing, name="absent bus",
                  backoff_initial=0.02, backoff_max=0.05)
    task = asyncio.create_task(bus.run())
    try:
        await eventually(lambda: bus.counters.last_error != "", timeout=5)
        await asyncio.sleep(1.0)  # a few dozen attempts
        assert not bus.connected.is_set()
        assert len(bus._client._disconnected._callbacks) == 1
    finally:
        await bus.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
