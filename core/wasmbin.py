"""A minimal reader of a core module's exports and their signatures, and of what it imports,
without compiling it.

The external runtime needs to know, before starting `wasmtime run`, whether the task's function is
an export (then `--invoke`, with the inputs checked and the printed results re-formatted by type)
or the module is a command, exactly as the internal runtime decides. Parsing the type, import,
function and export sections is enough and costs microseconds. The manager reads the modules a
module imports from: one that needs WASI is not for a board (core.domain.ModuleNeeds).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

_VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128", 0x70: "funcref",
             0x6F: "externref"}


class WasmParseError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class CoreExports:
    # func export name -> (param kinds, result kinds)
    funcs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
    names: tuple[str, ...]


class _Reader:
    def __init__(self, data: bytes | bytearray, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise WasmParseError("unexpected end of section")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def u32(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 35:
                raise WasmParseError("LEB128 integer too long")

    def name(self) -> str:
        n = self.u32()
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")

    def valtype(self) -> str:
        b = self.byte()
        if b in (0x64, 0x63):  # (ref null? ht): typed function references
            self.heaptype()
            return "ref"
        return _VALTYPES.get(b, f"0x{b:02x}")

    def heaptype(self) -> None:
        if self.pos >= self.end:
            raise WasmParseError("unexpected end of section")
        b = self.data[self.pos]
        if b & 0x40 or b >= 0x69:  # abstract heap type, one byte
            self.pos += 1
        else:
            self.s33()

    def s33(self) -> None:
        while self.byte() & 0x80:
            pass

    def limits(self) -> None:
        flags = self.byte()
        self.u32()
        if flags & 1:
            self.u32()


def _sections(wasm: bytes | bytearray) -> Iterator[tuple[int, _Reader]]:
    """Each section's id and a reader of its body, in order (raises WasmParseError)."""
    if wasm[:4] != b"\0asm":
        raise WasmParseError("not a wasm binary")
    pos = 8
    while pos < len(wasm):
        section_id = wasm[pos]
        r = _Reader(wasm, pos + 1)
        size = r.u32()
        if r.pos + size > len(wasm):
            raise WasmParseError(f"section {section_id} runs past the end of the binary")
        yield section_id, _Reader(wasm, r.pos, r.pos + size)
        pos = r.pos + size


def _import(body: _Reader) -> tuple[str, int | None]:
    """One entry of the import section: its module's name, and its type index if it is a function."""
    module = body.name()
    body.name()
    kind = body.byte()
    if kind == 0:
        return module, body.u32()
    if kind == 1:
        body.valtype()
        body.limits()
    elif kind == 2:
        body.limits()
    elif kind == 3:
        body.valtype()
        body.byte()
    elif kind == 4:
        body.byte()
        body.u32()
    return module, None


def imported_modules(wasm: bytes | bytearray) -> frozenset[str]:
    """The modules a core module imports from (`wasi_snapshot_preview1`, `env`, ...); raises
    WasmParseError."""
    for section_id, body in _sections(wasm):
        if section_id == 2:
            return frozenset(_import(body)[0] for _ in range(body.u32()))
    return frozenset()


def core_exports(wasm: bytes) -> CoreExports:
    """Function exports of a core module with their signatures (raises WasmParseError)."""
    types: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    func_types: list[int] = []
    exports: list[tuple[str, int, int]] = []
    for section_id, body in _sections(wasm):
        if section_id == 1:
            for _ in range(body.u32()):
                form = body.byte()
                if form == 0x4E:  # rec group (GC proposal): not supported by this reader
                    raise WasmParseError("recursive type groups are not supported")
                if form in (0x50, 0x4F):  # sub types
                    for _ in range(body.u32()):
                        body.u32()
                    form = body.byte()
                if form != 0x60:
                    types.append(((), ()))
                    continue
                params = tuple(body.valtype() for _ in range(body.u32()))
                results = tuple(body.valtype() for _ in range(body.u32()))
                types.append((params, results))
        elif section_id == 2:
            for _ in range(body.u32()):
                _, type_index = _import(body)
                if type_index is not None:
                    func_types.append(type_index)
        elif section_id == 3:
            func_types.extend(body.u32() for _ in range(body.u32()))
        elif section_id == 7:
            for _ in range(body.u32()):
                name = body.name()
                kind = body.byte()
                exports.append((name, kind, body.u32()))
    funcs = {}
    for name, kind, index in exports:
        if kind == 0 and index < len(func_types) and func_types[index] < len(types):
            funcs[name] = types[func_types[index]]
    return CoreExports(funcs, tuple(name for name, _, _ in exports))
