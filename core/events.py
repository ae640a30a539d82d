"""Fan-out to subscribers (the console, tests), each with its own bounded buffer.

Used for core events and for the MQTT traffic tap.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Subscription(Generic[T]):
    """Overflow policy: drop the oldest item and count it. A slow reader never slows the core."""

    def __init__(self, fanout: Fanout[T], maxlen: int) -> None:
        self._fanout = fanout
        self.buffer: deque[T] = deque(maxlen=maxlen)
        self.dropped = 0
        self._ready = asyncio.Event()

    def push(self, item: T) -> None:
        if len(self.buffer) == self.buffer.maxlen:
            self.dropped += 1
        self.buffer.append(item)
        self._ready.set()

    def drain(self) -> list[T]:
        items = list(self.buffer)
        self.buffer.clear()
        self._ready.clear()
        return items

    async def wait(self, timeout: float | None = None) -> list[T]:
        """Everything buffered, waiting up to `timeout` seconds for the first item."""
        if not self.buffer:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
        return self.drain()

    def close(self) -> None:
        self._fanout._subs.discard(self)

    def __enter__(self) -> Subscription[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fanout(Generic[T]):
    def __init__(self) -> None:
        self._subs: set[Subscription[T]] = set()

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subs)

    def subscribe(self, maxlen: int = 10_000) -> Subscription[T]:
        sub: Subscription[T] = Subscription(self, maxlen)
        self._subs.add(sub)
        return sub

    def emit(self, item: T) -> None:
        for sub in self._subs:
            sub.push(item)
