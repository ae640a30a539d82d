"""Batched point reads of tasks.

A task the manager no longer holds in memory is read back when it is started or looked at. One
query per read costs a round trip to the database (a thread hop with SQLite) each; when hundreds of
old tasks are started at once, that round trip dominates. Reads asked for while one query runs are
answered together by the next query, as the writer groups commits.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from core.domain import Task
from core.store.base import Store


@dataclass(slots=True)
class ReaderStats:
    queries: int = 0
    reads: int = 0
    largest_batch: int = 0


class TaskReader:
    def __init__(self, store: Store, *, max_batch: int = 500) -> None:
        self.store = store
        self._max_batch = max_batch
        # task id -> the reads waiting for it (the same task may be asked for twice).
        self._waiting: dict[str, list[asyncio.Future[Task | None]]] = {}
        self._reading: asyncio.Task[None] | None = None
        self.stats = ReaderStats()

    async def get(self, task_id: str) -> Task | None:
        """The stored task (without its module), or None when there is none. Each caller gets its own copy."""
        future: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(task_id, []).append(future)
        if self._reading is None:
            self._reading = asyncio.create_task(self._read_all(), name="task-reads")
        return await future

    async def _read_all(self) -> None:
        try:
            # One turn of the loop first: reads asked for by the same event join this query.
            await asyncio.sleep(0)
            while self._waiting:
                ids = list(self._waiting)[: self._max_batch]
                batch = {task_id: self._waiting.pop(task_id) for task_id in ids}
                try:
                    found = await self.store.get_tasks(ids)
                except Exception as exc:  # every waiter sees the store's error, as a lone read would
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                self.stats.queries += 1
                self.stats.reads += len(ids)
                self.stats.largest_batch = max(self.stats.largest_batch, len(ids))
                for task_id, futures in batch.items():
                    task = found.get(task_id)
                    for i, future in enumerate(futures):
                        if not future.done():
                            future.set_result(task if i == 0 or task is None else task.copy())
        finally:
            self._reading = None
            for futures in self._waiting.values():  # only when cancelled (shutdown)
                for future in futures:
                    future.cancel()
            self._waiting.clear()
