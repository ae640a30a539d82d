"""How task inputs become wasm values and wasm results become the `results` string.

This is a wire contract: the Python proplet and the embedded C proplet (firmware/src/core/values.c)
implement exactly these rules, so the same task gives byte-identical results on every proplet.

Inputs (strings on the wire; upstream converts them by the export's parameter types):
- i32, i64: a decimal integer with an optional sign, within the type's signed range; for i32 an
  unsigned value up to 2**32-1 is also accepted and wraps (so "4294967295" is -1), likewise 2**64-1
  for i64. Anything else is an error naming the input and the type.
- f32, f64: a decimal or scientific float ("1.5", "-2e3"), or "inf", "-inf", "nan" (any case).
Results:
- no value: ""; several values: each formatted, joined by ",".
- i32, i64: signed decimal.
- f32, f64: "NaN", "inf", "-inf"; an integral value below 1e16 in magnitude prints without a
  fraction ("3", "-0"); otherwise the shortest "%.{p}g" (p = 1..9 for f32, 1..17 for f64) that
  reads back to the same value.
"""

from __future__ import annotations

import math
import re
import struct

_INT = re.compile(r"^[+-]?[0-9]+$")
_FLOAT = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")

_RANGES = {"i32": 32, "i64": 64}


class WasmValueError(ValueError):
    """An input that does not fit the export's parameter type."""


# Inputs up to this many characters are quoted whole in errors: the embedded proplet takes no longer
# ones (firmware/src/core/limits.h, PROPLET_INPUT_TEXT_MAX), so its errors read the same.
QUOTED_INPUT_MAX = 80


def quoted_input(text: str) -> str:
    """`text` as Python quotes it, cut short past QUOTED_INPUT_MAX characters: an error that quoted a
    200 KB input whole would carry it into the result, the task's events and every log line."""
    if len(text) <= QUOTED_INPUT_MAX:
        return repr(text)
    return f"{text[:QUOTED_INPUT_MAX]!r}… ({len(text):,} characters)"


# Digits of the largest wasm or component integer (2^64 - 1): more cannot fit, and int() refuses
# more than 4,300 (a ValueError).
MAX_INTEGER_DIGITS = 20


def parse_input(text: str, kind: str, index: int = 0) -> int | float:
    """Convert one input string to a value of wasm type `kind` (i32, i64, f32, f64)."""
    s = text.strip()
    if kind in _RANGES:
        bits = _RANGES[kind]
        if not _INT.match(s):
            raise WasmValueError(f"input {index} ({quoted_input(text)}) is not an integer, but the parameter is {kind}")
        if len(s.lstrip("+-").lstrip("0")) > MAX_INTEGER_DIGITS:
            raise WasmValueError(f"input {index} ({quoted_input(text)}) does not fit in {kind}")
        value = int(s)
        lo, hi = -(1 << (bits - 1)), (1 << bits) - 1
        if not lo <= value <= hi:
            raise WasmValueError(f"input {index} ({quoted_input(text)}) does not fit in {kind}")
        if value >= 1 << (bits - 1):
            value -= 1 << bits
        return value
    if kind in ("f32", "f64"):
        low = s.lower()
        if low in ("inf", "+inf", "infinity", "+infinity"):
            return math.inf
        if low in ("-inf", "-infinity"):
            return -math.inf
        if low in ("nan", "+nan", "-nan"):
            return math.nan
        if not _FLOAT.match(s):
            raise WasmValueError(f"input {index} ({quoted_input(text)}) is not a number, but the parameter is {kind}")
        value = float(s)
        if kind == "f32":
            try:
                value = struct.unpack("<f", struct.pack("<f", value))[0]
            except OverflowError:
                value = math.copysign(math.inf, value)
        return value
    raise WasmValueError(f"parameter {index} has type {kind}, which a task input cannot provide")


def _shortest(value: float, max_precision: int, *, single: bool) -> str:
    for precision in range(1, max_precision + 1):
        text = "%.*g" % (precision, value)
        back = float(text)
        if single:
            back = struct.unpack("<f", struct.pack("<f", back))[0]
        if back == value:
            return text
    return "%.*g" % (max_precision, value)


def format_value(value: int | float, kind: str) -> str:
    if kind in ("i32", "i64"):
        return str(int(value))
    if kind in ("f32", "f64"):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v == math.trunc(v) and abs(v) < 1e16:
            return "%.0f" % v
        return _shortest(v, 9 if kind == "f32" else 17, single=kind == "f32")
    raise WasmValueError(f"cannot format a result of type {kind}")


def format_results(values: list[int | float], kinds: list[str]) -> str:
    return ",".join(format_value(v, k) for v, k in zip(values, kinds, strict=True))
