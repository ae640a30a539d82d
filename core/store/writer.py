"""Group commit in front of the store.

Every write goes through one queue; the writer loop takes whatever has accumulated while the
previous commit ran and applies it in one transaction. Under load a batch holds hundreds of state
transitions for the price of one commit; when idle a write commits at once. Order is preserved.

Callers choose whether to wait for durability: the REST API waits (a 201 means stored), the MQTT
handlers only wait for queue space (backpressure) and move on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.store.base import Store, StoreError, WriteOp

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    ops: Sequence[WriteOp]
    # None when nobody waits for this write (the hot path skips the future).
    future: asyncio.Future[None] | None = None
    # Run as soon as the write is committed, before any waiter resumes (see `enqueue`).
    then: Callable[[], None] | None = None


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    ops: int = 0
    largest_batch: int = 0
    failures: int = 0


def _consume(fut: asyncio.Future[None]) -> None:
    # Failures are logged by the writer; a caller that did not wait must not trigger
    # "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class StoreWriter:
    def __init__(self, store: Store, *, max_queue: int = 50_000, max_batch_ops: int = 2_000) -> None:
        self.store = store
        # Overflow policy: block. A full queue slows the producers (MQTT intake, the API) down
        # instead of dropping state transitions.
        self._queue: asyncio.Queue[_Entry] = asyncio.Queue(maxsize=max_queue)
        self._max_batch_ops = max_batch_ops
        # Entries handed to the queue and entries finished (committed or failed), both counted from
        # the start: the queue is FIFO, so `finished >= n` means the first n entries are done.
        self.queued_entries = 0
        self.finished_entries = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = WriterStats()

    @property
    def backlog(self) -> int:
        """Entries queued and not yet committed (or failed)."""
        return self.queued_entries - self.finished_entries

    async def enqueue(self, *ops: WriteOp, then: Callable[[], None] | None = None) -> asyncio.Future[None]:
        """Queue writes; return a future that resolves when they are committed.

        `then` runs right after the commit, before the waiters of this batch resume: the dispatcher
        sends a start from it, so the start leaves before the API call that queued the task (whose
        write shares the commit) gets to build its answer. It is not run if the write fails."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        await self._put(_Entry(ops, future, then))
        return future

    async def submit(self, *ops: WriteOp) -> None:
        """Queue writes nobody waits for (failures are logged). Waits only for queue space."""
        await self._put(_Entry(ops))

    async def _put(self, entry: _Entry) -> None:
        self.queued_entries += 1
        self._idle.clear()
        try:
            await self._queue.put(entry)
        except BaseException:  # cancelled while the queue was full: the entry never went in
            self.queued_entries -= 1
            if not self.backlog:
                self._idle.set()
            raise

    async def write(self, *ops: WriteOp) -> None:
        """Queue writes and wait until they are committed."""
        await (await self.enqueue(*ops))

    async def barrier(self) -> None:
        """Wait until every write queued before this call is committed (read-your-writes)."""
        await self.barrier_for(self.queued_entries)

    async def barrier_for(self, entries: int) -> None:
        """Wait until the first `entries` writes ever queued are committed (a no-op when they are)."""
        if self.finished_entries < entries:
            await self.write()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # One turn of the loop before taking the batch: writes made ready by the same event join
            # this commit instead of waiting a whole commit for the next one (a start's `pending`
            # and its dispatch's `scheduled`, which must be stored before the start goes out).
            await asyncio.sleep(0)
            size = len(batch[0].ops)
            while size < self._max_batch_ops and not self._queue.empty():
                entry = self._queue.get_nowait()
                batch.append(entry)
                size += len(entry.ops)
            await self._commit(batch)

    async def _commit(self, batch: list[_Entry]) -> None:
        ops = [op for entry in batch for op in entry.ops]
        try:
            if ops:
                await self.store.apply(ops)
        except asyncio.CancelledError:
            raise
        except Exception:
            if len(batch) == 1:
                self._fail(batch[0], ops)
            else:
                # Isolate the bad entry so one failing write does not lose the whole batch.
                for entry in batch:
                    try:
                        if entry.ops:
                            await self.store.apply(entry.ops)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        self._fail(entry, entry.ops)
                    else:
                        self._then(entry)
                        self._done(entry)
                self._after(batch, len(ops))
                return
        else:
            for entry in batch:
                self._then(entry)
            for entry in batch:
                self._done(entry)
        self._after(batch, len(ops))

    def _after(self, batch: list[_Entry], n_ops: int) -> None:
        self.stats.batches += 1
        self.stats.ops += n_ops
        self.stats.largest_batch = max(self.stats.largest_batch, n_ops)
        self.finished_entries += len(batch)
        if not self.backlog:
            self._idle.set()

    def _then(self, entry: _Entry) -> None:
        if entry.then is not None:
            try:
                entry.then()
            except Exception:
                log.exception("the action after a committed write failed")

    def _done(self, entry: _Entry) -> None:
        if entry.future is not None and not entry.future.done():
            entry.future.set_result(None)

    def _fail(self, entry: _Entry, ops: Sequence[WriteOp]) -> None:
        self.stats.failures += 1
        log.exception("store write failed (%d statements, first: %.80s)", len(ops), ops[0].sql if ops else "")
        if entry.future is not None and not entry.future.done():
            entry.future.set_exception(StoreError(f"the {self.store.dialect} store refused a write"))
