"""What every wasm delivery strategy shares: the reference to fetch, the interface, the error.

The agent turns a start message into a `WasmRef`, and `ModuleFetcher` picks the first source that
accepts it. A source returns raw bytes; it does not judge whether they are the module the task
wants: the fetcher verifies the digest before any byte goes further (STYLE rule 12).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Upstream's WASM_FETCH_MAX_BYTES: the largest module a proplet accepts from any source.
DEFAULT_MAX_MODULE_BYTES = 100 * 1024 * 1024


class FetchError(Exception):
    """The module could not be obtained. The message is the user-facing reason (STYLE rule 14):
    the agent publishes it as the task's error."""


class ModuleTooLarge(FetchError):
    """The module is over this proplet's limit (PROPLET_WASM_FETCH_MAX_BYTES): another proplet, with
    a higher limit, may take it."""


@dataclass(frozen=True, slots=True)
class WasmRef:
    """Where a task's module comes from, as the start message says."""

    task_id: str
    # An http(s):// URL, or an OCI reference / manager blob ref fetched over MQTT chunks.
    image_url: str = ""
    # The inline module, already base64-decoded by the protocol decoder.
    file: bytes = b""
    # Expected "sha256:<hex>" (the start message's wasm_digest); "" when unknown.
    digest: str = ""


# A module's bytes as a source returns them: a bytearray when they were appended piece by piece as
# they arrived, so that no copy of the whole module is made after its last byte. Consumers only
# read them (wasmtime compiles from either).
ModuleBytes = bytes | bytearray


@runtime_checkable
class WasmSource(Protocol):
    def accepts(self, ref: WasmRef) -> bool: ...

    async def fetch(self, ref: WasmRef) -> ModuleBytes: ...


@runtime_checkable
class DigestingSource(Protocol):
    """A source that hashes the bytes as they arrive (overlapping the hash with the network wait)
    offers this too, so the fetcher does not hash 10 MiB a second time. The digest must be the
    sha256 of exactly the bytes returned."""

    async def fetch_with_digest(self, ref: WasmRef) -> tuple[ModuleBytes, str]: ...


# One worker thread hashes what the sources receive while the loop receives the next bytes
# (hashlib releases the GIL): ~6 ms per 10 MiB that no longer holds up a transfer. One thread, so
# the pieces of a module go into its hash in the order they were handed over; it starts on first
# use, so a proplet that never fetches has none.
_HASHING = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="module-hash")


def _update(hasher: hashlib._Hash, pieces: list[bytes | memoryview]) -> None:
    # One update per batch: each update takes the GIL back when it ends, and while the loop is busy
    # receiving (an HTTP download keeps it so) every take can wait a whole switch interval. A copy
    # of the batch costs less than the waits it saves.
    hasher.update(pieces[0] if len(pieces) == 1 else b"".join(pieces))


class BackgroundSha256:
    """The sha256 of bytes handed over in order, computed on the hashing thread in batches of at
    least `batch_bytes` (a thread hop per batch rather than per piece)."""

    __slots__ = ("_batch", "_batch_bytes", "_batched", "_hasher", "_last")

    def __init__(self, batch_bytes: int = 256 * 1024) -> None:
        self._hasher = hashlib.sha256()
        self._batch: list[bytes | memoryview] = []
        self._batched = 0
        self._batch_bytes = batch_bytes
        self._last: concurrent.futures.Future[None] | None = None

    def update(self, piece: bytes | memoryview) -> None:
        self._batch.append(piece)
        self._batched += len(piece)
        if self._batched >= self._batch_bytes:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._batch:
            batch, self._batch, self._batched = self._batch, [], 0
            self._last = _HASHING.submit(_update, self._hasher, batch)

    async def digest(self) -> str:
        """"sha256:<hex>" of everything handed over, once the thread has caught up."""
        self._hand_over()
        if self._last is not None:
            await asyncio.wrap_future(self._last)
        return "sha256:" + self._hasher.hexdigest()


def format_size(n: int) -> str:
    """Bytes in the unit an operator reads at a glance (100 MiB, 512 KiB, 17 bytes)."""
    if n < 1024:
        return f"{n} bytes"
    value = n / 1024
    unit = "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.4g} {unit}"
