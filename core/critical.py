"""When the manager core has time-critical work in hand, for a host that shares its interpreter.

The console runs the core on a thread of its own, beside the thread that renders its frames, and both
share one GIL. Each time the core's work crosses a thread (to SQLite's thread and back), it has to
win the GIL back from a frame in progress: 0.3-0.4 ms a crossing on a 2-core
VM, so a start asked for during a frame left 2-4 ms later instead of 0.5 (docs/performance.md). The
core marks such work, and a host that listens (console.hosting.StandAside) stops its own thread until
the work is through.

Time-critical here: a start or a stop asked for, and a result received, each until what they queued
for the database is committed (the start leaves, the result is acknowledged, from that commit).
Headless, nobody listens, and a section costs a counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger("propeller.core")


class CriticalWorkListener(Protocol):
    """Told on the core's thread, in pairs: `began` when the core takes time-critical work up while
    it had none, `through` when that work and any begun meanwhile are done."""

    def began(self) -> None: ...

    def through(self) -> None: ...


class CriticalWork:
    """`with core.critical_work:` around the handling of a start, a stop or a result.

    `drained()` says whether the core's writes are all committed; `wait_drained()` waits until they
    may be. Once the last open section ends, the listener is told the work is through as soon as the
    writes are drained: a start leaves from its commit, which its section does not always wait for."""

    __slots__ = ("_busy", "_closed", "_depth", "_drained", "_settling", "_wait_drained", "_watch", "listener")

    def __init__(self, drained: Callable[[], bool], wait_drained: Callable[[], Awaitable[None]]) -> None:
        self.listener: CriticalWorkListener | None = None
        self._drained = drained
        self._wait_drained = wait_drained
        self._depth = 0
        self._busy = False  # `began` told and `through` not yet
        self._settling = False  # a look at whether the work is through is due on the next turn
        self._watch: asyncio.Task[None] | None = None
        self._closed = False  # the core is stopping: no more watches

    def __enter__(self) -> None:
        self._depth += 1
        if not self._busy and self.listener is not None:
            self._busy = True
            self._tell("began")

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if not self._depth and self._busy and not self._settling:
            # A turn later: what leaves once the work is stored (a result's acknowledgement) is sent
            # from callbacks of the commit, queued before this one.
            self._settling = True
            asyncio.get_running_loop().call_soon(self._settle)

    def _settle(self) -> None:
        self._settling = False
        if self._depth or not self._busy or self._watch is not None:
            return  # still in hand, or the watch tells it
        if self._drained() or self._closed:
            self._through()
        else:
            self._watch = asyncio.get_running_loop().create_task(self._through_once_drained())

    @property
    def busy(self) -> bool:
        return self._busy

    async def close(self) -> None:
        """Stop watching (the core is stopping); the listener is told the work is through."""
        self._closed = True
        watch = self._watch
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _through_once_drained(self) -> None:
        try:
            # The dispatcher queues a start's write a turn after the start's own, and acknowledgements
            # leave a turn after their commit: look again a turn later.
            while True:
                await self._wait_drained()
                await asyncio.sleep(0)
                if self._drained():
                    break
        finally:
            self._watch = None
            if not self._depth:  # otherwise the open section tells it when it ends
                self._through()

    def _through(self) -> None:
        self._busy = False
        self._tell("through")

    def _tell(self, what: str) -> None:
        listener = self.listener
        if listener is None:
            return
        try:
            getattr(listener, what)()
        except Exception:  # the host's failure must not fail a start or lose a result
            log.exception("the listener of time-critical work failed")
