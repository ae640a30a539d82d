"""Firmware tools for the embedded proplet: build, flash, monitor, provision, list ports.

Everything here is plain functions and classes that the Textual console reuses (streaming
command output line by line with a progress percentage, provisioning over serial, listing
ports); the click group at the bottom is a thin layer over them. External tools are command
templates, run with a timeout, and every failure is a `FirmwareError` whose message says what
failed, why, and what to do next.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

DEVICE_ENV = "esp32-s3-devkitc-1"
BENCH_ENV = "esp32-s3-bench"
DEFAULT_FIRMWARE_DIR = Path(__file__).resolve().parents[1] / "firmware"
REGISTRY_HOST = "api.registry.platformio.org"
# Overrides the registry host the build probes (tests point it at an unresolvable name).
REGISTRY_HOST_ENV = "PROPELLER_PIO_REGISTRY"
PROBE_TIMEOUT = 3.0
BUILD_TIMEOUT = 1800.0
FLASH_TIMEOUT = 300.0
CONSOLE_BAUD = 115200

# USB vendor ids of the bridges ESP32 boards use: Espressif's own USB, Silicon Labs CP210x,
# WCH CH34x, FTDI.
ESP_USB_VENDORS = {0x303A: "Espressif", 0x10C4: "Silicon Labs", 0x1A86: "WCH", 0x0403: "FTDI"}

# Command templates, as the console's config overrides them: {placeholders} are quoted values.
DEFAULT_TEMPLATES: dict[str, str] = {
    "build": "{pio} run --project-dir {project} --environment {env}",
    "flash": (
        "{python} -m esptool --chip esp32s3 --port {port} --baud {baud} write-flash "
        "0x0 {build_dir}/bootloader.bin 0x8000 {build_dir}/partitions.bin 0x10000 {build_dir}/firmware.bin"
    ),
}


class FirmwareError(Exception):
    """A firmware operation failed; the message is meant for the user as is."""


@dataclass(frozen=True, slots=True)
class FirmwareProject:
    """Where the PlatformIO project and its build output live."""

    directory: Path = DEFAULT_FIRMWARE_DIR
    env: str = DEVICE_ENV

    @property
    def build_dir(self) -> Path:
        return self.directory / ".pio" / "build" / self.env

    def images(self) -> list[Path]:
        return [self.build_dir / name for name in ("bootloader.bin", "partitions.bin", "firmware.bin")]

    def environments(self) -> list[str]:
        """The `[env:NAME]` sections of the project's platformio.ini (an INI file)."""
        ini = self.directory / "platformio.ini"
        if not ini.is_file():
            raise FirmwareError(f"No PlatformIO project at {self.directory}: it has no platformio.ini. "
                                "Pass the firmware's directory as --project (firmware/ in the checkout).")
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read(ini, encoding="utf-8")
        except configparser.Error as exc:
            raise FirmwareError(f"{ini} cannot be read: {exc}") from None
        return [section.removeprefix("env:") for section in parser.sections() if section.startswith("env:")]

    def check_environment(self) -> None:
        """Fail at once, naming the choices, for an environment the project does not define (pio
        itself would only say so after the registry probe and its own start-up)."""
        known = self.environments()
        if self.env not in known:
            raise FirmwareError(f"No PlatformIO environment {self.env!r} in {self.directory / 'platformio.ini'}; "
                                f"it defines: {', '.join(known) or 'none'}.")


def render_command(template: str, **values: Any) -> list[str]:
    """A command template with its placeholders filled (each value quoted) as an argv list."""
    quoted = {key: shlex.quote(str(value)) for key, value in values.items()}
    try:
        return shlex.split(template.format(**quoted))
    except KeyError as exc:
        raise FirmwareError(f"the command template {template!r} uses {{{exc.args[0]}}}, which is not known") from None


# ------------------------------------------------------------------------------------------
# progress and streaming

_PERCENT = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)\s?%")
_NINJA = re.compile(r"^\[(\d+)/(\d+)\]")


def parse_progress(line: str) -> float | None:
    """The progress percentage a pio, ninja or esptool output line states, if any."""
    ninja = _NINJA.match(line.strip())
    if ninja and int(ninja.group(2)) > 0:
        return min(100.0, 100.0 * int(ninja.group(1)) / int(ninja.group(2)))
    match = _PERCENT.search(line)
    if match:
        value = float(match.group(1))
        if 0.0 <= value <= 100.0:
            return value
    return None


@dataclass(slots=True)
class CommandResult:
    returncode: int
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


LineHandler = Callable[[str, float | None], None]

# Lines kept for error messages; a build prints tens of thousands.
KEEP_LINES = 400


async def stream_command(argv: list[str], *, timeout: float, on_line: LineHandler | None = None,
                         cwd: Path | None = None, env: dict[str, str] | None = None) -> CommandResult:
    """Run argv, handing each output line (stdout and stderr merged) and its progress to on_line.

    On timeout the whole process group is killed and FirmwareError says so.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            cwd=cwd, env=env, start_new_session=True)
    except FileNotFoundError:
        raise FirmwareError(f"{argv[0]} is not installed or not on PATH") from None
    result = CommandResult(returncode=-1)
    assert proc.stdout is not None

    async def pump() -> None:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip("\r\n")
            result.lines.append(line)
            del result.lines[:-KEEP_LINES]
            if on_line is not None:
                on_line(line, parse_progress(line))

    try:
        async with asyncio.timeout(timeout):
            await pump()
        async with asyncio.timeout(max(1.0, timeout)):
            result.returncode = await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise FirmwareError(
            f"{Path(argv[0]).name} did not finish within {timeout:.0f} s and was stopped; "
            "check the output above, or raise --timeout if the machine is just slow") from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    return result


# ------------------------------------------------------------------------------------------
# build


@dataclass(frozen=True, slots=True)
class RegistryProbe:
    reachable: bool
    host: str
    detail: str


def probe_registry(host: str | None = None, timeout: float = PROBE_TIMEOUT) -> RegistryProbe:
    """Can this machine reach PlatformIO's registry? A DNS lookup and a TLS-port connect, each
    bounded by timeout (pio itself retries for about a minute before it gives up)."""
    host = host or os.environ.get(REGISTRY_HOST_ENV) or REGISTRY_HOST
    outcome: dict[str, Any] = {}

    def resolve() -> None:
        try:
            outcome["addresses"] = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        except OSError as exc:
            outcome["error"] = exc

    # getaddrinfo has no timeout of its own: run it in a thread and stop waiting.
    resolver = threading.Thread(target=resolve, daemon=True)
    resolver.start()
    resolver.join(timeout)
    if resolver.is_alive():
        return RegistryProbe(False, host, f"the DNS lookup did not answer within {timeout:.0f} s")
    if "error" in outcome:
        return RegistryProbe(False, host, f"the DNS lookup failed ({outcome['error']})")
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            pass
    except OSError as exc:
        return RegistryProbe(False, host, f"connecting to port 443 failed ({exc})")
    return RegistryProbe(True, host, "reachable")


def platformio_core_dir() -> Path:
    return Path(os.environ.get("PLATFORMIO_CORE_DIR") or Path.home() / ".platformio")


def platform_installed() -> bool:
    """Whether the espressif32 platform (and so the toolchain) was downloaded before."""
    return (platformio_core_dir() / "platforms" / "espressif32").is_dir()


def find_pio() -> str:
    candidates = [shutil.which("pio"), shutil.which("platformio"),
                  str(Path(sys.executable).with_name("pio"))]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    raise FirmwareError("PlatformIO is not installed: run pip install 'propeller[firmware]' "
                        "(or pip install platformio) and try again")


def check_can_build() -> None:
    """Fail fast, with the reason, where `pio run` would hang on the network and then fail."""
    if platform_installed():
        return
    probe = probe_registry()
    if not probe.reachable:
        raise FirmwareError(
            f"Cannot reach the PlatformIO registry at {probe.host}: {probe.detail}. The first build "
            "downloads the ESP32 toolchain, ESP-IDF and WAMR from it; connect this machine to the "
            "internet (or set HTTPS_PROXY) and run the build again. Later builds work offline.")


async def build(project: FirmwareProject, *, on_line: LineHandler | None = None,
                timeout: float = BUILD_TIMEOUT, template: str = DEFAULT_TEMPLATES["build"]) -> CommandResult:
    project.check_environment()
    # The probe waits on DNS and a connect: off the event loop the console shares.
    await asyncio.to_thread(check_can_build)
    argv = render_command(template, pio=find_pio(), project=project.directory, env=project.env)
    result = await stream_command(argv, timeout=timeout, on_line=on_line)
    if result.returncode != 0:
        raise FirmwareError(
            f"the firmware build failed (pio exited with {result.returncode}); the last lines were:\n"
            + "\n".join(result.lines[-15:]))
    return result


# ------------------------------------------------------------------------------------------
# flash


def port_is_url(port: str) -> bool:
    return "://" in port


def check_port(port: str) -> None:
    if not port_is_url(port) and not Path(port).exists():
        raise FirmwareError(
            f"No board at {port}: the port does not exist. Connect the board over USB (the port "
            "marked UART on an ESP32-S3-DevKitC-1), run `propeller firmware ports` to see where it "
            "appeared, and pass that as --port.")


def explain_esptool_failure(output: str, port: str) -> str:
    """esptool's own error, turned into what the user should do about it."""
    if "Could not open" in output or "could not open port" in output:
        return (f"No board at {port}: esptool could not open the port (it does not exist or "
                "another program, such as a serial monitor, holds it). Close other monitors, "
                "check `propeller firmware ports`, and try again.")
    if "Failed to connect" in output or "No serial data received" in output:
        return (f"The board on {port} did not answer esptool. Hold BOOT, press and release RESET, "
                "release BOOT to enter the bootloader, then flash again.")
    if "Permission denied" in output:
        return (f"No permission to open {port}: add your user to the dialout group (sudo usermod "
                "-aG dialout $USER, then log in again).")
    last = [line for line in output.splitlines() if line.strip()][-3:]
    return "esptool failed: " + " / ".join(last)


async def run_esptool(args: list[str], port: str, *, on_line: LineHandler | None = None,
                      timeout: float = FLASH_TIMEOUT) -> CommandResult:
    result = await stream_command([sys.executable, "-m", "esptool", *args], timeout=timeout, on_line=on_line)
    if result.returncode != 0:
        raise FirmwareError(explain_esptool_failure(result.output, port))
    return result


async def flash(project: FirmwareProject, port: str, *, baud: int = 460800,
                on_line: LineHandler | None = None, timeout: float = FLASH_TIMEOUT,
                template: str = DEFAULT_TEMPLATES["flash"]) -> CommandResult:
    check_port(port)
    missing = [image for image in project.images() if not image.is_file()]
    if missing:
        raise FirmwareError(
            f"The firmware for {project.env} is not built ({missing[0]} is missing): run "
            f"`propeller firmware build --env {project.env}` first.")
    argv = render_command(template, python=sys.executable, port=port, baud=baud, build_dir=project.build_dir)
    result = await stream_command(argv, timeout=timeout, on_line=on_line)
    if result.returncode != 0:
        raise FirmwareError(explain_esptool_failure(result.output, port))
    return result


# ------------------------------------------------------------------------------------------
# serial ports, monitor, provisioning


@dataclass(frozen=True, slots=True)
class PortInfo:
    device: str
    description: str
    hwid: str
    vendor: str

    @property
    def likely_board(self) -> bool:
        return bool(self.vendor)


def missing_tool_text(exc: ModuleNotFoundError, doing: str) -> str:
    """What to install when an optional firmware tool is missing: pyserial and the rest are the
    `firmware` extra, so a base install met "No module named 'serial'" (or a traceback)."""
    root = (exc.name or "").split(".")[0]
    package = {"serial": "pyserial"}.get(root, root or "a module")
    return (f"{doing} needs {package}, which is not installed. Install the firmware tools: "
            "pip install 'propeller[firmware]' (in a checkout: .venv/bin/pip install -e '.[firmware]').")


def list_ports() -> list[PortInfo]:
    try:
        from serial.tools import list_ports as serial_ports
    except ModuleNotFoundError as exc:
        raise FirmwareError(missing_tool_text(exc, "Listing serial ports")) from None

    ports = []
    for port in sorted(serial_ports.comports(), key=lambda p: p.device):
        vendor = ESP_USB_VENDORS.get(port.vid or -1, "")
        ports.append(PortInfo(port.device, port.description or "", port.hwid or "", vendor))
    return ports


def open_serial(port: str, baud: int = CONSOLE_BAUD, timeout: float = 0.2, *,
                doing: str = "Opening a serial port") -> Any:
    """Open a serial port without resetting the board (`doing`: what for, should pyserial be missing).

    Asserting DTR/RTS on open drives an ESP32's EN/IO0 through the auto-reset circuit, so both
    are released before the port is opened.
    """
    try:
        import serial
    except ModuleNotFoundError as exc:
        raise FirmwareError(missing_tool_text(exc, doing)) from None

    check_port(port)
    conn = serial.serial_for_url(port, do_not_open=True, baudrate=baud, timeout=timeout)
    conn.dtr = False
    conn.rts = False
    try:
        conn.open()
    except serial.SerialException as exc:
        raise FirmwareError(explain_esptool_failure(f"Could not open {port}: {exc}", port)) from None
    return conn


def monitor_lines(port: str, baud: int = CONSOLE_BAUD, stop: threading.Event | None = None) -> Iterator[str]:
    """Lines the device prints, until stop is set (or forever)."""
    with contextlib.closing(open_serial(port, baud, doing="The serial monitor")) as conn:
        pending = b""
        while stop is None or not stop.is_set():
            pending += conn.read(256)
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                yield line.decode(errors="replace").rstrip("\r")


# Keys of the device's settings (firmware/src/core/provision.c), in the order they are set.
SETTING_KEYS = ("wifi_ssid", "wifi_pass", "mqtt_url", "mqtt_user", "mqtt_pass", "proplet_id", "domain", "channel",
                "trusted_keys")


def trusted_keys_setting(paths: list[Path]) -> str:
    """The device's `trusted_keys` for these PEM public keys: the base64 of each key's 32 bytes."""
    import base64

    from cryptography.hazmat.primitives import serialization

    from core.signing import SignatureError, load_public_keys

    try:
        keys = load_public_keys(paths)
    except SignatureError as exc:
        raise FirmwareError(str(exc)) from None
    raw = (key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) for key in keys)
    return ",".join(base64.b64encode(key).decode() for key in raw)


class Provisioner:
    """The serial line protocol of firmware/src/core/provision.h.

    Answers start with "+"; everything else on the line is the device's log and is skipped.
    """

    def __init__(self, port: str, baud: int = CONSOLE_BAUD, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self._conn = open_serial(port, baud, doing="Provisioning")
        self._pending = b""

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Provisioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, line: str) -> None:
        if "\n" in line or "\r" in line:
            raise FirmwareError("provisioning values cannot contain line breaks")
        self._conn.write(line.encode() + b"\n")
        self._conn.flush()

    def _answer(self, deadline: float) -> list[str] | None:
        """Answer lines up to the final +OK/+ERR line; None when the deadline passes first."""
        lines: list[str] = []
        while time.monotonic() < deadline:
            while b"\n" in self._pending:
                raw, self._pending = self._pending.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                if not line.startswith("+"):
                    continue  # the device's own log output
                lines.append(line)
                if line.startswith(("+OK", "+ERR")):
                    return lines
            self._pending += self._conn.read(256)
        return None

    def command(self, line: str) -> list[str]:
        self._send(line)
        answer = self._answer(time.monotonic() + self.timeout)
        if answer is None:
            raise FirmwareError(
                f"The device on {self.port} did not answer {line.split()[0]} within {self.timeout:.0f} s. "
                "Is the proplet firmware flashed and running? Try `propeller firmware monitor`.")
        if answer[-1].startswith("+ERR"):
            raise FirmwareError(f"The device refused {line.split()[0]}: {answer[-1][5:]}")
        return answer

    def hello(self) -> str:
        """Wait until the device answers (it may still be booting); its greeting line."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            self._send("HELLO")
            answer = self._answer(min(deadline, time.monotonic() + 0.5))
            if answer and answer[-1].startswith("+OK propeller-proplet"):
                return answer[-1][4:]
        raise FirmwareError(
            f"No proplet answered on {self.port} within {self.timeout:.0f} s. Check that the "
            "board runs the proplet firmware (flash it with `propeller firmware flash`) and that "
            "no serial monitor holds the port.")

    def set(self, key: str, value: str) -> None:
        if key not in SETTING_KEYS:
            raise FirmwareError(f"unknown setting {key!r}; settings: {', '.join(SETTING_KEYS)}")
        self.command(f"SET {key} {value}")

    def settings(self) -> dict[str, str]:
        out = {}
        for line in self.command("LIST")[:-1]:
            key, _, value = line.removeprefix("+KEY ").partition("=")
            out[key] = value
        return out

    def save(self) -> None:
        self.command("SAVE")

    def reboot(self) -> None:
        self.command("REBOOT")


def provision(port: str, values: dict[str, str], *, reboot: bool = True, timeout: float = 5.0,
              on_line: Callable[[str], None] | None = None) -> dict[str, str]:
    """Write settings to the device, save them to its flash and (by default) restart it."""
    say = on_line or (lambda _line: None)
    with Provisioner(port, timeout=timeout) as device:
        say(f"found {device.hello()}")
        for key in SETTING_KEYS:
            if key in values:
                device.set(key, values[key])
                say(f"set {key}")
        device.save()
        say("saved to the device's flash")
        settings = device.settings()
        if reboot:
            device.reboot()
            say("restarting with the new settings")
    return settings


# ------------------------------------------------------------------------------------------
# the click layer


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except FirmwareError as exc:
        raise click.ClickException(str(exc)) from None


def _echo_line(line: str, progress: float | None) -> None:
    click.echo(line)


def _project_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--env", default=DEVICE_ENV, show_default=True,
                        help=f"PlatformIO environment ({DEVICE_ENV}, or {BENCH_ENV} for the benchmark).")(func)
    return click.option("--project", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_FIRMWARE_DIR,
                        show_default=True, help="The firmware's PlatformIO project.")(func)


@click.group("firmware")
def firmware_group() -> None:
    """Build, flash, monitor and provision the ESP32-S3 proplet firmware."""


@firmware_group.command("build")
@_project_options
@click.option("--timeout", type=float, default=BUILD_TIMEOUT, show_default=True, help="Seconds before pio is stopped.")
def build_command(project: Path, env: str, timeout: float) -> None:
    """Build the firmware with PlatformIO (the first build downloads the toolchain)."""
    _run(build(FirmwareProject(project, env), on_line=_echo_line, timeout=timeout))
    click.echo(f"built {FirmwareProject(project, env).build_dir / 'firmware.bin'}")


@firmware_group.command("flash")
@_project_options
@click.option("--port", required=True, help="Serial port of the board (see `propeller firmware ports`).")
@click.option("--baud", type=int, default=460800, show_default=True)
@click.option("--timeout", type=float, default=FLASH_TIMEOUT, show_default=True)
def flash_command(project: Path, env: str, port: str, baud: int, timeout: float) -> None:
    """Write the built firmware to the board with esptool."""
    _run(flash(FirmwareProject(project, env), port, baud=baud, on_line=_echo_line, timeout=timeout))
    click.echo(f"flashed {env} to {port}")


@firmware_group.command("monitor")
@click.option("--port", required=True, help="Serial port of the board.")
@click.option("--baud", type=int, default=CONSOLE_BAUD, show_default=True)
def monitor_command(port: str, baud: int) -> None:
    """Print what the board logs (Ctrl-C to quit)."""
    try:
        for line in monitor_lines(port, baud):
            click.echo(line)
    except FirmwareError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


@firmware_group.command("provision")
@click.option("--port", required=True, help="Serial port of the board.")
@click.option("--wifi-ssid", help="Wi-Fi network name.")
@click.option("--wifi-password", envvar="PROPELLER_WIFI_PASSWORD", help="Wi-Fi password (or $PROPELLER_WIFI_PASSWORD).")
@click.option("--broker", "mqtt_url", help="Broker URL, mqtt://host:port.")
@click.option("--mqtt-user", help="MQTT username.")
@click.option("--mqtt-password", envvar="PROPELLER_MQTT_PASSWORD", help="MQTT password (or $PROPELLER_MQTT_PASSWORD).")
@click.option("--id", "proplet_id", help="The proplet's id (also its MQTT client id).")
@click.option("--domain", help="Topic domain: the manager's tenant_id.")
@click.option("--channel", help="Topic channel: the manager's channel_id.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 public key (PEM, from `propeller keys generate`); the board then runs only modules "
                   "the manager signed with it (MANAGER_SIGNING_KEY). Repeat for up to 4 keys.")
@click.option("--no-reboot", is_flag=True, help="Save without restarting the board.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for each answer.")
def provision_command(port: str, wifi_ssid: str | None, wifi_password: str | None, mqtt_url: str | None,
                      mqtt_user: str | None, mqtt_password: str | None, proplet_id: str | None,
                      domain: str | None, channel: str | None, trusted_keys: tuple[Path, ...], no_reboot: bool,
                      timeout: float) -> None:
    """Store Wi-Fi, broker, identity and trusted keys in the board's flash over the serial port."""
    given = {"wifi_ssid": wifi_ssid, "wifi_pass": wifi_password, "mqtt_url": mqtt_url, "mqtt_user": mqtt_user,
             "mqtt_pass": mqtt_password, "proplet_id": proplet_id, "domain": domain, "channel": channel}
    values = {key: value for key, value in given.items() if value is not None}
    try:
        if trusted_keys:
            values["trusted_keys"] = trusted_keys_setting(list(trusted_keys))
        settings = provision(port, values, reboot=not no_reboot, timeout=timeout, on_line=click.echo)
    except FirmwareError as exc:
        raise click.ClickException(str(exc)) from None
    for key, value in settings.items():
        click.echo(f"  {key} = {value}")


@firmware_group.command("ports")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ports_command(as_json: bool) -> None:
    """List serial ports; boards with a known USB bridge are marked."""
    try:
        ports = list_ports()
    except FirmwareError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        import json

        click.echo(json.dumps([{"device": p.device, "description": p.description, "hwid": p.hwid,
                                "vendor": p.vendor, "likely_board": p.likely_board} for p in ports]))
        return
    if not ports:
        click.echo("No serial ports found. Connect the board over USB (on an ESP32-S3-DevKitC-1, "
                   "the port marked UART) and run this again.")
        return
    for p in ports:
        mark = "*" if p.likely_board else " "
        click.echo(f"{mark} {p.device:<20} {p.description} [{p.hwid}]{f' ({p.vendor})' if p.vendor else ''}")
    if any(p.likely_board for p in ports):
        click.echo("* a USB bridge ESP32 boards use")


__all__ = [
    "BENCH_ENV", "DEVICE_ENV", "CommandResult", "FirmwareError", "FirmwareProject", "PortInfo", "Provisioner",
    "RegistryProbe", "build", "check_can_build", "explain_esptool_failure", "firmware_group", "flash",
    "list_ports", "monitor_lines", "parse_progress", "probe_registry", "provision",
    "render_command", "run_esptool", "stream_command", "trusted_keys_setting",
]
