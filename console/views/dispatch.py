"""Dispatch: a keyboard form to submit a task, with a file picker and validation errors in place."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import Button, Checkbox, DirectoryTree, Input, Label, Select, Static
from textual.widgets.input import Selection

from console import keys
from console.base import ConsoleScreen, PaletteCommand
from console.modules import (
    DispatchForm,
    FieldError,
    FormErrors,
    ModuleSource,
    build_body,
    errors_by_field,
    resolve_module,
)
from console.widgets import CompletingInput, ConsoleInput
from core.domain import is_component

TARGETS = [("any live proplet", "any"), ("a pinned proplet", "pinned"), ("every live proplet (broadcast)", "broadcast")]


class ListSuggester(Suggester):
    """Completes from a list that changes (exports of the chosen module, known proplet ids)."""

    def __init__(self, source: Any) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.source = source

    async def get_suggestion(self, value: str) -> str | None:
        words: Iterable[str] = self.source()
        for word in words:
            if word.startswith(value) and word != value:
                return word
        return None


class ModuleFiles(DirectoryTree):
    """Directories and WebAssembly files only."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and (p.is_dir() or p.suffix in (".wasm", ".wat"))]


class FilePicker(ModalScreen[Path | None]):
    """Pick a .wasm or .wat file. Enter opens a directory or picks a file; Backspace goes up; Esc cancels."""

    DEFAULT_CSS = """
    FilePicker { align: center middle; }
    FilePicker > Vertical { width: 80%; height: 80%; border: thick $primary; background: $surface; }
    FilePicker #picker-path { padding: 0 1; color: $text-muted; }
    FilePicker ModuleFiles { height: 1fr; }
    """
    BINDINGS: ClassVar = [
        Binding("escape", "cancel", "Cancel", id="picker.cancel"),
        Binding("backspace", "up", "Parent directory", id="picker.up"),
    ]

    def __init__(self, start: Path) -> None:
        super().__init__()
        self.start = start

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = "Choose a module (.wasm or .wat)"
            yield Label(Content(str(self.start)), id="picker-path")
            yield ModuleFiles(self.start, id="picker-tree")

    def on_mount(self) -> None:
        self.query_one(ModuleFiles).focus()

    @on(DirectoryTree.FileSelected)
    def _picked(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(event.path)

    def action_up(self) -> None:
        tree = self.query_one(ModuleFiles)
        parent = Path(tree.path).resolve().parent
        tree.path = parent
        self.query_one("#picker-path", Label).update(Content(str(parent)))

    def action_cancel(self) -> None:
        self.dismiss(None)


FIELDS = ("module", "name", "inputs", "env", "target", "proplet", "timeout", "fuel", "memory", "retries", "priority")


class DispatchScreen(ConsoleScreen):
    CRUMB = "Dispatch"
    BINDINGS: ClassVar = keys.DISPATCH
    # Under 30 lines (80x24 is most terminals' default) the rows lose the blank line between them,
    # which put the buttons and the "start now" box below the bottom edge.
    VERTICAL_BREAKPOINTS: ClassVar = [(0, "-short"), (30, "-tall")]
    HELP = """\
### Dispatch a task
**Module**: a local `.wasm` or `.wat` file (Ctrl+O or F2 browses; `.wat` is compiled here), an
`http(s)://` URL, or an OCI reference (`registry.lan/wasm/app:v1`, fetched through the proxy).
**Function**: the export to call (Tab completes the module's exports). **Inputs**: arguments separated
by spaces or commas. **Env**: `KEY=VALUE` pairs. **Target**: any live proplet, one pinned proplet, or
all of them. Limits are optional. **Enter** in any field or **F5** dispatches; errors show next to the
field. After dispatching, the task table opens on the new task.
"""
    DEFAULT_CSS = """
    DispatchScreen #form { padding: 0 2; }
    DispatchScreen .row { height: auto; margin-bottom: 0; }
    DispatchScreen .field-label { width: 14; color: $text-muted; }
    DispatchScreen .field { width: 1fr; height: auto; }
    DispatchScreen .field Input, DispatchScreen .field Select { width: 1fr; }
    DispatchScreen .error { color: $error; max-width: 100%; height: auto; padding-left: 1; display: none; }
    DispatchScreen .error.-shown { display: block; }
    DispatchScreen .hint { color: $text-muted; padding-left: 15; height: auto; }
    DispatchScreen #limits Input { width: 1fr; }
    DispatchScreen #buttons { height: auto; margin-top: 1; }
    DispatchScreen .row { margin-top: 1; }
    DispatchScreen #limits Input { margin-right: 1; }
    DispatchScreen #buttons Button { margin-right: 2; }
    DispatchScreen.-read-only #submit { display: none; }
    DispatchScreen.-short .row { margin-top: 0; }
    """

    class Dispatched(Message):
        def __init__(self, task_id: str, name: str, started: bool) -> None:
            super().__init__()
            self.task_id = task_id
            self.name = name
            self.started = started

    class ModuleProbed(Message):
        """What the Module field named when it was read: `source` is None when it named no readable module."""

        def __init__(self, typed: str, source: ModuleSource | None) -> None:
            super().__init__()
            self.typed = typed
            self.source = source

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exports: tuple[str, ...] = ()
        self._filled_name = ""  # the function the form filled in from the module's only export

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="form"):
            yield from self._field("module", "Module", ConsoleInput(
                placeholder="path/to/module.wasm (or .wat), https://… or registry/repo:tag", id="module", compact=True),
                browse=True)
            yield from self._field("name", "Function", CompletingInput(
                placeholder="export to call, e.g. add (Tab completes)", id="name", compact=True,
                suggester=ListSuggester(lambda: self.exports)))
            yield from self._field("inputs", "Inputs", ConsoleInput(placeholder="e.g. 40 2", id="inputs", compact=True))
            yield from self._field("env", "Env", ConsoleInput(
                placeholder="KEY=VALUE KEY2=VALUE", id="env", compact=True))
            yield from self._field("target", "Target", Select(
                TARGETS, value="any", allow_blank=False, id="target", compact=True))
            yield from self._field("proplet", "Proplet", CompletingInput(
                placeholder="proplet id (for a pinned task; Tab completes)", id="proplet", compact=True,
                suggester=ListSuggester(lambda: sorted(self.console.fleet.proplets))))
            with Horizontal(classes="row", id="limits"):
                yield Label("Limits", classes="field-label")
                yield ConsoleInput(placeholder="timeout s", id="timeout", type="number", compact=True)
                yield ConsoleInput(placeholder="fuel", id="fuel", type="integer", compact=True)
                yield ConsoleInput(placeholder="memory MiB", id="memory", type="number", compact=True)
                yield ConsoleInput(placeholder="retries", id="retries", type="integer", compact=True)
                yield ConsoleInput(placeholder="priority 0-100", id="priority", type="integer", compact=True)
            for name in ("timeout", "fuel", "memory", "retries", "priority"):
                yield Label("", classes="error", id=f"error-{name}")
            with Horizontal(classes="row"):
                yield Label("", classes="field-label")
                yield Checkbox("daemon (long-running)", id="daemon")
                yield Checkbox("latent (i calls it)", id="latent")
                yield Checkbox("start now", value=True, id="start-now")
            yield Label("", classes="error", id="error-form")
            with Horizontal(id="buttons"):
                yield Button("Dispatch (Enter / F5)", variant="primary", id="submit")
                yield Button("Reset", id="reset")

    def _field(self, name: str, label: str, widget: Any, browse: bool = False) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Label(label, classes="field-label")
            with Horizontal(classes="field"):
                yield widget
                if browse:
                    # Ctrl+O is the keyboard path; Tab goes straight from the module to the function.
                    button = Button("Browse… (Ctrl+O)", id="browse", compact=True)
                    button.can_focus = False
                    yield button
        yield Label("", classes="error", id=f"error-{name}")
        if browse:
            yield Static(id="dispatch-hint", classes="hint")

    def on_mount(self) -> None:
        self.set_class(self.console.read_only, "-read-only")
        self._show_hint("")

    def _show_hint(self, text: str) -> None:
        if self.console.read_only:
            refusal = "the console is read-only: tasks cannot be dispatched from here"
            text = f"{text}; {refusal}" if text else refusal.capitalize() + "."
        self.query_one("#dispatch-hint", Static).update(Content(text))

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        focused = self.focused
        if focused is None or not isinstance(focused, (Input, Select, Checkbox, Button)):
            # At once, not deferred like Widget.focus: keys typed right after the view's key go here.
            self.set_focus(self.query_one("#module", Input))

    # -- form state ------------------------------------------------------------------------

    def form(self) -> DispatchForm:
        def text(widget_id: str) -> str:
            return self.query_one(f"#{widget_id}", Input).value

        target = self.query_one("#target", Select).value
        return DispatchForm(
            module=text("module"), name=text("name"), inputs=text("inputs"), env=text("env"),
            target=str(target), proplet_id=text("proplet"), timeout_s=text("timeout"), fuel=text("fuel"),
            memory_mib=text("memory"), retries=text("retries"), priority=text("priority"),
            daemon=self.query_one("#daemon", Checkbox).value, latent=self.query_one("#latent", Checkbox).value)

    def show_errors(self, errors: dict[str, str]) -> None:
        for name in (*FIELDS, "form"):
            label = self.query(f"#error-{name}")
            if not label:
                continue
            message = errors.get(name, "")
            widget = label.first(Label)
            widget.update(Content(("✗ " + message) if message else ""))
            widget.set_class(bool(message), "-shown")
        if errors:
            first = next((n for n in FIELDS if n in errors), None)
            target = {"proplet": "#proplet", "target": "#target"}.get(first or "", f"#{first}" if first else "")
            if target and self.query(target):
                self.query_one(target).focus()

    # -- module probe: exports for the Function field ------------------------------------

    @on(Input.Changed, "#module")
    def _module_changed(self, event: Input.Changed) -> None:
        self.exports = ()
        if event.value.strip():
            self.probe_module(event.value)
        else:
            # The hint described the module the field named before; the placeholder says what goes here.
            self.workers.cancel_group(self, "module-probe")
            self._show_hint("")

    @work(exclusive=True, group="module-probe", description="Reading the module", exit_on_error=False)
    async def probe_module(self, text: str) -> None:
        try:
            source: ModuleSource | None = await resolve_module(text)
        except FieldError:
            source = None  # shown when the form is submitted; typing a path is not an error yet
        self.post_message(self.ModuleProbed(text, source))

    @on(ModuleProbed)
    def _module_probed(self, event: ModuleProbed) -> None:
        if event.typed != self.query_one("#module", Input).value:
            return  # the field has changed since: a probe of its newer text is on its way
        if event.source is None:
            self.exports = ()
            self._show_hint("")
            return
        self.exports = event.source.exports
        hint = ""
        if event.source.kind == "file":
            hint = f"{len(event.source.data):,} bytes"
            if is_component(event.source.data):
                # The manager sends it to no embedded proplet: say so before it waits in the queue.
                hint += "; a component: for proplets that run components, not the boards"
            if self.exports:
                hint += f"; exports: {', '.join(self.exports)}"
            name = self.query_one("#name", Input)
            # A function the form filled in for the previous module is replaced too (add.wasm, then
            # hello.wasm: `add` became `_start`); one the user typed is kept.
            if (not name.value or name.value == self._filled_name) and name.value not in self.exports:
                name.value = self.exports[0] if len(self.exports) == 1 else ""
                self._filled_name = name.value
        elif event.source.kind == "url":
            hint = "fetched over HTTP by the proplet"
        elif self.console.manager is not None and self.console.manager.settings.oci_proxy:
            hint = "an OCI reference: fetched through the proxy this manager hosts"
        else:
            hint = "an OCI reference: fetched through the proxy (`propeller proxy`, or MANAGER_OCI_PROXY=true)"
        self._show_hint(hint)

    # -- actions ---------------------------------------------------------------------------

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        if event.input.id in FIELDS:
            event.stop()
            self.action_submit()

    @on(Button.Pressed, "#submit")
    def _submit_pressed(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#reset")
    def _reset_pressed(self) -> None:
        self.action_reset()

    @on(Button.Pressed, "#browse")
    def _browse_pressed(self) -> None:
        self.action_browse()

    def action_submit(self) -> None:
        if self.refused_read_only():
            return
        self.show_errors({})
        self.submit(self.form(), self.query_one("#start-now", Checkbox).value)

    @work(exclusive=True, group="dispatch", description="Dispatching the task", exit_on_error=False)
    async def submit(self, form: DispatchForm, start_now: bool) -> None:
        from core.errors import CoreError
        from core.schemas import parse_task_create

        manager = self.console.manager
        errors: dict[str, str] = {}
        module: ModuleSource | None = None
        try:
            module = await resolve_module(form.module)
        except FieldError as exc:
            errors[exc.field] = str(exc)
        try:
            # Check the other fields too, so every problem shows at once.
            body = build_body(form, module or ModuleSource("url", "-"))
        except FormErrors as exc:
            errors.update({k: v for k, v in exc.errors.items() if k not in errors})
        if errors:
            self.post_message(self.Invalid(errors))
            return
        try:
            create = parse_task_create(body)
        except CoreError as exc:
            self.post_message(self.Invalid(errors_by_field(str(exc))))
            return
        task = await manager.create_task(create)
        if start_now:
            await manager.start_task(task.id)
        self.post_message(self.Dispatched(task.id, task.name, start_now))

    class Invalid(Message):
        def __init__(self, errors: dict[str, str]) -> None:
            super().__init__()
            self.errors = errors

    @on(Invalid)
    def _invalid(self, event: Invalid) -> None:
        self.show_errors(event.errors)

    @on(Dispatched)
    def _dispatched(self, event: Dispatched) -> None:
        verb = "dispatched" if event.started else "created (not started)"
        self.notify(f"Task {event.task_id[:8]} ({event.name}) {verb}.", timeout=4)
        # The form keeps its fields (Enter dispatches the same again), but the next `5` opens it on
        # the module, selected, so a path typed replaces it; it reopened on the field Enter was
        # pressed in, and "examples/hello.wasm" went into Inputs after "40 2".
        module = self.query_one("#module", Input)
        self.set_focus(module)
        module.selection = Selection(0, len(module.value))
        self.console.show_task_in_table(event.task_id)

    def action_browse(self) -> None:
        current = self.query_one("#module", Input).value.strip()
        start = Path(current).expanduser().parent if current and Path(current).expanduser().parent.is_dir() \
            else Path.cwd()

        def picked(path: Path | None) -> None:
            if path is not None:
                module = self.query_one("#module", Input)
                module.value = str(path)
                self.query_one("#name", Input).focus()

        self.app.push_screen(FilePicker(start.resolve()), picked)

    def action_reset(self) -> None:
        for widget_id in ("module", "name", "inputs", "env", "proplet", "timeout", "fuel", "memory", "retries",
                          "priority"):
            self.query_one(f"#{widget_id}", Input).value = ""
        self.query_one("#target", Select).value = "any"
        self.query_one("#daemon", Checkbox).value = False
        self.query_one("#latent", Checkbox).value = False
        self.show_errors({})
        self._show_hint("")
        self.query_one("#module", Input).focus()

    def palette_commands(self) -> list[PaletteCommand]:
        return [
            PaletteCommand("Dispatch: submit", "Dispatch the task in the form", self.action_submit, True),
            PaletteCommand("Dispatch: browse for a module", "Pick a .wasm or .wat file", self.action_browse),
            PaletteCommand("Dispatch: reset the form", "Clear every field", self.action_reset),
        ]
