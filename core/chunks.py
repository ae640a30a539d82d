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


class _Encoded:
    """An artifact's chunk messages in one encoding, each encoded when it is first sent and kept
    for later requests.

    Encoding as they go out, on the loop (a copy of the chunk, plus base64 for JSON: ~0.1 ms
    each), sends the first chunk at once; encoding a 10 MiB artifact up front took ~10 ms on a
    thread before anything was sent.
    """

    __slots__ = ("app_name", "artifact", "binary", "chunk_size", "payloads")

    def __init__(self, app_name: str, artifact: Artifact, chunk_size: int, binary: bool) -> None:
        self.app_name = app_name
        self.artifact = artifact
        self.chunk_size = chunk_size
        self.binary = binary
        total = max(1, -(-len(artifact.data) // chunk_size))
        self.payloads: list[bytes | None] = [None] * total

    def payload(self, idx: int) -> bytes:
        payload = self.payloads[idx]
        if payload is None:
            data = self.artifact.data
            start = idx * self.chunk_size
            chunk = ChunkMessage(self.app_name, idx, len(self.payloads),
                                 memoryview(data)[start:start + self.chunk_size],
                                 digest=self.artifact.digest, size=len(data))
            payload = protocol.encode_binary_chunk(chunk) if self.binary else protocol.encode_chunk(chunk)
            self.payloads[idx] = payload
        return payload


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
        # The chunks of the artifacts served most recently, by ref and encoding; bounded by count.
        self._encoded: OrderedDict[tuple[str, bool], _Encoded] = OrderedDict()
        self._encoded_max = 8
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
        encoded = self._encoded_chunks(request.app_name, artifact, binary is not None)
        topic = binary or self.chunk_topic
        total = len(encoded.payloads)
        wanted = [i for i in request.missing if i < total] if request.missing else range(total)
        slots = asyncio.Semaphore(self._window)

        async def one(idx: int) -> None:
            async with slots:
                await self._publish(topic, encoded.payload(idx))

        await asyncio.gather(*(one(i) for i in wanted))
        self.served += 1
        log.debug("served %s: %d of %d chunks%s", request.app_name, len(wanted), total, " (binary)" * bool(binary))

    def _encoded_chunks(self, app_name: str, artifact: Artifact, binary: bool) -> _Encoded:
        key = (app_name, binary)
        cached = self._encoded.get(key)
        if (cached is not None and cached.artifact.digest == artifact.digest
                and cached.chunk_size == self.chunk_size):
            self._encoded.move_to_end(key)
            return cached
        encoded = self._encoded[key] = _Encoded(app_name, artifact, self.chunk_size, binary)
        while len(self._encoded) > self._encoded_max:
            self._encoded.popitem(last=False)
        return encoded

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
