"""Results kept on disk until the manager confirms it stored them.

An append-only log (`results.log`): a line `R <result JSON>` when a result is stored, `A <[task,
attempt]>` when the manager confirmed it (or it expired). Each record is one `write()` to a file
opened for appending, so a proplet killed at any moment keeps every result it finished (the page
cache outlives the process; `fsync` also survives a power cut, at a disk flush per result), and a
broker that loses messages in a crash cannot lose results: they are sent again until acknowledged
(`control/manager/result_ack`). A record torn by a crash is the last line; it is skipped on load.

A log rather than a file per result: creating a file costs 350-800 µs of CPU on a typical VM's
ext4 (journal and directory updates) and more on flash, against ~1 µs for an append; it was the
largest single cost of a short task. The log is emptied (truncated) whenever every result in it is
confirmed, which under a steady flow of acknowledgements is most of the time, and rewritten with
only the waiting results when it has grown large with confirmed ones.

Bounded: at most `max_entries` results, weighing at most `max_bytes` together (each is held in
memory too, and one may carry 1 MiB of output). When the outbox is full the proplet refuses new
tasks (they go to another proplet) rather than drop a finished result.

Upstream's manager sends no acknowledgements. Until this proplet has seen one, or a start with
an attempt (which only this project's manager sends), results are sent once and entries expire
after `unconfirmed_ttl`, so an upstream manager is not flooded with repeats. Waiting for the first
acknowledgement alone lost a result resent on a reconnect before the manager had subscribed again
on a restarted broker: sent once, it was never sent again. That the manager acknowledges is
remembered on disk (`acks_seen`, an empty file), so a restarted proplet keeps sending its waiting
results until they are confirmed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from core import protocol
from core.protocol import InvalidMessage, ResultMessage

log = logging.getLogger(__name__)

LOG_NAME = "results.log"
ACKS_SEEN_NAME = "acks_seen"
_RESULT = b"R "
_ACK = b"A "
# Rewrite the log once it is this large and at least 4/5 of it is confirmed results.
COMPACT_AT_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class _Entry:
    result: ResultMessage
    size: int  # bytes of its record in the log
    sent_at: float
    written_at: float
    held: int = 0  # bytes of its record, whether or not the log holds it (what `max_bytes` bounds)


class Outbox:
    def __init__(self, directory: Path, *, max_entries: int = 100_000, max_bytes: int = 32 * 1024 * 1024,
                 resend_after: float = 5.0,
                 unconfirmed_ttl: float = 300.0, fsync: bool = False) -> None:
        self.directory = directory
        self.path = directory / LOG_NAME
        self.fsync = fsync
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.resend_after = resend_after
        self.unconfirmed_ttl = unconfirmed_ttl
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._log_bytes = 0
        self._live_bytes = 0
        self._held_bytes = 0
        self._torn = False
        self.acks_seen = (directory / ACKS_SEEN_NAME).exists()
        self.acknowledged = 0
        # Observable (tests, metrics): records that could not be written; the result is still sent.
        self.write_failures = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._load()
        self._fd = -1
        self._rewrite()

    # ------------------------------------------------------------------------------------
    # load and compaction

    def _load(self) -> None:
        now = time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            for number, line in enumerate(self.path.read_bytes().split(b"\n"), 1):
                if line:
                    self._replay(line, number, now)
        self._migrate_files(now)
        if self._entries:
            log.info("outbox holds %d results from before the restart; they will be sent again",
                     len(self._entries))

    def _replay(self, line: bytes, number: int, now: float) -> None:
        try:
            if line.startswith(_RESULT):
                result = protocol.decode_result(line[2:])
                self._entries[(result.task_id, result.attempt)] = _Entry(result, 0, 0.0, now)
                return
            if line.startswith(_ACK):
                task_id, attempt = orjson.loads(line[2:])
                self._entries.pop((task_id, attempt), None)
                return
            raise ValueError("unknown record")
        except (InvalidMessage, ValueError, TypeError) as exc:
            # A crash in the middle of a write leaves a torn last line; anything else is damage.
            log.warning("outbox %s line %d is unreadable and skipped: %s", self.path, number, exc)

    def _migrate_files(self, now: float) -> None:
        """Results left as one file each by proplets before the log (same directory)."""
        for path in sorted(self.directory.glob("*.json")):
            try:
                result = protocol.decode_result(path.read_bytes())
            except (OSError, InvalidMessage) as exc:
                log.warning("dropping unreadable outbox entry %s: %s", path.name, exc)
            else:
                self._entries.setdefault((result.task_id, result.attempt), _Entry(result, 0, 0.0, now))
            with contextlib.suppress(OSError):
                path.unlink()
        for tmp in self.directory.glob("*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _rewrite(self) -> None:
        """Replace the log with one holding only the waiting results (atomically: temp + rename)."""
        records = []
        for entry in self._entries.values():
            record = _RESULT + protocol.encode_result(entry.result) + b"\n"
            entry.size = entry.held = len(record)
            records.append(record)
        data = b"".join(records)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        self._log_bytes = self._live_bytes = self._held_bytes = len(data)

    def _compact(self) -> None:
        try:
            if not self._entries:
                # Everything confirmed: empty the file in place (no new file, no rename).
                os.ftruncate(self._fd, 0)
                self._log_bytes = self._live_bytes = 0
            elif self._log_bytes >= COMPACT_AT_BYTES and self._live_bytes * 5 <= self._log_bytes:
                self._rewrite()
        except OSError as exc:
            log.warning("could not compact the outbox %s: %s", self.path, exc)

    def _append(self, record: bytes) -> bool:
        if self._torn:
            # A failed write (disk full) may have left part of a record: end that line, so the
            # next record is not read as its continuation.
            record = b"\n" + record
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(self._fd, view):]
            if self.fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            self._torn = True
            self.write_failures += 1
            log.error("could not write to the outbox %s (%s): a result is kept in memory only", self.path, exc)
            return False
        self._torn = False
        self._log_bytes += len(record)
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------------------------
    # the outbox

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.max_entries or self._held_bytes >= self.max_bytes

    def task_ids(self) -> tuple[str, ...]:
        return tuple(task_id for task_id, _ in self._entries)

    def get(self, task_id: str, attempt: int) -> ResultMessage | None:
        entry = self._entries.get((task_id, attempt))
        return entry.result if entry is not None else None

    def put(self, result: ResultMessage) -> None:
        """Store a result durably before it is published."""
        record = _RESULT + protocol.encode_result(result) + b"\n"
        key = (result.task_id, result.attempt)
        previous = self._entries.get(key)
        if previous is not None:
            self._live_bytes -= previous.size
            self._held_bytes -= previous.held
        now = time.monotonic()
        size = len(record) if self._append(record) else 0
        self._entries[key] = _Entry(result, size, now, now, len(record))
        self._live_bytes += size
        self._held_bytes += len(record)

    def manager_acknowledges(self) -> None:
        """The manager acknowledges results (it sent one, or a start with an attempt, which only
        this project's manager sends): from now on results are sent again until confirmed."""
        if self.acks_seen:
            return
        self.acks_seen = True
        # Kept across restarts: results loaded from the log must still wait for their ack,
        # not expire after one send as they do for a manager that never acknowledges.
        try:
            (self.directory / ACKS_SEEN_NAME).touch()
        except OSError as exc:
            log.warning("could not record in %s that the manager acknowledges results: %s",
                        self.directory, exc)

    def ack(self, task_id: str, attempt: int) -> bool:
        """The manager stored this result: forget it. Returns False for an unknown entry."""
        self.manager_acknowledges()
        key = (task_id, attempt)
        entry = self._entries.pop(key, None)
        if entry is None and attempt == 0:
            # An ack without attempt (or for attempt 0) matches the task's only entry.
            key = next((k for k in self._entries if k[0] == task_id), key)
            entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.acknowledged += 1
        self._forget(key, entry)
        return True

    def _forget(self, key: tuple[str, int], entry: _Entry) -> None:
        self._live_bytes -= entry.size
        self._held_bytes -= entry.held
        if self._entries:
            self._append(_ACK + orjson.dumps(key) + b"\n")
        self._compact()

    def due(self, *, reconnected: bool = False) -> Iterator[ResultMessage]:
        """Results to send again now: all of them after a reconnect, else those unconfirmed for
        `resend_after` seconds. Without any acknowledgement seen, old entries expire instead."""
        now = time.monotonic()
        for key, entry in list(self._entries.items()):
            if not self.acks_seen:
                if now - entry.written_at > self.unconfirmed_ttl:
                    self._entries.pop(key, None)
                    self._forget(key, entry)
                    continue
                if not reconnected:
                    continue
            if reconnected or now - entry.sent_at >= self.resend_after:
                entry.sent_at = now
                yield entry.result
