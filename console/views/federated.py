"""Federated learning: rounds as they run (state, updates against what completes them, the model each
made), a round's detail with every participant's update, and a form to start a round or the next one."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, Static

from console import keys
from console.base import ConsoleScreen, PaletteCommand
from console.modules import FieldError, FormErrors, ModuleSource, resolve_module
from console.rounds import (
    ROUND_FIELDS,
    ROUNDS_SHOWN,
    RoundForm,
    RoundRow,
    RoundsView,
    UpdateRow,
    build_experiment,
    model_name,
    round_errors_by_field,
)
from console.text import escape
from console.views.dispatch import FilePicker
from console.views.proplets import age
from console.widgets import ConsoleInput, StateTable, StatusLine

# Rounds take seconds to minutes: the views ask the manager this often while they are shown.
POLL_INTERVAL = 1.0

COLUMNS = (("round", "ROUND", 24), ("state", "STATE", 10), ("updates", "UPDATES", 9), ("proplets", "PROPLETS", 9),
           ("model", "MODEL", 9), ("created", "STARTED", 10), ("ends", "ENDS / TOOK", 12), ("reason", "REASON", 60))
COLUMN_KEYS = tuple(key for key, _, _ in COLUMNS)
UPDATE_COLUMNS = (("proplet", "PROPLET", 24), ("samples", "SAMPLES", 8), ("via", "VIA", 7),
                  ("received", "RECEIVED", 10), ("metrics", "METRICS", 30), ("weights", "WEIGHTS", 40))
UPDATE_COLUMN_KEYS = tuple(key for key, _, _ in UPDATE_COLUMNS)


def _seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m"


def round_timing(row: RoundRow, now: datetime) -> str:
    """How long it took once ended; until its deadline while it runs."""
    if row.completed_at is not None:
        return f"took {_seconds((row.completed_at - row.created_at).total_seconds())}"
    if row.state != "running":
        return ""
    left = (row.deadline - now).total_seconds()
    return f"in {_seconds(left)}" if left > 0 else "closing"


def model_cell(row: RoundRow) -> str:
    return f"{model_name(row.model_in)}→{model_name(row.model_out)}" if row.model_out is not None \
        else model_name(row.model_in)


class RoundTable(StateTable):
    HELP = ("Federated-learning rounds, newest first. **Enter**/**d** opens one; **s** starts a round, **n** the "
            "next one from the selected round's model; **/** filters; **y** copies the id.")

    def row_cells(self, row: RoundRow, now: datetime) -> tuple[Any, ...]:
        return (
            self.cell(row.round_id),
            self.cell(row.state, row.state, state=row.state),
            self.cell(f"{row.updates}/{row.needed}", row.updates),
            self.cell(f"{len(row.started)}/{len(row.asked)}", len(row.started)),
            self.cell(model_cell(row), row.model_out if row.model_out is not None else row.model_in),
            self.cell(age(now, row.created_at), -row.created_at.timestamp()),
            self.cell(round_timing(row, now)),
            self.cell(row.reason),
        )


class FederatedScreen(ConsoleScreen):
    CRUMB = "Federated learning"
    BINDINGS: ClassVar = keys.FL
    HELP = """\
### Federated learning
Each round runs a training module on the participants that are online (one task each, named
`fl-round-<round>-<proplet>`, also in the task table); their updates are averaged, weighted by their
samples, into the next model version. **s** starts a round (a `.wasm`/`.wat` file, URL or OCI
reference; the newest model and every online proplet by default), **n** the next round from the
selected round's model. **Enter** shows a round's updates. `propeller fl model N` prints a model's
weights.
"""

    class Loaded(Message):
        """A poll of the manager's rounds came back."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.view: RoundsView | None = None
        self.problem = ""  # why the last poll failed
        self._shown: dict[str, tuple[Any, ...]] = {}
        self._asked_at = 0.0
        # One poll at a time: a slow one (a busy store) is not cut off by the next, which would
        # leave the view never updated.
        self._polling = False

    def compose_body(self) -> ComposeResult:
        table = RoundTable(id="rounds", cursor_type="row", zebra_stripes=True)
        for key, label, width in COLUMNS:
            table.add_column(label, key=key, width=width)
        yield table
        yield StatusLine(id="fl-models", classes="status-line")
        yield StatusLine(id="fl-status", classes="status-line")

    @property
    def table(self) -> RoundTable:
        return self.query_one("#rounds", RoundTable)

    def poll(self) -> None:
        if not self._polling:
            self._polling = True
            self.load()

    @work(group="fl-rounds", description="Reading federated-learning rounds", exit_on_error=False)
    async def load(self) -> None:
        try:
            self.view = await self.console.manager.fl_rounds(ROUNDS_SHOWN)
            self.problem = ""
        except Exception as exc:  # shown in the status line; the next poll tries again
            self.problem = f"cannot read the rounds: {exc}"
        finally:
            self._polling = False
        self.post_message(self.Loaded())

    @on(Loaded)
    def _loaded(self) -> None:
        self.render_rounds()

    def flush_body(self) -> None:
        now = self.console.clock().timestamp()
        if now - self._asked_at >= POLL_INTERVAL:
            self._asked_at = now
            self.poll()
        self.render_rounds()

    def render_rounds(self) -> None:
        view = self.view
        if view is None:
            self.query_one("#fl-status", StatusLine).show(self.problem or "reading rounds…")
            return
        table = self.table
        now = self.console.clock()
        if self._filter_changed:
            self._filter_changed = False
            table.clear()
            self._shown.clear()
        rows = {r.round_id: r for r in view.rounds if self.row_filter.matches(r.search_text())}
        for round_id in [k for k in self._shown if k not in rows]:
            table.remove_row(round_id)
            del self._shown[round_id]
        added = False
        for round_id, row in rows.items():
            cells = table.row_cells(row, now)
            old = self._shown.get(round_id)
            table.sync_row(round_id, COLUMN_KEYS, old, cells)
            added = added or old is None
            self._shown[round_id] = cells
        if added:
            table.sort("created")
        models = ", ".join(f"{model_name(m.version)} ({'from ' + m.round_id if m.round_id else 'start'})"
                           for m in view.models[:8])
        self.query_one("#fl-models", StatusLine).show(f"models: {models}" if models else "models: none yet")
        if view.coordinator:
            status = (f"rounds are coordinated by {view.coordinator} (MANAGER_COORDINATOR_URL); this manager "
                      "starts their tasks and relays")
        else:
            running = sum(1 for r in view.rounds if r.state == "running")
            status = f"{view.total} round{'' if view.total == 1 else 's'}, {running} running"
            if view.total > len(view.rounds):
                status += f" (newest {len(view.rounds)} shown; propeller fl rounds lists all)"
        if self.row_filter.active:
            status += f" · {self.row_filter.describe()}"
        if self.problem:
            status += f" · {self.problem}"
        self.query_one("#fl-status", StatusLine).show(status)

    def selected(self) -> RoundRow | None:
        round_id = self.table.selected_key()
        if round_id is None or self.view is None:
            return None
        return next((r for r in self.view.rounds if r.round_id == round_id), None)

    @on(DataTable.RowSelected, "#rounds")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.app.push_screen(RoundDetailScreen(event.row_key.value))

    def action_describe(self) -> None:
        row = self.selected()
        if row is not None:
            self.app.push_screen(RoundDetailScreen(row.round_id))

    def action_copy(self) -> None:
        row = self.selected()
        if row is not None:
            self.app.copy_to_clipboard(row.round_id)
            self.notify(f"Copied round id {row.round_id}", timeout=3)

    def action_reload(self) -> None:
        self.poll()

    def action_new_round(self) -> None:
        if not self.refused_read_only():
            self.open_form(RoundForm(module=self.console.last_round_module))

    def action_next_round(self) -> None:
        if self.refused_read_only():
            return
        row = self.selected()
        if row is None:
            self.open_form(RoundForm(module=self.console.last_round_module))
            return
        self.open_form(next_round_form(row, self.console.last_round_module))

    def open_form(self, form: RoundForm) -> None:
        latest = self.view.models[0].version if self.view and self.view.models else None

        def started(answer: dict[str, Any] | None) -> None:
            if answer is None:
                return
            offline = answer.get("participants_offline") or []
            self.notify(f"Round {answer['round_id']} started on {', '.join(answer['participants_started'])}"
                        + (f" ({', '.join(offline)} offline)" if offline else "")
                        + f"; {answer.get('k_of_n', '?')} updates complete it.", timeout=6)
            self._asked_at = 0.0
            self.poll()

        self.app.push_screen(StartRoundModal(form, latest), started)

    def palette_commands(self) -> list[PaletteCommand]:
        commands = [
            PaletteCommand("Federated learning: start a round", "Train a module on the online proplets",
                           self.action_new_round, True),
            PaletteCommand("Federated learning: filter", "Filter the rounds", self.action_filter),
        ]
        if self.selected() is not None:
            commands += [
                PaletteCommand("Round: describe", "Open the selected round", self.action_describe),
                PaletteCommand("Round: next round", "Start a round from the model the selected round made",
                               self.action_next_round, True),
                PaletteCommand("Round: copy id", "Copy the selected round's id", self.action_copy),
            ]
        return commands


def next_round_form(row: RoundRow, module: str) -> RoundForm:
    """A round like `row`, from the model it made (or, if it made none, the one it started from), with its
    module: its image when it had one, else the one typed last (rounds keep no inline module)."""
    base = row.model_out if row.model_out is not None else row.model_in
    hyper = "" if row.hyperparams == "{}" else row.hyperparams
    return RoundForm(module=row.task_wasm_image or module, model=str(base), participants=", ".join(row.asked),
                     timeout_s=f"{row.timeout_s:g}", hyperparams=hyper)


class RoundDetailScreen(ConsoleScreen):
    """One round: what it asked for, where it stands, and each participant's update."""

    BINDINGS: ClassVar = [*keys.FL_ROUND, Binding("escape", "app.back", "Back", id="fl_round.back")]
    HELP = """\
### Round
The round's participants, what completes it, and every update it has counted (the first per
participant; `VIA` says how it came: in the task's result, POST /fl/update, CBOR, or MQTT). The view
follows a running round. **n** starts the next round from the model this one made; **y** copies the id.
"""
    DEFAULT_CSS = """
    RoundDetailScreen #round-fields { height: auto; padding: 0 1; }
    RoundDetailScreen #updates { height: 1fr; }
    """

    class Loaded(Message):
        def __init__(self, row: RoundRow | None, updates: list[UpdateRow], newest_model: int | None,
                     problem: str = "") -> None:
            super().__init__()
            self.row = row
            self.updates = updates
            self.newest_model = newest_model
            self.problem = problem

    def __init__(self, round_id: str) -> None:
        super().__init__()
        self.round_id = round_id
        self.row: RoundRow | None = None
        self.updates: list[UpdateRow] = []
        self.newest_model: int | None = None
        self._asked_at = 0.0
        self._polling = False
        self._rendered: tuple[Any, ...] = ()
        self._update_cells: dict[str, tuple[str, ...]] = {}  # what each update's row shows

    def crumbs(self) -> list[str]:
        return ["Federated learning", self.round_id]

    def compose_body(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(Content("loading…"), id="round-fields")
            table = StateTable(id="updates", cursor_type="row", zebra_stripes=True)
            for key, label, width in UPDATE_COLUMNS:
                table.add_column(label, key=key, width=width)
            yield table

    def on_mount(self) -> None:
        self.poll()

    def poll(self) -> None:
        if not self._polling:
            self._polling = True
            self.load()

    @work(group="fl-round", description="Reading the round", exit_on_error=False)
    async def load(self) -> None:
        try:
            row, updates, newest = await self.console.manager.fl_round(self.round_id)
        except Exception as exc:  # unknown round, or the store failing: said in place of the fields
            self.post_message(self.Loaded(None, [], None, f"cannot read round {self.round_id}: {exc}"))
            return
        finally:
            self._polling = False
        self.post_message(self.Loaded(row, updates, newest))

    @on(Loaded)
    def _loaded(self, event: Loaded) -> None:
        if event.problem:
            self.query_one("#round-fields", Static).update(Content(event.problem))
            return
        self.row, self.updates, self.newest_model = event.row, event.updates, event.newest_model
        self.flush_body()

    def flush_body(self) -> None:
        now = self.console.clock()
        if self.row is not None and self.row.state == "running" and now.timestamp() - self._asked_at >= POLL_INTERVAL:
            self._asked_at = now.timestamp()
            self.poll()
        row = self.row
        if row is None:
            return
        key = (row, tuple(self.updates), round_timing(row, now))
        if key == self._rendered:
            return
        self._rendered = key
        colour = {"completed": "$success", "failed": "$error"}.get(row.state, "$primary")
        waiting = [p for p in row.started if p not in {u.proplet_id for u in self.updates}]
        lines = [
            f"[b]{escape(row.round_id)}[/b]" + (f"  (experiment {escape(row.experiment_id)})"
                                                  if row.experiment_id != row.round_id else ""),
            f"state         [{colour}]{row.state}[/]  {escape(round_timing(row, now))}"
            + (f"  {escape(row.reason)}" if row.reason else ""),
            f"model         {model_name(row.model_in)}"
            + (f" → {model_name(row.model_out)}" if row.model_out is not None else ""),
            f"updates       {row.updates} of {row.needed} needed"
            + (f"; waiting for {escape(', '.join(waiting))}" if row.state == "running" and waiting else ""),
            f"participants  {escape(', '.join(row.started)) or 'none'} started"
            + (f"; {escape(', '.join(p for p in row.asked if p not in row.started))} offline when it began"
               if len(row.started) < len(row.asked) else ""),
            f"module        {escape(row.task_wasm_image or 'inline')}   timeout {row.timeout_s:g}s   "
            f"hyperparams {escape(row.hyperparams)}",
        ]
        self.query_one("#round-fields", Static).update(Content.from_markup("\n".join(lines)))
        table = self.query_one("#updates", StateTable)
        # Updated by row key, like every table of the console: the ages change every second.
        for u in self.updates:
            # Cells, not str: a table reads a str as markup, and proplet ids and metrics come from the network.
            cells = tuple(table.cell(text) for text in (u.proplet_id, str(u.num_samples), u.source,
                                                           age(now, u.received_at), u.metrics, u.weights))
            table.sync_row(u.proplet_id, UPDATE_COLUMN_KEYS, self._update_cells.get(u.proplet_id), cells)
            self._update_cells[u.proplet_id] = cells

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.round_id)
        self.notify(f"Copied round id {self.round_id}", timeout=3)

    def action_reload(self) -> None:
        self.poll()

    def action_next_round(self) -> None:
        if self.refused_read_only() or self.row is None:
            return

        def started(answer: dict[str, Any] | None) -> None:
            if answer is not None:
                self.notify(f"Round {answer['round_id']} started on {', '.join(answer['participants_started'])}.",
                            timeout=6)
                self.app.pop_screen()  # back to the rounds, where the new one shows

        self.app.push_screen(StartRoundModal(next_round_form(self.row, self.console.last_round_module),
                                             self.newest_model), started)


class StartRoundModal(ModalScreen[dict[str, Any] | None]):
    """The start-a-round form. Enter or F5 starts it; errors show next to their field; Esc cancels."""

    BINDINGS: ClassVar = keys.ROUND_FORM
    DEFAULT_CSS = """
    StartRoundModal { align: center middle; }
    StartRoundModal > VerticalScroll { width: 96; max-width: 100%; max-height: 90%; height: auto;
                                       border: thick $primary; background: $surface; padding: 0 2; }
    StartRoundModal .row { height: auto; margin-top: 1; }
    StartRoundModal Input.-textual-compact:focus { background: $primary 25%; }
    StartRoundModal .field-label { width: 14; color: $text-muted; }
    StartRoundModal Input { width: 1fr; }
    StartRoundModal .error { color: $error; max-width: 100%; height: auto; padding-left: 14; display: none; }
    StartRoundModal .error.-shown { display: block; }
    StartRoundModal .hint { color: $text-muted; height: auto; margin-top: 1; }
    """
    PLACEHOLDERS: ClassVar = {
        "module": "training module: path to .wasm/.wat (Ctrl+O browses), http(s):// URL or OCI reference",
        "round_id": "empty: round-<date>-<time>",
        "model": "version to train from: empty for the newest",
        "participants": "proplet ids, comma-separated: empty for every online proplet",
        "k_of_n": "updates that complete the round: empty for all started",
        "timeout_s": "seconds before it closes with what it has: empty for 300",
        "hyperparams": 'JSON object, e.g. {"lr": 0.01, "epochs": 5}',
    }
    LABELS: ClassVar = {"module": "Module", "round_id": "Round id", "model": "From model", "participants":
                        "Participants", "k_of_n": "Updates", "timeout_s": "Timeout (s)", "hyperparams": "Hyperparams"}

    class Invalid(Message):
        def __init__(self, errors: dict[str, str]) -> None:
            super().__init__()
            self.errors = errors

    class Started(Message):
        def __init__(self, answer: dict[str, Any]) -> None:
            super().__init__()
            self.answer = answer

    def __init__(self, form: RoundForm, latest_model: int | None) -> None:
        super().__init__()
        self.initial = form
        self.latest_model = latest_model
        self.form_used = form
        # A second Enter while the first is being answered is ignored, not a second round.
        self.submitting = False

    def compose(self) -> ComposeResult:
        with VerticalScroll() as box:
            box.border_title = "Start a federated-learning round"
            for name in ROUND_FIELDS:
                with Horizontal(classes="row"):
                    yield Label(self.LABELS[name], classes="field-label")
                    # Compact (no border): the seven fields fit a 24-line terminal.
                    yield ConsoleInput(getattr(self.initial, name), placeholder=self.PLACEHOLDERS[name], id=name,
                                       compact=True)
                yield Label("", id=f"{name}-error", classes="error")
            yield Label("", id="form-error", classes="error")
            online = [p.id for p in self.app.fleet.proplets.values() if p.online]  # type: ignore[attr-defined]
            latest = f"newest model {model_name(self.latest_model)} · " if self.latest_model is not None else ""
            yield Static(Content(f"Online: {', '.join(online) or 'none'} · {latest}Enter/F5 starts, Esc cancels"),
                         classes="hint")

    def on_mount(self) -> None:
        self.query_one("#module" if not self.initial.module else "#round_id", ConsoleInput).focus()

    def form(self) -> RoundForm:
        return RoundForm(**{name: self.query_one(f"#{name}", ConsoleInput).value for name in ROUND_FIELDS})

    @on(ConsoleInput.Submitted)
    def _enter(self, event: ConsoleInput.Submitted) -> None:
        event.stop()
        self.action_submit()

    def action_submit(self) -> None:
        if self.submitting:
            return
        self.submitting = True
        self.show_errors({})
        self.form_used = self.form()
        self.submit(self.form_used)

    @work(group="fl-start", description="Starting the round", exit_on_error=False)
    async def submit(self, form: RoundForm) -> None:
        try:
            self.post_message(await self._submit(form))
        except Exception as exc:  # the store failing, say: said on the form, which stays open
            self.post_message(self.Invalid({"form": f"The manager could not start the round: {exc}"}))

    async def _submit(self, form: RoundForm) -> Message:
        from core.errors import CoreError

        errors: dict[str, str] = {}
        module: ModuleSource | None = None
        try:
            module = await resolve_module(form.module)
        except FieldError as exc:
            errors[exc.field] = str(exc)
        online = sorted(p.id for p in self.app.fleet.proplets.values() if p.online)  # type: ignore[attr-defined]
        now = self.app.clock()  # type: ignore[attr-defined]
        try:
            body = build_experiment(form, module, online=online, latest_model=self.latest_model,
                                    default_round_id=f"round-{now:%Y%m%d-%H%M%S}")
        except FormErrors as exc:
            errors.update({k: v for k, v in exc.errors.items() if k not in errors})
        if errors:
            return self.Invalid(errors)
        try:
            answer = await self.app.manager.start_round(body)  # type: ignore[attr-defined]
        except CoreError as exc:  # invalid, a round id taken, no participant online, …
            return self.Invalid(round_errors_by_field(str(exc)))
        return self.Started(answer)

    @on(Invalid)
    def _invalid(self, event: Invalid) -> None:
        self.submitting = False
        self.show_errors(event.errors)

    @on(Started)
    def _started(self, event: Started) -> None:
        # Rounds do not store an inline module: the next round's form offers this one again.
        self.app.last_round_module = self.form_used.module  # type: ignore[attr-defined]
        self.dismiss(event.answer)

    def show_errors(self, errors: dict[str, str]) -> None:
        for name in (*ROUND_FIELDS, "form"):
            label = self.query_one(f"#{name}-error", Label)
            text = errors.get(name, "")
            label.update(Content(text))
            label.set_class(bool(text), "-shown")
        first = next((name for name in ROUND_FIELDS if name in errors), None)
        if first is not None:
            self.query_one(f"#{first}", ConsoleInput).focus()

    def action_browse(self) -> None:
        current = self.query_one("#module", ConsoleInput).value.strip()
        parent = Path(current).expanduser().parent if current else None
        start = parent if parent is not None and parent.is_dir() else Path.cwd()

        def picked(path: Path | None) -> None:
            if path is not None:
                self.query_one("#module", ConsoleInput).value = str(path)
                self.query_one("#round_id", ConsoleInput).focus()

        self.app.push_screen(FilePicker(start.resolve()), picked)

    def action_cancel(self) -> None:
        self.dismiss(None)

