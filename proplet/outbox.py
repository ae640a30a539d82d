"""Results kept on disk until the manager confirms it stored them.

One file per result (`<task>.<attempt>.json`), written atomically (temp file, fsync, rename), so a
proplet killed at any moment keeps every result it finished, and a broker that loses messages in a
crash cannot lose results: they are sent again until acknowledged (`control/manager/result_ack`).

Bounded: at most `max_entries` results. When the outbox is full the proplet refuses new tasks
(they go to another proplet) rather than drop a finished result.

Upstream's manager sends no acknowledgements. Until this proplet has seen one, results are sent
once and entries expire after `unconfirmed_ttl`, so an upstream manager is not flooded with
repeats.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core import protocol
from core.protocol import InvalidMessage, ResultMessage

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    result: ResultMessage
    path: Path
    sent_at: float
    written_at: float


class Outbox:
    def __init__(self, directory: Path, *, max_entries: int = 100_000, resend_after: float = 5.0,
                 unconfirmed_ttl: float = 300.0, fsync: bool = False) -> None:
        self.directory = directory
        # The rename alone survives a killed process; fsync also survives a power cut, at the
        # price of a disk flush per result.
        self.fsync = fsync
        self.max_entries = max_entries
        self.resend_after = resend_after
        self.unconfirmed_ttl = unconfirmed_ttl
        self._entries: dict[tuple[str, int], _Entry] = {}
        self.acks_seen = False
        self.acknowledged = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        now = time.monotonic()
        for path in sorted(self.directory.glob("*.json")):
            try:
                result = protocol.decode_result(path.read_bytes())
            except (OSError, InvalidMessage) as exc:
                log.warning("dropping unreadable outbox entry %s: %s", path.name, exc)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            self._entries[(result.task_id, result.attempt)] = _Entry(result, path, 0.0, now)
        for tmp in self.directory.glob("*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        if self._entries:
            log.info("outbox holds %d results from before the restart; they will be sent again",
                     len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.max_entries

    def task_ids(self) -> tuple[str, ...]:
        return tuple(task_id for task_id, _ in self._entries)

    def get(self, task_id: str, attempt: int) -> ResultMessage | None:
        entry = self._entries.get((task_id, attempt))
        return entry.result if entry is not None else None

    def put(self, result: ResultMessage) -> None:
        """Store a result durably before it is published."""
        name = f"{_safe(result.task_id)}.{result.attempt}.json"
        path = self.directory / name
        tmp = path.with_suffix(".tmp")
        data = protocol.encode_result(result)
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        now = time.monotonic()
        self._entries[(result.task_id, result.attempt)] = _Entry(result, path, now, now)

    def ack(self, task_id: str, attempt: int) -> bool:
        """The manager stored this result: forget it. Returns False for an unknown entry."""
        self.acks_seen = True
        entry = self._entries.pop((task_id, attempt), None)
        if entry is None and attempt == 0:
            # An ack without attempt (or for attempt 0) matches the task's only entry.
            key = next((k for k in self._entries if k[0] == task_id), None)
            entry = self._entries.pop(key) if key is not None else None
        if entry is None:
            return False
        self.acknowledged += 1
        with contextlib.suppress(OSError):
            entry.path.unlink()
        return True

    def due(self, *, reconnected: bool = False) -> Iterator[ResultMessage]:
        """Results to send again now: all of them after a reconnect, else those unconfirmed for
        `resend_after` seconds. Without any acknowledgement seen, old entries expire instead."""
        now = time.monotonic()
        for key, entry in list(self._entries.items()):
            if not self.acks_seen:
                if now - entry.written_at > self.unconfirmed_ttl:
                    self._entries.pop(key, None)
                    with contextlib.suppress(OSError):
                        entry.path.unlink()
                    continue
                if not reconnected:
                    continue
            if reconnected or now - entry.sent_at >= self.resend_after:
                entry.sent_at = now
                yield entry.result


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:128]
