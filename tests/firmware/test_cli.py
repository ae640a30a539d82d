"""`propeller firmware ...`: provisioning against the C line protocol over a pseudo-terminal,
ports, and the build and flash failures this machine can produce (no registry, no board)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from propeller import firmware as fw
from tests.firmware.test_host_proplet import module, online, run_task


def propeller(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "propeller", "firmware", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


async def wait_for_path(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(path.exists):
        assert time.monotonic() < deadline, f"{path} did not appear"
        await asyncio.sleep(0.05)


async def test_provisioning_over_serial_brings_a_fresh_proplet_into_the_fleet(
        manager_factory, host_proplets, broker, tmp_path, wasm) -> None:
    settings = tmp_path / "proplet.conf"
    tty = tmp_path / "ttyPROPLET"
    async with manager_factory() as core:
        # A fresh device: no settings, waiting on its serial port.
        proplet = host_proplets(None, "esp-fresh", "--settings", str(settings), "--provision-pty", str(tty),
                                join=False)
        await wait_for_path(tty)
        result = await asyncio.to_thread(
            propeller, "provision", "--port", str(tty), "--broker", broker.url, "--id", "esp-fresh",
            "--domain", core.settings.tenant_id, "--channel", core.settings.channel_id,
            "--mqtt-user", "esp-fresh", "--mqtt-password", "s3cret")
        assert result.returncode == 0, result.stderr + proplet.log
        assert "found propeller-proplet" in result.stdout
        assert "mqtt_pass = ****" in result.stdout  # read back masked
        saved = dict(line.split("=", 1) for line in settings.read_text().splitlines())
        assert saved["mqtt_url"] == broker.url and saved["proplet_id"] == "esp-fresh"
        assert saved["mqtt_pass"] == "s3cret"
        # After the reboot it joins with what was provisioned, and runs tasks.
        await online(core, "esp-fresh")
        done = await run_task(core, "esp-fresh", name="add", file=module(wasm["add"]), inputs=["40", "2"])
        assert done.results == "42", proplet.log


async def test_provisioned_trusted_keys_make_the_proplet_run_only_signed_modules(
        manager_factory, host_proplets, broker, tmp_path, wasm) -> None:
    from core.signing import generate_keypair

    private, public = generate_keypair(tmp_path / "keys")
    settings = tmp_path / "signed.conf"
    tty = tmp_path / "ttySIGNED"
    async with manager_factory(signing_key=private) as core:
        proplet = host_proplets(None, "esp-signed", "--settings", str(settings), "--provision-pty", str(tty),
                                join=False)
        await wait_for_path(tty)
        result = await asyncio.to_thread(
            propeller, "provision", "--port", str(tty), "--broker", broker.url, "--id", "esp-signed",
            "--domain", core.settings.tenant_id, "--channel", core.settings.channel_id, "--trusted-key", str(public))
        assert result.returncode == 0, result.stderr + proplet.log
        # The PEM body without its 16-character DER prefix is the base64 of the key's 32 bytes.
        body = public.read_text().splitlines()[1]
        assert f"trusted_keys = {body[16:]}" in result.stdout
        await online(core, "esp-signed")
        assert "only modules signed by one of 1 trusted keys run" in proplet.log
        done = await run_task(core, "esp-signed", name="add", file=module(wasm["add"]), inputs=["40", "2"])
        assert done.results == "42", (done.error, proplet.log)
    async with manager_factory(tenant_id=core.settings.tenant_id) as unsigning:
        await online(unsigning, "esp-signed")
        refused = await run_task(unsigning, "esp-signed", name="add", file=module(wasm["add"]), inputs=["1", "2"])
        assert "is not signed, and this proplet only runs signed modules" in refused.error


async def test_a_trusted_key_file_that_is_not_one_is_refused_before_the_board_is_touched(tmp_path) -> None:
    from core.signing import generate_keypair

    private, _ = generate_keypair(tmp_path / "keys")
    result = await asyncio.to_thread(propeller, "provision", "--port", str(tmp_path / "no-such-tty"),
                                     "--trusted-key", str(private))
    assert result.returncode == 1
    assert f"cannot read the trusted key {private}: Valid PEM but no BEGIN PUBLIC KEY" in result.stderr


async def test_the_device_explains_what_it_refuses(host_proplets, tmp_path) -> None:
    tty = tmp_path / "ttyREFUSE"
    host_proplets(None, "esp-refuse", "--settings", str(tmp_path / "p.conf"), "--provision-pty", str(tty), join=False)
    await wait_for_path(tty)
    result = await asyncio.to_thread(propeller, "provision", "--port", str(tty), "--broker", "10.0.0.2:1883")
    assert result.returncode == 1
    assert ("The device refused SET: mqtt_url must look like mqtt://host:port (or mqtts://), got '10.0.0.2:1883'"
            in result.stderr)
    assert not (tmp_path / "p.conf").exists()  # nothing was saved


def test_a_port_where_no_proplet_answers(tmp_path) -> None:
    controller, terminal = os.openpty()
    try:
        path = os.ttyname(terminal)
        result = propeller("provision", "--port", path, "--id", "x", "--timeout", "1")
        assert result.returncode == 1
        assert f"No proplet answered on {path} within 1 s" in result.stderr
    finally:
        os.close(controller)
        os.close(terminal)


def test_a_missing_port_is_reported_as_a_missing_board() -> None:
    for command in (["provision", "--id", "x"], ["flash"], ["monitor"]):
        result = propeller(*command, "--port", "/dev/ttyPROPELLER-NONE")
        assert result.returncode == 1, command
        assert "No board at /dev/ttyPROPELLER-NONE: the port does not exist" in result.stderr
        assert "propeller firmware ports" in result.stderr


def test_flash_needs_a_build_first(tmp_path) -> None:
    controller, terminal = os.openpty()
    try:
        result = propeller("flash", "--port", os.ttyname(terminal), "--project", str(tmp_path))
    finally:
        os.close(controller)
        os.close(terminal)
    assert result.returncode == 1
    assert "The firmware for esp32-s3-devkitc-1 is not built" in result.stderr
    assert "propeller firmware build --env esp32-s3-devkitc-1" in result.stderr


async def test_esptools_own_error_becomes_a_clear_message() -> None:
    with pytest.raises(fw.FirmwareError) as caught:
        await fw.run_esptool(["--port", "/dev/ttyPROPELLER-NONE", "chip-id"], "/dev/ttyPROPELLER-NONE",
                             timeout=60)
    assert str(caught.value).startswith("No board at /dev/ttyPROPELLER-NONE: esptool could not open the port")


def test_build_names_the_environments_the_project_defines(tmp_path) -> None:
    result = propeller("build", "--env", "nope")
    assert result.returncode == 1
    assert "No PlatformIO environment 'nope' in" in result.stderr
    assert "it defines: esp32-s3-devkitc-1, esp32-s3-bench." in result.stderr
    result = propeller("build", "--project", str(tmp_path))
    assert result.returncode == 1
    assert f"No PlatformIO project at {tmp_path}: it has no platformio.ini" in result.stderr


def test_build_reports_an_unreachable_registry_quickly() -> None:
    started = time.monotonic()
    result = propeller("build", env={"PROPELLER_PIO_REGISTRY": "registry.invalid",
                                     "PLATFORMIO_CORE_DIR": "/nonexistent/pio-core"})
    assert result.returncode == 1
    assert "Cannot reach the PlatformIO registry at registry.invalid: the DNS lookup failed" in result.stderr
    assert "connect this machine to the internet" in result.stderr
    assert time.monotonic() - started < 3 * fw.PROBE_TIMEOUT + 5


def test_ports_lists_what_pyserial_sees() -> None:
    from serial.tools import list_ports

    result = propeller("ports", "--json")
    assert result.returncode == 0, result.stderr
    listed = orjson.loads(result.stdout)
    assert [p["device"] for p in listed] == sorted(p.device for p in list_ports.comports())
    text = propeller("ports")
    assert text.returncode == 0
    for port in listed:
        assert port["device"] in text.stdout


def test_without_pyserial_the_commands_say_what_to_install(tmp_path) -> None:
    # A base install (scripts/run) has no pyserial: `firmware ports` ended in a traceback.
    shadow = tmp_path / "no-pyserial" / "serial"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'serial'\", name='serial')\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")]))}
    for args, doing in ((["ports"], "Listing serial ports"),
                        (["monitor", "--port", "/dev/ttyNONE"], "The serial monitor"),
                        (["provision", "--port", "/dev/ttyNONE", "--id", "x"], "Provisioning")):
        done = propeller(*args, env=env)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"{doing} needs pyserial, which is not installed" in done.stderr, done.stderr
        assert "pip install 'propeller[firmware]'" in done.stderr


def test_monitor_streams_what_the_device_prints() -> None:
    controller, terminal = os.openpty()
    stop = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in fw.monitor_lines(os.ttyname(terminal), stop=stop):
            lines.append(line)
            if len(lines) == 2:
                stop.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        # Opening a port discards what arrived before (as with a real board): keep printing until
        # the monitor has caught two lines.
        deadline = time.monotonic() + 10
        while reader.is_alive() and time.monotonic() < deadline:
            os.write(controller, b"I (312) proplet: booting\r\nI (980) proplet: joined\r\n")
            time.sleep(0.1)
        assert lines[:2] == ["I (312) proplet: booting", "I (980) proplet: joined"]
    finally:
        stop.set()
        reader.join(5)
        os.close(controller)
        os.close(terminal)


async def test_a_hung_tool_is_stopped_at_its_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(fw.FirmwareError, match="did not finish within 1 s and was stopped"):
        await fw.stream_command(["sleep", "30"], timeout=1)
    assert time.monotonic() - started < 5


async def test_output_streams_line_by_line_with_progress() -> None:
    seen: list[tuple[str, Any]] = []
    script = ("print('Compiling .pio/build/x/src/core/proplet.c.o'); print('[12/48] Building C object'); "
              "print('Writing at 0x00010000 [=====>      ]  47.5% 131072/275984 bytes...'); "
              "import sys; print('A fatal error occurred', file=sys.stderr)")
    result = await fw.stream_command([sys.executable, "-c", script], timeout=30,
                                     on_line=lambda line, pct: seen.append((line, pct)))
    assert result.returncode == 0
    assert [pct for _, pct in seen] == [None, 25.0, 47.5, None]
    assert seen[-1][0] == "A fatal error occurred"


@pytest.mark.parametrize(("line", "expected"), [
    ("Writing at 0x00010000... (12 %)", 12.0),
    ("Writing at 0x00034000 [=========================>] 100.0% 275984/275984 bytes...", 100.0),
    ("[ 45%] Building C object esp-idf/main/CMakeFiles/__idf_main.dir/main.c.obj", 45.0),
    ("[3/1024] Performing configure step", 3 / 1024 * 100),
    ("Compiling .pio/build/esp32-s3-devkitc-1/src/core/protocol.c.o", None),
    ("RAM:   [==        ]  18.4% (used 60304 bytes from 327680 bytes)", 18.4),
    ("heap 250% of nothing", None),
])
def test_progress_is_read_from_pio_ninja_and_esptool_lines(line: str, expected: float | None) -> None:
    got = fw.parse_progress(line)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_command_templates_quote_their_values() -> None:
    argv = fw.render_command(fw.DEFAULT_TEMPLATES["build"], pio="/opt/pio", project=Path("/a b/fw"), env="x")
    assert argv == ["/opt/pio", "run", "--project-dir", "/a b/fw", "--environment", "x"]
    with pytest.raises(fw.FirmwareError, match=r"uses \{board\}"):
        fw.render_command("flash {board}", port="p")
