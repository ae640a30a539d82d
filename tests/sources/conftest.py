"""Real counterparts for the wasm sources: MQTT chunk servers on the session Mosquitto, a raw
chunk publisher for hand-made (out-of-order, duplicated, foreign) chunks, and the proplet side
of a chunk transfer wired exactly as the agent wires it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiomqtt
import pytest

from core import protocol
from core.chunks import Artifact, ArtifactUnavailable, ChunkServer
from core.lifecycle import cancel_and_wait
from core.mqtt import MqttBus, MqttConnection, make_client, parse_broker_url
from core.protocol import ChunkMessage, RegistryRequest, decode_binary_chunk, decode_chunk
from core.topics import Topics
from proplet.sources import ChunkSource
from tests.conftest import unique
from tests.registry import registry  # noqa: F401  (the session's docker-registry fixture)


@pytest.fixture
def topics() -> Topics:
    """A topic domain of the test's own, so tests sharing the session broker never see each other."""
    return Topics(unique("t"), "default")


def connection(broker_url: str, name: str) -> MqttConnection:
    client_id = f"{name}-{uuid.uuid4().hex[:8]}"
    return MqttConnection(parse_broker_url(broker_url), client_id, username=client_id, qos=1, timeout=5.0)


@asynccontextmanager
async def running(bus: MqttBus) -> AsyncIterator[MqttBus]:
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(5)
        yield bus
    finally:
        await bus.close()
        await cancel_and_wait([task], owner="test bus")


@asynccontextmanager
async def proplet_side(broker_url: str, topics: Topics, **options: Any) -> AsyncIterator[ChunkSource]:
    """A ChunkSource wired to its own MQTT connection, the way the agent does it: requests go out
    through the bus's publish, every `registry/server` payload (and `registry/server/binary` one,
    with `binary=True`) goes to `on_payload`."""
    source: ChunkSource | None = None

    async def on_message(topic: str, payload: bytes) -> None:
        assert source is not None
        source.on_payload(payload, topic)

    subscriptions = [topics.registry_chunk]
    if options.get("binary"):
        subscriptions.append(topics.registry_chunk_binary)
    bus = MqttBus(connection(broker_url, "proplet"), subscriptions=subscriptions,
                  on_message=on_message, name="proplet")
    source = ChunkSource(bus.publish, topics.registry_request, proplet_id=bus.conn.client_id, **options)
    async with running(bus):
        yield source


def resolver(artifacts: dict[str, bytes]) -> Callable[[str], Any]:
    async def resolve(name: str) -> Artifact:
        if name not in artifacts:
            raise ArtifactUnavailable(f"no artifact named {name} here")
        data = artifacts[name]
        return Artifact(data, protocol.sha256_digest(data))

    return resolve


class RecordingServer:
    """A ChunkServer on its own connection that also records every request it receives."""

    def __init__(self, server: ChunkServer) -> None:
        self.server = server
        self.requests: list[RegistryRequest] = []


@asynccontextmanager
async def chunk_server(broker_url: str, topics: Topics, artifacts: dict[str, bytes], *,
                       server_cls: type[ChunkServer] = ChunkServer, **options: Any) -> AsyncIterator[RecordingServer]:
    holder: RecordingServer | None = None

    async def on_message(topic: str, payload: bytes) -> None:
        assert holder is not None
        request = protocol.decode_registry_request(payload, topic)
        holder.requests.append(request)
        holder.server.submit(request)

    bus = MqttBus(connection(broker_url, "server"), subscriptions=[topics.registry_request],
                  on_message=on_message, name="server")
    # Like the manager's and the proxy's, unless a test passes binary_topic=None (upstream's proxy).
    options.setdefault("binary_topic", topics.registry_chunk_binary)
    server = server_cls(bus, topics.registry_chunk, resolve=resolver(artifacts), accepts=lambda _: True, **options)
    holder = RecordingServer(server)
    async with running(bus):
        task = asyncio.create_task(server.run())
        try:
            yield holder
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class LossyChunkServer(ChunkServer):
    """Loses the chunks listed in `lose` the first time each is sent, as a broker or network
    would: the proplet only learns of it by the stall."""

    def __init__(self, *args: Any, lose: set[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lose = set(lose)
        self.lost: list[int] = []

    async def _publish(self, topic: str, payload: bytes) -> None:
        message = decode_binary_chunk(payload) if topic == self.binary_topic else decode_chunk(payload)
        if message.chunk_idx in self.lose and not message.error:
            self.lose.discard(message.chunk_idx)
            self.lost.append(message.chunk_idx)
            return
        await super()._publish(topic, payload)


class RawChunkPublisher:
    """Publishes hand-made chunks and records the requests it sees: for arrival orders and
    contents a well-behaved server never produces."""

    def __init__(self, broker_url: str, topics: Topics) -> None:
        self.topics = topics
        self._conn = connection(broker_url, "raw")
        self.requests: list[RegistryRequest] = []
        self._arrived = asyncio.Condition()
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawChunkPublisher:
        self._client = make_client(self._conn)
        await self._client.__aenter__()
        await self._client.subscribe(self.topics.registry_request, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def _read(self) -> None:
        assert self._client is not None
        async for message in self._client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            async with self._arrived:
                self.requests.append(protocol.decode_registry_request(payload))
                self._arrived.notify_all()

    async def wait_requests(self, count: int, timeout: float = 5.0) -> list[RegistryRequest]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests

    async def send(self, message: ChunkMessage | bytes) -> None:
        assert self._client is not None
        payload = message if isinstance(message, bytes) else protocol.encode_chunk(message)
        await self._client.publish(self.topics.registry_chunk, payload, qos=1)

    async def send_binary(self, message: ChunkMessage | bytes) -> None:
        assert self._client is not None
        payload = message if isinstance(message, bytes) else protocol.encode_binary_chunk(message)
        await self._client.publish(self.topics.registry_chunk_binary, payload, qos=1)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a counter or buffer of the source under test to change. The source offers no event
    for these (nothing in production waits on them), so poll briefly."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def chunks_of(name: str, data: bytes, chunk_size: int, *, digest: bool = True) -> list[ChunkMessage]:
    pieces = protocol.split_chunks(data, chunk_size)
    return [ChunkMessage(name, i, len(pieces), piece,
                         digest=protocol.sha256_digest(data) if digest else "",
                         size=len(data) if digest else 0)
            for i, piece in enumerate(pieces)]
