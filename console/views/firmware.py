"""Firmware: serial ports, build / flash / monitor / provision with streamed output and a progress bar."""

from __future__ import annotations

import socket
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Label, Log, ProgressBar, Static

from console import keys
from console.base import ConsoleScreen, PaletteCommand
from console.firmware import FirmwareJob
from console.widgets import ConfirmModal, ConsoleInput, StateTable

PROVISION_FIELDS = (("wifi_ssid", "Wi-Fi network"), ("wifi_pass", "Wi-Fi password"), ("mqtt_url", "Broker URL"),
                    ("proplet_id", "Proplet id"), ("domain", "Domain (tenant)"), ("channel", "Channel"))


def lan_address() -> str:
    """This machine's address towards the network (what a board must use instead of 127.0.0.1)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent for a UDP connect
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class ProvisionModal(ModalScreen[dict[str, str] | None]):
    DEFAULT_CSS = """
    ProvisionModal { align: center middle; }
    ProvisionModal > Vertical { width: 72; max-width: 100%; height: auto; border: thick $primary; background: $surface;
                                padding: 1 2; }
    ProvisionModal Label { padding-top: 1; }
    ProvisionModal Input.-textual-compact { background: $panel; }
    ProvisionModal Input.-textual-compact:focus { background: $primary 25%; }
    """
    BINDINGS: ClassVar = [Binding("escape", "cancel", "Cancel", id="provision.cancel")]

    def __init__(self, defaults: dict[str, str]) -> None:
        super().__init__()
        self.defaults = defaults

    def compose(self) -> ComposeResult:
        with Vertical() as box:
            box.border_title = "Provision the board (Enter in the last field sends)"
            for key, label in PROVISION_FIELDS:
                yield Label(label)
                # Compact (no border): the six fields fit a 24-line terminal.
                yield ConsoleInput(self.defaults.get(key, ""), id=f"prov-{key}",
                                   password=key == "wifi_pass", compact=True)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        if event.input.id == f"prov-{PROVISION_FIELDS[-1][0]}":
            values = {key: self.query_one(f"#prov-{key}", Input).value for key, _ in PROVISION_FIELDS}
            self.dismiss({k: v for k, v in values.items() if v})
        else:
            self.focus_next()

    def action_cancel(self) -> None:
        self.dismiss(None)


class FirmwareScreen(ConsoleScreen):
    CRUMB = "Firmware"
    BINDINGS: ClassVar = keys.FIRMWARE
    HELP = """\
### Firmware (ESP32-S3 proplet)
**r** lists serial ports (boards with a known USB bridge are marked), **b** builds the firmware with
PlatformIO, **f** flashes it with esptool to the port below (asks first), **m** streams the board's
serial output (**x** stops), **p** stores Wi-Fi, broker and identity on the board. Output streams
below; the bar follows the tool's own percentages. The first build downloads the toolchain from the
PlatformIO registry; without internet access the console says so instead of waiting a minute.
Commands come from `console.firmware` in the config file.
"""
    DEFAULT_CSS = """
    FirmwareScreen #ports { height: auto; max-height: 8; }
    FirmwareScreen #port-row { height: auto; }
    FirmwareScreen #port-row Label { padding: 1 1 0 0; }
    FirmwareScreen #port { width: 40; }
    FirmwareScreen #fw-message { height: auto; padding: 0 1; }
    FirmwareScreen #fw-message.-error { color: $error; text-style: bold; }
    FirmwareScreen #fw-message.-ok { color: $success; }
    FirmwareScreen ProgressBar { margin: 0 1; }
    FirmwareScreen #fw-output { height: 1fr; border-top: solid $panel; }
    """

    class PortsListed(Message):
        def __init__(self, ports: list[Any]) -> None:
            super().__init__()
            self.ports = ports

    class JobEnded(Message):
        def __init__(self, job: FirmwareJob) -> None:
            super().__init__()
            self.job = job

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job: FirmwareJob | None = None
        self._job_lines = 0
        self._shown_job: FirmwareJob | None = None

    def compose_body(self) -> ComposeResult:
        with Vertical():
            table = StateTable(id="ports", cursor_type="row")
            for key, label in (("device", "PORT"), ("description", "DESCRIPTION"), ("vendor", "USB BRIDGE"),
                               ("hwid", "HARDWARE ID")):
                table.add_column(label, key=key)
            yield table
            with Horizontal(id="port-row"):
                yield Label("Port")
                yield ConsoleInput(placeholder="/dev/ttyUSB0 (filled from the selected row)", id="port")
            yield Static(Content("Press r to list serial ports, b to build."), id="fw-message")
            yield ProgressBar(total=100, show_eta=False, id="fw-progress")
            yield Log(id="fw-output", max_lines=5000)

    def on_mount(self) -> None:
        self.list_ports()

    # -- ports -----------------------------------------------------------------------------

    @work(exclusive=True, group="firmware-ports", description="Listing serial ports", exit_on_error=False)
    async def list_ports(self) -> None:
        try:
            ports = await self.console.firmware.ports()
        except self.console.firmware.error_types() as exc:
            self.post_message(self.JobEnded(_failed("ports", str(exc))))
            return
        self.post_message(self.PortsListed(ports))

    @on(PortsListed)
    def _ports(self, event: PortsListed) -> None:
        table = self.query_one("#ports", StateTable)
        table.clear()
        for p in event.ports:
            table.add_row(p.device, p.description, p.vendor or "", p.hwid, key=p.device)
        boards = [p for p in event.ports if getattr(p, "likely_board", False)]
        port_input = self.query_one("#port", Input)
        if not port_input.value and (boards or event.ports):
            port_input.value = (boards or event.ports)[0].device
        if not event.ports:
            self.say("No serial ports found. Connect the board over USB (on an ESP32-S3-DevKitC-1 the port marked "
                     "UART) and press r; or type the port below.", "error")
        else:
            self.say(f"{len(event.ports)} serial ports, {len(boards)} with a USB bridge ESP32 boards use.", "")

    @on(DataTable.RowHighlighted, "#ports")
    def _port_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value:
            self.query_one("#port", Input).value = event.row_key.value

    def say(self, text: str, kind: str) -> None:
        message = self.query_one("#fw-message", Static)
        message.update(Content(text))
        message.set_class(kind == "error", "-error")
        message.set_class(kind == "ok", "-ok")

    def port(self) -> str | None:
        port = self.query_one("#port", Input).value.strip()
        if not port:
            self.say("Choose a port: select a row above (r lists ports) or type it, e.g. /dev/ttyUSB0.", "error")
            self.query_one("#port", Input).focus()
            return None
        return port

    # -- jobs ------------------------------------------------------------------------------

    def _start(self, name: str) -> FirmwareJob | None:
        if self.job is not None and self.job.running:
            self.notify(f"{self.job.name} is still running; press x to cancel it first.", severity="warning")
            return None
        self.job = FirmwareJob(name)
        self.query_one("#fw-output", Log).clear()
        self._job_lines = 0
        self.query_one("#fw-progress", ProgressBar).update(total=100, progress=0)
        self.say(f"{name}…", "")
        return self.job

    def action_ports(self) -> None:
        self.list_ports()

    def action_build(self) -> None:
        job = self._start("build")
        if job is not None:
            self.run_job(job, lambda: self.console.firmware.build(job))

    def action_flash(self) -> None:
        if self.refused_read_only():
            return
        port = self.port()
        if port is None:
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                job = self._start("flash")
                if job is not None:
                    self.run_job(job, lambda: self.console.firmware.flash(job, port))

        self.app.push_screen(ConfirmModal(
            f"Flash {self.console.settings.firmware.env} to the board on {port}? This replaces the firmware on it.",
            "Flash"), confirmed)

    def action_monitor(self) -> None:
        port = self.port()
        if port is None:
            return
        job = self._start("monitor")
        if job is not None:
            self.run_blocking_job(job, lambda: self.console.firmware.monitor(job, port))

    def action_provision(self) -> None:
        if self.refused_read_only():
            return
        port = self.port()
        if port is None:
            return
        manager = self.console.manager
        broker = manager.broker_address
        host = broker.host if broker and broker.host not in ("127.0.0.1", "localhost", "::1") else lan_address()
        defaults = {
            "mqtt_url": f"mqtt://{host}:{broker.port if broker else 1883}",
            "domain": manager.settings.tenant_id, "channel": manager.settings.channel_id,
        }

        def answered(values: dict[str, str] | None) -> None:
            if values:
                job = self._start("provision")
                if job is not None:
                    self.run_blocking_job(job, lambda: self.console.firmware.provision(job, port, values))

        self.app.push_screen(ProvisionModal(defaults), answered)

    def action_cancel(self) -> None:
        if self.job is None or not self.job.running:
            self.notify("No firmware job is running.", severity="warning")
            return
        self.job.stop.set()
        self.workers.cancel_group(self, "firmware-job")
        self.job.finish(error=f"{self.job.name} cancelled")
        self.post_message(self.JobEnded(self.job))

    @work(exclusive=True, group="firmware-job", description="Running a firmware tool", exit_on_error=False)
    async def run_job(self, job: FirmwareJob, operation: Any) -> None:
        errors = self.console.firmware.error_types()
        try:
            await operation()
        except errors as exc:
            job.finish(error=str(exc))
        else:
            job.finish(outcome=f"{job.name} finished")
        self.post_message(self.JobEnded(job))

    @work(exclusive=True, group="firmware-job", thread=True, description="Running a firmware tool",
          exit_on_error=False)
    def run_blocking_job(self, job: FirmwareJob, operation: Any) -> None:
        errors = self.console.firmware.error_types()
        try:
            result = operation()
        except errors as exc:
            job.finish(error=str(exc))
        else:
            job.finish(outcome=f"{job.name} finished" + (f": {result}" if result else ""))
        # From a thread: post_message only (never call_from_thread in a hot path).
        self.post_message(self.JobEnded(job))

    @on(JobEnded)
    def _ended(self, event: JobEnded) -> None:
        job = event.job
        self.flush_body()
        if job.error:
            self.say(job.error, "error")
            self.notify(job.error, severity="error", timeout=10)
        else:
            self.say(job.outcome, "ok")
            self.query_one("#fw-progress", ProgressBar).update(progress=100)

    def flush_body(self) -> None:
        job = self.job
        if job is None:
            return
        if job is not self._shown_job:
            self._shown_job = job
            self._job_lines = 0
        lines = job.lines_since(self._job_lines)
        self._job_lines = job.total_lines
        if lines:
            self.query_one("#fw-output", Log).write_lines(lines)
        if job.progress is not None:
            self.query_one("#fw-progress", ProgressBar).update(progress=job.progress)

    def palette_commands(self) -> list[PaletteCommand]:
        return [
            PaletteCommand("Firmware: list ports", "List serial ports", self.action_ports),
            PaletteCommand("Firmware: build", "Build the firmware with PlatformIO", self.action_build),
            PaletteCommand("Firmware: flash", "Flash the firmware to the selected port", self.action_flash, True),
            PaletteCommand("Firmware: monitor", "Stream the board's serial output", self.action_monitor),
            PaletteCommand("Firmware: provision", "Store Wi-Fi and broker settings", self.action_provision, True),
        ]


def _failed(name: str, error: str) -> FirmwareJob:
    job = FirmwareJob(name)
    job.finish(error=error)
    return job
