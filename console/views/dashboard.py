"""Dashboard: the fleet at a glance."""

from __future__ import annotations

import textwrap
import time
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.content import Content
from textual.widgets import Label, Sparkline, Static

from console.base import ConsoleScreen
from console.text import escape
from console.views.proplets import age
from console.views.tasks import fmt_time, short_id
from core.domain import TaskState

STATE_VARS = {TaskState.PENDING: "$text-muted", TaskState.SCHEDULED: "$secondary", TaskState.RUNNING: "$primary",
              TaskState.COMPLETED: "$success", TaskState.FAILED: "$error", TaskState.SKIPPED: "$warning",
              TaskState.INTERRUPTED: "$warning"}


class Panel(Vertical):
    DEFAULT_CSS = """
    Panel {
        border: round $panel;
        border-title-color: $primary;
        border-title-style: bold;
        padding: 0 1;
        height: 1fr;
    }
    Panel > Static { height: auto; text-wrap: nowrap; text-overflow: ellipsis; }
    Panel > Sparkline { height: 2; margin-bottom: 1; }
    Panel > .caption { color: $text-muted; height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, title: str, *children: Any, **kwargs: Any) -> None:
        super().__init__(*children, **kwargs)
        self.border_title = title


class DashboardScreen(ConsoleScreen):
    CRUMB = "Dashboard"
    BINDINGS: ClassVar = []
    HELP = """\
### Dashboard
The fleet at a glance: proplets, tasks by state (from the database), throughput and heartbeats over
the last minute, the broker and the database, and the latest failures.
"""
    # Three columns where there is room, two on an 80-column terminal.
    HORIZONTAL_BREAKPOINTS: ClassVar = [(0, "-narrow"), (110, "-wide")]
    # On a short terminal (24 lines: five lines inside a panel) the states go in two columns without
    # bars and the sparklines take a line each, so every state and both rates stay in view.
    VERTICAL_BREAKPOINTS: ClassVar = [(0, "-short"), (30, "-tall")]
    DEFAULT_CSS = """
    DashboardScreen #dash-grid {
        grid-size: 3 2;
        grid-columns: 1fr 1fr 1fr;
        grid-rows: 1fr 1fr;
        height: 1fr;
    }
    DashboardScreen.-narrow #dash-grid {
        grid-size: 2 3;
        grid-columns: 1fr 1fr;
        grid-rows: 1fr 1fr 1fr;
    }
    DashboardScreen.-short Panel > Sparkline { height: 1; margin-bottom: 0; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last: dict[str, Any] = {}

    def compose_body(self) -> ComposeResult:
        with Grid(id="dash-grid"):
            yield Panel("Proplets", Static(id="dash-proplets"))
            yield Panel("Tasks by state", Static(id="dash-tasks"))
            yield Panel("Broker and database", Static(id="dash-services"))
            yield Panel(
                "Throughput (last 60 s)",
                Label("finished per second", classes="caption", id="finished-caption"),
                Sparkline([0.0], id="finished-rate"),
                Label("dispatched per second", classes="caption", id="dispatched-caption"),
                Sparkline([0.0], id="dispatched-rate"),
            )
            yield Panel(
                "Heartbeats and MQTT (last 60 s)",
                Label("heartbeats per second", classes="caption", id="heartbeat-caption"),
                Sparkline([0.0], id="heartbeat-rate"),
                Label("MQTT messages per second", classes="caption", id="mqtt-caption"),
                Sparkline([0.0], id="mqtt-rate"),
            )
            yield Panel("Recent failures", Static(id="dash-failures"))

    def on_resize(self) -> None:
        # The short or tall form follows the size classes Textual sets in its own resize handler,
        # which runs after this one: drawn again right after it rather than a refresh later.
        if self.flushed_at:  # drawn once already (before that, the first refresh draws it)
            self.call_next(self.flush)

    def _set(self, widget_id: str, markup: str) -> None:
        if self._last.get(widget_id) == markup:
            return
        self._last[widget_id] = markup
        self.query_one(f"#{widget_id}", Static).update(Content.from_markup(markup))

    def _spark(self, widget_id: str, values: list[float], caption_id: str, caption: str) -> None:
        key = (tuple(values), caption)
        if self._last.get(widget_id) == key:
            return
        self._last[widget_id] = key
        self.query_one(f"#{widget_id}", Sparkline).data = values
        self.query_one(f"#{caption_id}", Label).update(caption)

    def flush_body(self) -> None:
        app = self.console
        fleet = app.fleet
        now = app.clock()
        # Proplets
        proplets = sorted(fleet.proplets.values(), key=lambda p: (not p.online, p.id))
        online = sum(1 for p in proplets if p.online)
        short = self.has_class("-short")
        lines = [f"[b $success]{online}[/] online   [b $error]{len(proplets) - online}[/] offline"]
        if not short or proplets:
            lines.append("")
        # The ids as wide as the longest shown, not 22: a panel is 36 columns wide on an 80-column
        # terminal (42 on a wide one), and the task counts were cut off the end of the line.
        id_width = max((len(p.id[:22]) for p in proplets[:8]), default=0)
        for p in proplets[:8]:
            dot = "[$success]●[/]" if p.online else "[$error]○[/]"
            lines.append(f"{dot} {escape(p.id[:22]):<{id_width}} {age(now, p.last_seen):>7}  {p.task_count} tasks")
        if len(proplets) > 8:
            lines.append(f"… and {len(proplets) - 8} more (:proplets)")
        if not proplets:
            # Wrapped to the panel: its lines do not wrap, and the way to launch one was cut off.
            width = max(20, self.query_one("#dash-proplets", Static).content_size.width or 42)
            lines += textwrap.wrap("No proplet has joined yet. Launch one with :local (then a), or start "
                                   "`propeller proplet` on a machine that reaches the broker.", width)
        self._set("dash-proplets", "\n".join(lines))
        # Tasks by state
        counts = fleet.counts
        total = sum(counts.values())

        def state_text(state: TaskState, label: int, number: int = 6) -> str:
            return f"[{STATE_VARS[state]}]{state.label:<{label}}[/] {counts.get(state, 0):>{number},}"

        rows = []
        if short:
            # Waiting and running on the left, finished on the right: 4 lines instead of 7, in the
            # 36 columns of a panel on an 80-column terminal.
            states = list(TaskState)
            left, right = states[:3], states[3:]
            for i, state in enumerate(right):
                rows.append(f"{state_text(left[i], 9) if i < len(left) else ' ' * 16}  {state_text(state, 11)}")
        else:
            for state in TaskState:
                n = counts.get(state, 0)
                bar = "█" * (int(24 * n / total) if total else 0)
                rows.append(f"{state_text(state, 12, 7)}  [{STATE_VARS[state]}]{bar}[/]")
        status = app.core_status
        assert status is not None, "flushed before the fleet was loaded"
        if not short:
            rows.append("")
        rows.append(f"total {total:,}   active {status.active:,}   queued {status.backlog:,}")
        self._set("dash-tasks", "\n".join(rows))
        # Broker and database
        broker = "[$success]connected[/]" if status.broker_connected else "[$error]not connected[/]"
        lines = []
        problems = [status.broker_error, f"database: {status.store_error}" if status.store_error else ""]
        if any(problems):
            # The manager keeps retrying; the reason (and what to do) is otherwise only in the log file.
            # Wrapped here: the panel's lines do not wrap (each would be cut to one line). First in the
            # panel, which shows five lines on a 24-line terminal: under the others, it was cut off.
            width = max(20, self.query_one("#dash-services", Static).content_size.width or 46)
            for problem in filter(None, problems):
                lines += [f"[$error]{escape(line)}[/]" for line in textwrap.wrap(problem, width)]
                lines.append("")
        lines += [
            f"broker    {escape(status.broker_url)}",
            f"          {broker}{' (in-process broker)' if status.broker_embedded else ''}",
            f"topics    m/{escape(app.manager.settings.tenant_id)}/c/{escape(app.manager.settings.channel_id)}/…",
            f"database  {escape(app.store_description())}",
            *([] if status.store_connected else ["          [$error]unreachable[/] (writes wait, retried)"]),
            f"REST API  {escape(status.api_url or 'off')}",
            *(["OCI proxy hosted here (MANAGER_OCI_PROXY)"] if app.manager.settings.oci_proxy else []),
        ]
        if fleet.rejected:
            _at, topic, reason = fleet.rejected[-1]
            lines.append(f"rejected  {len(fleet.rejected)} messages; last: {escape(topic)}: {escape(reason[:60])}")
        self._set("dash-services", "\n".join(lines))
        # Rates
        wall = time.time()
        finished = fleet.finished_rate.values(wall)
        dispatched = fleet.dispatched_rate.values(wall)
        heartbeats = fleet.heartbeat_rate.values(wall)
        traffic = [a + b for a, b in zip(app.traffic.rate_in.values(wall), app.traffic.rate_out.values(wall),
                                         strict=True)]
        self._spark("finished-rate", finished, "finished-caption", f"finished per second, now {finished[-1]:,.0f}")
        self._spark("dispatched-rate", dispatched, "dispatched-caption",
                    f"dispatched per second, now {dispatched[-1]:,.0f}")
        self._spark("heartbeat-rate", heartbeats, "heartbeat-caption",
                    f"heartbeats per second, now {heartbeats[-1]:,.0f}")
        self._spark("mqtt-rate", traffic, "mqtt-caption", f"MQTT messages per second, now {traffic[-1]:,.0f}")
        # Failures
        failures = fleet.recent_failures(8)
        if failures:
            lines = []
            for f in failures[:6]:
                lines.append(f"[$error]{fmt_time(f.at)}[/] {short_id(f.task_id)} [b]{escape(f.name[:20])}[/]")
                lines.append(f"  [$text-muted]{escape(f.detail.replace(chr(10), ' ')[:200])}[/]")
        else:
            lines = ["No task failed since the console started."]
        self._set("dash-failures", "\n".join(lines))
