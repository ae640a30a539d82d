"""Stopping background tasks with a bound, so a stuck one cannot hang a shutdown; and locks taken by key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Hashable, Iterable

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], *, timeout: float = 10.0, owner: str = "") -> None:
    """Cancel `tasks` and wait for them, at most `timeout` seconds; name the ones that did not end."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return
    done, still = await asyncio.wait(pending, timeout=timeout)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s: %s ended with %r while stopping", owner, task.get_name(), task.exception())
    if still:
        log.warning("%s: %s did not stop within %.0f s; leaving them", owner,
                    ", ".join(t.get_name() for t in still), timeout)


class KeyedLocks:
    """One asyncio.Lock per key, made when first wanted and dropped once nobody holds or waits for it
    (keys are task or group ids: a lock per id ever seen would grow without bound)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._users: dict[Hashable, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock = self._locks.get(key)
        if lock is None:  # not setdefault: that would build a lock on every call, a start's hot path
            lock = self._locks[key] = asyncio.Lock()
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]
