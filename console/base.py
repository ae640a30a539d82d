"""The base of every console view: header, body, command and filter bars, footer; read-only gating;
rendering only when shown, at the app's fixed cadence."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from textual import events, on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker

from console import keys
from console.filtering import RowFilter
from console.widgets import CommandBar, FilterBar, FleetHeader, KeyHints, WordSuggester

# A filter being typed is applied at once, then at most once per this many seconds while keys keep
# coming: a table of 1,000 rows takes 0.1-0.2 s to fill again, and each key typed meanwhile filled it
# again, so the list fell further behind the keys the faster one typed.
FILTER_SETTLE_S = 0.1
READ_ONLY = "the console is read-only (--read-only or console.read_only)"

if TYPE_CHECKING:
    from console.app import ConsoleApp


def app_style_inputs(app: App[Any]) -> tuple[object, ...]:
    """What a widget's styles depend on outside its own screen: the app's classes and pseudo-classes
    (focus, dark, ansi, ...) and the theme. Textual applies a change of these to the screens shown at
    the time only; the CSS itself, when it changes, is applied again on a view switch by Textual."""
    return app.theme, app.classes, app.pseudo_classes


@dataclass(frozen=True, slots=True)
class PaletteCommand:
    name: str
    help: str
    callback: Any
    mutating: bool = False


class ConsoleScreen(Screen[None]):
    """A view. Subclasses implement `compose_body`, `flush_body` and may set HELP (markdown)."""

    CRUMB: ClassVar[str] = ""
    HELP: ClassVar[str] = ""
    MUTATING: ClassVar[frozenset[str]] = keys.MUTATING

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.row_filter = RowFilter()
        self._filter_changed = False
        self._filter_applied_at = 0.0  # perf_counter() when a typed filter was last applied
        self._filter_timer: Any = None
        self.flushed_at = 0.0  # perf_counter() of the last catch-up with the fleet's state
        self.hidden_at = 0.0  # perf_counter() of when another screen last covered this one
        self._styled_for: tuple[object, ...] | None = None  # app_style_inputs() when last covered

    @property
    def console(self) -> ConsoleApp:
        return cast("ConsoleApp", self.app)

    def compose(self) -> ComposeResult:
        yield FleetHeader()
        yield from self.compose_body()
        yield FilterBar(placeholder="filter: regex, ! in front inverts; Enter keeps it, Esc clears it")
        # 71 columns: whole inside the bar on an 80-column terminal (it was cut after "theme").
        yield CommandBar(placeholder=":tasks, proplets, mqtt, dispatch, local, fw, fl, dash, theme <name>, q",
                         suggester=WordSuggester(lambda: self.console.command_words()))
        yield KeyHints()

    def compose_body(self) -> ComposeResult:
        yield from ()

    # -- rendering at the app's cadence ------------------------------------------------

    def _on_mount(self) -> None:
        self._ready = True

    def flush(self) -> None:
        """Called by the app every refresh interval while this screen is the active one."""
        headers = self.query(FleetHeader)
        if not getattr(self, "_ready", False) or not headers:
            return  # not composed yet, or being taken down
        self.console.update_header(headers.first(), self.crumbs())
        self.flush_body()
        self.flushed_at = time.perf_counter()

    def flush_body(self) -> None:
        pass

    def on_screen_suspend(self) -> None:
        self.hidden_at = time.perf_counter()
        self._styled_for = app_style_inputs(self.app)

    def on_screen_resume(self, event: events.ScreenResume | None = None) -> None:
        # Textual styles every widget of a screen again when it is shown (Screen._on_screen_resume,
        # which runs after this handler), and restyling clears each widget's rendered lines, so the
        # first frame renders everything anew: 10 ms of styling and a full frame on every view switch,
        # half of a switch's latency under a traffic flood. A screen's styles go stale while it is
        # hidden only if what they depend on outside it changed meanwhile; otherwise it is skipped.
        if (event is not None and event.refresh_styles and self._styled_for is not None
                and self._styled_for == app_style_inputs(self.app)):
            event.refresh_styles = False
        # Hidden views are not rendered; catch up at once when shown again (back from a detail
        # screen or a dialog). A view switch has caught up already, before the screen resumed.
        if self.flushed_at <= self.hidden_at:
            self.flush()

    def crumbs(self) -> list[str]:
        crumbs = [self.CRUMB]
        if self.row_filter.active:
            crumbs.append(self.row_filter.describe())
        return crumbs

    # -- read-only gating ----------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.MUTATING and self.console.read_only:
            return None  # shown greyed out in the footer, not run
        return True

    def refused_read_only(self, what: str = "") -> bool:
        """Whether the console is read-only; if so, says so (what: the refused action, as the footer names it)."""
        if self.console.read_only:
            self.notify(f"{what or 'This action'} is disabled: {READ_ONLY}.", severity="warning")
            return True
        return False

    def refuse_binding(self, action: str) -> bool:
        """Refuses a mutating binding's action in read-only mode, naming it (ConsoleApp.run_action): Textual
        passes over a key whose action check_action disables without a word."""
        if not self.console.read_only or action.partition("(")[0] not in self.MUTATING:
            return False
        described = next((b.description for b in self.BINDINGS
                          if isinstance(b, Binding) and b.action == action and b.description), "")
        return self.refused_read_only(described)

    # -- bars ----------------------------------------------------------------------------

    def open_command_bar(self) -> None:
        self.query_one(CommandBar).open()

    def action_filter(self) -> None:
        bar = self.query_one(FilterBar)
        bar.value = self.row_filter.text
        bar.open()

    @on(FilterBar.FilterChanged)
    def _filter_text(self, event: FilterBar.FilterChanged) -> None:
        self.row_filter = RowFilter.parse(event.text)
        self._filter_changed = True
        # Not left to the cadence, so the list follows the keys; but coalesced (FILTER_SETTLE_S).
        wait = self._filter_applied_at + FILTER_SETTLE_S - time.perf_counter()
        if wait <= 0:
            self._apply_filter()
        elif self._filter_timer is None:
            self._filter_timer = self.set_timer(wait, self._apply_filter)

    def _apply_filter(self) -> None:
        self._filter_timer = None
        if self._filter_changed:  # not already applied by the cadence meanwhile
            self.flush()
        self._filter_applied_at = time.perf_counter()

    def clear_filter(self) -> bool:
        if not self.row_filter.active:
            return False
        bar = self.query_one(FilterBar)
        bar.value = ""
        self.row_filter = RowFilter()
        self._filter_changed = True
        self.flush()
        return True

    def palette_commands(self) -> list[PaletteCommand]:
        return []

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        # Worker state messages do not bubble: each screen hands failures to the app's one handler.
        self.console.report_worker_error(event.worker)
