"""Modules over MQTT chunks: every non-HTTP `image_url` (an OCI reference served by the proxy, or a
`blob:sha256:…` ref served by the manager), upstream §3.10 and §4.

The proplet publishes a `RegistryRequest` on `registry/proplet`; the server answers with chunks on
`registry/server`, one topic shared by every artifact. Beyond upstream, compatibly:

- With `binary`, requests ask for chunks of raw bytes (`encoding: "binary"`), which our proxy and
  manager publish on `registry/server/binary`: a quarter fewer bytes on the wire and no base64 to
  decode. A server that ignores the field (upstream's proxy) answers in JSON, read as before. When
  nothing arrives by the first stall (a broker ACL that predates that topic drops them silently),
  the transfer asks again for JSON, and once JSON then arrives the source asks for JSON from then on.
- Only refs this proplet asked for are buffered; other chunks are dropped on arrival, before their
  base64 is even decoded when `on_payload` is used (upstream buffers everything, defect 17).
- A stall (no new chunk for `stall_timeout` s) is answered with a request for just the missing
  indexes (`missing`), a few times, then the fetch fails naming the likely cause (defect 18).
- An `error` chunk fails the fetch at once with the server's reason.
- The chunks' `digest`/`size`, when present, are checked; a digest change mid-transfer (the tag
  was moved and re-served) restarts the reassembly on the new artifact.
- Concurrent fetches of one ref share one transfer (defect 19); state lives only while someone
  waits, and is dropped on completion, failure, cancellation of the last waiter, or
  `transfer_timeout`.

Bounds: at most `max_transfers` transfers at once (policy: a further fetch waits for a slot); each
buffers at most `max_bytes` (policy: the transfer fails with a clear error). The worst case is
`max_transfers × max_bytes` of memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

from core import protocol
from core.chunks import is_blob_ref
from core.protocol import ChunkMessage, InvalidMessage, RegistryRequest
from core.topics import REGISTRY_CHUNK_BINARY
from proplet.sources.base import (
    DEFAULT_MAX_MODULE_BYTES,
    BackgroundSha256,
    FetchError,
    ModuleBytes,
    ModuleTooLarge,
    WasmRef,
    format_size,
)
from proplet.sources.http import is_http_url

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]

# How our encoder and Go's encoding/json spell the key and the start of its value: used to drop
# chunks of refs nobody here waits for without decoding their base64 (about 2 ms per 512 KB chunk).
_APP_NAME_KEY = b'"app_name":'
_COMPACT_APP_NAME = _APP_NAME_KEY + b'"'
# Characters that JSON encoders may escape differently (Go escapes <, > and &): a ref containing
# one gets no pre-filter, and its chunks are always decoded.
_PLAIN_REF_CHARS = frozenset(chr(c) for c in range(0x20, 0x7F)) - set('"\\<>&')
# Indexes a resume request asks for at most (the first ones missing; the next stall asks for more).
MAX_MISSING_PER_REQUEST = 1024


def _needle(ref: str) -> bytes:
    """What a chunk of `ref` contains; b"" (found in every payload) when that cannot be known."""
    if set(ref) <= _PLAIN_REF_CHARS:
        return _APP_NAME_KEY + orjson.dumps(ref)
    return b""


@dataclass(slots=True)
class ChunkCounters:
    requests: int = 0
    resumes: int = 0
    chunks: int = 0
    # Of `chunks`, those that came as raw bytes (registry/server/binary).
    binary_chunks: int = 0
    # Transfers that asked for binary chunks, got nothing by the first stall and asked for JSON.
    json_fallbacks: int = 0
    duplicates: int = 0
    ignored: int = 0
    invalid: int = 0
    bytes: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(eq=False, slots=True)
class _Transfer:
    ref: str
    future: asyncio.Future[tuple[ModuleBytes, str]]
    started: float
    last_progress: float
    needle: bytes
    total: int | None = None
    digest: str = ""
    size: int = 0
    # The module's chunks [0, appended), in order; it is the fetch's result once complete.
    # Appended as they arrive rather than joined after the last: a 10 MiB join touched 10 MiB of
    # fresh memory after the last chunk (~5 ms of page faults on our VMs, a quarter of the
    # delivery); appended, those faults fall in the gaps between arrivals, and each chunk's own
    # memory is freed once hashed, for the next ones to reuse.
    data: bytearray = field(default_factory=bytearray)
    appended: int = 0
    # Chunks that arrived before one in front of them, by index.
    pieces: dict[int, bytes | memoryview] = field(default_factory=dict)
    received: int = 0
    requests: int = 0
    resumes: int = 0
    restarts: int = 0
    waiters: int = 0
    encoding: str = ""
    # Asked for binary chunks, got nothing by the first stall and asked again for JSON ones.
    fell_back: bool = False
    # Every appended chunk goes into `hasher` too: the hash is computed as the module arrives, so
    # completion costs no extra pass over it.
    hasher: BackgroundSha256 = field(default_factory=BackgroundSha256)
    # The task that finishes the transfer once the hash has caught up (kept here: a task nobody
    # holds may be collected mid-way).
    finishing: asyncio.Task[None] | None = None
    holds_slot: bool = True

    def missing(self) -> tuple[int, ...]:
        if self.total is None:
            return ()
        # Bounded: `total` is whatever a chunk claimed, and a claim of millions would otherwise
        # build a request of megabytes on the event loop.
        return tuple(itertools.islice((i for i in range(self.appended, self.total) if i not in self.pieces),
                                      MAX_MISSING_PER_REQUEST))

    @property
    def chunks_in(self) -> int:
        return self.appended + len(self.pieces)

    def reset(self) -> None:
        self.total = None
        self.digest = ""
        self.size = 0
        self.data = bytearray()
        self.appended = 0
        self.pieces = {}
        self.received = 0
        self.hasher = BackgroundSha256()
        if self.finishing is not None:  # it was finishing the artifact now replaced
            self.finishing.cancel()
            self.finishing = None


class ChunkSource:
    """Fetches artifacts over MQTT chunks.

    Wiring (the agent's job): pass an async `publish(topic, payload)` and the full
    `registry/proplet` topic; feed every message received on `registry/server` to
    `on_payload(payload)` (cheapest) or decode it with `core.protocol.decode_chunk` and call
    `on_chunk(msg)`. Both are synchronous and never raise.
    """

    def __init__(
        self,
        publish: Publish,
        request_topic: str,
        *,
        proplet_id: str = "",
        stall_timeout: float = 10.0,
        max_resumes: int = 3,
        transfer_timeout: float = 300.0,
        max_bytes: int = DEFAULT_MAX_MODULE_BYTES,
        max_transfers: int = 8,
        binary: bool = False,
    ) -> None:
        if stall_timeout <= 0 or transfer_timeout <= 0:
            raise ValueError("stall_timeout and transfer_timeout must be positive")
        self._publish = publish
        self.request_topic = request_topic
        self.proplet_id = proplet_id
        self.stall_timeout = stall_timeout
        self.max_resumes = max_resumes
        self.transfer_timeout = transfer_timeout
        self.max_bytes = max_bytes
        # Only when the caller subscribes to `registry/server/binary` and feeds it to on_payload:
        # the answers to such requests arrive nowhere else.
        self.encoding = protocol.CHUNK_ENCODING_BINARY if binary else ""
        self._slots = asyncio.Semaphore(max_transfers)
        self._transfers: dict[str, _Transfer] = {}
        self.counters = ChunkCounters()

    # -- WasmSource --------------------------------------------------------------------------

    def accepts(self, ref: WasmRef) -> bool:
        return bool(ref.image_url) and not is_http_url(ref.image_url)

    async def fetch(self, ref: WasmRef) -> ModuleBytes:
        data, _ = await self.fetch_with_digest(ref)
        return data

    async def fetch_with_digest(self, ref: WasmRef) -> tuple[ModuleBytes, str]:
        name = ref.image_url
        transfer = self._transfers.get(name)
        created = False
        if transfer is None:
            await self._slots.acquire()
            transfer = self._transfers.get(name)  # another fetch may have started it meanwhile
            if transfer is None:
                transfer = self._open(name)
                created = True
            else:
                self._slots.release()
        transfer.waiters += 1
        try:
            if created:
                await self._request(transfer, initial=True)
            return await self._wait(transfer)
        finally:
            transfer.waiters -= 1
            if transfer.waiters == 0 and not transfer.future.done():
                # The last one waiting gave up (task stopped): nobody needs these chunks any more.
                transfer.future.cancel()
                self._close(transfer)

    @property
    def active(self) -> tuple[str, ...]:
        """Refs with a transfer in progress."""
        return tuple(self._transfers)

    def buffered_bytes(self) -> int:
        return sum(t.received for t in self._transfers.values())

    # -- incoming chunks -----------------------------------------------------------------------

    def on_payload(self, payload: bytes, topic: str = "registry/server") -> None:
        """A raw message from `registry/server` or, told by its topic, `registry/server/binary`.
        Chunks of refs nobody here waits for are dropped before their data is decoded."""
        if topic.endswith(REGISTRY_CHUNK_BINARY):
            self._on_binary_payload(payload, topic)
            return
        if not self._transfers:
            self.counters.ignored += 1
            return
        if _COMPACT_APP_NAME in payload and not any(t.needle in payload for t in self._transfers.values()):
            self.counters.ignored += 1
            return
        try:
            message = protocol.decode_chunk(payload, topic)
        except InvalidMessage as exc:
            self.counters.invalid += 1
            log.warning("dropped a chunk: %s", exc)
            return
        transfer = self._transfers.get(message.app_name)
        if transfer is not None and transfer.fell_back and self.encoding:
            self.encoding = ""
            log.warning("binary chunks of %s never arrived but JSON ones do: the broker probably does not let "
                        "registry/server/binary through (see docs/mosquitto/acl.conf); this proplet asks for "
                        "JSON chunks from now on", transfer.ref)
        self.on_chunk(message)

    def _on_binary_payload(self, payload: bytes, topic: str) -> None:
        if not self._transfers:
            self.counters.ignored += 1
            return
        try:
            message = protocol.decode_binary_chunk_for(self._transfers, payload, topic)
        except InvalidMessage as exc:
            self.counters.invalid += 1
            log.warning("dropped a chunk: %s", exc)
            return
        if message is None:
            self.counters.ignored += 1
            return
        self.counters.binary_chunks += 1
        self.on_chunk(message)

    def on_chunk(self, msg: ChunkMessage) -> None:
        """One decoded chunk, in any order, possibly duplicated, possibly for someone else."""
        transfer = self._transfers.get(msg.app_name)
        if transfer is None or transfer.future.done():
            self.counters.ignored += 1
            return
        self.counters.chunks += 1
        if msg.error:
            self._fail(transfer, FetchError(f"{self._server(transfer.ref)} cannot serve {transfer.ref}: {msg.error}"))
            return
        if msg.digest and transfer.digest and msg.digest != transfer.digest:
            # The tag now points at another artifact and someone had it served: the module must be
            # built from one artifact's bytes, so start over on the new one.
            if transfer.restarts >= 2:
                self._fail(transfer, FetchError(
                    f"{transfer.ref} changed three times while it was being fetched ({msg.digest} is the "
                    "latest). Pin the image by digest (name@sha256:…) or stop re-pushing the tag."))
                return
            log.info("%s changed from %s to %s during the transfer; starting over",
                     transfer.ref, transfer.digest, msg.digest)
            transfer.restarts += 1
            transfer.reset()
        if transfer.total is None:
            if msg.size > self.max_bytes:
                self._fail(transfer, self._too_large(transfer, msg.size))
                return
            transfer.total = msg.total_chunks
            transfer.digest = msg.digest
            transfer.size = msg.size
        elif msg.total_chunks != transfer.total:
            self._fail(transfer, FetchError(
                f"The chunks of {transfer.ref} disagree on their number ({transfer.total}, then "
                f"{msg.total_chunks}): the artifact changed during the transfer. Start the task again, "
                "or pin the image by digest."))
            return
        if not transfer.digest and msg.digest:
            transfer.digest = msg.digest
        if msg.chunk_idx < transfer.appended or msg.chunk_idx in transfer.pieces:
            self.counters.duplicates += 1
            return
        transfer.received += len(msg.data)
        self.counters.bytes += len(msg.data)
        if transfer.received > self.max_bytes:
            self._fail(transfer, self._too_large(transfer, transfer.received))
            return
        transfer.pieces[msg.chunk_idx] = msg.data
        transfer.last_progress = time.monotonic()
        while transfer.appended in transfer.pieces:
            piece = transfer.pieces.pop(transfer.appended)
            transfer.data += piece
            transfer.hasher.update(piece)
            transfer.appended += 1
        if transfer.appended == transfer.total and transfer.finishing is None:
            transfer.finishing = asyncio.get_running_loop().create_task(self._complete(transfer))

    # -- transfer lifecycle --------------------------------------------------------------------

    def _open(self, ref: str) -> _Transfer:
        now = time.monotonic()
        future: asyncio.Future[tuple[ModuleBytes, str]] = asyncio.get_running_loop().create_future()
        # Mark a failure as seen even when every waiter was cancelled at the same moment.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        transfer = _Transfer(ref, future, now, now, needle=_needle(ref), encoding=self.encoding)
        self._transfers[ref] = transfer
        return transfer

    def _close(self, transfer: _Transfer) -> None:
        if self._transfers.get(transfer.ref) is transfer:
            del self._transfers[transfer.ref]
        transfer.pieces = {}
        transfer.data = bytearray()  # a new one: the old one may be the fetch's result
        if transfer.holds_slot:
            transfer.holds_slot = False
            self._slots.release()

    def _fail(self, transfer: _Transfer, error: FetchError) -> None:
        self.counters.failed += 1
        log.warning("fetching %s failed: %s", transfer.ref, error)
        if not transfer.future.done():
            transfer.future.set_exception(error)
        self._close(transfer)

    async def _complete(self, transfer: _Transfer) -> None:
        assert transfer.total is not None
        digest = await transfer.hasher.digest()
        if transfer.future.done():  # failed or given up while the hash caught up
            return
        data = transfer.data
        if transfer.size and len(data) != transfer.size:
            self._fail(transfer, FetchError(
                f"{transfer.ref} arrived as {len(data)} bytes but {self._server(transfer.ref)} announced "
                f"{transfer.size}. Start the task again; if it persists, check the server's chunking."))
            return
        if transfer.digest and digest != transfer.digest:
            self._fail(transfer, FetchError(
                f"The reassembled {transfer.ref} has sha256 {digest} but {self._server(transfer.ref)} "
                f"announced {transfer.digest}: chunks were corrupted on the way. Start the task again."))
            return
        self.counters.completed += 1
        log.debug("fetched %s: %d bytes in %d chunks, %.0f ms, %d resumes", transfer.ref, len(data),
                  transfer.total, (time.monotonic() - transfer.started) * 1000, transfer.resumes)
        transfer.future.set_result((data, digest))
        self._close(transfer)

    async def _request(self, transfer: _Transfer, *, initial: bool = False) -> None:
        missing = () if initial else transfer.missing()
        payload = protocol.encode_registry_request(
            RegistryRequest(transfer.ref, missing=missing, proplet_id=self.proplet_id, encoding=transfer.encoding))
        transfer.requests += 1
        self.counters.requests += 1
        try:
            await self._publish(self.request_topic, payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if initial:
                self._fail(transfer, FetchError(
                    f"Could not ask for {transfer.ref} over MQTT ({exc}). Check the proplet's broker "
                    "connection."))
            else:
                # The next stall check tries again; a broker outage is reported by the bus itself.
                log.warning("resume request for %s failed: %s", transfer.ref, exc)

    async def _wait(self, transfer: _Transfer) -> tuple[ModuleBytes, str]:
        while not transfer.future.done():
            now = time.monotonic()
            deadline = min(transfer.last_progress + self.stall_timeout, transfer.started + self.transfer_timeout)
            if deadline > now:
                try:
                    # Shielded: a waiter that gives up (its timeout, its own cancel) leaves the transfer to
                    # the other waiters.
                    async with asyncio.timeout(deadline - now):
                        return await asyncio.shield(transfer.future)
                except TimeoutError:
                    continue  # progress may have moved the deadline; look again
            if now >= transfer.started + self.transfer_timeout:
                self._fail(transfer, FetchError(
                    f"Fetching {transfer.ref} took longer than {self.transfer_timeout:g} s "
                    f"({self._progress(transfer)}). Check the broker's and the {self._server(transfer.ref)}'s "
                    "load, or ship a smaller module."))
                break
            if transfer.resumes >= self.max_resumes:
                self._fail(transfer, self._stalled(transfer))
                break
            # Every waiter checks the same deadline; moving it here makes only one of them resume.
            transfer.resumes += 1
            transfer.last_progress = now
            self.counters.resumes += 1
            if transfer.encoding and transfer.total is None:
                transfer.encoding = ""
                transfer.fell_back = True
                self.counters.json_fallbacks += 1
            log.info("%s stalled (%s); asking again for %s%s", transfer.ref, self._progress(transfer),
                     f"{len(transfer.missing())} of the missing chunks" if transfer.total else "the whole artifact",
                     " as JSON chunks" if transfer.fell_back else "")
            await self._request(transfer)
        return transfer.future.result()

    # -- messages ------------------------------------------------------------------------------

    def _stalled(self, transfer: _Transfer) -> FetchError:
        server = self._server(transfer.ref)
        if not transfer.chunks_in and transfer.total is None:
            return FetchError(
                f"No chunk of {transfer.ref} arrived for {self.stall_timeout:g} s after {transfer.requests} "
                f"requests; is the {server} running and connected to the same broker, tenant and channel?")
        return FetchError(
            f"The transfer of {transfer.ref} stalled ({self._progress(transfer)}): no chunk arrived for "
            f"{self.stall_timeout:g} s after {transfer.resumes} requests for the missing ones; is the {server} "
            "still running?")

    def _too_large(self, transfer: _Transfer, size: int) -> ModuleTooLarge:
        return ModuleTooLarge(
            f"{transfer.ref} is larger than the proplet's limit of {format_size(self.max_bytes)} "
            f"({format_size(size)} announced or received). Ship a smaller module or raise "
            "PROPLET_WASM_FETCH_MAX_BYTES on the proplet.")

    @staticmethod
    def _progress(transfer: _Transfer) -> str:
        if transfer.total is None:
            return "no chunk received"
        return f"{transfer.chunks_in} of {transfer.total} chunks received"

    @staticmethod
    def _server(ref: str) -> str:
        return "manager" if is_blob_ref(ref) else "OCI proxy (propeller proxy)"
