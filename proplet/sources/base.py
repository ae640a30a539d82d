"""What every wasm delivery strategy shares: the reference to fetch, the interface, the error.

The agent turns a start message into a `WasmRef`, and `ModuleFetcher` picks the first source that
accepts it. A source returns raw bytes; it does not judge whether they are the module the task
wants: the fetcher verifies the digest before any byte goes further (STYLE rule 12).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Upstream's WASM_FETCH_MAX_BYTES: the largest module a proplet accepts from any source.
DEFAULT_MAX_MODULE_BYTES = 100 * 1024 * 1024


class FetchError(Exception):
    """The module could not be obtained. The message is the user-facing reason (STYLE rule 14):
    the agent publishes it as the task's error."""


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


@runtime_checkable
class WasmSource(Protocol):
    def accepts(self, ref: WasmRef) -> bool: ...

    async def fetch(self, ref: WasmRef) -> bytes: ...


@runtime_checkable
class DigestingSource(Protocol):
    """A source that hashes the bytes as they arrive (overlapping the hash with the network wait)
    offers this too, so the fetcher does not hash 10 MiB a second time. The digest must be the
    sha256 of exactly the bytes returned."""

    async def fetch_with_digest(self, ref: WasmRef) -> tuple[bytes, str]: ...


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
