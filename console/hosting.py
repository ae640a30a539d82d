"""How the console reaches the manager core it hosts.

`propeller` runs the core on a thread of its own with its own event loop (`CoreThread`), so that
rendering a frame (5-30 ms of Python under a traffic flood) does not hold up a dispatch for the whole
frame: the core takes the GIL back within a switch interval. It still has to take it back at each
crossing between threads, so while the core has a start or a result in hand the console's thread
stands aside (`StandAside`). Everything the console asks
of the core goes through `ManagerLink`, which runs the call on the core's loop and hands the result
back to the console's loop. Tests that build the core on their own loop give the console a link
without a thread (`ManagerLink(core)`), so the same console code serves both.

Event and traffic subscriptions (core.events.Subscription) are safe to read from the console's loop
whichever thread feeds them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from console.rounds import RoundRow, RoundsView, UpdateRow
    from core.config import ManagerSettings
    from core.domain import Proplet, PropletMetrics, Task, TaskEvent, TaskMetrics, TaskState
    from core.events import Subscription
    from core.mqtt import TrafficRecord
    from core.schemas import TaskCreate
    from core.service import CoreStatus, ManagerCore
    from core.store.base import Page

log = logging.getLogger("propeller.console")

T = TypeVar("T")

# How long a thread may hold the GIL while another waits for it (CPython's default is 5 ms). The core's
# thread wakes for each MQTT message; a shorter slice lets it in sooner while the console renders.
GIL_SWITCH_INTERVAL = 0.0002

# StandAside: the signal that asks the console's thread to stand aside, the longest it waits for the
# core each time, and the share of its time it may spend waiting, per window (a core busy without a
# break, dispatching a thousand tasks a second, must not freeze the screen).
STAND_ASIDE_SIGNAL = getattr(signal, "SIGUSR2", None)
STAND_ASIDE_MAX_WAIT = 0.005
STAND_ASIDE_WINDOW = 0.1
STAND_ASIDE_MAX_SHARE = 0.2


@dataclass(frozen=True, slots=True)
class CoreSnapshot:
    """What the console shows of the core's in-memory state, read in one call on the core's loop."""

    status: CoreStatus
    proplets: list[Proplet] | None  # None when not asked for
    running: dict[str, list[str]]  # proplet id -> ids of the tasks it runs


class ManagerLink:
    """The console's calls into the manager core, each run on the core's event loop.

    `loop` is the core's loop when the core runs on another thread; None when it shares the caller's.
    The settings, topics and broker address are fixed once the core has started and are read directly.
    """

    def __init__(self, core: ManagerCore, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.core = core
        self.loop = loop
        self.settings = core.settings
        self.topics = core.topics
        self.broker_address = core.broker_address
        self.store_description = core.store.description
        # Shown until the console's first read of the core (made on the core's thread when threaded).
        self.status_at_start = core.status()

    @property
    def threaded(self) -> bool:
        return self.loop is not None

    async def on_core(self, function: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """`await function(*args, **kwargs)` on the core's loop."""
        if self.loop is None:
            return await function(*args, **kwargs)
        future = asyncio.run_coroutine_threadsafe(function(*args, **kwargs), self.loop)
        return await asyncio.wrap_future(future)

    # ---- tasks --------------------------------------------------------------------------

    async def create_task(self, body: TaskCreate) -> Task:
        return await self.on_core(self.core.create_task, body)

    async def start_task(self, task_id: str) -> Task:
        return await self.on_core(self.core.start_task, task_id)

    async def stop_task(self, task_id: str) -> Task:
        return await self.on_core(self.core.stop_task, task_id)

    async def invoke_task(self, task_id: str, inputs: list[str]) -> str:
        return await self.on_core(self.core.invoke_task, task_id, inputs, {})

    async def delete_task(self, task_id: str) -> None:
        await self.on_core(self.core.delete_task, task_id)

    async def get_task(self, task_id: str) -> Task:
        return await self.on_core(self.core.get_task, task_id)

    async def get_tasks(self, task_ids: list[str]) -> tuple[list[Task], list[str]]:
        """The tasks that exist, and the ids that do not: one trip to the core for a batch."""
        return await self.on_core(self._get_tasks, task_ids)

    async def _get_tasks(self, task_ids: list[str]) -> tuple[list[Task], list[str]]:
        from core.errors import NotFound

        found: list[Task] = []
        missing: list[str] = []
        for task_id in task_ids:
            try:
                found.append(await self.core.get_task(task_id))
            except NotFound:
                missing.append(task_id)
        return found, missing

    async def list_tasks(self, *, offset: int = 0, limit: int = 100,
                         states: list[TaskState] | None = None) -> Page[Task]:
        return await self.on_core(self.core.list_tasks, offset=offset, limit=limit, states=states)

    async def task_events(self, task_id: str) -> list[TaskEvent]:
        return await self.on_core(self.core.task_events, task_id)

    async def latest_task_metrics(self, task_id: str) -> TaskMetrics | None:
        page = await self.on_core(self.core.task_metrics, task_id, 0, 1)
        return page.items[0] if page.items else None

    async def count_tasks_by_state(self) -> dict[TaskState, int]:
        return await self.on_core(self.core.store.count_tasks_by_state)

    # ---- proplets -----------------------------------------------------------------------

    async def delete_proplet(self, proplet_id: str) -> None:
        await self.on_core(self.core.delete_proplet, proplet_id)

    async def proplet_metrics(self, proplet_id: str, offset: int, limit: int) -> Page[PropletMetrics]:
        return await self.on_core(self.core.proplet_metrics, proplet_id, offset, limit)

    async def snapshot(self, *, proplets: bool) -> CoreSnapshot:
        """Status, running tasks per proplet and (with `proplets`) the proplet list, read together."""
        return await self.on_core(self._snapshot, proplets)

    async def _snapshot(self, proplets: bool) -> CoreSnapshot:
        core = self.core
        listed = core.list_proplets() if proplets else None
        running = {pid: tasks for pid in core.proplets if (tasks := core.running_tasks(pid))}
        return CoreSnapshot(core.status(), listed, running)

    # ---- federated learning -------------------------------------------------------------

    async def fl_rounds(self, limit: int) -> RoundsView:
        """The newest rounds (with their update counts) and the models, copied on the core's loop."""
        return await self.on_core(self._fl_rounds, limit)

    async def _fl_rounds(self, limit: int) -> RoundsView:
        from console.rounds import ModelRow, RoundRow, RoundsView

        fl = self.core.federated
        if fl.remote is not None:
            return RoundsView(0, (), (), self.core.settings.coordinator_url)
        total, rounds = await fl.round_summaries(limit)
        models = await fl.models()
        return RoundsView(total, tuple(RoundRow.of(r, n) for r, n in rounds),
                          tuple(ModelRow(v, round_id, at) for v, round_id, at in models), "")

    async def fl_round(self, round_id: str) -> tuple[RoundRow, list[UpdateRow], int | None]:
        """A round, its updates, and the newest model version stored."""
        return await self.on_core(self._fl_round, round_id)

    async def _fl_round(self, round_id: str) -> tuple[RoundRow, list[UpdateRow], int | None]:
        from console.rounds import RoundRow, UpdateRow

        fl = self.core.federated
        r, updates = await fl.get_round(round_id)
        return RoundRow.of(r, len(updates)), [UpdateRow.of(u) for u in updates], fl.newest_model

    async def start_round(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /fl/experiments from the console: validated as the API validates it (InvalidRequest).
        Not cancelled with its caller: a round cut off half-way would hold no tasks until its deadline."""
        return await asyncio.shield(self.on_core(self._start_round, body))

    async def _start_round(self, body: dict[str, Any]) -> dict[str, Any]:
        from pydantic import ValidationError

        from core.errors import InvalidRequest
        from core.schemas import ExperimentConfig, format_validation_error

        try:
            config = ExperimentConfig.model_validate(body)
        except ValidationError as exc:
            raise InvalidRequest(format_validation_error(exc)) from None
        return await self.core.federated.configure(config)

    # ---- streams ------------------------------------------------------------------------

    def subscribe_events(self, maxlen: int) -> Subscription[Any]:
        return self.core.events.subscribe(maxlen)

    def subscribe_traffic(self, maxlen: int) -> Subscription[TrafficRecord] | None:
        bus = self.core.bus
        return bus.tap.subscribe(maxlen) if bus is not None else None


class StandAside:
    """The console's thread stops while the core it hosts has time-critical work in hand.

    Both threads share one GIL, and the core's work crosses threads (to SQLite's thread and back):
    each crossing during a frame (5-30 ms of Python under a traffic flood) waited 0.3-0.4 ms for the
    GIL, and a start dispatched meanwhile left 2-4 ms after it was asked for instead of 0.5. A
    shorter switch interval did not help: each handover costs a thread wake-up too.

    The core says when such work begins and when it is through (core.critical, on its own thread).
    If this thread is waiting for events in its loop's selector then, it looks on waking and waits
    for the core before it does anything. If it is running (a frame), the core sends it a signal:
    CPython runs the handler between two bytecodes of the main thread, in the middle of a frame too,
    and the handler waits. A wait ends when the core is through, after STAND_ASIDE_MAX_WAIT at the
    latest, and waits stop for the rest of a window once they took STAND_ASIDE_MAX_SHARE of it.

    Installed only from the main thread (where handlers run), with the signal free, on a selector
    event loop; otherwise the console runs as before. `close()` only once the core's thread has
    ended: a signal sent with no handler would end the process."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._gate = threading.Event()  # set: nothing to stand aside for
        self._gate.set()
        self._main = threading.main_thread().ident
        self._selector: Any = getattr(loop, "_selector", None)  # asyncio's selector loops (private, stable)
        self._previous_handler: Any = None
        self._installed = False
        self._waiting = False  # in a wait: a signal arriving meanwhile has nothing to add
        self._selecting = False  # this thread waits in its loop's selector: no signal needed
        self._window_start = 0.0
        self._window_waited = 0.0
        self.waits = 0
        self.waited_s = 0.0
        self.signals = 0
        self.skipped = 0  # began while the share of the window was spent

    def install(self) -> bool:
        if (STAND_ASIDE_SIGNAL is None or not hasattr(signal, "pthread_kill") or self._selector is None
                or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(STAND_ASIDE_SIGNAL) not in (signal.SIG_DFL, None)):
            log.debug("the console does not stand aside for the core here (no free signal, not the main "
                      "thread, or not a selector event loop)")
            return False
        self._previous_handler = signal.signal(STAND_ASIDE_SIGNAL, self._on_signal)
        select = self._selector.select

        def select_then_stand_aside(timeout: float | None = None) -> Any:
            self._selecting = True
            try:
                return select(timeout)
            finally:
                self._selecting = False
                if not self._gate.is_set():
                    self._stand_aside()

        self._selector.select = select_then_stand_aside
        self._installed = True
        return True

    def close(self, *, core_thread_ended: bool) -> None:
        """The selector as it was, and the signal's handler too once the core's thread has ended; while
        it may still run (the console gave up waiting for it), the signal is ignored instead."""
        if not self._installed:
            return
        self._installed = False
        self._gate.set()
        del self._selector.select  # the selector's own method again
        signal.signal(STAND_ASIDE_SIGNAL, self._previous_handler if core_thread_ended else signal.SIG_IGN)

    # ---- on the core's thread (core.critical.CriticalWorkListener) ----

    def began(self) -> None:
        if not self._installed:
            return
        now = time.monotonic()
        if now - self._window_start >= STAND_ASIDE_WINDOW:
            self._window_start = now
            self._window_waited = 0.0
        elif self._window_waited >= STAND_ASIDE_WINDOW * STAND_ASIDE_MAX_SHARE:
            self.skipped += 1
            return
        self._gate.clear()
        # Read after the gate is closed: a selector returning meanwhile sees it closed.
        if not self._selecting:
            self.signals += 1
            signal.pthread_kill(self._main, STAND_ASIDE_SIGNAL)

    def through(self) -> None:
        self._gate.set()

    # ---- on the console's thread ----

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._gate.is_set():
            self._stand_aside()

    def _stand_aside(self) -> None:
        if self._waiting:
            return
        self._waiting = True
        started = time.monotonic()
        try:
            self._gate.wait(STAND_ASIDE_MAX_WAIT)
        finally:
            waited = time.monotonic() - started
            self._window_waited += waited
            self.waited_s += waited
            self.waits += 1
            self._waiting = False


class CoreThread:
    """`async with CoreThread(settings) as link`: the manager core started on its own thread and loop,
    stopped (cleanly, as `propeller serve` stops) when the block ends. A start-up failure (database or
    broker unreachable) is raised here, in the caller's thread. If the core shuts itself down while
    the block runs (a background loop of it failed), `on_core_closed` is called on the caller's loop."""

    def __init__(self, settings: ManagerSettings, on_core_closed: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_core_closed = on_core_closed
        self._caller_loop: asyncio.AbstractEventLoop | None = None
        self._started: concurrent.futures.Future[ManagerLink] = concurrent.futures.Future()
        self._finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving: asyncio.Task[None] | None = None
        self._abandoned = False  # the caller stopped waiting for the start (Ctrl+C): give it up
        self._thread = threading.Thread(target=self._run, name="propeller-core", daemon=True)
        self._switch_interval = sys.getswitchinterval()
        self.stand_aside: StandAside | None = None

    async def __aenter__(self) -> ManagerLink:
        self._caller_loop = asyncio.get_running_loop()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        stand_aside = StandAside(self._caller_loop)
        if stand_aside.install():
            self.stand_aside = stand_aside
        self._thread.start()
        try:
            # Shielded: cancelling the wait (Ctrl+C) must not cancel the future the core's thread
            # still has to complete.
            started = asyncio.wrap_future(self._started)
            return await asyncio.shield(started)
        except BaseException:
            # A start still under way (a database that accepts the connection and never answers
            # keeps it for a minute) is cancelled, not waited for: Ctrl+C was otherwise ignored until
            # the start gave up by itself. A start that failed has ended already.
            self._abandon_start()
            with contextlib.suppress(BaseException):  # the start's own outcome; ours is raised below
                await asyncio.shield(asyncio.wrap_future(self._finished))
            with contextlib.suppress(BaseException):  # taken, so that it is not logged as never retrieved
                await started
            self._thread.join()
            self._restore()
            raise

    async def __aexit__(self, *exc: object) -> None:
        try:
            self._request_stop()
            await asyncio.wrap_future(self._finished)
            self._thread.join()  # the future is its last act: returns at once
        finally:
            self._restore()

    def _restore(self) -> None:
        sys.setswitchinterval(self._switch_interval)
        if self.stand_aside is not None:
            self.stand_aside.close(core_thread_ended=not self._thread.is_alive())

    def stop_and_wait(self, timeout: float) -> bool:
        """Stop the core from any thread and wait for it; True once it has stopped. For the console's
        hang-up backstop, whose UI thread may be stuck writing to a terminal that is gone."""
        self._request_stop()
        try:
            self._finished.result(timeout)
        except concurrent.futures.TimeoutError:
            return False
        except Exception:  # a failed shutdown was logged by the core; it has ended
            return True
        return True

    def _request_stop(self) -> None:
        """Ask the core's loop to stop the core (safe from any thread, and more than once)."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the core already ended on its own
                self._loop.call_soon_threadsafe(self._stop.set)

    def _abandon_start(self) -> None:
        """Cancel the core's start from the caller's thread (safe however far the thread has got: a
        start not yet on its loop sees the flag, one on it is cancelled there)."""
        self._abandoned = True
        loop, serving = self._loop, self._serving
        if loop is not None and serving is not None:
            with contextlib.suppress(RuntimeError):  # the core's loop has ended already
                loop.call_soon_threadsafe(serving.cancel)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            if self._started.done():
                self._finished.set_exception(exc)  # raised by __aexit__
            else:
                self._started.set_exception(exc)  # raised by __aenter__
                self._finished.set_result(None)
        else:
            self._finished.set_result(None)

    async def _serve(self) -> None:
        from core.service import ManagerCore

        self._stop = asyncio.Event()
        self._serving = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        if self._abandoned:
            raise asyncio.CancelledError
        async with ManagerCore(self.settings) as core:
            core.critical_work.listener = self.stand_aside
            self._started.set_result(ManagerLink(core, self._loop))
            stopping = asyncio.ensure_future(self._stop.wait())
            closed = asyncio.ensure_future(core.wait_closed())
            await asyncio.wait({stopping, closed}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            closed.cancel()
            if not self._stop.is_set() and self.on_core_closed is not None and self._caller_loop is not None:
                log.error("the manager core shut itself down (see the error above); closing the console")
                with contextlib.suppress(RuntimeError):  # the console has closed meanwhile
                    self._caller_loop.call_soon_threadsafe(self.on_core_closed)
