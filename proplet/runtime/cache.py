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
import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_HEADER = b"PROPLETCWASM\x01"
_HASH_LEN = 32


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

    def write_code(self, hex_digest: str, kind: str, payload: bytes) -> None:
        body = _HEADER + hashlib.sha256(payload).digest() + payload
        _atomic_write(self.code_path(hex_digest, kind), body)

    def wasm_path(self, hex_digest: str) -> Path:
        return self.wasm_dir / f"{hex_digest}.wasm"

    def write_wasm(self, hex_digest: str, wasm: bytes | bytearray) -> None:
        path = self.wasm_path(hex_digest)
        if not path.exists():
            _atomic_write(path, wasm)

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
