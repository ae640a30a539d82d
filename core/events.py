"""Fan-out to subscribers (the console, tests), each with its own bounded buffer.

Used for core events and for the MQTT traffic tap. A subscriber may read from another thread's event
loop than the one that emits (the console runs the core on a thread of its own): buffers are deques,
whose append and popleft are atomic, and a push from a foreign thread wakes the reader through its
own loop, once per drained batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
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
        self._reader_thread = threading.get_ident()
        try:
            self._reader_loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._reader_loop = None
        self._wake_sent = False

    def push(self, item: T) -> None:
        if len(self.buffer) == self.buffer.maxlen:
            self.dropped += 1
        self.buffer.append(item)
        if threading.get_ident() == self._reader_thread:
            self._ready.set()
        elif not self._wake_sent and self._reader_loop is not None:
            self._wake_sent = True
            with contextlib.suppress(RuntimeError):  # the reader's loop has closed: nobody is waiting
                self._reader_loop.call_soon_threadsafe(self._ready.set)

    def drain(self) -> list[T]:
        self._wake_sent = False
        self._ready.clear()
        # popleft, not list() then clear(): a push from another thread in between would be lost.
        items: list[T] = []
        take = self.buffer.popleft
        with contextlib.suppress(IndexError):
            while True:
                items.append(take())
        return items

    async def wait(self, timeout: float | None = None) -> list[T]:
        """Everything buffered, waiting up to `timeout` seconds for the first item."""
        if not self.buffer:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
        return self.drain()

    def close(self) -> None:
        self._fanout.unsubscribe(self)

    def __enter__(self) -> Subscription[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fanout(Generic[T]):
    def __init__(self) -> None:
        # Replaced, never changed in place: emit() may run on another thread than (un)subscribe.
        self._subs: frozenset[Subscription[T]] = frozenset()

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subs)

    def subscribe(self, maxlen: int = 10_000, *, kind: type[Subscription[T]] = Subscription) -> Subscription[T]:
        """A new subscription; `kind` is a Subscription subclass for a reader that must see each item
        as it is emitted (a benchmark stamping the moment an event leaves the core)."""
        sub = kind(self, maxlen)
        self._subs = self._subs | {sub}
        return sub

    def unsubscribe(self, sub: Subscription[T]) -> None:
        self._subs = self._subs - {sub}

    def emit(self, item: T) -> None:
        for sub in self._subs:
            sub.push(item)
