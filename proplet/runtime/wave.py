"""WAVE (the WebAssembly Value Encoding) for component-function inputs and results.

Upstream's proplet parses each task input as WAVE by the parameter's type and returns the first
result WAVE-encoded (a string comes back quoted: `"hi"`), via Rust's `wasm-wave`. This module does
the same over wasmtime-py's component value types and Python values:

- bool `true`/`false`; integers in decimal; floats as decimals (no exponent, like Rust's
  Display) or `nan`, `inf`, `-inf`; char `'c'`; string `"text"` with `\\n \\t \\r \\" \\' \\\\ \\u{hex}`
- list `[a, b]`, tuple `(a, b)`, record `{name: value}` (option fields may be left out),
  variant/enum `case` or `case(payload)`, option `some(x)`/`none`, result `ok(x)`/`err(e)`/`ok`/`err`,
  flags `{a, b}`

As an extension for hand-written tasks, a top-level string input may also be given plain
(`world` as well as `"world"`), and a top-level char as the bare character.
"""

from __future__ import annotations

import math
import re
import struct
from decimal import Decimal
from typing import Any

from wasmtime import component as cm

from core.wasmvalues import MAX_INTEGER_DIGITS, quoted_input


class WaveError(ValueError):
    """Text that is not a valid WAVE value of the expected type."""


_INT_RANGES: dict[type, tuple[int, int]] = {
    cm.S8: (-(1 << 7), (1 << 7) - 1),
    cm.S16: (-(1 << 15), (1 << 15) - 1),
    cm.S32: (-(1 << 31), (1 << 31) - 1),
    cm.S64: (-(1 << 63), (1 << 63) - 1),
    cm.U8: (0, (1 << 8) - 1),
    cm.U16: (0, (1 << 16) - 1),
    cm.U32: (0, (1 << 32) - 1),
    cm.U64: (0, (1 << 64) - 1),
}

_TYPE_NAMES: dict[type, str] = {
    cm.Bool: "bool", cm.S8: "s8", cm.S16: "s16", cm.S32: "s32", cm.S64: "s64", cm.U8: "u8",
    cm.U16: "u16", cm.U32: "u32", cm.U64: "u64", cm.F32: "f32", cm.F64: "f64", cm.Char: "char",
    cm.String: "string", cm.ListType: "list", cm.RecordType: "record", cm.TupleType: "tuple",
    cm.VariantType: "variant", cm.EnumType: "enum", cm.OptionType: "option",
    cm.ResultType: "result", cm.FlagsType: "flags", cm.OwnType: "own<resource>",
    cm.BorrowType: "borrow<resource>",
}

_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_IDENT = re.compile(r"%?[a-zA-Z][a-zA-Z0-9]*(?:-[a-zA-Z0-9]+)*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


def type_name(ty: Any) -> str:
    return _TYPE_NAMES.get(type(ty), type(ty).__name__)


def parse_input(text: str, ty: Any, index: int = 0) -> Any:
    """One task input as a Python value for wasmtime-py, by the parameter's component type."""
    try:
        if isinstance(ty, cm.String) and not text.startswith('"'):
            return _scalar_values(text)
        if isinstance(ty, cm.Char) and len(text) == 1:
            return _scalar_values(text)
        return parse(text, ty)
    except WaveError as e:
        raise WaveError(f"input {index} ({quoted_input(text)}) is not a valid {type_name(ty)}: {e}") from None


def parse(text: str, ty: Any) -> Any:
    p = _Parser(text)
    value = p.value(ty)
    p.ws()
    if p.i != len(text):
        raise WaveError(f"unexpected {text[p.i:p.i + 10]!r} after the value")
    return value


class _Parser:
    def __init__(self, s: str) -> None:
        self.s = s
        self.i = 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = self.s[self.i:self.i + 10] or "the end"
            raise WaveError(f"expected {ch!r} but found {found!r}")
        self.i += 1

    def accept(self, ch: str) -> bool:
        if self.peek() == ch:
            self.i += 1
            return True
        return False

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        self.ws()
        m = pattern.match(self.s, self.i)
        if not m:
            raise WaveError(f"expected {what} but found {self.s[self.i:self.i + 10] or 'the end'!r}")
        self.i = m.end()
        return m.group(0)

    def ident(self) -> str:
        return self.match(_IDENT, "a name").lstrip("%")

    def value(self, ty: Any) -> Any:
        if isinstance(ty, cm.Bool):
            word = self.ident()
            if word not in ("true", "false"):
                raise WaveError(f"expected true or false, not {word!r}")
            return word == "true"
        if type(ty) in _INT_RANGES:
            digits = self.match(_INTEGER, "an integer")
            lo, hi = _INT_RANGES[type(ty)]
            if len(digits.lstrip("+-").lstrip("0")) > MAX_INTEGER_DIGITS:
                raise WaveError(f"{digits[:24]}… is outside {type_name(ty)} ({lo}..{hi})")
            value = int(digits)
            if not lo <= value <= hi:
                raise WaveError(f"{value} is outside {type_name(ty)} ({lo}..{hi})")
            return value
        if isinstance(ty, cm.F32 | cm.F64):
            return self.float(single=isinstance(ty, cm.F32))
        if isinstance(ty, cm.Char):
            text = self.quoted("'")
            if len(text) != 1:
                raise WaveError(f"a char holds one character, not {len(text)}")
            return text
        if isinstance(ty, cm.String):
            return self.quoted('"')
        if isinstance(ty, cm.ListType):
            items = self.sequence("[", "]", lambda: self.value(ty.element))
            return bytes(items) if isinstance(ty.element, cm.U8) else items
        if isinstance(ty, cm.TupleType):
            elements = ty.elements
            items = []
            self.expect("(")
            for n, element in enumerate(elements):
                if n:
                    self.expect(",")
                items.append(self.value(element))
            self.accept(",")
            self.expect(")")
            return tuple(items)
        if isinstance(ty, cm.RecordType):
            return self.record(ty)
        if isinstance(ty, cm.FlagsType):
            names = set(ty.names)
            flags = self.sequence("{", "}", self.ident)
            unknown = [f for f in flags if f not in names]
            if unknown:
                raise WaveError(f"unknown flag {unknown[0]!r}; flags are {', '.join(sorted(names))}")
            return set(flags)
        if isinstance(ty, cm.EnumType):
            name = self.ident()
            if name not in ty.names:
                raise WaveError(f"unknown case {name!r}; cases are {', '.join(ty.names)}")
            return name
        if isinstance(ty, cm.OptionType | cm.ResultType | cm.VariantType):
            return self.variant(ty)
        raise WaveError(f"a task input cannot provide a {type_name(ty)}")

    def float(self, *, single: bool) -> float:
        self.ws()
        for word, value in (("nan", math.nan), ("-inf", -math.inf), ("inf", math.inf)):
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return value
        value = float(self.match(_NUMBER, "a number"))
        if single:
            try:
                value = struct.unpack("<f", struct.pack("<f", value))[0]
            except OverflowError:
                value = math.copysign(math.inf, value)
        return value

    def quoted(self, quote: str) -> str:
        self.expect(quote)
        out: list[str] = []
        s = self.s
        while True:
            if self.i >= len(s):
                raise WaveError(f"missing closing {quote}")
            ch = s[self.i]
            self.i += 1
            if ch == quote:
                return _scalar_values("".join(out))
            if ch != "\\":
                out.append(ch)
                continue
            esc = s[self.i:self.i + 1]
            self.i += 1
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
            elif esc == "u":
                end = s.find("}", self.i)
                if not s.startswith("{", self.i) or end < 0:
                    raise WaveError("a \\u escape looks like \\u{1F600}")
                try:
                    out.append(chr(int(s[self.i + 1:end], 16)))
                except (ValueError, OverflowError):
                    raise WaveError(f"bad \\u escape {s[self.i:end + 1]!r}") from None
                self.i = end + 1
            else:
                raise WaveError(f"unknown escape \\{esc}")

    def sequence(self, open_: str, close: str, item: Any) -> list[Any]:
        self.expect(open_)
        items: list[Any] = []
        while not self.accept(close):
            if items:
                self.expect(",")
                if self.accept(close):
                    break
            items.append(item())
        return items

    def record(self, ty: Any) -> Any:
        fields = dict(ty.fields)
        seen: dict[str, Any] = {}
        self.expect("{")
        while not self.accept("}"):
            if seen:
                self.expect(",")
                if self.accept("}"):
                    break
            name = self.ident()
            if name not in fields:
                raise WaveError(f"unknown field {name!r}; fields are {', '.join(fields)}")
            self.expect(":")
            seen[name] = self.value(fields[name])
        record = cm.Record()
        for name, field_ty in fields.items():
            if name in seen:
                setattr(record, name, seen[name])
            elif isinstance(field_ty, cm.OptionType):
                setattr(record, name, _wrap_case(field_ty, "none", None))
            else:
                raise WaveError(f"field {name!r} is missing")
        return record

    def variant(self, ty: Any) -> Any:
        cases = dict(ty._cases())
        self.ws()
        m = _IDENT.match(self.s, self.i)
        name = m.group(0).lstrip("%") if m else ""
        if name not in cases:
            if isinstance(ty, cm.OptionType):
                # WAVE lets an option's payload stand for some(payload).
                return _wrap_case(ty, "some", self.value(ty.payload))
            raise WaveError(f"expected one of {', '.join(cases)}")
        assert m is not None
        self.i = m.end()
        payload_ty = cases[name]
        if payload_ty is None:
            return _wrap_case(ty, name, None)
        if isinstance(ty, cm.ResultType) and self.peek() != "(":
            raise WaveError(f"{name} needs a payload: {name}(...)")
        self.expect("(")
        payload = self.value(payload_ty)
        self.expect(")")
        return _wrap_case(ty, name, payload)


def _scalar_values(text: str) -> str:
    """`text` if it holds only Unicode scalar values. A lone surrogate (from a `\\u{d800}` escape,
    or a JSON input's `\\ud800`) has no UTF-8 form, so no component string can carry it."""
    lone = _SURROGATE.search(text)
    if lone:
        raise WaveError(f"it holds a lone surrogate (U+{ord(lone.group()):04X}), which is not a Unicode character")
    return text


def _wrap_case(ty: Any, name: str, payload: Any) -> Any:
    """wasmtime-py represents a variant as Variant(tag, payload) only when its cases are ambiguous
    by Python type ("tagged"); otherwise the payload (or None) stands alone."""
    if ty._tagged():
        return cm.Variant(name, payload)
    return payload


def encode(value: Any, ty: Any) -> str:
    """A Python value returned by wasmtime-py as WAVE text, as wasm-wave writes it."""
    if isinstance(ty, cm.Bool):
        return "true" if value else "false"
    if type(ty) in _INT_RANGES:
        return str(int(value))
    if isinstance(ty, cm.F32 | cm.F64):
        return _float(float(value), single=isinstance(ty, cm.F32))
    if isinstance(ty, cm.Char):
        return "'" + _escape(value, "'") + "'"
    if isinstance(ty, cm.String):
        return '"' + _escape(value, '"') + '"'
    if isinstance(ty, cm.ListType):
        return "[" + ", ".join(encode(v, ty.element) for v in value) + "]"
    if isinstance(ty, cm.TupleType):
        return "(" + ", ".join(encode(v, t) for v, t in zip(value, ty.elements, strict=True)) + ")"
    if isinstance(ty, cm.RecordType):
        return "{" + ", ".join(f"{_name(n)}: {encode(getattr(value, n), t)}" for n, t in ty.fields) + "}"
    if isinstance(ty, cm.FlagsType):
        return "{" + ", ".join(_name(n) for n in ty.names if n in value) + "}"
    if isinstance(ty, cm.EnumType):
        return _name(value)
    if isinstance(ty, cm.OptionType | cm.ResultType | cm.VariantType):
        name, payload_ty, payload = _case_of(ty, value)
        if payload_ty is None:
            return _name(name)
        return f"{_name(name)}({encode(payload, payload_ty)})"
    raise WaveError(f"cannot encode a {type_name(ty)} result")


_KEYWORDS = {"true", "false", "some", "none", "ok", "err", "inf", "nan"}


def _name(name: str) -> str:
    return "%" + name if name in _KEYWORDS else name


def _case_of(ty: Any, value: Any) -> tuple[str, Any, Any]:
    cases = ty._cases()
    if ty._tagged():
        for name, payload_ty in cases:
            if name == value.tag:
                return name, payload_ty, value.payload
        raise WaveError(f"case {value.tag!r} is not in the type")
    # Untagged: pick the case by the payload's Python type, exactly as wasmtime-py lifted it.
    for name, payload_ty in cases:
        if payload_ty is None:
            if value is None:
                return name, None, None
            continue
        classes: set[type] = set()
        payload_ty.add_classes(classes)
        if isinstance(value, tuple(classes)):
            return name, payload_ty, value
    raise WaveError(f"value {value!r} matches no case of the type")


def _escape(text: str, quote: str) -> str:
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == quote:
            out.append("\\" + quote)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return "".join(out)


def _float(v: float, *, single: bool) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if single:
        # Shortest decimal that reads back as the same f32, as Rust prints an f32.
        for precision in range(1, 10):
            text = "%.*g" % (precision, v)  # noqa: UP031 - %g gives the significant-digit control needed
            if struct.unpack("<f", struct.pack("<f", float(text)))[0] == v:
                break
    else:
        text = repr(v)
    # Rust's Display never uses an exponent and drops a trailing ".0".
    text = format(Decimal(text), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text
