"""Tasks: a live table updated in place by row key, and the task detail screen with its timeline."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import DataTable, Label, Static

from console import keys
from console.base import ConsoleScreen, PaletteCommand
from console.fleet import TaskRow, result_text
from console.text import escape
from console.widgets import ConfirmModal, StateTable, StatusLine
from core.bounded import size_text
from core.domain import TaskState

COLUMNS = (("id", "ID", 10), ("name", "NAME", 14), ("state", "STATE", 11), ("proplet", "PROPLET", 22),
           ("created", "CREATED (UTC)", 14), ("duration", "DURATION", 9), ("outcome", "RESULT / REASON", 40))
COLUMN_KEYS = tuple(key for key, _, _ in COLUMNS)
# Characters of a result or an error the detail screen lays out; `c` copies the whole result.
DETAIL_TEXT_MAX = 16_000
SORTS = {"name": "name", "state": "state", "created": "created", "proplet": "proplet"}


def short_id(task_id: str) -> str:
    return task_id[:8]


def fmt_time(at: datetime | None, with_date: bool = True) -> str:
    if at is None:
        return ""
    return at.strftime("%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def outcome_text(row: TaskRow, width: int = 80) -> str:
    text = row.outcome.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


class TasksTable(StateTable):
    HELP = """\
The task table updates in place as tasks change state. **Enter** or **d** opens a task,
**/** filters (regex, `!` inverts), **N S A P** sort by name, state, age, proplet (again: reverse).
"""

    def row_cells(self, row: TaskRow) -> tuple[Any, ...]:
        state = row.state.label
        return (
            self.cell(short_id(row.id), row.id),
            self.cell(row.name),
            self.cell(state, (row.state.is_terminal, state), state=state),
            self.cell(row.proplet_id),
            self.cell(fmt_time(row.created_at), row.created_at or datetime.min),
            self.cell(fmt_duration(row.duration), row.duration or 0.0),
            self.cell(outcome_text(row), state="error" if row.error else ""),
        )


class TasksScreen(ConsoleScreen):
    CRUMB = "Tasks"
    BINDINGS: ClassVar = keys.TASKS
    HELP = """\
### Tasks
Every task of this manager, newest first, updated live (at most `console.task_rows`; the oldest finished
ones leave first). Colours follow the state. **s** starts a task (a finished one runs again), **x** stops
it and **D** deletes it (both ask first), **y** copies its id (OSC 52, works over SSH). **i** calls a
deployed latent task (dispatched with the form's latent box) with the inputs you type, and tells its result.
"""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shown: dict[str, tuple[Any, ...]] = {}
        self._dirty: set[str] = set()
        self._generation = -1
        self.sort_column = "created"
        self.sort_reverse = True

    def compose_body(self) -> ComposeResult:
        table = TasksTable(id="tasks", cursor_type="row", zebra_stripes=True)
        # Only the id: what is left of the window must hold the last column whole, or scrolled to the
        # end the result's first characters were under the pinned ones.
        table.pinned_columns = 1
        for key, label, width in COLUMNS:
            table.add_column(label, key=key, width=width)
        yield table
        yield StatusLine(id="tasks-status", classes="status-line")

    def on_mount(self) -> None:
        self._dirty = self.console.fleet.watch_tasks()

    @property
    def table(self) -> TasksTable:
        return self.query_one("#tasks", TasksTable)

    def flush_body(self) -> None:
        fleet = self.console.fleet
        table = self.table
        if not fleet.loaded:
            return
        if self._generation != fleet.generation or self._filter_changed or len(self._dirty) > max(
                50, len(self._shown) // 2):
            self._rebuild()
        elif self._dirty:
            self._apply_dirty()
        shown = table.row_count
        total = fleet.counts_total if fleet.counts_total else len(fleet.tasks)
        status = f"{shown} shown of {total} tasks"
        if self.row_filter.active:
            status += f" · {self.row_filter.describe()}"
        self.query_one("#tasks-status", StatusLine).show(status)

    def _rebuild(self) -> None:
        fleet = self.console.fleet
        table = self.table
        self._generation = fleet.generation
        self._filter_changed = False
        self._dirty.clear()
        selected = self.selected_id()
        table.clear()
        self._shown.clear()
        for row in reversed(fleet.tasks.values()):
            if self.row_filter.matches(row.search_text()):
                cells = table.row_cells(row)
                table.add_row(*cells, key=row.id)
                self._shown[row.id] = cells
        self._sort()
        self.select(selected)

    def _apply_dirty(self) -> None:
        fleet = self.console.fleet
        table = self.table
        ids = list(self._dirty)
        self._dirty.clear()
        resort = False
        for task_id in ids:
            row = fleet.tasks.get(task_id)
            visible = row is not None and self.row_filter.matches(row.search_text())
            old = self._shown.get(task_id)
            if not visible:
                if old is not None:
                    table.remove_row(task_id)
                    del self._shown[task_id]
                continue
            assert row is not None
            cells = table.row_cells(row)
            resort = self.sort_column in table.sync_row(task_id, COLUMN_KEYS, old, cells) or resort
            self._shown[task_id] = cells
        if resort:
            self._sort()

    def _sort(self) -> None:
        if self.table.row_count > 1:
            self.table.sort(self.sort_column, key=lambda cell: cell.sort_key, reverse=self.sort_reverse)

    # -- selection -------------------------------------------------------------------------

    def selected_id(self) -> str | None:
        return self.table.selected_key()

    def select(self, task_id: str | None) -> None:
        if task_id is None or task_id not in self._shown:
            return
        self.table.move_cursor(row=self.table.get_row_index(task_id))

    # -- actions ---------------------------------------------------------------------------

    @on(DataTable.RowSelected, "#tasks")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.app.push_screen(TaskDetailScreen(event.row_key.value))

    def action_describe(self) -> None:
        task_id = self.selected_id()
        if task_id:
            self.app.push_screen(TaskDetailScreen(task_id))

    def action_sort(self, column: str) -> None:
        if self.sort_column == column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column = column
            self.sort_reverse = column == "created"
        self._sort()
        self.notify(f"Sorted by {column}{' (descending)' if self.sort_reverse else ''}", timeout=2)

    def action_copy(self) -> None:
        task_id = self.selected_id()
        if task_id:
            self.app.copy_to_clipboard(task_id)
            self.notify(f"Copied task id {task_id}", timeout=3)

    def action_start(self) -> None:
        task_id = self.selected_id()
        if task_id and not self.refused_read_only():
            self.console.start_task(task_id)

    def action_stop(self) -> None:
        task_id = self.selected_id()
        if task_id and not self.refused_read_only():
            self.console.confirm_stop_task(task_id)

    def action_delete(self) -> None:
        task_id = self.selected_id()
        if task_id and not self.refused_read_only():
            self.console.confirm_delete_task(task_id)

    def action_invoke(self) -> None:
        task_id = self.selected_id()
        if task_id and not self.refused_read_only():
            self.console.invoke_task(task_id)

    def action_reload(self) -> None:
        self.console.reload_tasks()

    def palette_commands(self) -> list[PaletteCommand]:
        commands = [
            PaletteCommand("Tasks: filter", "Filter the task table (regex, ! inverts)", self.action_filter),
            PaletteCommand("Tasks: sort by state", "Sort the table by state", lambda: self.action_sort("state")),
            PaletteCommand("Tasks: sort by name", "Sort the table by name", lambda: self.action_sort("name")),
            PaletteCommand("Tasks: reload", "Reload the task list from the database", self.action_reload),
        ]
        if self.selected_id():
            commands += [
                PaletteCommand("Task: describe", "Open the selected task", self.action_describe),
                PaletteCommand("Task: copy id", "Copy the selected task's id", self.action_copy),
                PaletteCommand("Task: start / re-run", "Queue the selected task", self.action_start, True),
                PaletteCommand("Task: stop", "Stop the selected task", self.action_stop, True),
                PaletteCommand("Task: delete", "Delete the selected task", self.action_delete, True),
                PaletteCommand("Task: invoke", "Call the selected latent task", self.action_invoke, True),
            ]
        return commands


# How often the detail of a running task fetches its latest metrics sample again.
USAGE_REFRESH_S = 2.0


class TaskDetailScreen(ConsoleScreen):
    """One task: fields, inputs, results or error, its proplet, and the lifecycle timeline."""

    BINDINGS: ClassVar = [*keys.TASK_DETAIL, Binding("escape", "app.back", "Back", id="task.back")]
    HELP = """\
### Task
The lifecycle timeline lists every transition with its time and how long the task stayed in that
state. A task that has run for a moment shows its CPU and memory (its proplet's latest sample).
**s** starts it again (a new attempt), **x** stops it, **D** deletes it; **y** copies the id,
**c** the result. **i** calls a deployed latent task with the inputs you type (its last call is
shown here). **Esc** goes back.
"""
    DEFAULT_CSS = """
    TaskDetailScreen #task-fields { height: auto; padding: 0 1; }
    TaskDetailScreen #timeline { height: auto; max-height: 16; margin: 1 0; }
    TaskDetailScreen #task-output { height: auto; padding: 0 1; }
    """

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id
        self.task_data: Any = None
        self.events: list[Any] = []
        # Its latest task_metrics sample (its proplet's, while it runs), and when it was fetched.
        self.usage: Any = None
        self._usage_at = 0.0
        self._dirty: set[str] = set()
        # The latest call made from here of a latent task (TaskInvokedHere).
        self.last_call: Any = None

    def crumbs(self) -> list[str]:
        return ["Tasks", short_id(self.task_id)]

    def compose_body(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(Content("loading…"), id="task-fields")
            yield Label(Content.from_markup("[b]Lifecycle[/b]"))
            timeline = StateTable(id="timeline", cursor_type="row", zebra_stripes=True)
            for key, label in (("at", "TIME (UTC)"), ("state", "STATE"), ("took", "FOR"), ("attempt", "ATTEMPT"),
                               ("proplet", "PROPLET"), ("detail", "DETAIL")):
                timeline.add_column(label, key=key)
            yield timeline
            with Horizontal(id="task-output-row"):
                yield Static(id="task-output")

    def on_mount(self) -> None:
        self._dirty = self.console.fleet.watch_tasks()
        self._dirty.clear()
        self.load()

    def on_unmount(self) -> None:
        self.console.fleet.unwatch_tasks(self._dirty)

    @work(exclusive=True, group="task-detail", description="Loading the task", exit_on_error=False)
    async def load(self) -> None:
        manager = self.console.manager
        self._usage_at = time.monotonic()
        task = await manager.get_task(self.task_id)
        events = await manager.task_events(self.task_id)
        usage = await manager.latest_task_metrics(self.task_id)
        self.task_data, self.events, self.usage = task, events, usage
        self.post_message(self.Loaded())

    @work(exclusive=True, group="task-usage", description="Loading the task's metrics", exit_on_error=False)
    async def load_usage(self) -> None:
        """Only the latest metrics sample: the task and its timeline change with its events."""
        self._usage_at = time.monotonic()
        self.usage = await self.console.manager.latest_task_metrics(self.task_id)
        self.post_message(self.Loaded())

    class Loaded(Message):
        """The task and its timeline, or its metrics, were fetched."""

    @on(Loaded)
    def _loaded(self) -> None:
        self.render_task()

    def flush_body(self) -> None:
        if self.task_id in self._dirty:
            self._dirty.clear()
            self.load()
            return
        self._dirty.clear()
        running = self.task_data is not None and self.task_data.state is TaskState.RUNNING
        if running and time.monotonic() - self._usage_at >= USAGE_REFRESH_S:
            self.load_usage()

    def render_task(self) -> None:
        task = self.task_data
        if task is None:
            return
        state = task.state.label
        limits = task.limits.to_dict()
        lines = [
            f"[b]{escape(task.name)}[/b]  {task.id}",
            f"state      [{_state_var(state)}]{state}[/]   attempt {task.attempt}"
            + (f"   retries {task.retries}/{task.max_retries}" if task.max_retries else ""),
            f"proplet    {task.proplet_id or '-'}" + ("  (pinned)" if task.pinned else "")
            + ("  (broadcast)" if task.broadcast else ""),
            f"module     {escape(task.image_url or task.wasm_digest or '-')}",
            f"inputs     {escape(' '.join(task.inputs) or '-')}",
        ]
        if task.env:
            lines.append("env        " + escape(" ".join(f"{k}={v}" for k, v in task.env.items())))
        if limits:
            lines.append("limits     " + ", ".join(f"{k}={v}" for k, v in limits.items()))
        if task.daemon:
            lines.append("daemon     yes")
        if task.latent:
            lines.append("latent     yes: deployed while it runs; i calls it")
        if self.last_call is not None:
            call = self.last_call
            lines.append(f"last call  {escape(' '.join(call.inputs) or '(its own inputs)')} → "
                         f"{escape(_shown_in_part(call.results)) or '(nothing)'}   in {fmt_duration(call.seconds)}")
        if task.workflow_id or task.job_id:
            lines.append("group      " + (f"workflow {task.workflow_id}" if task.workflow_id else f"job {task.job_id}"))
        if task.depends_on:
            lines.append(f"after      {' '.join(task.depends_on)}   run_if {task.run_if or 'success'}")
        lines.append(f"created    {fmt_time(task.created_at)}   started {fmt_time(task.start_time) or '-'}"
                     f"   finished {fmt_time(task.finish_time) or '-'}")
        if task.reason and not task.state.is_terminal:
            lines.append(f"waiting    {escape(task.reason)}")
        if self.usage is not None:
            lines.append("usage      " + usage_text(self.usage.metrics, self.usage.aggregated)
                         + f"   (sampled {fmt_time(self.usage.timestamp)})")
        self.query_one("#task-fields", Static).update(Content.from_markup("\n".join(lines)))
        out = []
        if task.results is not None:
            out.append("[b $success]Result[/]  " + escape(_shown_in_part(result_text(task.results))))
        if task.error:
            out.append("[b $error]Error[/]   " + escape(_shown_in_part(task.error)))
        self.query_one("#task-output", Static).update(Content.from_markup("\n".join(out)))
        timeline = self.query_one("#timeline", StateTable)
        timeline.clear()
        for i, e in enumerate(self.events):
            nxt = self.events[i + 1].at if i + 1 < len(self.events) else None
            took = (nxt - e.at).total_seconds() if nxt else None
            if nxt is None and not e.state.is_terminal:
                took = (self.console.clock() - e.at).total_seconds()
            label = e.state.label
            timeline.add_row(timeline.cell(fmt_time(e.at)), timeline.cell(label, state=label),
                             timeline.cell(fmt_duration(took) + ("…" if nxt is None and took is not None else "")),
                             timeline.cell(str(e.attempt)), timeline.cell(e.proplet_id),
                             timeline.cell(e.detail))

    def action_start(self) -> None:
        if not self.refused_read_only():
            self.console.start_task(self.task_id)

    def action_stop(self) -> None:
        if not self.refused_read_only():
            self.console.confirm_stop_task(self.task_id)

    def action_delete(self) -> None:
        if not self.refused_read_only():
            self.console.confirm_delete_task(self.task_id)

    def action_invoke(self) -> None:
        if not self.refused_read_only():
            self.console.invoke_task(self.task_id)

    def show_call(self, call: Any) -> None:
        self.last_call = call
        self.render_task()

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.task_id)
        self.notify(f"Copied task id {self.task_id}", timeout=3)

    def action_copy_result(self) -> None:
        task = self.task_data
        if task is None or (task.results is None and not task.error):
            self.notify("This task has no result yet.", severity="warning")
            return
        text = result_text(task.results) if task.results is not None else task.error
        self.app.copy_to_clipboard(text)
        self.notify("Copied the result", timeout=3)

    def action_reload(self) -> None:
        self.load()

    def palette_commands(self) -> list[PaletteCommand]:
        return [
            PaletteCommand("Task: start / re-run", "Queue this task again", self.action_start, True),
            PaletteCommand("Task: stop", "Stop this task", self.action_stop, True),
            PaletteCommand("Task: delete", "Delete this task", self.action_delete, True),
            PaletteCommand("Task: invoke", "Call this latent task", self.action_invoke, True),
            PaletteCommand("Task: copy id", "Copy this task's id", self.action_copy),
            PaletteCommand("Task: copy result", "Copy this task's result", self.action_copy_result),
        ]


def _shown_in_part(text: str) -> str:
    """The beginning of a long result or error: laying out a whole 1 MiB result took the screen seconds."""
    if len(text) <= DETAIL_TEXT_MAX:
        return text
    return f"{text[:DETAIL_TEXT_MAX]}…\n({size_text(len(text.encode()))} in all; c copies it whole)"


def usage_text(metrics: dict[str, Any], aggregated: dict[str, Any] | None) -> str:
    """A task_metrics sample in a line: "cpu 98.5%  memory 128.0 KiB  (avg cpu 97.1%, max memory …)"."""
    parts = []
    if isinstance(metrics.get("cpu_percent"), int | float):
        parts.append(f"cpu {metrics['cpu_percent']:.1f}%")
    if isinstance(metrics.get("memory_bytes"), int):
        parts.append(f"memory {size_text(metrics['memory_bytes'])}")
    text = "  ".join(parts) or "-"
    if aggregated and isinstance(aggregated.get("sample_count"), int):
        text += (f"  ({aggregated['sample_count']} samples: avg cpu {aggregated.get('avg_cpu_usage', 0):.1f}%, "
                 f"max memory {size_text(int(aggregated.get('max_memory_usage', 0)))})")
    return text


def _state_var(state: str) -> str:
    return {"completed": "$success", "failed": "$error", "running": "$primary", "interrupted": "$warning",
            "skipped": "$warning", "scheduled": "$secondary"}.get(state, "$text-muted")


__all__ = ["ConfirmModal", "TaskDetailScreen", "TasksScreen"]
