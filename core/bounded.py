"""A least-recently-used map bounded by entries and by the bytes its values hold.

A count alone does not bound memory when one value may be large: a task's results reach 1 MiB of
captured output (more from another proplet), so the manager's 10,000 recently used tasks or a
proplet's 2,000 remembered results could have held gigabytes."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


def payload_bytes(value: Any) -> int:
    """About the bytes a decoded JSON value holds (its compact JSON length); 0 for None."""
    if value is None:
        return 0
    if isinstance(value, str | bytes | bytearray):
        return len(value)
    if isinstance(value, bool | int | float):
        return 8
    return len(json.dumps(value, separators=(",", ":"), default=str))


def size_text(size: int) -> str:
    """A byte count for messages: 195.4 KiB, 1.0 MiB."""
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


class BoundedLru(Generic[K, V]):
    """`put` makes a key the most recently used and evicts the least recently used entries while
    there are more than `max_entries` or their values weigh more than `max_bytes` together (the
    entry just put is kept even if it alone weighs more). A value's weight is taken when it is put."""

    def __init__(self, max_entries: int, max_bytes: int, weigh: Callable[[V], int]) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._weigh = weigh
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return entry[0] if entry is not None else None

    def use(self, key: K) -> V | None:
        """`get`, and the key becomes the most recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.bytes -= entry[1]
        return entry[0]

    def put(self, key: K, value: V) -> list[K]:
        """Keep `value` under `key`; the keys evicted to make room, least recently used first."""
        self.pop(key)
        weight = self._weigh(value)
        self._entries[key] = (value, weight)
        self.bytes += weight
        evicted: list[K] = []
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
            old, (_, old_weight) = self._entries.popitem(last=False)
            self.bytes -= old_weight
            evicted.append(old)
        return evicted
