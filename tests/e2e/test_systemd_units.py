"""The systemd units shipped in docs/systemd: systemd's own check of them, every variable they name
is a setting Propeller reads, and the manager and a proplet started exactly as the units start them
(their environment, directories and environment files, with systemd's %E/%S/%C directories moved
into the test's) run a task and stop cleanly on the units' SIGTERM within their TimeoutStopSec."""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.config import ManagerSettings, describe_settings
from proplet.config import PropletSettings
from proplet.proxy import ProxySettings
from tests.services import free_port, need, running_mosquitto, wait_port
from tests.wasmfixtures import wasm

UNITS = Path(__file__).resolve().parents[2] / "docs" / "systemd"
INSTALLED = "/opt/propeller/bin/propeller"  # where docs/deployment.md installs the command
VENV_COMMAND = Path(sys.executable).with_name("propeller")
SETTINGS = {"propeller-manager.service": {row[0] for row in describe_settings(ManagerSettings, "MANAGER_")},
            "propeller-proplet.service": {row[0] for row in PropletSettings.describe()},
            "propeller-proxy.service": {row[0] for row in describe_settings(ProxySettings, "PROXY_")}}
XDG = {"XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"}

pytestmark = pytest.mark.timeout(120)


def service_section(unit: str) -> dict[str, list[str]]:
    """The [Service] section's keys, each with its values in order (a key may repeat)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def systemd_dirs(root: Path) -> dict[str, Path]:
    """systemd's specifiers for a system service: %E /etc, %S /var/lib, %C /var/cache, here under root."""
    return {"%E": root / "etc", "%S": root / "var" / "lib", "%C": root / "var" / "cache"}


def environment_as_systemd_sets_it(unit: str, root: Path) -> dict[str, str]:
    """The unit's Environment= assignments and its EnvironmentFile= (the /etc one under root), with
    the directories systemd would create for it created."""
    dirs = systemd_dirs(root)
    service = service_section(unit)
    env = {"PATH": os.environ["PATH"], "HOME": str(root / "home-not-there")}  # ProtectHome: no home to use
    for line in service.get("Environment", []):
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            for spec, path in dirs.items():
                value = value.replace(spec, str(path))
            env[name] = value
    for entry in service.get("EnvironmentFile", []):
        path = Path(entry.lstrip("-").replace("/etc", str(dirs["%E"]), 1))
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    name, _, value = line.partition("=")
                    env[name.strip()] = value.strip()
        else:
            assert entry.startswith("-"), f"{unit}: {entry} is required but absent"
    for key, spec in (("ConfigurationDirectory", "%E"), ("StateDirectory", "%S"), ("CacheDirectory", "%C")):
        for name in service.get(key, []):
            (dirs[spec] / name).mkdir(parents=True, exist_ok=True)
    return env


def command(unit: str) -> list[str]:
    (exec_start,) = service_section(unit)["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED, exec_start
    return [str(VENV_COMMAND), *argv[1:]]


def stop_as_systemd_does(unit: str, process: subprocess.Popen[bytes]) -> int:
    service = service_section(unit)
    assert service["KillSignal"] == ["SIGTERM"]
    process.send_signal(signal.SIGTERM)
    return process.wait(float(service["TimeoutStopSec"][0]))


@pytest.mark.parametrize("unit", sorted(SETTINGS))
def test_systemd_finds_nothing_wrong_with_the_unit(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    need(analyze is not None, "systemd-analyze", "apt-get install systemd (scripts/test installs it)")
    assert analyze is not None
    # The same unit with the command where this checkout has it (systemd checks it is executable).
    (tmp_path / unit).write_text((UNITS / unit).read_text().replace(INSTALLED, str(VENV_COMMAND)))
    checked = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True,
                             timeout=60)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")


@pytest.mark.parametrize("unit", sorted(SETTINGS))
def test_every_variable_a_unit_names_is_a_setting(unit: str) -> None:
    """A misspelt variable is ignored without a word; the unit and its comments name only real ones."""
    text = (UNITS / unit).read_text()
    named = set(re.findall(r"\b(?:MANAGER|PROPLET|PROXY|XDG)_[A-Z0-9_]+", text))
    assert named - SETTINGS[unit] - XDG == set()
    assert XDG <= named, "every XDG directory is placed, or one of them would fall back to a home directory"


def test_the_environment_file_docs_deployment_shows_is_read_as_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (UNITS.parent / "deployment.md").read_text()
    block = text.split("/etc/propeller/manager.env` for a fleet", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    env = dict(line.split("=", 1) for line in block.splitlines() if line.strip())
    assert set(env) <= SETTINGS["propeller-manager.service"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = ManagerSettings(_env_file=None)
    assert settings.storage_type == "postgres" and settings.http_host == "0.0.0.0"
    assert settings.http_tokens == ["a-long-random-token", "another-for-the-ci"]


def test_a_manager_and_a_proplet_started_as_their_units_run_a_task_and_stop_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "root"
    etc = systemd_dirs(root)["%E"] / "propeller"
    etc.mkdir(parents=True)
    with running_mosquitto(tmp_path / "broker") as broker:
        http_port = free_port()
        # The manager is set by its environment file, the proplet by the config file: both as documented.
        (etc / "manager.env").write_text(f"# as an operator writes it\nMANAGER_MQTT_ADDRESS={broker.url}\n"
                                         f"MANAGER_HTTP_PORT={http_port}\nMANAGER_TENANT_ID=units\n")
        (etc / "config.yaml").write_text(f"proplet:\n  mqtt_address: {broker.url}\n  tenant_id: units\n"
                                         "  liveliness_interval: 1\n")
        manager_env = environment_as_systemd_sets_it("propeller-manager.service", root)
        proplet_env = environment_as_systemd_sets_it("propeller-proplet.service", root)
        manager = subprocess.Popen(command("propeller-manager.service"), env=manager_env, cwd=root,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        proplet = subprocess.Popen(command("propeller-proplet.service"), env=proplet_env, cwd=root,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(http_port, timeout=30)
            api = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
            deadline = time.monotonic() + 30
            while not [p for p in api.get("/proplets").json()["proplets"] if p.get("alive")]:
                assert time.monotonic() < deadline, "the proplet never came online"
                time.sleep(0.2)
            created = api.post("/tasks", json={"name": "add", "inputs": [40, 2],
                                               "file": base64.b64encode(wasm("add")).decode()})
            assert created.status_code == 201, created.text
            task_id = created.json()["id"]
            assert api.post(f"/tasks/{task_id}/start").status_code == 200
            while (task := api.get(f"/tasks/{task_id}").json())["state_name"] not in ("completed", "failed"):
                assert time.monotonic() < deadline, task
                time.sleep(0.1)
            assert (task["state_name"], task["results"]) == ("completed", "42")
        finally:
            codes = [stop_as_systemd_does("propeller-proplet.service", proplet),
                     stop_as_systemd_does("propeller-manager.service", manager)]
        assert codes == [0, 0], [p.stderr.read().decode()[-2000:] for p in (proplet, manager) if p.stderr]
    lib, cache = systemd_dirs(root)["%S"] / "propeller", systemd_dirs(root)["%C"] / "propeller"
    assert (lib / "propeller.db").is_file()
    assert (lib / "proplet").is_dir() and (cache / "proplet").is_dir()
    assert not (root / "home-not-there").exists()
