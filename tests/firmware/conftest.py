"""Fixtures of the firmware tests: the host build (make), wasm modules compiled from WAT, and
host proplets started against the session's Mosquitto.

The host build needs gcc, make and the Debian packages libcjson-dev, libpaho-mqtt-dev,
libcmocka-dev and libsodium-dev, plus the wasmtime wheel; a missing one fails in CI and skips
locally.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.services import Mosquitto, need

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE = ROOT / "firmware"
WAT_DIR = Path(__file__).parent / "wasm"
HOST_BINARY = FIRMWARE / "build" / "host" / "embedded-proplet"
WIRECHECK_BINARY = FIRMWARE / "build" / "host" / "wirecheck"

HEADERS = {
    "libcjson-dev": Path("/usr/include/cjson/cJSON.h"),
    "libpaho-mqtt-dev": Path("/usr/include/MQTTAsync.h"),
    "libcmocka-dev": Path("/usr/include/cmocka.h"),
    "libsodium-dev": Path("/usr/include/sodium.h"),
}


def need_c_toolchain() -> None:
    for tool in ("gcc", "make"):
        need(shutil.which(tool) is not None, tool, f"install it with `apt-get install {tool}`")
    for package, header in HEADERS.items():
        need(header.exists(), package, f"install it with `apt-get install {package}`")


def make(*targets: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # pytest-xdist workers each build: one at a time, or they overwrite each other's outputs.
    lock_path = FIRMWARE / "build" / ".make.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return subprocess.run(["make", "-C", str(FIRMWARE), *targets], capture_output=True, text=True,
                              timeout=timeout, check=False)


@pytest.fixture(scope="session")
def host_build() -> Path:
    """The host proplet and the wire checker, built once per session."""
    need_c_toolchain()
    result = make("host", "wirecheck")
    assert result.returncode == 0, f"make host wirecheck failed:\n{result.stdout}\n{result.stderr}"
    return HOST_BINARY


@pytest.fixture(scope="session")
def wasm() -> dict[str, bytes]:
    """Every module under tests/firmware/wasm/, compiled from its WAT."""
    import wasmtime

    return {path.stem: wasmtime.wat2wasm(path.read_text()) for path in sorted(WAT_DIR.glob("*.wat"))}


@dataclass
class HostProplet:
    """One host proplet process; stopped by its pid at the end of the test."""

    proplet_id: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self) -> HostProplet:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([str(HOST_BINARY), *self.args], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env={**os.environ, **self.extra_env})
        log.close()
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no chance to say goodbye, so only the Last Will tells the manager."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not appear in the proplet's log:\n{self.log}")
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"the proplet exited ({self.process.returncode}):\n{self.log}")
            time.sleep(0.05)


@pytest.fixture
def host_proplets(host_build: Path, broker: Mosquitto, tmp_path: Path) -> Iterator[Any]:
    """`start(core, proplet_id, *args, env=...)`: a host proplet on the manager's domain and channel."""
    started: list[HostProplet] = []

    def start(core: Any = None, proplet_id: str = "esp-host", *args: str, join: bool = True,
              env: dict[str, str] | None = None) -> HostProplet:
        argv = []
        if join:
            argv += ["--broker", broker.url, "--id", proplet_id, "--domain", core.settings.tenant_id,
                     "--channel", core.settings.channel_id]
        argv += ["--heartbeat", "1", "--metrics", "2", "--log-level", "debug", *args]
        proplet = HostProplet(proplet_id, argv, tmp_path / f"{proplet_id}.log", extra_env=env or {}).start()
        started.append(proplet)
        return proplet

    yield start
    for proplet in started:
        with contextlib.suppress(Exception):
            proplet.stop()
