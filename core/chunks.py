"""Serving artifacts as chunks over MQTT (upstream's registry protocol, §3.10).

The manager serves its own large modules this way (refs `blob:sha256:<hex>`), and the proxy serves
OCI artifacts. Both answer `registry/proplet` requests by publishing on `registry/server`.
Beyond upstream: the artifact's digest and size travel with every chunk, a request may name only
the chunks it is missing or ask for raw-byte chunks (`encoding: "binary"`, answered on
`registry/server/binary`), a failed publish is retried instead of leaving a hole, and an artifact
that cannot be served is answered with an error chunk instead of silence.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core import protocol
from core.mqtt import BrokerUnavailable, MqttBus
from core.protocol import ChunkMessage, RegistryRequest

log = logging.getLogger(__name__)

BLOB_PREFIX = "blob:"


def blob_ref(digest: str) -> str:
    return BLOB_PREFIX + digest


def is_blob_ref(app_name: str) -> bool:
    return app_name.startswith(BLOB_PREFIX)


class ArtifactUnavailable(LookupError):
    """The artifact cannot be served; the message is sent to the requester."""


@dataclass(frozen=True, slots=True)
class Artifact:
    data: bytes
    digest: str


def _encoded_chunk(app_name: str, artifact: Artifact, chunk_size: int, idx: int, binary: bool) -> bytes:
    """Chunk `idx` of an artifact as a message, encoded when it is sent.

    Encoding as they go out, on the loop (a copy of the chunk, plus base64 for JSON: ~0.1 ms
    each), sends the first chunk at once; encoding a 10 MiB artifact up front took ~10 ms on a
    thread before anything was sent. Nothing encoded is kept: paho copies each message into its
    packet anyway, a kept copy would double or more the memory of every artifact served, and each
    message encoded for a new artifact would be fresh memory to fault in (~0.2 ms per 512 KB chunk
    on our VMs) where one encoded after the last was sent reuses that one's memory.
    """
    data = artifact.data
    start = idx * chunk_size
    chunk = ChunkMessage(app_name, idx, _chunk_count(len(data), chunk_size),
                         memoryview(data)[start:start + chunk_size], digest=artifact.digest, size=len(data))
    return protocol.encode_binary_chunk(chunk) if binary else protocol.encode_chunk(chunk)


def _chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


Resolver = Callable[[str], Awaitable[Artifact]]


class ArtifactCache:
    """Recently served artifacts, bounded by total bytes (evicts least recently used)."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Artifact] = OrderedDict()
        self._bytes = 0

    def get(self, key: str) -> Artifact | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, artifact: Artifact) -> None:
        if len(artifact.data) > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= len(old.data)
        self._items[key] = artifact
        self._bytes += len(artifact.data)
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted.data)


class ChunkServer:
    """Answers registry requests for the refs `accepts` says are ours.

    Requests wait in a bounded queue (overflow: refuse with an error chunk) and are served by a
    few workers, so one large artifact does not hold up the others.
    """

    def __init__(
        self,
        bus: MqttBus,
        chunk_topic: str,
        *,
        resolve: Resolver,
        accepts: Callable[[str], bool],
        chunk_size: int = protocol.UPSTREAM_CHUNK_SIZE,
        workers: int = 4,
        max_queued: int = 256,
        window: int = 8,
        cache: ArtifactCache | None = None,
        binary_topic: str | None = None,
    ) -> None:
        self.bus = bus
        self.chunk_topic = chunk_topic
        # Where raw-byte chunks go; without it every request is answered in upstream's JSON.
        self.binary_topic = binary_topic
        self.resolve = resolve
        self.accepts = accepts
        self.chunk_size = chunk_size
        self.cache = cache or ArtifactCache()
        self._queue: asyncio.Queue[RegistryRequest] = asyncio.Queue(maxsize=max_queued)
        self._workers = workers
        self._window = window
        self.served = 0
        self.refused = 0

    def submit(self, request: RegistryRequest) -> bool:
        """Queue a request we accept. Returns False when the ref is not ours."""
        if not self.accepts(request.app_name):
            return False
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self.refused += 1
            log.warning("chunk server busy: refusing %s (%d requests queued)",
                        request.app_name, self._queue.qsize())
            self.bus.send(*self._encode_one(request, ChunkMessage(
                request.app_name, 0, 1, b"", error="the chunk server is busy; the request was refused, try again")))
        return True

    def _binary_topic_for(self, request: RegistryRequest) -> str | None:
        """Where `request` gets binary chunks; None when it gets upstream's JSON ones."""
        return self.binary_topic if request.wants_binary else None

    def _encode_one(self, request: RegistryRequest, chunk: ChunkMessage) -> tuple[str, bytes]:
        """A single chunk (an error) for `request`, on the topic and in the encoding it asked for."""
        binary = self._binary_topic_for(request)
        if binary:
            return binary, protocol.encode_binary_chunk(chunk)
        return self.chunk_topic, protocol.encode_chunk(chunk)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for i in range(self._workers):
                group.create_task(self._worker(), name=f"chunk-worker-{i}")

    async def _worker(self) -> None:
        while True:
            request = await self._queue.get()
            try:
                await self.serve(request)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("serving %s failed", request.app_name)

    async def artifact(self, app_name: str) -> Artifact:
        cached = self.cache.get(app_name)
        if cached is not None:
            return cached
        artifact = await self.resolve(app_name)
        self.cache.put(app_name, artifact)
        return artifact

    async def serve(self, request: RegistryRequest) -> None:
        binary = self._binary_topic_for(request)
        try:
            artifact = await self.artifact(request.app_name)
        except Exception as exc:
            # Any failure is answered, so the proplet fails at once with the reason instead of
            # waiting for its stall timeout.
            self.refused += 1
            reason = str(exc) if isinstance(exc, ArtifactUnavailable) else (
                f"the artifact could not be served ({type(exc).__name__}: {exc})")
            log.warning("cannot serve %s: %s", request.app_name, reason)
            await self._publish(*self._encode_one(request, ChunkMessage(request.app_name, 0, 1, b"", error=reason)))
            return
        topic = binary or self.chunk_topic
        chunk_size = self.chunk_size
        total = _chunk_count(len(artifact.data), chunk_size)
        # Each listed index once, in the order asked: a list repeating index 0 a thousand times
        # would otherwise be a thousand chunks (500 MB at upstream's chunk size) for one request.
        wanted = list(dict.fromkeys(i for i in request.missing if i < total)) if request.missing else range(total)
        slots = asyncio.Semaphore(self._window)

        async def one(idx: int) -> None:
            async with slots:
                await self._publish(topic, _encoded_chunk(request.app_name, artifact, chunk_size, idx,
                                                          binary is not None))

        await asyncio.gather(*(one(i) for i in wanted))
        self.served += 1
        log.debug("served %s: %d of %d chunks%s", request.app_name, len(wanted), total, " (binary)" * bool(binary))

    async def _publish(self, topic: str, payload: bytes) -> None:
        while True:
            try:
                await self.bus.publish(topic, payload)
                return
            except BrokerUnavailable:
                if self.bus.closing:
                    return
                # Retry rather than leave a hole the proplet only notices at its timeout.
                log.warning("broker unavailable while publishing a chunk; retrying")
