"""Proplets: liveness, last heartbeat age, running tasks, CPU and memory; detail with history plots."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import DataTable, Label, Sparkline, Static

from console import keys
from console.base import ConsoleScreen, PaletteCommand
from console.fleet import PropletRow, short_size
from console.text import escape
from console.widgets import StateTable, StatusLine

COLUMNS = (("id", "ID", 26), ("name", "NAME", 16), ("state", "STATE", 8), ("seen", "LAST HEARTBEAT", 15),
           ("tasks", "TASKS", 7), ("cpu", "CPU %", 7), ("mem", "MEMORY", 10), ("runtime", "RUNTIME", 12),
           ("platform", "OS/ARCH", 14))
COLUMN_KEYS = tuple(key for key, _, _ in COLUMNS)


def age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "never"
    seconds = max(0.0, (now - then).total_seconds())
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h ago"
    return f"{seconds // 86400:.0f}d ago"


class PropletTable(StateTable):
    HELP = "Proplets known to this manager. **Enter**/**d** opens one; **/** filters; **y** copies the id."

    def row_cells(self, row: PropletRow, now: datetime) -> tuple[Any, ...]:
        state = row.state
        last = row.last_seen
        return (
            self.cell(row.id),
            self.cell(row.name),
            self.cell(state, state, state=state),
            self.cell(age(now, last), -(last.timestamp() if last else 0.0)),
            self.cell(f"{row.task_count}/{row.capacity}" if row.capacity else str(row.task_count), row.task_count),
            self.cell("" if row.cpu_percent is None else f"{row.cpu_percent:.1f}", row.cpu_percent or 0.0),
            self.cell("" if row.rss_bytes is None else short_size(row.rss_bytes), row.rss_bytes or 0),
            self.cell(row.runtime),
            self.cell(row.platform),
        )


class PropletsScreen(ConsoleScreen):
    CRUMB = "Proplets"
    BINDINGS: ClassVar = keys.PROPLETS
    HELP = """\
### Proplets
Liveness comes from heartbeats: a proplet is offline after three heartbeat intervals of silence, or at
once when its Last Will arrives. A proplet told to stop (SIGTERM) is **draining**: it finishes what
it runs, is sent no new task, and gives back what it has not finished. **D** forgets a proplet that
runs nothing (it reappears when it announces itself again).
"""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shown: dict[str, tuple[Any, ...]] = {}
        self._dirty: set[str] = set()

    def compose_body(self) -> ComposeResult:
        table = PropletTable(id="proplets", cursor_type="row", zebra_stripes=True)
        table.pinned_columns = 1
        for key, label, width in COLUMNS:
            table.add_column(label, key=key, width=width)
        yield table
        yield StatusLine(id="proplets-status", classes="status-line")

    def on_mount(self) -> None:
        self._dirty = self.console.fleet.watch_proplets()

    @property
    def table(self) -> PropletTable:
        return self.query_one("#proplets", PropletTable)

    def flush_body(self) -> None:
        fleet = self.console.fleet
        table = self.table
        now = self.console.clock()
        if self._filter_changed:
            self._filter_changed = False
            table.clear()
            self._shown.clear()
        # Ages change every second, so every row is compared; proplets are tens, not thousands.
        self._dirty.clear()
        added = False
        for proplet_id in sorted(set(fleet.proplets) | set(self._shown)):
            row = fleet.proplets.get(proplet_id)
            visible = row is not None and self.row_filter.matches(row.search_text())
            old = self._shown.get(proplet_id)
            if not visible:
                if old is not None:
                    table.remove_row(proplet_id)
                    del self._shown[proplet_id]
                continue
            assert row is not None
            cells = table.row_cells(row, now)
            table.sync_row(proplet_id, COLUMN_KEYS, old, cells)
            added = added or old is None
            self._shown[proplet_id] = cells
        if added:
            table.sort("id")
        online = sum(1 for p in fleet.proplets.values() if p.online)
        status = f"{online} online, {len(fleet.proplets) - online} offline"
        if self.row_filter.active:
            status += f" · {self.row_filter.describe()}"
        self.query_one("#proplets-status", StatusLine).show(status)

    def selected_id(self) -> str | None:
        return self.table.selected_key()

    @on(DataTable.RowSelected, "#proplets")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.app.push_screen(PropletDetailScreen(event.row_key.value))

    def action_describe(self) -> None:
        proplet_id = self.selected_id()
        if proplet_id:
            self.app.push_screen(PropletDetailScreen(proplet_id))

    def action_copy(self) -> None:
        proplet_id = self.selected_id()
        if proplet_id:
            self.app.copy_to_clipboard(proplet_id)
            self.notify(f"Copied proplet id {proplet_id}", timeout=3)

    def action_delete(self) -> None:
        proplet_id = self.selected_id()
        if proplet_id and not self.refused_read_only():
            self.console.confirm_forget_proplet(proplet_id)

    def palette_commands(self) -> list[PaletteCommand]:
        commands = [PaletteCommand("Proplets: filter", "Filter the proplet table", self.action_filter)]
        if self.selected_id():
            commands += [
                PaletteCommand("Proplet: describe", "Open the selected proplet", self.action_describe),
                PaletteCommand("Proplet: copy id", "Copy the selected proplet's id", self.action_copy),
                PaletteCommand("Proplet: forget", "Delete the selected proplet from the manager",
                               self.action_delete, True),
            ]
        return commands


class PropletDetailScreen(ConsoleScreen):
    """One proplet: identity, liveness, heartbeat history, CPU and memory plots, running tasks."""

    BINDINGS: ClassVar = [*keys.PROPLET_DETAIL, Binding("escape", "app.back", "Back", id="proplet.back")]
    HELP = """\
### Proplet
Heartbeat intervals, CPU and memory over the last samples (from the database when the view opens,
then live). **y** copies the id; **Esc** goes back.
"""
    DEFAULT_CSS = """
    PropletDetailScreen #proplet-fields { height: auto; padding: 0 1; }
    PropletDetailScreen .plot { height: 4; margin: 0 1; }
    PropletDetailScreen .plot-label { padding: 0 1; color: $text-muted; }
    """

    class Loaded(Message):
        """Stored metrics were fetched."""

    def __init__(self, proplet_id: str) -> None:
        super().__init__()
        self.proplet_id = proplet_id
        self.stored_cpu: list[float] = []
        self.stored_mem: list[float] = []
        self._dirty: set[str] = set()
        self._rendered: tuple[Any, ...] = ()

    def crumbs(self) -> list[str]:
        return ["Proplets", self.proplet_id]

    def compose_body(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(Content("loading…"), id="proplet-fields")
            with Vertical():
                yield Label("heartbeat interval (s), last 120", classes="plot-label", id="hb-label")
                yield Sparkline([], id="heartbeats", classes="plot")
                yield Label("CPU %", classes="plot-label", id="cpu-label")
                yield Sparkline([], id="cpu", classes="plot")
                yield Label("memory (RSS)", classes="plot-label", id="mem-label")
                yield Sparkline([], id="memory", classes="plot")
            with Horizontal():
                yield Static(id="running")

    def on_mount(self) -> None:
        self._dirty = self.console.fleet.watch_proplets()
        self.load()

    def on_unmount(self) -> None:
        self.console.fleet.unwatch_proplets(self._dirty)

    @work(exclusive=True, group="proplet-detail", description="Loading proplet metrics", exit_on_error=False)
    async def load(self) -> None:
        page = await self.console.manager.proplet_metrics(self.proplet_id, 0, 120)
        samples = sorted(page.items, key=lambda m: m.timestamp)
        self.stored_cpu = [float(m.cpu_metrics.get("percent", 0.0) or 0.0) for m in samples]
        self.stored_mem = [float(m.memory_metrics.get("rss_bytes", 0) or 0) for m in samples]
        self.post_message(self.Loaded())

    @on(Loaded)
    def _loaded(self) -> None:
        self._rendered = ()
        self.flush_body()

    def flush_body(self) -> None:
        row = self.console.fleet.proplets.get(self.proplet_id)
        self._dirty.clear()
        if row is None:
            self.query_one("#proplet-fields", Static).update(
                Content(f"Proplet {self.proplet_id} is no longer known to the manager."))
            return
        now = self.console.clock()
        running = self.console.running_by_proplet.get(self.proplet_id, [])
        key = (row.state, row.last_seen, row.offline_reason, row.task_count, row.cpu_percent, row.rss_bytes,
               len(row.heartbeats), len(row.cpu), tuple(running), age(now, row.last_seen))
        if key == self._rendered:
            return
        self._rendered = key
        state = {"online": "[$success]online[/]", "offline": "[$error]offline[/]",
                 "draining": "[$warning]draining[/]: shutting down, finishing its tasks, sent no new one"}[row.state]
        lines = [
            f"[b]{escape(row.id)}[/b]  ({escape(row.name)})",
            f"state      {state}" + (f"  {escape(row.offline_reason)}" if row.offline_reason else ""),
            f"heartbeat  {age(now, row.last_seen)}   ({len(row.heartbeats)} seen)",
            f"tasks      {row.task_count}" + (f" of {row.slots} slots" if row.slots else "")
            + (f" + {row.capacity - row.slots} queued on the proplet"
               if row.slots and row.capacity and row.capacity > row.slots else ""),
            f"runtime    {escape(row.runtime or '-')}   {escape(row.platform or '')}",
        ]
        if row.takes:
            lines.append(f"takes      {escape(row.takes)}")
        if row.metrics_url:
            lines.append(f"metrics    {escape(row.metrics_url)}")
        if row.cpu_percent is not None:
            lines.append(f"cpu        {row.cpu_percent:.1f} %   memory {short_size(row.rss_bytes or 0)}")
        self.query_one("#proplet-fields", Static).update(Content.from_markup("\n".join(lines)))
        beats = list(row.heartbeats)
        intervals = [(b - a).total_seconds() for a, b in itertools.pairwise(beats)]
        self.query_one("#heartbeats", Sparkline).data = intervals or [0.0]
        if intervals:
            self.query_one("#hb-label", Label).update(
                f"heartbeat interval (s), last {len(intervals)}: min {min(intervals):.1f}, "
                f"mean {sum(intervals) / len(intervals):.1f}, max {max(intervals):.1f}")
        self.query_one("#cpu", Sparkline).data = (self.stored_cpu + list(row.cpu))[-120:] or [0.0]
        memory = (self.stored_mem + list(row.memory))[-120:]
        self.query_one("#memory", Sparkline).data = memory or [0.0]
        if memory:
            self.query_one("#mem-label", Label).update(
                f"memory (RSS), {short_size(int(min(memory)))} .. {short_size(int(max(memory)))}")
        text = "running tasks: " + (", ".join(running) if running else "none")
        self.query_one("#running", Static).update(Content(text))

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.proplet_id)
        self.notify(f"Copied proplet id {self.proplet_id}", timeout=3)

    def action_reload(self) -> None:
        self.load()
