"""Content-addressed on-disk cache of compiled (serialized) modules and of the original bytes.

Layout under the cache root:

    wasm/<hex>.wasm                          the module as delivered (to compile for another engine)
    <engine tag>/<hex>.<module|component>.cwasm   wasmtime's serialized code for that engine

Serialized code is native code that wasmtime loads without checking it, so only files this proplet
wrote are read back: the directories are created 0700 and refused if another user can write them,
files are written to a temporary name and renamed into place, and each carries a header with the
sha256 of its payload, so a truncated or damaged file is discarded and recompiled, never loaded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_HEADER = b"PROPLETCWASM\x01"
_HASH_LEN = 32

# Every file of a module starts with its digest: `<hex>.wasm`, `<hex>.module.cwasm`, the external
# runtime's `<hex>.<cli tag>[.fuel].cwasm[.sha256]`.
_MODULE_FILE = re.compile(r"([0-9a-f]{64})\.")
# A temporary file older than this was left by a process that died while writing it.
_ABANDONED_TEMP_S = 3600.0
# A trim goes down to this share of the limit, so that a stream of new modules does not scan the
# directory on every write.
_TRIM_TO = 0.9
# A module run again within this time is not touched again (its files' modification time is its recency).
_TOUCH_EVERY_S = 60.0


class UnsafeCacheDir(Exception):
    """The cache directory could be written by someone else, so its contents cannot be trusted."""


def _secure_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheDir(
            f"The module cache directory {path} is owned by another user or writable by others, so "
            f"compiled code in it cannot be trusted. Run `chmod 700 {path}` (as its owner) or point "
            "the proplet's cache directory elsewhere."
        )
    return path


class DiskCache:
    """Serialized artifacts for one engine configuration, plus the shared raw-wasm store."""

    def __init__(self, root: Path, engine_tag: str) -> None:
        self.root = _secure_dir(root)
        self.wasm_dir = _secure_dir(root / "wasm")
        self.code_dir = _secure_dir(root / engine_tag)

    def code_path(self, hex_digest: str, kind: str) -> Path:
        return self.code_dir / f"{hex_digest}.{kind}.cwasm"

    def find_code(self, hex_digest: str) -> tuple[str, Path] | None:
        for kind in ("module", "component"):
            path = self.code_path(hex_digest, kind)
            if path.exists():
                return kind, path
        return None

    def read_code(self, path: Path) -> bytes | None:
        """The payload if the file is intact; a damaged file is removed and None returned."""
        try:
            data = path.read_bytes()
        except OSError:
            return None
        head = len(_HEADER) + _HASH_LEN
        if (len(data) < head or not data.startswith(_HEADER)
                or hashlib.sha256(memoryview(data)[head:]).digest() != data[len(_HEADER):head]):
            log.warning("discarding damaged compiled module %s; it will be recompiled", path)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data[head:]

    def write_code(self, hex_digest: str, kind: str, payload: bytes) -> int:
        """Bytes written."""
        body = _HEADER + hashlib.sha256(payload).digest() + payload
        _atomic_write(self.code_path(hex_digest, kind), body)
        return len(body)

    def wasm_path(self, hex_digest: str) -> Path:
        return self.wasm_dir / f"{hex_digest}.wasm"

    def write_wasm(self, hex_digest: str, wasm: bytes | bytearray) -> int:
        """Bytes written (none when the file is there already)."""
        path = self.wasm_path(hex_digest)
        if path.exists():
            return 0
        _atomic_write(path, wasm)
        return len(wasm)

    def read_wasm(self, hex_digest: str) -> bytes | None:
        """The delivered bytes, re-verified against their digest (they are compiled, not trusted)."""
        try:
            wasm = self.wasm_path(hex_digest).read_bytes()
        except OSError:
            return None
        if hashlib.sha256(wasm).hexdigest() != hex_digest:
            log.warning("discarding %s: its content no longer matches its digest", self.wasm_path(hex_digest))
            return None
        return wasm


def _atomic_write(path: Path, data: bytes | bytearray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class DiskBudget:
    """Keeps the files under a cache root within `max_bytes`, removing the modules least recently
    used first.

    A module's files (its bytes, its code for each engine configuration, the external runtime's
    precompiled files) are found by the digest their names start with, in the root and the
    directories under it, and removed together; the runtime then forgets the module (`forget`), so
    that the agent fetches it again when a task needs it. Recency is the newest modification time
    of a module's files: a run touches them (`used`: at most once a minute per module, so a
    module run from memory all day is not the first to go, and its recency survives a restart).
    Code compiled for an engine configuration no longer in use (wasmtime upgraded, the runtime
    switched) is never touched again, so it goes first. A module in use (`using`: a run of it or a
    read of its files under way) or that `in_use()` names (a load of it under way) is never
    removed; a lock is held only while a module is checked and removed, so a module marked in use
    never loses its files, and the event loop never waits on a read."""

    def __init__(self, root: Path, max_bytes: int, *, files_of: Callable[[str], Collection[Path]],
                 in_use: Callable[[], Collection[str]] = frozenset,
                 forget: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._files_of = files_of
        self._in_use = in_use
        self._forget = forget
        # The bytes under the root as of the last scan plus what was written since; None until the
        # first write scans.
        self._total: int | None = None
        self._scan_lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._using: Counter[str] = Counter()
        # Observable (tests, logs): modules removed to stay within the limit, and their bytes.
        self.evicted = 0
        self.evicted_bytes = 0

    def added(self, nbytes: int) -> None:
        """`nbytes` were just written under the root; trim when that takes it past the limit. Runs
        on the writing thread (a compile's or asyncio.to_thread's), never on the event loop."""
        with self._scan_lock:
            if self._total is None:
                self._total = sum(size for size, _, _ in self._modules().values())
            else:
                self._total += nbytes
            if self._total > self.max_bytes:
                self._total = self._trim()

    @contextlib.contextmanager
    def using(self, hex_digest: str) -> Iterator[None]:
        """The module's files are not removed meanwhile (a run or a server start reads them)."""
        with self._lock:
            self._using[hex_digest] += 1
        try:
            yield
        finally:
            with self._lock:
                self._using[hex_digest] -= 1
                if not self._using[hex_digest]:
                    del self._using[hex_digest]

    def write(self, write_files: Callable[[], int], nbytes: int) -> None:
        """Run `write_files` (it writes under the root and returns the bytes written) and count
        them. On a full disk, remove the modules run least recently to make room for `nbytes` and
        try once more (OSError if that fails too): an edge box's disk filled by something else
        costs the cache, not the task."""
        try:
            written = write_files()
        except OSError as e:
            if not disk_full(e) or not self.make_room(nbytes):
                raise
            written = write_files()
        self.added(written)

    def make_room(self, nbytes: int) -> bool:
        """The disk is full: remove the modules run least recently (none in use) until `nbytes`
        more are free, at least; whether any was removed."""
        with self._scan_lock:
            before = self.evicted_bytes
            self._total = self._trim(free=nbytes)
            freed = self.evicted_bytes - before
        log.warning("the disk holding the module cache %s is full: removed %d bytes of modules run least "
                    "recently to make room", self.root, freed)
        return freed > 0

    def used(self, hex_digest: str, on_thread: Callable[[Callable[[str], None], str], object]) -> None:
        """A run of the module: it becomes the most recently used. Cheap enough for every run on the
        event loop: at most once a minute, its files are touched, a few system calls that
        `on_thread(fn, arg)` (an executor's submit) runs elsewhere."""
        now = time.monotonic()
        if now - self._touched.get(hex_digest, -_TOUCH_EVERY_S) < _TOUCH_EVERY_S:
            return
        self._touched[hex_digest] = now
        on_thread(self._touch, hex_digest)

    def _touch(self, hex_digest: str) -> None:
        """The module becomes the most recently used: its files' modification time is now."""
        # The clock's own time, not the file system's (os.utime(path) alone): that one advances a
        # tick (4-10 ms) at a time, so a module run right after another was written could tie with it.
        when = time.time_ns()
        for path in self._files_of(hex_digest):
            with contextlib.suppress(OSError):
                os.utime(path, ns=(when, when))

    def _files(self) -> Iterator[os.DirEntry[str]]:
        with contextlib.suppress(OSError), os.scandir(self.root) as top:
            for entry in top:
                if entry.is_dir(follow_symlinks=False):
                    with contextlib.suppress(OSError), os.scandir(entry.path) as inner:
                        yield from (f for f in inner if f.is_file(follow_symlinks=False))
                elif entry.is_file(follow_symlinks=False):
                    yield entry

    def _modules(self) -> dict[str, tuple[int, float, list[str]]]:
        """digest -> (bytes, newest mtime, paths); abandoned temporary files are removed on the way."""
        modules: dict[str, tuple[int, float, list[str]]] = {}
        now = time.time()
        for entry in self._files():
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                if now - st.st_mtime > _ABANDONED_TEMP_S:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                continue
            match = _MODULE_FILE.match(entry.name)
            if match is None:
                continue
            size, newest, paths = modules.get(match[1], (0, 0.0, []))
            paths.append(entry.path)
            modules[match[1]] = (size + st.st_size, max(newest, st.st_mtime), paths)
        return modules

    def _trim(self, free: int = 0) -> int:
        """Remove modules down to 90% of the limit, and `free` bytes below the total at least."""
        modules = self._modules()
        total = sum(size for size, _, _ in modules.values())
        target = min(self.max_bytes * _TRIM_TO, total - free)
        for hex_digest, (size, _, paths) in sorted(modules.items(), key=lambda item: item[1][1]):
            if total <= target:
                break
            with self._lock:
                if hex_digest in self._using or hex_digest in self._in_use():
                    continue
                if self._forget is not None:
                    self._forget(hex_digest)
                for path in paths:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            self._touched.pop(hex_digest, None)
            total -= size
            self.evicted += 1
            self.evicted_bytes += size
            log.info("removed module sha256:%s (%d bytes) from the cache in %s, the least recently used, "
                     "to keep it under %d bytes", hex_digest, size, self.root, self.max_bytes)
        if total > self.max_bytes:
            log.warning("the modules in use take %d bytes of the cache in %s, more than its limit of %d bytes",
                        total, self.root, self.max_bytes)
        return total


def disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
