"""The `/` filter of the tables and the traffic view: a case-insensitive regex, `!` in front inverts it.

An invalid regex is matched literally instead of refusing what the user typed (k9s does the same
with its fuzzy fallback), and `literal` says so for the status line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RowFilter:
    text: str = ""
    pattern: re.Pattern[str] | None = None
    invert: bool = False
    literal: bool = False

    @classmethod
    def parse(cls, text: str) -> RowFilter:
        raw = text.strip()
        invert = raw.startswith("!")
        body = raw[1:].strip() if invert else raw
        if not body:
            return cls(raw, None, invert)
        try:
            return cls(raw, re.compile(body, re.IGNORECASE), invert)
        except re.error:
            return cls(raw, re.compile(re.escape(body), re.IGNORECASE), invert, literal=True)

    @property
    def active(self) -> bool:
        return self.pattern is not None

    def matches(self, haystack: str | tuple[str, ...]) -> bool:
        """Whether a row shows: any of its fields matches (so `^` anchors at a column's start)."""
        if self.pattern is None:
            return True
        fields = (haystack,) if isinstance(haystack, str) else haystack
        search = self.pattern.search
        found = any(search(f) is not None for f in fields)
        return found != self.invert

    def describe(self) -> str:
        if self.pattern is None:
            return ""
        what = "not matching" if self.invert else "matching"
        body = self.text[1:].strip() if self.invert else self.text
        return f"{what} /{body}/" + (" (literal: not a valid regex)" if self.literal else "")
