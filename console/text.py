"""Text the console does not write itself (task names, proplet ids, errors, topics, a filter as typed),
put inside the console's markup."""

from __future__ import annotations

import re

from rich.segment import Segment
from textual.color import Color
from textual.filter import LineFilter


def escape(text: str) -> str:
    """`text` as markup that shows it exactly, whatever follows it.

    textual.markup.escape escapes only complete tags: `[/` or `[x` with no `]` stays as it is, and the
    console's own closing tag after it makes one tag of both (`[/x[/b]`): a MarkupError that closed the
    console, or a style that swallowed the rest of the line. So every `[` is escaped. A backslash at
    the end would escape the `[` of the tag after it: a zero-width space keeps them apart."""
    escaped = text.replace("[", "\\[")
    if escaped.endswith("\\"):
        escaped += "\u200b"
    return escaped


# C0 and C1 control characters and DEL. Rich and Textual measure each as 0 cells wide, so taking them
# out of a line leaves its layout as it is.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class ControlCodeFilter(LineFilter):
    """Takes control characters out of every line drawn, whichever widget drew it.

    Task names, errors, proplet ids, metadata and MQTT payloads come from the network, and Rich and
    Textual pass ESC through (Content and Text strip only BEL, BS, VT, FF and CR; Log only up to
    U+0014): a task named `\\x1b[2J` cleared the operator's terminal, and OSC 52 in an error could set
    its clipboard. The console's own escape sequences are written from styles, never from text."""

    def apply(self, segments: list[Segment], background: Color) -> list[Segment]:
        if not _CONTROL.search("".join(segment.text for segment in segments)):
            return segments
        return [Segment(_CONTROL.sub("", segment.text), segment.style) if segment.control is None else segment
                for segment in segments]
