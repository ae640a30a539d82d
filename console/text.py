"""Text the console does not write itself (task names, proplet ids, errors, topics, a filter as typed),
put inside the console's markup."""

from __future__ import annotations


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

