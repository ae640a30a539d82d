"""Local proplets: launch `propeller proplet` subprocesses on this machine, watch their output, stop them."""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import DataTable, Log

from console import keys
from console.base import ConsoleScreen, PaletteCommand
from console.widgets import ConfirmModal, PromptModal, StateTable, StatusLine

COLUMNS = (("id", "ID", 28), ("pid", "PID", 8), ("process", "PROCESS", 12), ("fleet", "IN THE FLEET", 13),
           ("uptime", "UP", 8), ("lines", "OUTPUT", 8))
COLUMN_KEYS = tuple(key for key, _, _ in COLUMNS)


def _how_many(text: str) -> str | None:
    if not text.strip().isdigit() or not 1 <= int(text) <= 32:
        return "Type a number from 1 to 32."
    return None


class LocalScreen(ConsoleScreen):
    CRUMB = "Local proplets"
    BINDINGS: ClassVar = keys.LOCAL
    HELP = """\
### Local proplets
Proplets running on this machine as `propeller proplet` processes, pointed at this console's manager
(its broker, tenant and channel) with distinct ids. **a** launches one, **n** asks how many, **x** stops
the selected one, **X** stops all. They are stopped when the console exits. The command comes from
`console.local_proplet_command` in the config file. The log shows the selected proplet's output.
"""
    DEFAULT_CSS = """
    LocalScreen #local-table { height: auto; max-height: 12; }
    LocalScreen #local-output { height: 1fr; border-top: solid $panel; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shown: dict[str, tuple[Any, ...]] = {}
        self._log_for: str | None = None
        self._log_total = 0

    def compose_body(self) -> ComposeResult:
        with Vertical():
            table = StateTable(id="local-table", cursor_type="row", zebra_stripes=True)
            for key, label, width in COLUMNS:
                table.add_column(label, key=key, width=width)
            yield table
            empty = "No local proplets yet: press a to launch one, n to launch several."
            if self.console.read_only:
                empty = "No local proplets: the console is read-only (--read-only), so none are launched from here."
            yield StatusLine(Content(empty), id="local-status", classes="status-line")
            yield Log(id="local-output", max_lines=self.console.settings.local_proplet_output_lines)

    @property
    def table(self) -> StateTable:
        return self.query_one("#local-table", StateTable)

    def selected_id(self) -> str | None:
        return self.table.selected_key()

    def flush_body(self) -> None:
        local = self.console.local
        fleet = self.console.fleet
        table = self.table
        now = time.monotonic()
        for proplet_id, proc in local.proplets.items():
            seen = fleet.proplets.get(proplet_id)
            in_fleet = "online" if seen and seen.online else ("offline" if seen else "not yet")
            status = proc.status
            cells = (
                table.cell(proplet_id),
                table.cell(str(proc.pid or "")),
                table.cell(status, state="exited" if status.startswith("exited") else status),
                table.cell(in_fleet, state=in_fleet if in_fleet != "not yet" else "pending"),
                table.cell(f"{now - proc.started_at:.0f}s" if proc.running else ""),
                table.cell(str(proc.total_lines)),
            )
            table.sync_row(proplet_id, COLUMN_KEYS, self._shown.get(proplet_id), cells)
            self._shown[proplet_id] = cells
        for gone in set(self._shown) - set(local.proplets):
            table.remove_row(gone)
            del self._shown[gone]
        running = local.running_count
        if local.proplets:
            text = (f"{running} running · output of {self._log_for or '-'} below · "
                    f"command: {local.command}")
            self.query_one("#local-status", StatusLine).show(text)
        self._update_log()

    def _update_log(self) -> None:
        selected = self.selected_id()
        log = self.query_one("#local-output", Log)
        proc = self.console.local.proplets.get(selected) if selected else None
        if selected != self._log_for:
            self._log_for = selected
            self._log_total = 0
            log.clear()
        if proc is None:
            return
        lines = proc.lines_since(self._log_total)
        self._log_total = proc.total_lines
        if lines:
            log.write_lines(lines)

    @on(DataTable.RowHighlighted, "#local-table")
    def _highlighted(self) -> None:
        self._update_log()

    # -- actions ---------------------------------------------------------------------------

    def action_launch(self) -> None:
        if not self.refused_read_only():
            self.launch(1)

    def action_launch_many(self) -> None:
        if self.refused_read_only():
            return

        def answered(text: str | None) -> None:
            if text:
                self.launch(int(text))

        self.app.push_screen(PromptModal("How many local proplets?", "2", _how_many), answered)

    @work(group="local-launch", description="Launching local proplets", exit_on_error=False)
    async def launch(self, count: int) -> None:
        started = await self.console.local.launch(count)
        self.notify(f"Launched {', '.join(p.id for p in started)}; they join the fleet in a few seconds.",
                    timeout=4)

    def action_stop(self) -> None:
        proplet_id = self.selected_id()
        if proplet_id is None or self.refused_read_only():
            return
        proc = self.console.local.proplets.get(proplet_id)
        if proc is None or not proc.running:
            self.notify(f"{proplet_id} is not running.", severity="warning")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.stop([proplet_id])

        self.app.push_screen(ConfirmModal(
            f"Stop local proplet {proplet_id}? Its running tasks get its shutdown grace (3 s unless "
            "PROPLET_SHUTDOWN_GRACE says otherwise) to finish; the rest run again on another proplet.", "Stop"),
            confirmed)

    def action_stop_all(self) -> None:
        if self.refused_read_only():
            return
        running = [p.id for p in self.console.local.proplets.values() if p.running]
        if not running:
            self.notify("No local proplet is running.", severity="warning")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.stop(running)

        self.app.push_screen(ConfirmModal(f"Stop all {len(running)} local proplets?", "Stop all"), confirmed)

    @work(group="local-stop", description="Stopping local proplets", exit_on_error=False)
    async def stop(self, proplet_ids: list[str]) -> None:
        # Together: each may take its shutdown grace to drain.
        await asyncio.gather(*(self.console.local.stop(proplet_id) for proplet_id in proplet_ids))
        self.notify(f"Stopped {', '.join(proplet_ids)}", timeout=3)

    def action_forget(self) -> None:
        self.console.local.forget_stopped()

    def palette_commands(self) -> list[PaletteCommand]:
        return [
            PaletteCommand("Local: launch a proplet", "Start one local proplet", self.action_launch, True),
            PaletteCommand("Local: launch several", "Start N local proplets", self.action_launch_many, True),
            PaletteCommand("Local: stop the selected proplet", "Stop it", self.action_stop, True),
            PaletteCommand("Local: stop all", "Stop every local proplet", self.action_stop_all, True),
        ]
