"""Workflows and jobs: tasks that wait for other tasks (`depends_on`, `run_if`).

A workflow (POST /workflows) is a set of tasks sharing a `workflow_id`; nothing starts on its own:
the client starts the roots, and every dependent task starts, or is skipped, once all its
dependencies have finished. A job (POST /jobs) is a named set of tasks sharing a `job_id`, started
at once with POST /jobs/{id}/start: in `parallel` and `configurable` mode its tasks without
dependencies start together and the rest follow their dependencies; in `sequential` mode each task
starts once the one before it completed. A failed or interrupted task ends its job: what still runs
is stopped and what has not started is skipped. Runs again: a finished job started again has every
task reset to pending and runs from the start; a finished task of a workflow started again resets
the finished tasks downstream of it, in the commit that queues it, which then run (or are skipped)
again as their dependencies finish. Upstream starts finished tasks again too, but its coordinator
leaves finished dependents alone, so there a workflow's re-run stops at the task started.

Upstream's semantics (reference §6.8) with its defects fixed: `sequential` waits for each task
instead of starting them all at once; `run_if` is read in jobs too, in sequential ones as well (though
there a failed task ends the job first, so a `run_if: failure` dependent is skipped with the rest,
and a sequential job's task may depend only on tasks before it); a skipped task releases its
own dependents at once instead of at the next unrelated event; an unmet dependency on a manual
start is a 409 with the names of the tasks it waits for, not a 500; GET /jobs/{id} answers 200.
Dependencies are checked for existence and cycles when the tasks are created. A task whose turn comes
while it cannot be queued (the dispatch backlog is full, the database refuses the write) stays
pending and is tried again every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from core.domain import Task, TaskState
from core.errors import Conflict, CoreError, InvalidRequest, NotFound, Unavailable
from core.lifecycle import KeyedLocks
from core.store.base import StoreError

if TYPE_CHECKING:
    from core.service import ManagerCore

log = logging.getLogger(__name__)

# A task whose turn came while it could not be queued (the dispatch backlog full, the database
# refusing the write) is tried again after this long, for as long as that lasts.
RETRY_START_AFTER_S = 1.0


def validate_dag(tasks: Mapping[str, Task]) -> None:
    """Every dependency names a task of the same group, and there is no cycle (InvalidRequest)."""
    for task in tasks.values():
        for dep in task.depends_on:
            if dep == task.id:
                raise InvalidRequest(f"task {task.id} depends on itself")
            if dep not in tasks:
                group = f"workflow {task.workflow_id}" if task.workflow_id else f"job {task.job_id}"
                raise InvalidRequest(f"task {task.id} depends on {dep}, which is not a task of {group}")
            if tasks[dep].latent:
                raise InvalidRequest(f"task {task.id} depends on {dep}, a latent task: deployed, it never "
                                     "finishes (it waits for invocations until stopped), so "
                                     f"{task.id} would never start")
    # Kahn's algorithm: what cannot be ordered lies on a cycle or behind one.
    waiting = {t.id: len(set(t.depends_on)) for t in tasks.values()}
    dependents: dict[str, list[str]] = {}
    for task in tasks.values():
        for dep in set(task.depends_on):
            dependents.setdefault(dep, []).append(task.id)
    ready = [tid for tid, n in waiting.items() if n == 0]
    while ready:
        for dependent in dependents.get(ready.pop(), ()):
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                ready.append(dependent)
    stuck = sorted(tid for tid, n in waiting.items() if n > 0)
    if stuck:
        raise InvalidRequest(f"the dependencies form a cycle involving tasks {', '.join(stuck)}")


def validate_sequence(tasks: Iterable[Task]) -> None:
    """In a sequential job a task can depend only on tasks before it (InvalidRequest): one waiting
    for a later task would hold up the job for ever."""
    before: set[str] = set()
    latent = ""
    for task in tasks:
        if latent:
            raise InvalidRequest(f"task {latent} is latent: deployed, it never finishes, so in a sequential job "
                                 f"task {task.id} after it would never start; put it last, or run the job in parallel")
        latent = task.id if task.latent else ""
        later = [d for d in task.depends_on if d not in before]
        if later:
            raise InvalidRequest(f"task {task.id} depends on {', '.join(later)}, which comes after it; in a "
                                 "sequential job a task can depend only on tasks listed before it")
        before.add(task.id)


def verdict(task: Task, deps: Iterable[Task]) -> bool | None:
    """Whether a dependent task runs once its dependencies have finished: None while one has not,
    then True (run) or False (skip) by its `run_if`: `success` (the default) needs every dependency
    completed, `failure` needs one failed."""
    deps = list(deps)
    if not all(d.state.is_terminal for d in deps):
        return None
    if task.run_if == "failure":
        return any(d.state is TaskState.FAILED for d in deps)
    return all(d.state is TaskState.COMPLETED for d in deps)


def never_started(task: Task, core: ManagerCore) -> bool:
    """Pending and never queued: waiting for its dependencies, its job, or a first start."""
    return task.state is TaskState.PENDING and task.id not in core.active


class GroupCoordinator:
    """Advances workflows and jobs when one of their tasks finishes (called from the core's state
    transitions). One advance at a time per group; each is a task of its own, so a transition never
    waits for the tasks it releases."""

    def __init__(self, core: ManagerCore) -> None:
        self.core = core
        self._turns = KeyedLocks()
        self._running: set[asyncio.Task[None]] = set()
        self._stopping: dict[str, int] = {}
        self.advances = 0
        self.errors = 0
        self.unstartable = 0
        self.deferred_starts = 0
        self._retries: dict[tuple[str, str], asyncio.TimerHandle] = {}

    def finished(self, task: Task) -> None:
        """A task of a workflow or job reached a terminal state."""
        self._spawn(self.advance(task.workflow_id, task.job_id, task.id, task.state))

    def finished_group(self, workflow_id: str, job_id: str) -> None:
        """Look at a whole group again (after a restart: a dependency may have finished unseen)."""
        self._spawn(self.advance(workflow_id, job_id))

    def _spawn(self, advance: Coroutine[object, object, None]) -> None:
        work = asyncio.ensure_future(advance)
        self._running.add(work)
        work.add_done_callback(self._running.discard)

    async def settle(self) -> None:
        """Wait until no advance is in progress (those they cause included)."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    def _retry_later(self, workflow_id: str, job_id: str) -> None:
        """Look at the group again in a while (once, however many of its starts were refused)."""
        key = (workflow_id, job_id)
        if key not in self._retries:
            def retry() -> None:
                del self._retries[key]
                self.finished_group(workflow_id, job_id)
            self._retries[key] = asyncio.get_running_loop().call_later(RETRY_START_AFTER_S, retry)

    async def close(self) -> None:
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for work in list(self._running):
            work.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def turn(self, workflow_id: str = "", job_id: str = "") -> AsyncIterator[None]:
        """The group's turn: no advance of it runs meanwhile (a stop takes it, so that what it
        reads of the group is what it acts on)."""
        key = f"w:{workflow_id}" if workflow_id else f"j:{job_id}"
        async with self._turns.hold(key):
            yield

    @contextlib.contextmanager
    def stopping(self, job_id: str) -> Iterator[None]:
        """A job being stopped: an advance that has read the group already starts none of its tasks."""
        self._stopping[job_id] = self._stopping.get(job_id, 0) + 1
        try:
            yield
        finally:
            self._stopping[job_id] -= 1
            if self._stopping[job_id] == 0:
                del self._stopping[job_id]

    async def advance(self, workflow_id: str, job_id: str, finished_id: str = "",
                      finished_state: TaskState | None = None) -> None:
        try:
            async with self.turn(workflow_id, job_id):
                await self._advance(workflow_id, job_id, finished_id, finished_state)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.errors += 1
            log.exception("advancing %s after task %s finished failed", workflow_id or job_id, finished_id)

    async def _start_task(self, task: Task, *, dependencies_met: bool = False) -> None:
        task_id, workflow_id, job_id = task.id, task.workflow_id, task.job_id
        if job_id and job_id in self._stopping:
            return  # the stop skips it
        with _quietly():
            try:
                await self.core.start_task(task_id, dependencies_met=dependencies_met)
            except (Unavailable, StoreError) as exc:
                # Not now, but nothing about the task forbids it: it stays pending and its turn
                # comes again (dropping it would leave it, its job and its dependents waiting for ever).
                self.deferred_starts += 1
                log.warning("task %s of %s cannot be queued yet (%s); trying again in %.0f s", task_id,
                            job_id or workflow_id, exc, RETRY_START_AFTER_S)
                self._retry_later(workflow_id, job_id)
            except InvalidRequest as exc:
                # As it is it can never start (it has no module): failed, so that its job ends and
                # its dependents are released, instead of all of them waiting for ever.
                self.unstartable += 1
                log.warning("task %s of %s cannot start: %s", task_id, job_id or "its workflow", exc)
                await self.core.fail_unstarted(task_id, f"its turn came but it cannot start: {exc}")

    async def _advance(self, workflow_id: str, job_id: str, finished_id: str,
                       finished_state: TaskState | None) -> None:
        core = self.core
        self.advances += 1
        job = None if workflow_id else await core.store.get_job(job_id)
        ends_job = job is not None and finished_state in (TaskState.FAILED, TaskState.INTERRUPTED)
        if not ends_job and (job is None or job.execution_mode != "sequential"):
            # Only a dependent can be released: a group without one (a parallel job, say) is not
            # read whole each time one of its tasks finishes.
            await core.writer.barrier()
            if not await core.store.group_has_waiting_dependents(workflow_id=workflow_id, job_id=job_id):
                return
        tasks = await core.group_tasks(workflow_id=workflow_id, job_id=job_id)
        if ends_job:
            why = f"job {job_id} ended: its task {finished_id} {finished_state.label}"
            for task in tasks:
                if task.id in core.active:
                    with _quietly():
                        await core.stop_task(task.id)
                elif task.state is TaskState.PENDING:
                    with _quietly():
                        await core.skip_task(task.id, why)
            return
        by_id = {t.id: t for t in tasks}
        if job is not None and job.execution_mode == "sequential":
            previous: Task | None = None
            for task in tasks:
                if never_started(task, core):
                    # The first one is for start_job to start; each next one once the one before is done.
                    if previous is not None and previous.state in (TaskState.COMPLETED, TaskState.SKIPPED):
                        await self._release(task, by_id)
                    return
                if not task.state.is_terminal:
                    return  # this one is on its way
                previous = task
            return
        for task in tasks:
            if task.depends_on and never_started(task, core):
                await self._release(task, by_id)

    async def _release(self, task: Task, group: Mapping[str, Task]) -> None:
        """Start a waiting task, or skip it, by its dependencies (read from `group` just now)."""
        deps = [group[d] for d in task.depends_on if d in group]
        if len(deps) < len(task.depends_on):
            gone = sorted(set(task.depends_on) - group.keys())
            with _quietly():
                await self.core.skip_task(task.id, f"its dependencies {', '.join(gone)} were deleted")
            return
        run = verdict(task, deps)
        if run is None:
            return
        if run:
            # Its dependencies were just read from this group: start_task need not read them again.
            await self._start_task(task, dependencies_met=True)
        else:
            states = ", ".join(f"{d.id} {d.state.label}" for d in deps)
            wanted = "one to fail" if task.run_if == "failure" else "all to complete"
            with _quietly():
                await self.core.skip_task(task.id, f"run_if {task.run_if or 'success'}: wanted {wanted}, "
                                                   f"got {states}")


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """A start, stop or skip that another actor may have made moot meanwhile."""
    try:
        yield
    except (Conflict, NotFound) as exc:
        log.debug("workflow step not needed: %s", exc)
    except CoreError as exc:
        log.warning("workflow step failed: %s", exc)
