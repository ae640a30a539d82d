"""The in-process runtime: wasmtime-py, one sandboxed Store per task, guests on worker threads.

Threading: the asyncio loop only schedules. Compiles and deserializations run on a small compile
pool, guests on a task pool of `max_concurrent` threads (wasm calls release the GIL in ctypes).
Each run gets its own Store with a memory limit (for components, applied by the memories the
proplet allocates for them, memories.py), an epoch deadline watched by `Watchdog`
(wall-clock timeout and `stop()`), fuel only when the task asks for a budget (fuel makes code
about 40 % slower, so those tasks use a second Engine), and bounded stdout/stderr captures.

Compiled modules are cached by digest: in memory (LRU) and serialized on disk per engine
configuration, so a repeated task neither fetches (the agent checks `has_module`) nor compiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import (
    Config,
    Engine,
    ExitTrap,
    Func,
    InstancePre,
    Linker,
    Memory,
    Module,
    Store,
    Trap,
    TrapCode,
    WasiConfig,
    WasmtimeError,
)
from wasmtime import _bindings as ffi
from wasmtime import component as cm
from wasmtime._extern import wrap_extern

from core.bounded import BoundedLru
from core.wasmbin import WasmParseError, core_exports
from core.wasmvalues import format_results

from . import memories, wave
from .api import (
    MIB,
    STOPPED_ERROR,
    BoundedCapture,
    CallError,
    Invocation,
    ModuleError,
    Outcome,
    RuntimeConfig,
    ServeError,
    ServeHandle,
    Usage,
    check_digest,
    command_results,
    fault_error,
    first_frame,
    fuel_error,
    invalid_module_error,
    memory_at_start_error,
    memory_limit_error,
    nul_error,
    overflow_error,
    plan_core_call,
    seconds,
    tail,
    timeout_error,
    trap_description,
    wasm_kind,
)
from .cache import DiskBudget, DiskCache, UnsafeCacheDir
from .components import ComponentExports, describe_exports, plan_call
from .memories import MemoryUse
from .watchdog import Reason, Watch, Watchdog

log = logging.getLogger(__name__)



def _wasmtime_version() -> str:
    """wasmtime-py's version (it names the compiled modules in the cache), read from the name of its
    dist-info folder: importlib.metadata would cost an idle proplet ~4 MB of memory (it imports
    zipfile, email and csv) for this one string."""
    site_packages = os.path.dirname(os.path.dirname(os.path.abspath(wasmtime.__file__)))
    prefix, suffix = "wasmtime-", ".dist-info"
    found = [entry[len(prefix):-len(suffix)] for entry in os.listdir(site_packages)
             if entry.startswith(prefix) and entry.endswith(suffix)]
    if len(found) == 1:
        return found[0]
    import importlib.metadata  # installed some other way: ask the slow way

    return importlib.metadata.version("wasmtime")


WASMTIME_VERSION = _wasmtime_version()

_CAUSE = re.compile(r"Caused by:\s*\n\s*(?:wasm trap: )?(.+)")

# wasmtime's message for each trap code, to describe traps reported by code (core modules) in the
# words used for traps reported by message (components, the CLI).
_TRAP_MESSAGES = {
    TrapCode.STACK_OVERFLOW: "call stack exhausted",
    TrapCode.MEMORY_OUT_OF_BOUNDS: "out of bounds memory access",
    TrapCode.HEAP_MISALIGNED: "misaligned memory access",
    TrapCode.TABLE_OUT_OF_BOUNDS: "out of bounds table access",
    TrapCode.INDIRECT_CALL_TO_NULL: "uninitialized element",
    TrapCode.BAD_SIGNATURE: "indirect call type mismatch",
    TrapCode.INTEGER_OVERFLOW: "integer overflow",
    TrapCode.INTEGER_DIVISION_BY_ZERO: "integer divide by zero",
    TrapCode.BAD_CONVERSION_TO_INTEGER: "invalid conversion to integer",
    TrapCode.UNREACHABLE: "`unreachable` instruction executed",
}


@dataclass(slots=True)
class _CoreArtifact:
    module: Module
    pre: InstancePre
    # export name -> (param kinds, result kinds), e.g. ("i32", "i32"), ("i32",)
    funcs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    export_names: tuple[str, ...]
    memories: tuple[str, ...]
    # A module importing nothing from WASI skips building a WasiConfig per run (~0.1 ms).
    uses_wasi: bool = True
    # Its compiled code's size (serialized), what keeping it in memory costs.
    code_bytes: int = 0
    # Its imports cannot block or reach outside the run (see _INLINE_SAFE_IMPORTS).
    inline_safe: bool = False
    # Run on the event loop (see _run_inline), once its last runs on a thread were all short.
    inline: bool = False
    short_runs: int = 0


@dataclass(slots=True)
class _ComponentArtifact:
    component: cm.Component
    exports: ComponentExports
    code_bytes: int = 0


Artifact = _CoreArtifact | _ComponentArtifact


def _code_bytes(artifact: Artifact) -> int:
    return artifact.code_bytes


class _EngineSet:
    """One Engine with its linkers (defined once: defining WASI per task would cost more than the
    task) and its disk cache directory, keyed by everything that changes the compiled code.

    Components run on engines of their own whose memories the proplet allocates (memories.py), so
    that a growth refused at the task's limit is seen; core modules keep wasmtime's own memories
    (copy-on-write initial images, no Python call on a host access to memory)."""

    def __init__(self, config: RuntimeConfig, *, fuel: bool, components: bool, cache_root: Path | None) -> None:
        cfg = Config()
        cfg.epoch_interruption = True
        cfg.consume_fuel = fuel
        cfg.wasm_component_model = True
        settings = [f"fuel={fuel}"]
        if components:
            memories.install(cfg)
            settings.append("memories=proplet")
        if config.memory_reservation is not None:
            cfg.memory_reservation = config.memory_reservation
            settings.append(f"reservation={config.memory_reservation}")
        if config.memory_guard_size is not None:
            cfg.memory_guard_size = config.memory_guard_size
            settings.append(f"guard={config.memory_guard_size}")
        self.fuel = fuel
        self.components = components
        self.engine = Engine(cfg)
        self.linker = Linker(self.engine)
        self.linker.define_wasi()
        # Component linkers are built on the first component task: they cost ~1.3 MB of an idle
        # proplet's memory, and most fleets run core modules only.
        self._component_linkers: dict[bool, cm.Linker] = {}
        self._component_lock = threading.Lock()
        settings_hash = hashlib.sha256(",".join(settings).encode()).hexdigest()[:12]
        self.tag = f"wasmtime-py-{WASMTIME_VERSION}-{platform.machine()}-{'fuel' if fuel else 'nofuel'}-{settings_hash}"
        self.disk: DiskCache | None = None
        if cache_root is not None:
            self.disk = DiskCache(cache_root, self.tag)

    def component_linker(self, network: bool) -> cm.Linker:
        """The WASI p2 linker, with outgoing HTTP only for tasks granted network access. Called
        from the guest threads, so the first two components may ask at once."""
        with self._component_lock:
            linker = self._component_linkers.get(network)
            if linker is None:
                linker = cm.Linker(self.engine)
                linker.add_wasip2()
                if network:
                    linker.add_wasi_http()
                self._component_linkers[network] = linker
            return linker


class _Run:
    """Per-run state shared between the event loop and the guest thread."""

    __slots__ = ("fuel", "memory", "memory_use", "stderr", "stdout", "timeout", "watch")

    def __init__(self, watch: Watch, timeout: float, memory: int, fuel: int | None, cap: int) -> None:
        self.watch = watch
        self.timeout = timeout
        self.memory = memory
        # A component's memories (allocated by memories.py) record a growth refused at the limit.
        self.memory_use = MemoryUse(memory)
        self.fuel = fuel
        self.stdout = BoundedCapture(cap)
        self.stderr = BoundedCapture(cap)


class _GuestFailed(Exception):
    """A run ended without a result; the message is the user-facing reason."""


class _ServedElsewhere(_GuestFailed):
    """A wasi:http proxy component: a proplet that serves HTTP runs it (Outcome.elsewhere)."""


class WasmtimeRuntime:
    """The internal runtime (wasmtime-py in this process)."""

    name = "wasmtime-internal"
    supports_http = False

    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        self._own_cache_dir: str | None = None
        cache_root = self.config.cache_dir
        if cache_root is None:
            # Memory-only by configuration, but a fuel task may need to compile the module again
            # for the fuel engine: keep the bytes in a private directory removed at close().
            self._own_cache_dir = tempfile.mkdtemp(prefix="proplet-wasm-")
            cache_root = Path(self._own_cache_dir)
        try:
            # Keyed by (fuel, components).
            self._engines = {
                (fuel, components): _EngineSet(self.config, fuel=fuel, components=components, cache_root=cache_root)
                for fuel in (False, True) for components in (False, True)
            }
        except UnsafeCacheDir:
            self._cleanup_own_dir()
            raise
        self._watchdog = Watchdog([e.engine for e in self._engines.values()], self.config.epoch_tick_s)
        self._pool = ThreadPoolExecutor(self.config.max_concurrent, thread_name_prefix="wasm-task")
        self._compile_pool = ThreadPoolExecutor(2, thread_name_prefix="wasm-compile")
        self._slots = asyncio.Semaphore(self.config.max_concurrent)
        self._artifacts: BoundedLru[tuple[str, bool], Artifact] = BoundedLru(
            self.config.memory_cache_entries, self.config.memory_cache_bytes, _code_bytes)
        self._lock = threading.Lock()
        self._loading: dict[str, asyncio.Future[None]] = {}
        # Runs under way by task id, for usage().
        self._runs: dict[str, _Run] = {}
        # The disk cache's bound. Loads under way write the module's files; runs mark it in use.
        # A module removed from disk is forgotten in memory too, so that has_module()
        # says no and the agent delivers it again (a fuel task compiles from the bytes on disk).
        self._budget = DiskBudget(cache_root, self.config.disk_cache_bytes, files_of=self._files_of,
                                  in_use=lambda: set(self._loading), forget=self._forget)
        self._closed = False
        # Observable counters (tests and metrics): real compiles vs loads from the disk cache.
        self.compiles = 0
        self.deserializations = 0
        # Runs made on the event loop, and those of them interrupted at their slice's end (run again on a thread).
        self.inline_runs = 0
        self.inline_fallbacks = 0
        # Runs on the guest threads now (their outcome not yet back on the loop).
        self._threaded_runs = 0

    # ----------------------------------------------------------------------------- cache

    def has_module(self, digest: str) -> bool:
        hex_digest = check_digest(digest)
        with self._lock:
            if (hex_digest, False) in self._artifacts:
                return True
        disk = self._engines[(False, False)].disk
        # The module's bytes too, not only its compiled code: a task with a fuel budget compiles
        # them for the fuel engine, and without them it would fail "not loaded" instead of the
        # agent fetching the module again (a full disk may have kept the one and not the other).
        return (disk is not None and self._find_code(hex_digest, False) is not None
                and disk.wasm_path(hex_digest).is_file())

    def _files_of(self, hex_digest: str) -> list[Path]:
        files = []
        for engines in self._engines.values():
            assert engines.disk is not None
            files += [engines.disk.code_path(hex_digest, kind) for kind in ("module", "component")]
        return [*files, self._engines[(False, False)].disk.wasm_path(hex_digest)]  # type: ignore[union-attr]

    def _forget(self, hex_digest: str) -> None:
        with self._lock:
            for fuel in (False, True):
                self._artifacts.pop((hex_digest, fuel))

    def _find_code(self, hex_digest: str, fuel: bool) -> tuple[_EngineSet, str, Path] | None:
        """Compiled code on disk for the engine of its kind (a component's code in a core
        engine's directory, written before components had engines of their own, is not used)."""
        for components in (False, True):
            engines = self._engines[(fuel, components)]
            found = engines.disk.find_code(hex_digest) if engines.disk is not None else None
            if found is not None and (found[0] == "component") == components:
                return engines, found[0], found[1]
        return None

    async def load(self, digest: str, wasm: bytes | bytearray) -> None:
        hex_digest = check_digest(digest)
        with self._lock:
            if self._artifacts.use((hex_digest, False)) is not None:
                return
        pending = self._loading.get(hex_digest)
        if pending is not None:
            # Another task is compiling the same module: wait for that compile, do not repeat it.
            await asyncio.shield(pending)
            return
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._compile_pool, self._load_sync, hex_digest, wasm)
        self._loading[hex_digest] = future
        try:
            await asyncio.shield(future)
        finally:
            if future.done():
                self._loading.pop(hex_digest, None)
            else:
                future.add_done_callback(lambda _: self._loading.pop(hex_digest, None))

    def _load_sync(self, hex_digest: str, wasm: bytes | bytearray) -> None:
        kind = wasm_kind(wasm)
        engines = self._engines[(False, kind == "component")]
        assert engines.disk is not None
        if self._artifact_from_disk(hex_digest, False, wasm) is not None:
            _keep_wasm(self._budget, engines.disk, hex_digest, wasm)
            return
        artifact = self._compile(engines, kind, wasm, hex_digest)
        _keep_wasm(self._budget, engines.disk, hex_digest, wasm)
        self._remember(hex_digest, False, artifact)

    def _compile(self, engines: _EngineSet, kind: str, wasm: bytes | bytearray, hex_digest: str) -> Artifact:
        try:
            if kind == "component":
                compiled: Module | cm.Component = cm.Component(engines.engine, wasm)
            else:
                compiled = Module(engines.engine, wasm)
        except WasmtimeError as e:
            raise ModuleError(invalid_module_error(kind, _first_line(e))) from None
        self.compiles += 1
        code = bytes(compiled.serialize())
        artifact = self._describe(engines, compiled, len(code), wasm)
        if engines.disk is not None:
            disk = engines.disk
            try:
                self._budget.write(lambda: disk.write_code(hex_digest, kind, code), len(code))
            except OSError as e:
                log.warning("could not cache compiled module sha256:%s on disk: %s", hex_digest, e)
        return artifact

    def _artifact_from_disk(self, hex_digest: str, fuel: bool,
                            wasm: bytes | bytearray | None = None) -> Artifact | None:
        """The compiled code on disk, described from `wasm` (the delivered bytes) or, without them,
        from the bytes kept on disk."""
        # The files stay meanwhile: a run marks its module in use, a load has it among those loading.
        found = self._find_code(hex_digest, fuel)
        if found is None:
            return None
        engines, kind, path = found
        assert engines.disk is not None
        payload = engines.disk.read_code(path)
        if payload is None:
            return None
        if kind == "module" and wasm is None:
            wasm = engines.disk.read_wasm(hex_digest)
        try:
            if kind == "component":
                compiled: Module | cm.Component = cm.Component.deserialize(engines.engine, payload)
            else:
                compiled = Module.deserialize(engines.engine, payload)
            artifact = self._describe(engines, compiled, len(payload), wasm)
        except (WasmtimeError, ModuleError) as e:
            log.warning("cannot use cached %s (%s); recompiling", path, _first_line(e))
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        self.deserializations += 1
        self._remember(hex_digest, fuel, artifact)
        return artifact

    def _describe(self, engines: _EngineSet, compiled: Module | cm.Component, code_bytes: int,
                  wasm: bytes | bytearray | None = None) -> Artifact:
        """Everything a run needs to know about the exports, computed once per compiled module.

        A core module's signatures are read from its bytes (wasmbin.py, as the external runtime
        reads them): wasmtime-py's C API aborts the process when asked the kind of a v128."""
        if isinstance(compiled, Module):
            try:
                pre = engines.linker.instantiate_pre(compiled)
            except WasmtimeError as e:
                raise ModuleError(
                    f"The module needs imports this proplet does not provide ({_first_line(e)}). "
                    "Only WASI preview 1 (wasi_snapshot_preview1) is available to core modules."
                ) from None
            signatures = None
            if wasm is not None:
                try:
                    signatures = core_exports(bytes(wasm)).funcs
                except WasmParseError as e:
                    log.warning("cannot read the export signatures from the module's bytes (%s); asking wasmtime", e)
            funcs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
            names: list[str] = []
            memories: list[str] = []
            for export in compiled.exports:
                names.append(export.name)
                ty = export.type
                if isinstance(ty, wasmtime.FuncType):
                    funcs[export.name] = (signatures[export.name] if signatures is not None else
                                          (tuple(_kind(p) for p in ty.params), tuple(_kind(r) for r in ty.results)))
                elif isinstance(ty, wasmtime.MemoryType):
                    memories.append(export.name)
            imports = compiled.imports
            uses_wasi = any(imp.module.startswith("wasi") for imp in imports)
            inline_safe = all((imp.module, imp.name) in _INLINE_SAFE_IMPORTS for imp in imports)
            return _CoreArtifact(compiled, pre, funcs, tuple(names), tuple(memories), uses_wasi, code_bytes,
                                 inline_safe)
        return _ComponentArtifact(compiled, describe_exports(compiled, engines.engine), code_bytes)

    def _remember(self, hex_digest: str, fuel: bool, artifact: Artifact) -> None:
        with self._lock:
            self._artifacts.put((hex_digest, fuel), artifact)

    def _cached(self, hex_digest: str, fuel: bool) -> Artifact | None:
        with self._lock:
            return self._artifacts.use((hex_digest, fuel))

    def _artifact_sync(self, hex_digest: str, fuel: bool) -> Artifact:
        """Memory, then disk, then (for the fuel engine) a compile from the stored bytes."""
        artifact = self._cached(hex_digest, fuel) or self._artifact_from_disk(hex_digest, fuel)
        if artifact is not None:
            return artifact
        disk = self._engines[(fuel, False)].disk
        assert disk is not None
        wasm = disk.read_wasm(hex_digest)  # in use: run() marked it
        if wasm is None:
            raise _GuestFailed(
                f"Module sha256:{hex_digest} is not loaded on this proplet. Deliver the module "
                "again (the agent calls load() before run())."
            )
        try:
            kind = wasm_kind(wasm)
            artifact = self._compile(self._engines[(fuel, kind == "component")], kind, wasm, hex_digest)
        except ModuleError as e:
            raise _GuestFailed(str(e)) from None
        self._remember(hex_digest, fuel, artifact)
        return artifact

    # ----------------------------------------------------------------------------- running

    async def run(self, digest: str, inv: Invocation) -> Outcome:
        started = time.perf_counter()
        try:
            hex_digest = check_digest(digest)
        except ValueError as e:
            return Outcome("", f"{e}.")
        with self._budget.using(hex_digest):  # its files stay, for a load or a compile with fuel from them
            return await self._run(hex_digest, inv, started)

    async def _run(self, hex_digest: str, inv: Invocation, started: float) -> Outcome:
        limits = inv.limits
        timeout = limits.timeout_s if limits.timeout_s is not None else self.config.default_timeout_s
        memory = limits.memory_bytes if limits.memory_bytes is not None else self.config.default_memory_bytes
        fuel = limits.fuel
        watch = self._watchdog.register(inv.task_id, timeout)
        state = _Run(watch, timeout, memory, fuel, self.config.capture_bytes)
        release_slot = True
        try:
            await self._slots.acquire()
        except BaseException:
            # Given up while waiting for a slot: forget the run, or stop() would find it for ever.
            self._watchdog.unregister(watch)
            raise
        self._runs[inv.task_id] = state
        try:
            if watch.stop_requested:
                return Outcome("", "The task was stopped by request before it started.",
                               duration_s=time.perf_counter() - started)
            loop = asyncio.get_running_loop()
            artifact = self._cached(hex_digest, fuel is not None)
            if artifact is None:
                try:
                    artifact = await loop.run_in_executor(
                        self._compile_pool, self._artifact_sync, hex_digest, fuel is not None)
                except _GuestFailed as e:
                    return Outcome("", str(e), duration_s=time.perf_counter() - started)
            self._budget.used(hex_digest, self._compile_pool.submit)
            self._watchdog.restart_clock(watch, timeout)
            # Only while nothing else runs: guests on threads run in parallel, on the loop one by one.
            inline = (isinstance(artifact, _CoreArtifact) and artifact.inline and not inv.dirs
                      and timeout >= _INLINE_MIN_TIMEOUT_S and not watch.stop_requested
                      and self._threaded_runs == 0)
            if inline:
                outcome = self._run_inline(artifact, inv, state)  # type: ignore[arg-type]
                if outcome is not None:
                    return outcome
            future: asyncio.Future[Outcome] = loop.create_future()
            self._threaded_runs += 1
            future.add_done_callback(self._threaded_run_ended)
            job = self._pool.submit(self._execute, artifact, inv, state, loop, future)
            # Backstop for a guest blocked inside a host call (a WASI sleep or read), where epochs
            # cannot reach it. A timer rather than asyncio.wait(timeout=...): it is on every run.
            blocked = False

            def on_blocked() -> None:
                nonlocal blocked
                blocked = True
                future.cancel()

            timer = loop.call_later(timeout + self.config.blocked_grace_s, on_blocked)
            try:
                outcome = await future
                if isinstance(artifact, _CoreArtifact) and artifact.inline_safe and not inline:
                    _count_short_run(artifact, outcome)
                return outcome
            except asyncio.CancelledError:
                # Either the agent gave up on this run or the guest is blocked: interrupt the guest
                # too, and keep its slot until its thread has really finished.
                watch.stop_requested = True
                release_slot = False
                # The job's callback runs on the guest thread when it ends (or at once if the job
                # never started); the semaphore belongs to the loop.
                job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._slots.release))
                if not blocked:
                    raise
                return Outcome(
                    "",
                    f"The task ran longer than its {seconds(timeout)} s limit while blocked in a "
                    "host call (such as a WASI sleep or read) that cannot be interrupted; its thread "
                    "is abandoned until the call returns. Raise the task's timeout or avoid long "
                    "blocking calls.",
                    stdout=state.stdout.value("stdout"),
                    stderr=state.stderr.value("stderr"),
                    duration_s=time.perf_counter() - started,
                )
            finally:
                timer.cancel()
        finally:
            self._watchdog.unregister(watch)
            if self._runs.get(inv.task_id) is state:
                del self._runs[inv.task_id]
            if release_slot:
                self._slots.release()

    def _threaded_run_ended(self, _: asyncio.Future[Outcome]) -> None:
        self._threaded_runs -= 1

    def _run_inline(self, art: _CoreArtifact, inv: Invocation, state: _Run) -> Outcome | None:
        """The guest run here, on the event loop: a module whose runs are short skips the two
        thread hand-overs a run otherwise costs (0.1-0.3 ms, a good part of such a guest's time). Its
        imports cannot block or reach outside the run, so the loop waits at most two epoch ticks:
        a guest still running then is interrupted, and None is returned to run it again from the
        start on a thread, where a stop and its deadline reach it (nothing it did is visible but
        its output, which is dropped). A run that took long is not made here again either."""
        watch = self._watchdog.slice_watch(inv.task_id)
        here = _Run(watch, state.timeout, state.memory, state.fuel, self.config.capture_bytes)
        engines = self._engines[(state.fuel is not None, False)]
        store = Store(engines.engine)
        outcome = self._guest(engines, art, inv, here, store)
        # Freed in a later turn of the loop, once the caller has sent the result on its way (a
        # store's memories take ~0.1 ms to unmap).
        asyncio.get_running_loop().call_soon(_release, store)
        self.inline_runs += 1
        if watch.reason is Reason.SLICE:
            self.inline_fallbacks += 1
        if watch.reason is Reason.SLICE or outcome.duration_s > _INLINE_LONG_S:
            art.inline, art.short_runs = False, 0
            log.info("the module of task %s no longer runs on the event loop: a run took %.1f ms",
                     inv.task_id, outcome.duration_s * 1e3)
        return None if watch.reason is Reason.SLICE else outcome

    def _execute(self, artifact: Artifact, inv: Invocation, state: _Run,
                 loop: asyncio.AbstractEventLoop, future: asyncio.Future[Outcome]) -> None:
        """Runs on a task thread: one Store, one instance, one call; the outcome goes to `future`."""
        engines = self._engines[(state.fuel is not None, isinstance(artifact, _ComponentArtifact))]
        store = Store(engines.engine)
        try:
            outcome = self._guest(engines, artifact, inv, state, store)
        except BaseException as e:  # a bug here must still reach the waiting run(), not vanish
            _deliver(loop, future, e)
            raise
        else:
            _deliver(loop, future, outcome)
        finally:
            # Dropped here, after the outcome is on its way (freeing a store's memories costs
            # ~130 µs), and on this thread: a WASI p2 store left to the garbage collector at
            # interpreter exit makes wasmtime's I/O runtime panic.
            del store

    def _guest(self, engines: _EngineSet, artifact: Artifact, inv: Invocation, state: _Run,
               store: Store) -> Outcome:
        started = time.perf_counter()
        fuel_used = None
        elsewhere = False
        watch = state.watch
        if not watch.slice_only:  # a run on the event loop is over before anyone asks
            watch.cpu_clock = time.pthread_getcpuclockid(threading.get_ident())
            watch.cpu_at_start = time.thread_time()
            watch.began = time.monotonic()
        try:
            self._watchdog.arm(store, state.watch)
            if state.fuel is not None:
                store.set_fuel(state.fuel)
            try:
                if isinstance(artifact, _CoreArtifact):
                    store.set_limits(memory_size=state.memory)
                    results = self._run_core(engines, artifact, inv, state, store)
                else:
                    # No store limit: it would refuse a growth before memories.py sees it, and
                    # memories.py applies the same limit.
                    with memories.bound(state.memory_use):
                        results = self._run_component(engines, artifact, inv, state, store)
                error = overflow_error(state.stdout)
            except _GuestFailed as e:
                results, error = "", str(e)
                elsewhere = isinstance(e, _ServedElsewhere)
            if state.fuel is not None:
                with contextlib.suppress(WasmtimeError):
                    fuel_used = state.fuel - store.get_fuel()
        finally:
            self._watchdog.disarm(state.watch)
        return Outcome(
            results,
            error,
            stdout=state.stdout.value("stdout"),
            stderr=state.stderr.value("stderr"),
            duration_s=time.perf_counter() - started,
            fuel_used=fuel_used,
            elsewhere=elsewhere,
        )

    def _wasi(self, inv: Invocation, state: _Run, argv: list[str] | None) -> WasiConfig:
        unfit = nul_error(inv.env, argv)
        if unfit:
            raise _GuestFailed(unfit)
        wasi = WasiConfig()
        if argv is not None:
            wasi.argv = argv
        if inv.env:
            wasi.env = list(inv.env.items())
        wasi.stdout_custom = state.stdout.write
        wasi.stderr_custom = state.stderr.write
        for directory in inv.dirs:
            try:
                wasi.preopen_dir(directory, directory)
            except WasmtimeError:
                raise _GuestFailed(
                    f"Cannot give the task the directory {directory}: it does not exist or the "
                    "proplet cannot open it. Create it, or remove it from the task's directories."
                ) from None
        return wasi

    # --- core modules

    def _run_core(self, engines: _EngineSet, art: _CoreArtifact, inv: Invocation, state: _Run,
                  store: Store) -> str:
        function = inv.function
        try:
            args = plan_core_call(art.funcs, art.export_names, function, inv.inputs)
        except CallError as e:
            raise _GuestFailed(str(e)) from None
        as_export = args is not None
        if as_export:
            params, result_kinds = art.funcs[function]
            argv = None
        else:
            argv = [function or "main", *inv.inputs]
        if art.uses_wasi:
            store.set_wasi(self._wasi(inv, state, argv))
        elif unfit := nul_error(inv.env, argv):
            # Refused though this guest would never see it: the external runtime cannot pass it on.
            raise _GuestFailed(unfit)
        instance = self._instantiate_core(art, store, state)
        try:
            if as_export:
                if "_initialize" in art.funcs:
                    _export(store, instance, "_initialize")(store)
                values = _call_numeric(store, _export(store, instance, function), params, result_kinds, args)
                return format_results(values, list(result_kinds))
            try:
                _export(store, instance, "_start")(store)
                code = 0
            except ExitTrap as e:
                code = e.code
        except (WasmtimeError, Trap) as e:
            raise _GuestFailed(self._failure(e, state, store, instance, art)) from None
        stdout, stderr = state.stdout.value("stdout"), state.stderr.value("stderr")
        if code != 0:
            raise _GuestFailed(self._exit_failure(code, stderr, state, store, instance, art))
        return command_results(stdout, stderr)

    def _instantiate_core(self, art: _CoreArtifact, store: Store, state: _Run) -> wasmtime.Instance:
        try:
            instance = art.pre.instantiate(store)
        except (WasmtimeError, Trap) as e:
            raise _GuestFailed(self._failure(e, state, store, None, art)) from None
        watch = state.watch
        if art.memories and not watch.slice_only:
            memory = instance.exports(store)[art.memories[0]]
            if isinstance(memory, wasmtime.Memory):
                watch.memory_bytes = memory.data_len(store)
                watch.memory = memory._memory  # wasmtime-py keeps the handle only there
        return instance

    def _failure(self, e: WasmtimeError | Trap, state: _Run, store: Store, instance: Any, art: Any) -> str:
        """The user-facing reason for a guest that ended with a trap or error."""
        watch = state.watch
        if watch.reason is Reason.STOPPED:
            return STOPPED_ERROR
        if watch.reason is Reason.TIMEOUT:
            return timeout_error(state.timeout)
        text = str(e)
        code = e.trap_code if isinstance(e, Trap) else None
        if code is TrapCode.OUT_OF_FUEL or "all fuel consumed" in text:
            return fuel_error(state.fuel)
        if code is TrapCode.INTERRUPT:
            return "The task was interrupted by the proplet."
        if "exceeds memory limits" in text or "memory minimum size" in text:
            # At instantiation: a memory's declared minimum is above the limit (core or component).
            return memory_at_start_error(state.memory, _first_line(e))
        cause = _first_cause(e)
        # The whole text: a component's trap may put its wasm trap message below other context
        # ("memory fault at wasm address ..." above "out of bounds memory access").
        detail = trap_description(_TRAP_MESSAGES[code] if code in _TRAP_MESSAGES else text)
        what = detail or f"failed: {cause}"
        where = first_frame(text)
        memory = self._memory_refusal(state, store, instance, art)
        if memory:
            return f"{memory} After the refusal the module {what}{f' (in `{where}`)' if where else ''}."
        return fault_error(what, where)

    def _exit_failure(self, code: int, stderr: bytes, state: _Run, store: Store, instance: Any,
                      art: Any) -> str:
        text = tail(stderr)
        exit_text = f"exited with code {code}" + (f": {text}" if text else "")
        memory = self._memory_refusal(state, store, instance, art)
        if memory:
            return f"{memory} After the refusal the module {exit_text}."
        return f"The module {exit_text}."

    def _memory_refusal(self, state: _Run, store: Store, instance: Any, art: Any) -> str:
        """Whether a failed guest had its memory growth refused.

        A component's memories record a refusal (memories.py). For a core module, memory.grow past
        the store limit returns -1 to the guest without telling the host, so this infers it: a
        guest that failed with its memory within a growth step of the limit (1/16 of the limit, at
        least 2 MiB) almost certainly asked for more and was refused."""
        if isinstance(art, _ComponentArtifact):
            refused = state.memory_use.refused_size is not None
            return memory_limit_error(state.memory) if refused else ""
        if instance is None:
            return ""
        margin = max(2 * MIB, state.memory // 16)
        for name in art.memories:
            memory = _export(store, instance, name)
            if isinstance(memory, Memory) and memory.data_len(store) + margin > state.memory:
                return memory_limit_error(state.memory)
        return ""

    # --- components

    def _run_component(self, engines: _EngineSet, art: _ComponentArtifact, inv: Invocation,
                       state: _Run, store: Store) -> str:
        exports = art.exports
        if exports.is_proxy and exports.run_index is None:
            raise _ServedElsewhere(
                "This is a wasi:http proxy component; the internal runtime cannot serve HTTP. Start "
                "the proplet with PROPLET_EXTERNAL_WASM_RUNTIME=wasmtime to serve it."
            )
        try:
            call = plan_call(exports, inv.function, inv.inputs, network=inv.network)
        except CallError as e:
            raise _GuestFailed(str(e)) from None
        func, args = call.func, call.args
        wasi = self._wasi(inv, state, call.argv)
        store.set_wasi(wasi)
        if exports.needs_http:
            store.set_wasi_http()
        linker = engines.component_linker(network=exports.needs_http)
        try:
            instance = linker.instantiate(store, art.component)
            if func is None:
                assert exports.run_index is not None
                run = instance.get_func(store, exports.run_index)
                assert run is not None
                try:
                    status = run(store)
                    code = 0 if getattr(status, "tag", "ok") == "ok" else 1
                except ExitTrap as e:
                    code = e.code
            else:
                callee = instance.get_func(store, func.index)
                assert callee is not None
                value = callee(store, *args)
                return "" if func.result is None else wave.encode(value, func.result)
        except (WasmtimeError, Trap) as e:
            # wasmtime-py's component call keeps the store in a cycle through the error's frames;
            # cleared, the store (and its memories) is freed when the run ends, not at the next
            # garbage collection.
            traceback.clear_frames(e.__traceback__)
            raise _GuestFailed(self._failure(e, state, store, None, art)) from None
        stdout, stderr = state.stdout.value("stdout"), state.stderr.value("stderr")
        if code != 0:
            raise _GuestFailed(self._exit_failure(code, stderr, state, store, None, art))
        return command_results(stdout, stderr)

    # ----------------------------------------------------------------------------- control

    def stop(self, task_id: str) -> bool:
        return self._watchdog.stop(task_id)

    def usage(self, task_id: str) -> Usage | None:
        run = self._runs.get(task_id)
        if run is None:
            return None
        watch = run.watch
        if watch.cpu_clock is None:
            return Usage(0.0, 0.0, 0, threads=1)  # its guest has not begun (its module is compiling)
        cpu = 0.0
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            cpu = max(0.0, time.clock_gettime(watch.cpu_clock) - watch.cpu_at_start)
        memory = run.memory_use.size if run.memory_use.created else watch.memory_bytes
        return Usage(time.monotonic() - watch.began, cpu, memory, threads=1)

    async def serve_http(self, digest: str, inv: Invocation, port: int | None = None) -> ServeHandle:
        raise ServeError(
            "The internal runtime cannot serve wasi:http components (wasmtime-py cannot create the "
            "incoming-request resources). Start the proplet with PROPLET_EXTERNAL_WASM_RUNTIME=wasmtime."
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch_task in list(self._watchdog._by_task):
            self._watchdog.stop(watch_task)
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        self._compile_pool.shutdown(wait=True)
        self._watchdog.close()
        with self._lock:
            self._artifacts.clear()
        self._cleanup_own_dir()

    def _cleanup_own_dir(self) -> None:
        if self._own_cache_dir is not None:
            shutil.rmtree(self._own_cache_dir, ignore_errors=True)
            self._own_cache_dir = None


# ------------------------------------------------------------------------------------ helpers


# Imports of a module that may run on the event loop: none blocks (no poll_oneoff: a sleep would
# hold the loop, which no epoch interrupts) and none reaches outside the run (no files, sockets).
_INLINE_SAFE_IMPORTS = frozenset(("wasi_snapshot_preview1", name) for name in (
    "args_get", "args_sizes_get", "environ_get", "environ_sizes_get", "clock_res_get", "clock_time_get",
    "fd_close", "fd_fdstat_get", "fd_filestat_get", "fd_prestat_get", "fd_prestat_dir_name", "fd_read",
    "fd_seek", "fd_write", "proc_exit", "random_get", "sched_yield"))
# A module runs on the event loop after this many runs in a row on a thread each shorter than
# _INLINE_SHORT_S (there a run's two thread hand-overs, 0.1-0.3 ms, weigh); one run on the loop
# longer than _INLINE_LONG_S sends it back to the threads (a single slow run, a collection or the
# VM's scheduler, is not enough).
_INLINE_AFTER_RUNS = 3
_INLINE_SHORT_S = 0.002
_INLINE_LONG_S = 0.005
# Tasks with a shorter timeout keep the thread, where their deadline is enforced.
_INLINE_MIN_TIMEOUT_S = 1.0


def _count_short_run(art: _CoreArtifact, outcome: Outcome) -> None:
    if outcome.error or outcome.duration_s > _INLINE_SHORT_S:
        art.short_runs = 0
        return
    art.short_runs += 1
    art.inline = art.short_runs >= _INLINE_AFTER_RUNS


def _release(_: object) -> None:
    """Called with what the loop should let go of (the last reference: freed after this turn)."""


def _keep_wasm(budget: DiskBudget, disk: DiskCache, hex_digest: str, wasm: bytes | bytearray) -> None:
    """Keep the delivered bytes for a later compile (for the fuel engine). A cache like the
    compiled code: when the disk stays full, only a fuel task of this module fails (asking for the
    module again), instead of the load and every task of it."""
    try:
        budget.write(lambda: disk.write_wasm(hex_digest, wasm), len(wasm))
    except OSError as e:
        log.warning("could not keep module sha256:%s on disk: %s", hex_digest, e)


def _export(store: Store, instance: wasmtime.Instance, name: str) -> Any:
    """One export by name, without building the whole export map (InstanceExports lists all)."""
    raw = name.encode()
    item = ffi.wasmtime_extern_t()
    if not ffi.wasmtime_instance_export_get(store._context(), ctypes.byref(instance._instance),
                                            raw, len(raw), ctypes.byref(item)):
        raise _GuestFailed(f"The module has no export named {name!r}.")
    return wrap_extern(item)


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Outcome],
             result: Outcome | BaseException) -> None:
    def settle() -> None:
        if future.done():  # the run was abandoned or cancelled meanwhile
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(settle)


_VAL_KINDS = {"i32": 0, "i64": 1, "f32": 2, "f64": 3}  # wasmtime_valkind_t


def _call_numeric(store: Store, func: Func, params: tuple[str, ...], results: tuple[str, ...],
                  args: list[int | float]) -> list[int | float]:
    """Call an export whose types are known numbers, straight through the C API.

    Func.__call__ re-reads the function's type and converts each value through Val on every
    call (about 170 Python calls); the types were read once at load, so this skips all that."""
    raw_params = (ffi.wasmtime_val_t * len(params))()
    for slot, kind, value in zip(raw_params, params, args, strict=True):
        slot.kind = _VAL_KINDS[kind]
        setattr(slot.of, kind, value)
    raw_results = (ffi.wasmtime_val_t * len(results))()
    trap = ctypes.POINTER(ffi.wasm_trap_t)()
    error = ffi.wasmtime_func_call(store._context(), ctypes.byref(func._func), raw_params, len(params),
                                   raw_results, len(results), ctypes.byref(trap))
    if error:
        raise WasmtimeError._from_ptr(error)
    if trap:
        raise Trap._from_ptr(trap)
    return [getattr(slot.of, kind) for slot, kind in zip(raw_results, results, strict=True)]


def _kind(ty: wasmtime.ValType) -> str:
    # The C API's kind for externref is named WASM_ANYREF, and wasmtime-py prints it so.
    text = str(ty)
    return "externref" if text == "anyref" else text


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    cause = _CAUSE.search(text)
    if cause:
        return cause.group(1).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _first_cause(e: BaseException) -> str:
    causes = _CAUSE.findall(str(e))
    return causes[-1].strip() if causes else _first_line(e)



