"""The firmware view against the real tools: an unreachable PlatformIO registry and a missing board must
be reported as such, with what to do, quickly (no minute-long pio retries)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input

from console.views.firmware import FirmwareScreen
from console.widgets import ConfirmModal
from tests.console.conftest import open_view, until

MISSING_PORT = "/dev/ttyUSB-propeller-test-missing"


@pytest.fixture
def offline_platformio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh PlatformIO home (no toolchain downloaded) and a registry name that cannot resolve.
    monkeypatch.setenv("PLATFORMIO_CORE_DIR", str(tmp_path / "pio-core"))
    monkeypatch.setenv("PROPELLER_PIO_REGISTRY", "registry.propeller-test.invalid")


def _message(screen: FirmwareScreen) -> str:
    return str(screen.query_one("#fw-message").render())


async def test_build_without_registry_access_says_so_and_what_to_do(console: Any, offline_platformio: None) -> None:
    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "7", FirmwareScreen)
        await until(pilot, lambda: "serial ports" in _message(screen) or "No serial ports" in _message(screen))
        started = time.monotonic()
        await pilot.press("b")
        await until(pilot, lambda: screen.job is not None and not screen.job.running, timeout=30)
        assert time.monotonic() - started < 20
        message = _message(screen)
        assert "Cannot reach the PlatformIO registry at registry.propeller-test.invalid" in message
        assert "connect this machine to the internet" in message
        assert screen.query_one("#fw-message").has_class("-error")
        assert any("PlatformIO registry" in n.message for n in app._notifications)


async def test_without_pyserial_the_view_says_what_to_install(console: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # scripts/run installs no extras: the view said "Listing serial ports failed: No module named 'serial'".
    for name in ("serial", "serial.tools", "serial.tools.list_ports"):
        monkeypatch.setitem(sys.modules, name, None)
    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "7", FirmwareScreen)
        await until(pilot, lambda: "needs pyserial" in _message(screen))
        assert "pip install 'propeller[firmware]'" in _message(screen)
        screen.query_one("#port", Input).value = MISSING_PORT
        await pilot.press("m")
        await until(pilot, lambda: screen.job is not None and screen.job.name == "monitor" and not screen.job.running)
        assert "The serial monitor needs pyserial" in _message(screen)


async def test_flash_and_monitor_without_a_board_say_so(console: Any) -> None:
    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "7", FirmwareScreen)
        screen.query_one("#port", Input).value = MISSING_PORT
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await until(pilot, lambda: screen.job is not None and not screen.job.running, timeout=30)
        assert f"No board at {MISSING_PORT}" in _message(screen)
        assert "Connect the board over USB" in _message(screen)
        await pilot.press("m")
        await until(pilot, lambda: screen.job is not None and screen.job.name == "monitor" and not screen.job.running)
        assert f"No board at {MISSING_PORT}" in _message(screen)
        # No port at all: the view asks for one instead of running anything.
        screen.query_one("#port", Input).value = ""
        await pilot.press("f")
        await pilot.pause(0.1)
        assert not isinstance(app.screen, ConfirmModal)
        assert "Choose a port" in _message(screen)


async def test_flash_with_a_real_esptool_on_a_port_that_is_not_a_board(console: Any, tmp_path: Path) -> None:
    """The port exists (a plain file), so esptool itself runs and fails; its error reaches the user."""
    fake_port = tmp_path / "ttyFAKE0"
    fake_port.write_text("")
    build = tmp_path / "fw"
    (build / ".pio" / "build" / "esp32-s3-devkitc-1").mkdir(parents=True)
    for image in ("bootloader.bin", "partitions.bin", "firmware.bin"):
        (build / ".pio" / "build" / "esp32-s3-devkitc-1" / image).write_bytes(b"\xe9" + b"\0" * 15)
    settings = {"firmware": {"project": build, "flash_timeout": 60}}
    async with console(**settings) as (app, pilot, _core):
        screen = await open_view(app, pilot, "7", FirmwareScreen)
        screen.query_one("#port", Input).value = str(fake_port)
        await pilot.press("f")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
        await pilot.press("y")
        await until(pilot, lambda: screen.job is not None and not screen.job.running, timeout=60)
        message = _message(screen)
        assert str(fake_port) in message and screen.query_one("#fw-message").has_class("-error")
        assert screen.job is not None and screen.job.total_lines > 0  # esptool's own output was streamed


async def test_build_output_streams_and_drives_the_progress_bar(console: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in `pio` on PATH whose output carries ninja-style and percentage progress (the real one
    cannot build here: its registry is unreachable): the log streams it and the bar follows."""
    core_dir = tmp_path / "pio-core"
    (core_dir / "platforms" / "espressif32").mkdir(parents=True)  # as if the toolchain was downloaded
    monkeypatch.setenv("PLATFORMIO_CORE_DIR", str(core_dir))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pio = bin_dir / "pio"
    pio.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        "assert sys.argv[1:3] == ['run', '--project-dir'], sys.argv\n"
        "for i in range(1, 5):\n"
        "    print(f'[{i}/8] Compiling src/core/part{i}.c', flush=True)\n"
        "    time.sleep(0.15)\n"
        "print('Linking .pio/build/firmware.elf  75%', flush=True)\n"
        "time.sleep(0.8)\n"
        "print('Building firmware.bin 100%', flush=True)\n")
    pio.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    async with console() as (app, pilot, _core):
        screen = await open_view(app, pilot, "7", FirmwareScreen)
        await pilot.press("b")
        bar = screen.query_one("#fw-progress")
        await until(pilot, lambda: bar.progress == 75.0, timeout=20)
        log = screen.query_one("#fw-output")
        assert any("[4/8] Compiling" in line for line in log.lines)
        await until(pilot, lambda: screen.job is not None and not screen.job.running, timeout=20)
        assert "build finished" in _message(screen) and bar.progress == 100
