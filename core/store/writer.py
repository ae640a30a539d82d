"""Group commit in front of the store.

Every write goes through one queue; the writer loop takes whatever has accumulated while the
previous commit ran and applies it in one transaction. Under load a batch holds hundreds of state
transitions for the price of one commit; when idle a write commits at once. Order is preserved.

Callers choose whether to wait for durability: the REST API waits (a 201 means stored), the MQTT
handlers only wait for queue space (backpressure) and move on.

A database that cannot be reached (server restarting, connection lost: `Store.is_transient`) loses
nothing: the batch is tried again, in order, with a capped backoff, until it commits; the queue
fills meanwhile and then holds producers back. A write someone waits for is given up after
`awaited_patience` seconds of such an outage: its caller gets `StoreUnavailable` (the REST API
answers 503) and handles it as a refused write, and its statements are not applied later. A write
whose COMMIT was under way when the connection was lost may be stored: it is not given up, its
caller waits until a retry settles it. A write
the database refuses (a constraint, a trigger) fails alone: the rest of its batch commits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.store.base import CommitInDoubt, Store, StoreError, StoreUnavailable, WriteOp, causes

# Retrying a batch the database could not take: 0.1 s, doubling, at most 2 s between attempts.
RETRY_FIRST = 0.1
RETRY_MAX = 2.0

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    ops: Sequence[WriteOp]
    # None when nobody waits for this write (the hot path skips the future).
    future: asyncio.Future[None] | None = None
    # Run as soon as the write is committed, before any waiter resumes (see `enqueue`).
    then: Callable[[], None] | None = None
    queued_at: float = 0.0
    # Given up during an outage (its caller was told): skipped, never applied.
    abandoned: bool = False
    # Its batch's COMMIT was under way when the connection was lost, so it may be stored: never
    # given up (its caller would be told "not stored"); a retry settles it.
    in_doubt: bool = False


@dataclass(slots=True)
class WriterStats:
    batches: int = 0
    ops: int = 0
    largest_batch: int = 0
    # Writes the database refused.
    failures: int = 0
    # Times the database became unreachable, batches tried again meanwhile, awaited writes given up.
    outages: int = 0
    retries: int = 0
    abandoned: int = 0
    longest_outage_s: float = 0.0


def _consume(fut: asyncio.Future[None]) -> None:
    # Failures are logged by the writer; a caller that did not wait must not trigger
    # "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


def _finished(entry: _Entry) -> bool:
    return entry.future is None or entry.future.done()


class StoreWriter:
    def __init__(self, store: Store, *, max_queue: int = 50_000, max_batch_ops: int = 2_000,
                 awaited_patience: float = 10.0) -> None:
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
        self._awaited_patience = awaited_patience
        # Entries with a future, oldest first, until they finish: those an outage has kept waiting
        # longer than the patience are given up.
        self._awaited: deque[_Entry] = deque()
        # monotonic time the current outage began, and what the database said; None when reachable.
        self.unreachable_since: float | None = None
        self.unreachable_reason = ""

    @property
    def reachable(self) -> bool:
        """False from a write failing because the database cannot be reached until one commits."""
        return self.unreachable_since is None

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
        entry = _Entry(ops, future, then, time.monotonic())
        await self._put(entry)
        self._awaited.append(entry)
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
        taken = len(batch)
        batch, n_ops, refused = await self._apply(batch)
        if refused is None:
            for entry in batch:
                self._then(entry)
            for entry in batch:
                self._done(entry)
        elif len(batch) == 1:
            self._fail(batch[0], batch[0].ops, refused)
        else:
            # Isolate the bad entry so one failing write does not lose the whole batch.
            for entry in batch:
                alone, _, refused = await self._apply([entry])
                if not alone:
                    continue  # given up during an outage meanwhile
                if refused is not None:
                    self._fail(entry, entry.ops, refused)
                else:
                    self._then(entry)
                    self._done(entry)
        self._after(taken, n_ops)

    async def _apply(self, batch: list[_Entry]) -> tuple[list[_Entry], int, Exception | None]:
        """Apply the entries' writes in one transaction, again and again while the database cannot be
        reached, leaving out entries given up meanwhile. Returns the entries tried last, their number
        of statements, and what the database refused them with (None: stored)."""
        delay = RETRY_FIRST
        while True:
            batch = [entry for entry in batch if not entry.abandoned]
            ops = [op for entry in batch for op in entry.ops]
            if not ops:
                return batch, 0, None
            try:
                await self.store.apply(ops)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.store.is_transient(exc):
                    if any(isinstance(e, CommitInDoubt) for e in causes(exc)):
                        for entry in batch:
                            entry.in_doubt = True
                    await self._wait_out(exc, delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                self._back()
                return batch, len(ops), exc
            self._back()
            return batch, len(ops), None

    async def _wait_out(self, exc: Exception, delay: float) -> None:
        """The database could not take a batch: note the outage (logged once), wait, give up the
        awaited writes it has held up too long."""
        now = time.monotonic()
        reason = str(exc) or type(exc).__name__
        if self.unreachable_since is None:
            self.unreachable_since = now
            self.stats.outages += 1
            log.warning("the database is unreachable (%s: %s); %d writes wait and are retried until it is "
                        "back", self.store.description, reason, self.backlog)
            log.debug("the write that found the database unreachable", exc_info=exc)
        else:
            self.stats.retries += 1
        self.unreachable_reason = reason
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            log.error("stopped while the database was unreachable: %d writes were not stored", self.backlog)
            raise
        self._give_up_overdue()

    def _give_up_overdue(self) -> None:
        now = time.monotonic()
        overdue = now - self._awaited_patience
        given_up = 0
        kept: list[_Entry] = []
        while self._awaited and (_finished(self._awaited[0]) or self._awaited[0].queued_at <= overdue):
            entry = self._awaited.popleft()
            if _finished(entry):
                continue
            if entry.in_doubt:
                kept.append(entry)
                continue
            assert entry.future is not None
            entry.abandoned = True
            given_up += 1
            entry.future.set_exception(StoreUnavailable(
                f"The database ({self.store.description}) has been unreachable for "
                f"{now - (self.unreachable_since or now):.0f} s ({self.unreachable_reason}); this change was "
                "not stored. Try again once it is back: the manager reconnects by itself."))
        self._awaited.extendleft(reversed(kept))
        if given_up:
            self.stats.abandoned += given_up
            log.warning("gave up %d writes whose callers waited %.0f s for the unreachable database; they "
                        "were told, and are not stored", given_up, self._awaited_patience)

    def _back(self) -> None:
        """The database answered: an outage, if one was under way, is over."""
        if self.unreachable_since is None:
            return
        lasted = time.monotonic() - self.unreachable_since
        self.stats.longest_outage_s = max(self.stats.longest_outage_s, lasted)
        self.unreachable_since = None
        self.unreachable_reason = ""
        log.warning("the database is reachable again after %.1f s; the writes held meanwhile are being stored "
                    "(%d waiting)", lasted, self.backlog)

    def _after(self, entries: int, n_ops: int) -> None:
        self.stats.batches += 1
        self.stats.ops += n_ops
        self.stats.largest_batch = max(self.stats.largest_batch, n_ops)
        self.finished_entries += entries
        while self._awaited and _finished(self._awaited[0]):
            self._awaited.popleft()
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

    def _fail(self, entry: _Entry, ops: Sequence[WriteOp], refusal: Exception) -> None:
        self.stats.failures += 1
        # Not log.exception: this runs after the except block, where it logged "NoneType: None".
        log.error("store write failed (%d statements, first: %.80s)", len(ops), ops[0].sql if ops else "",
                  exc_info=refusal)
        if entry.future is not None and not entry.future.done():
            entry.future.set_exception(StoreError(f"the {self.store.dialect} store refused a write"))
