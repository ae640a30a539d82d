"""Reusable console widgets: header, command and filter bars, confirm modal, help screen, table cells."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.cells import cell_len
from rich.style import Style
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widget import Widget
from textual.widgets import Button, DataTable, Input, Label, Markdown, Static

from console import keys

if TYPE_CHECKING:
    from console.app import ConsoleApp

# ------------------------------------------------------------------------------------------
# inputs


class ConsoleInput(Input):
    """An Input that follows the console's cursor_blink setting (off over slow links and in snapshots)."""

    def on_mount(self) -> None:
        self.cursor_blink = bool(getattr(self.app, "cursor_blink_enabled", True))

    def accept_suggestion(self) -> bool:
        """Take the suggestion shown as ghost text; False when there is none."""
        if not self._suggestion or self._suggestion == self.value:
            return False
        self.value = self._suggestion
        self.cursor_position = len(self.value)
        return True


class CompletingInput(ConsoleInput):
    """A field with suggestions: Tab takes the one shown (ghost text), or moves on when none is."""

    BINDINGS: ClassVar = [Binding("tab", "complete_or_next", "Complete", show=False)]

    def action_complete_or_next(self) -> None:
        if not self.accept_suggestion():
            self.screen.focus_next()


class WordSuggester(Suggester):
    """Ghost text for the command bar: completes the command word, then the argument (theme names)."""

    def __init__(self, words: Callable[[], Iterable[str]]) -> None:
        super().__init__(use_cache=False, case_sensitive=False)
        self._words = words

    async def get_suggestion(self, value: str) -> str | None:
        if not value:
            return None
        for word in self._words():
            if word.lower().startswith(value.lower()) and len(word) > len(value):
                return word
        return None


class CommandBar(ConsoleInput):
    """k9s' `:` prompt: a command with aliases, ghost-text suggestions, Tab to accept, Esc to close."""

    DEFAULT_CSS = """
    CommandBar {
        dock: bottom;
        display: none;
        border: tall $accent;
        margin-bottom: 1;  /* above the key hints, docked at the bottom too: they hid its lower border */
        &.-open { display: block; }
    }
    """
    BINDINGS: ClassVar = [
        Binding("escape", "close", "Close", show=False),
        Binding("tab", "accept_suggestion", "Complete", show=False),
    ]

    def allow_focus(self) -> bool:
        return self.has_class("-open")

    def open(self) -> None:
        self.value = ""
        self.add_class("-open")
        # Focus now, not after a refresh (Widget.focus defers): ":q<Enter>" typed or pasted in one burst
        # must land in the bar.
        self.screen.set_focus(self)

    def action_close(self) -> None:
        self.remove_class("-open")
        self.value = ""
        self.screen.focus_next() if self.screen.focused is self else None

    def action_accept_suggestion(self) -> None:
        self.accept_suggestion()

    def action_submit(self) -> None:
        # Run at once (Enter is a binding, run as the key is read), not through a message: keys
        # typed or pasted after ":dispatch<Enter>" must reach the view the command opens.
        text = self.value.strip()
        self.remove_class("-open")
        self.value = ""
        if self.screen.focused is self:
            self.screen.focus_next()
        if text:
            cast("ConsoleApp", self.app).run_command(text)

    def on_blur(self) -> None:
        self.remove_class("-open")


class FilterBar(ConsoleInput):
    """The `/` filter: regex, `!` inverts; applied as you type, Enter keeps it, Esc clears it."""

    DEFAULT_CSS = """
    FilterBar {
        dock: bottom;
        display: none;
        border: tall $primary;
        margin-bottom: 1;  /* above the key hints, docked at the bottom too: they hid its lower border */
        &.-open { display: block; }
    }
    """
    BINDINGS: ClassVar = [Binding("escape", "clear", "Clear filter", show=False)]

    @dataclass
    class FilterChanged(Message):
        """The filter text changed."""

        text: str

    def allow_focus(self) -> bool:
        return self.has_class("-open")

    def open(self) -> None:
        self.add_class("-open")
        self.screen.set_focus(self)

    def action_clear(self) -> None:
        self.value = ""
        self.remove_class("-open")
        self.post_message(self.FilterChanged(""))

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.FilterChanged(self.value))

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.remove_class("-open")

    def on_blur(self) -> None:
        self.remove_class("-open")


# ------------------------------------------------------------------------------------------
# header


class StatusLine(Static):
    """The one-line status under a view. It is one row high (`.status-line`) whatever it says, so
    new text only repaints the line: a Static's update lays the whole screen out again, at every
    refresh of a view under a flood of traffic."""

    def show(self, text: str) -> None:
        self.update(Content(text), layout=False)


class FleetHeader(Widget):
    """Where you are: host, broker and its state, database, counts with ↑/↓ markers, breadcrumbs."""

    DEFAULT_CSS = """
    FleetHeader {
        dock: top;
        height: 2;
        background: $panel;
        color: $foreground;
        padding: 0 1;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """
    # A changed number keeps its marker this long (k9s deltas).
    MARKER_SECONDS = 5.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._deltas: dict[str, tuple[int, str, float]] = {}
        self._shown: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._lines: tuple[tuple[Content, ...], ...] = ((Content(""),), (Content(""),))
        self._content = Content("")

    def render(self) -> Content:
        # Each line is the first of its forms that fits (they go from the fullest to the shortest),
        # chosen at every render so a resized terminal gets the form that fits it.
        width = self.content_size.width
        return Content("\n").join(
            next((form for form in forms if width <= 0 or form.cell_length <= width), forms[-1])
            for forms in self._lines)

    def marker(self, key: str, value: int, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        previous = self._deltas.get(key)
        if previous is None:
            self._deltas[key] = (value, "", now)
            return ""
        old, mark, since = previous
        if value != old:
            mark = "↑" if value > old else "↓"
            self._deltas[key] = (value, mark, now)
            return mark
        if mark and now - since > self.MARKER_SECONDS:
            self._deltas[key] = (value, "", since)
            return ""
        return mark

    def show(self, where: str | Sequence[str], crumbs: str | Sequence[str]) -> None:
        """Each line as markup, or as several forms from the fullest to the shortest: on a narrow
        terminal (80 columns over SSH) the shorter ones keep what matters (the broker's and the
        database's state, the failed count) in view, where the full line was cut at the right."""
        shown = tuple((line,) if isinstance(line, str) else tuple(line) for line in (where, crumbs))
        if shown == self._shown:
            return
        self._shown = (shown[0], shown[1])
        self._lines = tuple(tuple(Content.from_markup(form) for form in forms) for forms in shown)
        self._content = Content("\n").join(forms[0] for forms in self._lines)
        self.refresh()

    @property
    def text(self) -> str:
        """Everything the header says (each line's fullest form)."""
        return self._content.plain


# ------------------------------------------------------------------------------------------
# footer


_DIMMED = Style(dim=True)


@dataclass(frozen=True, slots=True)
class _Hint:
    start: int
    end: int
    key: str
    enabled: bool


class KeyHints(Widget):
    """The footer: the keys that apply now, drawn as one line from the screen's active bindings.

    Textual's Footer mounts a widget per key and rebuilds them all whenever the bindings change,
    which is every view switch and every toggle; under a 2,000 msg/s flood that rebuild was the
    largest part of a key press. One widget rendering one line shows the same keys (disabled
    ones dimmed, the command palette on the right) and a click on a key presses it.
    """

    DEFAULT_CSS = """
    KeyHints {
        dock: bottom;
        height: 1;
        color: $footer-foreground;
        background: $footer-background;
        text-wrap: nowrap;
        text-overflow: ellipsis;
        .key-hints--key {
            color: $footer-key-foreground;
            background: $footer-key-background;
            text-style: bold;
        }
        .key-hints--description {
            color: $footer-description-foreground;
            background: $footer-description-background;
        }
    }
    """
    COMPONENT_CLASSES: ClassVar[set[str]] = {"key-hints--key", "key-hints--description"}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hints: list[_Hint] = []

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _bindings_changed(self, screen: Any) -> None:
        if self.is_attached and screen is self.screen:
            self.refresh()

    def render(self) -> Text:
        key_style = self.get_component_rich_style("key-hints--key")
        description_style = self.get_component_rich_style("key-hints--description")
        text = Text(no_wrap=True, overflow="ellipsis")
        hints: list[_Hint] = []
        palette = None
        shown: dict[str, tuple[Binding, bool, bool]] = {}
        for node, binding, enabled, _tooltip in self.screen.active_bindings.values():
            if binding.key == self.app.COMMAND_PALETTE_BINDING and self.app.ENABLE_COMMAND_PALETTE:
                palette = (binding, enabled)
                continue
            if not binding.show or binding.action in shown:
                continue
            shown[binding.action] = (binding, enabled, node is self.app)
        # On a narrow terminal the app's keys (`:` and `?`, which lead to all the others) stay in view:
        # the view's keys that do not fit give way to them, the last first.
        entries = list(shown.values())
        width = self.size.width
        while width and sum(self._width(b) for b, _, _ in entries) > width:
            view_keys = [i for i, (_, _, app_key) in enumerate(entries) if not app_key]
            if not view_keys:
                break
            del entries[view_keys[-1]]
        for binding, enabled, _app_key in entries:
            self._append(text, hints, binding, enabled, key_style, description_style)
        if palette is not None:
            binding, enabled = palette
            label = f" {self.app.get_key_display(binding)} {binding.description} "
            room = self.size.width - text.cell_len - len(label)
            if room > 0:
                text.append(" " * room)
                self._append(text, hints, binding, enabled, key_style, description_style)
        self._hints = hints
        return text

    def _width(self, binding: Binding) -> int:
        """The cells `_append` takes for the binding."""
        key = cell_len(f" {self.app.get_key_display(binding)} ")
        return key + (cell_len(f"{binding.description} ") if binding.description else 0)

    def _append(self, text: Text, hints: list[_Hint], binding: Binding, enabled: bool,
                key_style: Any, description_style: Any) -> None:
        start = text.cell_len
        if not enabled:
            # Refused here (read-only mode): dimmed, as Textual's Footer does, and the key without its
            # colour too, since a terminal that ignores "dim" showed "f5 Dispatch" as if it worked.
            key_style = description_style = description_style + _DIMMED
        text.append(f" {self.app.get_key_display(binding)} ", key_style)
        if binding.description:
            text.append(f"{binding.description} ", description_style)
        hints.append(_Hint(start, text.cell_len, binding.key, enabled))

    def on_click(self, event: Any) -> None:
        for hint in self._hints:
            if hint.start <= event.x < hint.end:
                # A disabled key too: pressing it says why it is refused (ConsoleApp.run_action).
                self.app.simulate_key(hint.key)
                return


# ------------------------------------------------------------------------------------------
# table cells


class Cell:
    """A DataTable cell that sorts by `sort_key` and takes its colour from a component class of the
    table at render time, so a theme switch recolours it (DataTable clears its cache on style updates)."""

    __slots__ = ("component", "sort_key", "table", "text")

    def __init__(self, text: str, sort_key: Any = None, *, table: DataTable[Any] | None = None,
                 component: str = "") -> None:
        self.text = text
        self.sort_key = text if sort_key is None else sort_key
        self.table = table
        self.component = component

    def __rich__(self) -> Text:
        style = ""
        if self.table is not None and self.component:
            style = self.table.get_component_rich_style(self.component, partial=True)
        return Text(self.text, style=style, no_wrap=True, overflow="ellipsis", end="")

    def __str__(self) -> str:
        return self.text

    def __lt__(self, other: Cell) -> bool:
        return bool(self.sort_key < other.sort_key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cell) and (self.text, self.component) == (other.text, other.component)

    def __hash__(self) -> int:
        return hash((self.text, self.component))


STATE_COMPONENTS = {
    "pending": "state--pending", "scheduled": "state--scheduled", "running": "state--running",
    "completed": "state--completed", "failed": "state--failed", "skipped": "state--skipped",
    "interrupted": "state--interrupted", "online": "state--online", "offline": "state--offline",
    "stopped": "state--offline", "exited": "state--failed", "stopping": "state--scheduled",
    "draining": "state--scheduled",
}


class StateTable(DataTable[Any]):
    """A DataTable whose state cells take their colours from the theme (classes per state, k9s-style)."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {*STATE_COMPONENTS.values(), "state--error"}
    DEFAULT_CSS = """
    StateTable {
        height: 1fr;
        & > .state--pending { color: $text-muted; }
        & > .state--scheduled { color: $secondary; }
        & > .state--running { color: $primary; text-style: bold; }
        & > .state--completed { color: $success; }
        & > .state--failed { color: $error; text-style: bold; }
        & > .state--skipped { color: $warning; }
        & > .state--interrupted { color: $warning; }
        & > .state--online { color: $success; }
        & > .state--offline { color: $error; }
        & > .state--error { color: $error; }
    }
    """

    # Columns kept at the left while the table scrolls right, once it is wider than its window (an
    # 80-column terminal over SSH): what names a row stays next to the cells scrolled to. Only then,
    # since Textual draws fixed columns in their own colour and without the zebra stripes.
    pinned_columns = 0

    def on_resize(self) -> None:
        if self.pinned_columns:
            wide = sum(column.get_render_width(self) for column in self.ordered_columns)
            self.fixed_columns = self.pinned_columns if wide > self.scrollable_content_region.width else 0

    def cell(self, text: str, sort_key: Any = None, state: str = "") -> Cell:
        component = STATE_COMPONENTS.get(state.split(" ")[0], "") if state else ""
        if state == "error":
            component = "state--error"
        return Cell(text, sort_key, table=self, component=component)

    def selected_key(self) -> str | None:
        """The row key under the cursor, or None for an empty table."""
        if self.row_count == 0:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:
            return None

    def sync_row(self, key: str, column_keys: Iterable[str], shown: tuple[Any, ...] | None,
                 cells: tuple[Any, ...]) -> set[str]:
        """Adds the row, or updates only the cells that changed (never rebuilds); returns the changed columns."""
        if shown is None:
            self.add_row(*cells, key=key)
            return set(column_keys)
        changed = set()
        for column, before, after in zip(column_keys, shown, cells, strict=True):
            if before != after:
                self.update_cell(key, column, after, update_width=False)
                changed.add(column)
        return changed


# ------------------------------------------------------------------------------------------
# modals


class ConfirmModal(ModalScreen[bool]):
    """Asks before a destructive action (stop, delete, flash). `y` confirms; `n`, Esc or Enter on No cancel."""

    DEFAULT_CSS = """
    ConfirmModal {
        align: center middle;
        & > Vertical {
            width: 64;
            max-width: 100%;
            height: auto;
            border: thick $error 80%;
            background: $surface;
            padding: 1 2;
        }
        & #question { width: 1fr; margin-bottom: 1; }
        & Horizontal { height: auto; align-horizontal: right; }
        & Button { margin-left: 2; }
    }
    """
    BINDINGS: ClassVar = keys.CONFIRM

    def __init__(self, question: str, confirm_label: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Content(self.question), id="question")
            with Horizontal():
                yield Button(f"{self.confirm_label} (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


class PromptModal(ModalScreen[str | None]):
    """One line of input (e.g. how many local proplets to launch)."""

    DEFAULT_CSS = """
    PromptModal {
        align: center middle;
        & > Vertical {
            width: 56; max-width: 100%; height: auto; border: thick $primary; background: $surface; padding: 1 2;
        }
        & #question { width: 1fr; }
        & #error { color: $error; height: auto; }
    }
    """
    BINDINGS: ClassVar = [Binding("escape", "cancel", "Cancel", show=False)]

    def __init__(self, question: str, value: str = "", validate: Callable[[str], str | None] | None = None) -> None:
        super().__init__()
        self.question = question
        self.initial = value
        self.validate_text = validate

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, id="question")  # wrapped: a long question was cut at the edge
            yield ConsoleInput(self.initial, id="answer")
            yield Label("", id="error")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        problem = self.validate_text(event.value) if self.validate_text else None
        if problem:
            self.query_one("#error", Label).update(problem)
            return
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """`?`: what the focused widget and this view do, and every key that applies now (with binding ids
    for the keymap); keys disabled in read-only mode are marked."""

    DEFAULT_CSS = """
    HelpScreen {
        align: center middle;
        & > VerticalScroll {
            width: 90%;
            max-width: 110;
            height: 85%;
            border: thick $primary;
            background: $surface;
            padding: 0 1;
        }
        & #help-text { height: auto; margin-bottom: 1; }
        & DataTable { height: auto; }
        & #help-footer { color: $text-muted; }
    }
    """
    BINDINGS: ClassVar = [Binding("escape,question_mark,q", "close", "Close", show=False)]

    def __init__(self, title: str, text: str, bindings: list[tuple[str, str, str, bool]]) -> None:
        super().__init__()
        self.help_title = title
        self.help_text = text
        self.bindings = bindings

    def compose(self) -> ComposeResult:
        with VerticalScroll() as scroll:
            scroll.border_title = f"Help: {self.help_title}"
            if self.help_text:
                yield Markdown(self.help_text, id="help-text")
            table: DataTable[str] = DataTable(id="help-keys", cursor_type="row", zebra_stripes=True)
            table.add_columns("Key", "Does", "Binding id (keymap)", "")
            for key, description, binding_id, enabled in self.bindings:
                table.add_row(key, description, binding_id, "" if enabled else "disabled (read-only)")
            yield table
            yield Label("Esc closes. Change keys with `keymap:` in the console section of the config file.",
                        id="help-footer")

    def action_close(self) -> None:
        self.dismiss(None)
