"""Wall-clock deadlines and stop requests for running guests, through epoch interruption.

One ticker thread increments every engine's epoch each `tick_s` while at least one guest runs.
Each store gets an epoch deadline of one tick and a deadline callback (wasmtime-py wraps neither,
so the callback goes through its ctypes bindings). At each tick the callback looks at its task:
stopped or past its deadline => it returns an error, which unwinds the guest as a trap; otherwise
it extends the deadline by one tick. The callback is a single C function shared by all stores;
the store's `data` pointer carries a small integer that names the task's `Watch`.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import wasmtime
from wasmtime import _bindings as ffi

log = logging.getLogger(__name__)


class Reason(StrEnum):
    """Why the watchdog interrupted a guest."""

    STOPPED = "stopped"
    TIMEOUT = "timeout"
    # A guest run on the event loop reached the end of its slice (two ticks): it runs again on a thread.
    SLICE = "slice"


@dataclass(slots=True, eq=False)
class Watch:
    """The watchdog's view of one task run."""

    task_id: str
    deadline: float  # time.monotonic() value
    handle: int = 0
    stop_requested: bool = False
    # Set by the callback when it interrupted the guest; read by the runner after the trap.
    reason: Reason | None = None
    armed: bool = False
    # Interrupt at the second tick, whatever the deadline: a guest run on the event loop (the
    # first may come right after it started; the second comes one to two ticks after).
    slice_only: bool = False
    ticks: int = 0
    # For the task's metrics (WasmtimeRuntime.usage): the guest thread's CPU clock and its CPU
    # time when the run began; the guest's exported memory and its size as the callback last saw it
    # (read there, on the guest's thread, since a store may not be touched from another).
    cpu_clock: int | None = None
    cpu_at_start: float = 0.0
    began: float = 0.0  # time.monotonic() when the guest's run began
    memory: ffi.wasmtime_memory_t | None = None
    memory_bytes: int = 0


_CALLBACK_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ffi.wasmtime_update_deadline_kind_t),
)
_FINALIZER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_NO_FINALIZER = ctypes.cast(None, _FINALIZER_TYPE)

# handle -> Watch, read by the C callback. Handles are never reused, so a late callback for a
# finished run finds nothing and lets the guest continue to its (imminent) end.
_WATCHES: dict[int, Watch] = {}
_HANDLES = itertools.count(1)
_CONTINUE = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE


def _on_deadline(ctx: object, data: int | None, delta: ctypes._Pointer, kind: ctypes._Pointer) -> int:
    # Runs on the guest's thread at every tick; it must never raise (ctypes would print the
    # exception and return 0, which wasmtime reads as "continue" with garbage in `delta`).
    try:
        watch = _WATCHES.get(data or 0)
        if watch is not None:
            if watch.slice_only:
                watch.ticks += 1
                if watch.ticks >= 2:
                    watch.reason = Reason.SLICE
                    return _trap(b"the guest's slice on the event loop ended")
            if watch.stop_requested:
                watch.reason = Reason.STOPPED
                return _trap(b"task stopped by request")
            if time.monotonic() >= watch.deadline:
                watch.reason = Reason.TIMEOUT
                return _trap(b"task ran past its deadline")
            if watch.memory is not None:
                watch.memory_bytes = ffi.wasmtime_memory_data_size(ctx, ctypes.byref(watch.memory))
        delta[0] = 1
        kind[0] = _CONTINUE
        return 0
    except BaseException:  # pragma: no cover - defensive, see above
        delta[0] = 1
        kind[0] = _CONTINUE
        return 0


def _trap(message: bytes) -> int:
    err = ffi.wasmtime_error_new(message)
    return ctypes.cast(err, ctypes.c_void_p).value or 0


_CALLBACK = _CALLBACK_TYPE(_on_deadline)


class Watchdog:
    """The ticker thread plus the registry of running tasks."""

    def __init__(self, engines: Sequence[wasmtime.Engine], tick_s: float = 0.01) -> None:
        self._engines = list(engines)
        self._tick_s = tick_s
        self._by_task: dict[str, set[Watch]] = {}
        self._lock = threading.Lock()
        self._busy = threading.Condition(self._lock)
        self._armed = 0
        self._sleeping = False
        self._closed = False
        self._thread = threading.Thread(target=self._tick, name="wasm-epoch-ticker", daemon=True)
        self._thread.start()

    def register(self, task_id: str, timeout_s: float) -> Watch:
        """Track a run from the moment it is accepted (so a stop while it queues counts too)."""
        watch = Watch(task_id, time.monotonic() + timeout_s, next(_HANDLES))
        with self._lock:
            self._by_task.setdefault(task_id, set()).add(watch)
        return watch

    def slice_watch(self, task_id: str) -> Watch:
        """A watch for a guest run on the event loop: interrupted at the second tick (after one
        to two ticks), never registered (stop() cannot come while the loop runs the guest)."""
        return Watch(task_id, float("inf"), next(_HANDLES), slice_only=True)

    def restart_clock(self, watch: Watch, timeout_s: float) -> None:
        """The timeout counts guest time, not time spent waiting for a slot or a compile."""
        watch.deadline = time.monotonic() + timeout_s

    def arm(self, store: wasmtime.Store, watch: Watch) -> None:
        """Attach the deadline callback to a fresh store (call on the thread that will run it)."""
        ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), _CALLBACK, watch.handle, _NO_FINALIZER)
        store.set_epoch_deadline(1)
        if not watch.armed:
            watch.armed = True
            _WATCHES[watch.handle] = watch
            with self._lock:
                self._armed += 1
                if self._sleeping:
                    self._busy.notify()

    def disarm(self, watch: Watch) -> None:
        if watch.armed:
            watch.armed = False
            del _WATCHES[watch.handle]
            with self._lock:
                self._armed -= 1

    def unregister(self, watch: Watch) -> None:
        """Forget the run for stop(); the guest thread disarms its own store when it ends (a run
        abandoned by the loop may still be executing, and must still be interruptible)."""
        with self._lock:
            runs = self._by_task.get(watch.task_id)
            if runs is not None:
                runs.discard(watch)
                if not runs:
                    del self._by_task[watch.task_id]

    def stop(self, task_id: str) -> bool:
        """Ask every run of `task_id` to stop at the next tick; True if one was known."""
        with self._lock:
            runs = list(self._by_task.get(task_id, ()))
        for watch in runs:
            watch.stop_requested = True
        return bool(runs)

    def is_known(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._by_task

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._busy.notify()
        self._thread.join(timeout=1)

    def _tick(self) -> None:
        # Ticks while guests run and for a second after the last one, then sleeps until the next
        # arm(): an idle proplet does not wake 100 times a second, and a steady stream of short
        # tasks does not pay a thread wake-up each.
        idle_ticks = 0
        linger = max(1, int(1.0 / self._tick_s))
        while True:
            with self._lock:
                if self._closed:
                    return
                idle_ticks = 0 if self._armed else idle_ticks + 1
                if idle_ticks > linger:
                    self._sleeping = True
                    while not self._armed and not self._closed:
                        self._busy.wait()
                    self._sleeping = False
                    idle_ticks = 0
                    if self._closed:
                        return
            time.sleep(self._tick_s)
            for engine in self._engines:
                engine.increment_epoch()
