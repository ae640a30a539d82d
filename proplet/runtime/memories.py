"""Linear memories the proplet allocates itself, for components, so that it sees a refused growth.

A store's memory limit (`Store.set_limits(memory_size=...)`) makes a `memory.grow` past it return -1
to the guest without telling the host. For a core module the runtime reads the memory's size
afterwards through its export; a component's memories cannot be reached from the host, and the
C API has no hook on the limit. So the engines that run components get a memory creator (wasmtime's
host memory API, through wasmtime-py's ctypes bindings, as watchdog.py does for the epoch callback):
each memory is an mmap reservation of the size and guard region wasmtime asks for, made readable and
writable (mprotect) only up to its current size, as wasmtime's own memories are; a growth past the
task's limit is refused here (the guest sees -1, as with the store limit) and recorded for its run.

Runs are found by thread: a component is instantiated and runs on its guest's thread, which binds
its run's `MemoryUse` (`bound`) for that time.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import mmap
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from wasmtime import Config
from wasmtime import _bindings as ffi

log = logging.getLogger(__name__)

WASM_PAGE = 65536
# Memories one run may create: as many as one core module may declare (wasmparser's limit), far
# above what a real component has (its modules' memories, the WASI adapter's, a GC heap). Each one
# reserves its address space (4 GiB + guard by default): a component instantiating a 100-memory
# module 100 times took 40 TiB of the process's 128 TiB, and three such runs at once left none for
# other tasks' memories or for the proplet itself (mmap failing with ENOMEM).
MAX_MEMORIES_PER_RUN = 100


@dataclass(slots=True)
class MemoryUse:
    """One run's memories: the task's limit, and the first growth refused at it."""

    limit: int
    # The size in bytes a memory was asked to grow to, past the limit (None: nothing was refused).
    refused_size: int | None = None
    # Memories created for the run so far (at most MAX_MEMORIES_PER_RUN).
    created: int = 0
    # Their accessible bytes together (the task's memory in its task_metrics).
    size: int = 0


@dataclass(slots=True)
class _Region:
    use: MemoryUse
    address: int
    size: int  # accessible bytes
    capacity: int  # bytes it may grow to without moving
    mapped: int  # capacity plus the guard region


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
_NO_ACCESS = 0  # PROT_NONE, which the mmap module does not export
_READ_WRITE = mmap.PROT_READ | mmap.PROT_WRITE
# ctypes passes a size_t modulo 2**64 without a word: a larger reservation would be mapped short.
_SIZE_MAX = ctypes.c_size_t(-1).value
_HOST_PAGE = mmap.PAGESIZE

# handle -> region, read by the C callbacks (a memory's `env` is its handle; handles are not reused).
_REGIONS: dict[int, _Region] = {}
_HANDLES = itertools.count(1)
_bound = threading.local()


@contextlib.contextmanager
def bound(use: MemoryUse) -> Iterator[MemoryUse]:
    """Memories created on this thread meanwhile belong to `use`'s run and obey its limit."""
    _bound.use = use
    try:
        yield use
    finally:
        _bound.use = None


def install(config: Config) -> None:
    """Make every memory of the engine built from `config` one of ours."""
    ffi.wasmtime_config_host_memory_creator_set(config.ptr(), ctypes.byref(_CREATOR))
    # Copy-on-write initial images work only on wasmtime's own memories (it panics otherwise).
    ffi.wasmtime_config_memory_init_cow_set(config.ptr(), False)


def live_memories() -> int:
    """Memories allocated and not yet freed (tests check that every store frees its own)."""
    return len(_REGIONS)


def _error(message: str) -> int:
    return ctypes.cast(ffi.wasmtime_error_new(message.encode()), ctypes.c_void_p).value or 0


# The callbacks run on guest threads inside wasmtime; they must never raise (ctypes would print
# the exception and hand wasmtime a zero it reads as success).

def _new_memory(_env: object, _ty: object, minimum: int, maximum: int, reserved: int, guard: int,
                memory_ret: ctypes._Pointer) -> int:
    try:
        use: MemoryUse | None = getattr(_bound, "use", None)
        if use is None:
            return _error("no task run is bound to this thread; the proplet creates memories only for its runs")
        if use.created >= MAX_MEMORIES_PER_RUN:
            return _error(f"the module creates more than {MAX_MEMORIES_PER_RUN} linear memories, the most a task "
                          "may have (each reserves its own address space)")
        if minimum > use.limit:
            # wasmtime's own words for a store limit refusing it, which the runtime recognises.
            return _error(f"memory minimum size of {minimum // WASM_PAGE} pages exceeds memory limits")
        # The reservation wasmtime asks for (its compiled code may skip bounds checks within it),
        # and at least room for the task's limit: these memories never move, so a memory whose
        # reservation is smaller than its limit (RuntimeConfig.memory_reservation) is still
        # allowed to grow up to the limit, as a wasmtime memory would by moving.
        needed = -(-min(maximum, max(minimum, use.limit)) // WASM_PAGE) * WASM_PAGE
        capacity = max(reserved, needed)
        mapped = capacity + guard
        if mapped > _SIZE_MAX:
            # A 64-bit memory under a limit near 2**64: mmap would be given the size modulo 2**64,
            # a mapping shorter than the capacity reported to wasmtime, and a growth past its end
            # would mprotect whatever is mapped next to it (the proplet's own memory).
            return _error(f"cannot reserve {mapped} bytes of address space for a linear memory "
                          "(more than this machine can address); lower the task's memory limit")
        if any(size % _HOST_PAGE for size in (minimum, reserved, guard)):
            # mprotect works in whole host pages: a partial page would be readable past the memory's end.
            return _error(f"a linear memory of {minimum} bytes (reservation {reserved}, guard {guard}) "
                          f"is not a whole number of {_HOST_PAGE}-byte host pages")
        address = _libc.mmap(None, mapped, _NO_ACCESS, _MAP_FLAGS, -1, 0)
        if address in (None, _MAP_FAILED):
            return _error(f"cannot reserve {mapped} bytes of address space for a linear memory "
                          f"(errno {ctypes.get_errno()})")
        if minimum and _libc.mprotect(address, minimum, _READ_WRITE) != 0:
            _libc.munmap(address, mapped)
            return _error(f"cannot commit {minimum} bytes of a linear memory (errno {ctypes.get_errno()})")
        use.created += 1
        use.size += minimum
        handle = next(_HANDLES)
        _REGIONS[handle] = _Region(use, address, minimum, capacity, mapped)
        memory = memory_ret[0]
        memory.env = handle
        memory.get_memory = _GET
        memory.grow_memory = _GROW
        memory.finalizer = _FREE
        return 0
    except BaseException:  # pragma: no cover - defensive, see above
        log.exception("creating a linear memory failed")
        return _error("the proplet failed creating a linear memory; see its log")


def _get_memory(env: int | None, size: ctypes._Pointer, capacity: ctypes._Pointer) -> int:
    region = _REGIONS.get(env or 0)
    if region is None:  # pragma: no cover - wasmtime asks only for memories it holds
        size[0] = capacity[0] = 0
        return 0
    size[0] = region.size
    capacity[0] = region.capacity
    return region.address


def _grow_memory(env: int | None, new_size: int) -> int:
    try:
        region = _REGIONS[env or 0]
        if new_size > region.use.limit:
            if region.use.refused_size is None:
                region.use.refused_size = new_size
            return _error(f"growing memory to {new_size} bytes would pass the task's limit of {region.use.limit}")
        if new_size > region.capacity or new_size % _HOST_PAGE:
            return _error(f"growing memory to {new_size} bytes would pass its reservation of {region.capacity} "
                          "or end within a host page")
        if new_size > region.size:
            if _libc.mprotect(region.address, new_size, _READ_WRITE) != 0:
                return _error(f"cannot commit {new_size} bytes of a linear memory (errno {ctypes.get_errno()})")
            region.use.size += new_size - region.size
            region.size = new_size
        return 0
    except BaseException:  # pragma: no cover - defensive, see above
        log.exception("growing a linear memory failed")
        return _error("the proplet failed growing a linear memory; see its log")


def _free_memory(env: int | None) -> None:
    region = _REGIONS.pop(env or 0, None)
    if region is not None and _libc.munmap(region.address, region.mapped) != 0:  # pragma: no cover
        log.warning("could not unmap a linear memory of %d bytes (errno %d)", region.mapped, ctypes.get_errno())


_GET = ffi.wasmtime_memory_get_callback_t(_get_memory)
_GROW = ffi.wasmtime_memory_grow_callback_t(_grow_memory)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_free_memory)
_NEW = ffi.wasmtime_new_memory_callback_t(_new_memory)
_CREATOR = ffi.wasmtime_memory_creator(None, _NEW, ctypes.cast(None, ctypes.CFUNCTYPE(None, ctypes.c_void_p)))
