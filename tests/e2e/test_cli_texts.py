"""What `propeller` says and does before it talks to a manager: --help texts, `info`, `keys
generate`, and the checks on the arguments of the client commands (no service needed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from propeller.client import ApiError, module_fields
from tests.services import Mosquitto, free_port

PROPELLER = [sys.executable, "-m", "propeller"]


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROPELLER, *args], env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def _row(help_text: str, var: str) -> str:
    return next(line for line in help_text.splitlines() if line.strip().startswith(var + " "))


def test_help_texts_show_each_default_and_describe_each_variable() -> None:
    serve = run("serve", "--help").stdout
    proplet = run("proplet", "--help").stdout
    proxy = run("proxy", "--help").stdout
    for text in (serve, proplet, proxy):
        assert "(computed)" not in text
        # Every variable row has a description before its default.
        rows = [line for line in text.splitlines() if re.match(r"\s+(MANAGER|PROPLET|PROXY)_[A-Z_]+\s", line)]
        assert rows and all(not re.match(r"\s+\S+\s+\[default:", row) for row in rows), rows
    assert _row(serve, "MANAGER_HTTP_TOKENS").endswith("[default: (none)]")
    assert _row(serve, "MANAGER_SQLITE_PATH").endswith("propeller/propeller.db]")
    assert "3 x max_concurrent_tasks" in _row(proplet, "PROPLET_MAX_QUEUED_TASKS")
    assert re.search(r"2 x the CPUs.*\[default: \d+\]$", _row(proplet, "PROPLET_MAX_CONCURRENT_TASKS"))
    # Heartbeats and metrics (and the acknowledgements) go at QoS 0 whatever the setting.
    for text, var in ((serve, "MANAGER_MQTT_QOS"), (proplet, "PROPLET_MQTT_QOS")):
        assert "except heartbeats, metrics, task_state and result_ack" in _row(text, var)
    main = run("--help").stdout
    assert "in-process broker by default" not in main and "localhost:1883" in main


def test_info_prints_the_console_log_and_explains_an_invalid_configuration(tmp_path: Path) -> None:
    out = run("info")
    assert out.returncode == 0, out.stderr
    state_dir = next(line.split(None, 2)[2] for line in out.stdout.splitlines() if line.startswith("state dir"))
    assert f"console log   {state_dir}/console.log" in out.stdout
    bad = run("info", env={"MANAGER_HTTP_PORT": "not-a-port"})
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "invalid configuration" in bad.stderr and "http_port" in bad.stderr
    config = tmp_path / "config.yaml"
    config.write_text("manager: [\n")
    bad = run("--config", str(config), "info")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "not valid YAML" in bad.stderr


def test_keys_generate_keeps_an_existing_pair_unless_forced(tmp_path: Path) -> None:
    assert run("keys", "generate", "--dir", str(tmp_path)).returncode == 0
    private = tmp_path / "propeller-signing.pem"
    first = private.read_bytes()
    again = run("keys", "generate", "--dir", str(tmp_path))
    assert again.returncode == 1 and "already there" in again.stderr and "--force" in again.stderr
    assert private.read_bytes() == first
    forced = run("keys", "generate", "--dir", str(tmp_path), "--force")
    assert forced.returncode == 0 and private.read_bytes() != first


def test_a_missing_wasm_file_is_not_taken_for_an_oci_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `examples/add.wasm` run from outside the checkout: once an OCI reference nobody serves, its
    # task waiting for chunks for ever; the console's dispatch form already called it a missing file.
    monkeypatch.chdir(tmp_path)
    for source in ("examples/add.wasm", "add.wasm", "./x/add.wasm", "mod.wat"):
        with pytest.raises(ApiError, match="no such file"):
            module_fields(source)
    assert module_fields("registry.lan/wasm/app:v1") == {"image_url": "registry.lan/wasm/app:v1"}
    assert module_fields("wasm/app@sha256:" + "0" * 64) == {"image_url": "wasm/app@sha256:" + "0" * 64}
    assert module_fields("https://files.lan/app.wasm") == {"image_url": "https://files.lan/app.wasm"}
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "add.wasm").write_bytes(b"\0asm\x01\0\0\0")
    assert set(module_fields("examples/add.wasm")) == {"file"}
    out = run("tasks", "create", "add", "--wasm", "examples/nope.wasm", "--manager-url", "http://127.0.0.1:9",
              cwd=tmp_path)
    assert out.returncode == 1 and "no such file" in out.stderr and str(tmp_path) in out.stderr


def test_schedule_options_without_a_schedule_are_refused() -> None:
    for extra in (["--recurring"], ["--timezone", "Europe/Paris"]):
        out = run("tasks", "create", "add", "--wasm", "https://files.lan/add.wasm", *extra,
                  "--manager-url", "http://127.0.0.1:9")
        assert out.returncode == 2 and "go with --schedule" in out.stderr


def test_wait_without_start_is_refused() -> None:
    # It was ignored: the task was created, not started, and the command returned at once.
    out = run("tasks", "create", "add", "--wasm", "https://files.lan/add.wasm", "--wait", "10",
              "--manager-url", "http://127.0.0.1:9")
    assert out.returncode == 2 and "--wait goes with --start" in out.stderr


def test_a_propeller_config_that_does_not_exist_is_named_in_a_warning(tmp_path: Path) -> None:
    # --config with a missing file is an error; $PROPELLER_CONFIG with one was silently ignored, so a
    # typo in its path ran on the defaults. It stays a warning: the tests isolate themselves with it.
    missing = tmp_path / "typo.yaml"
    out = run("info", env={"PROPELLER_CONFIG": str(missing)})
    assert out.returncode == 0, out.stderr
    assert f"$PROPELLER_CONFIG names {missing}, which does not exist" in out.stderr
    assert f"config file   {missing} (absent)" in out.stdout
    missing_flag = run("--config", str(missing), "info")
    assert missing_flag.returncode == 2 and f"config file {missing} does not exist" in missing_flag.stderr
    present = tmp_path / "config.yaml"
    present.write_text("manager:\n  http_port: 7171\n")
    out = run("info", env={"PROPELLER_CONFIG": str(present)})
    assert out.returncode == 0 and "PROPELLER_CONFIG" not in out.stderr and "http_port = 7171" in out.stdout


def test_info_names_the_database_and_the_broker_a_manager_would_use(broker: Mosquitto) -> None:
    # The settings alone said mqtt_address = None and printed sqlite_path even with storage memory.
    port = free_port()
    out = run("info", env={"MANAGER_DEFAULT_BROKER_PORT": str(port)})
    sqlite_path = next(line.split(" = ", 1)[1] for line in out.stdout.splitlines() if "sqlite_path = " in line)
    assert f"database      sqlite {sqlite_path}\n" in out.stdout
    assert f"broker        an in-process one on 127.0.0.1:{port} (nothing listens there now)\n" in out.stdout
    out = run("info", env={"MANAGER_STORAGE_TYPE": "memory", "MANAGER_MQTT_ADDRESS": "mqtt://broker.lan:1884"})
    assert "database      sqlite (in memory)\n" in out.stdout
    assert "broker        mqtt://broker.lan:1884\n" in out.stdout
    out = run("info", env={"MANAGER_DEFAULT_BROKER_PORT": str(broker.port)})
    assert f"broker        the one listening on 127.0.0.1:{broker.port}\n" in out.stdout


def test_a_proplet_that_finds_no_broker_names_the_setting_to_change() -> None:
    # It said "point the broker address setting at a running broker", naming no setting.
    port = free_port()
    proc = subprocess.Popen([*PROPELLER, "proplet"], env={**os.environ, "PROPLET_MQTT_ADDRESS": f"mqtt://127.0.0.1:{port}"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert (f"Cannot reach the MQTT broker at mqtt://127.0.0.1:{port} (connection refused). Start a broker there, "
            "or set PROPLET_MQTT_ADDRESS to the URL of a running broker.") in out, out
    # Its default, where a manager run with no broker configured puts its own.
    from core.mqtt import BrokerAddress, describe_connect_error

    text = describe_connect_error(BrokerAddress("localhost", 1883), ConnectionRefusedError(), "PROPLET_MQTT_ADDRESS")
    assert "(a manager here with no broker configured, `propeller serve` or the console, starts one)" in text


def test_wasm_takes_a_wat_file_as_the_consoles_dispatch_form_does(tmp_path: Path) -> None:
    # --wasm refused .wat ("does not start with \0asm") while the dispatch form compiled it.
    import base64

    wat = tmp_path / "add.wat"
    wat.write_text('(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))')
    data = base64.b64decode(module_fields(str(wat))["file"])
    assert data.startswith(b"\0asm")
    from console.modules import function_exports

    assert function_exports(data) == ("add",)
    bad = tmp_path / "bad.wat"
    bad.write_text("(module (func (export \"f\") not-an-instruction))")
    with pytest.raises(ApiError, match="not valid WebAssembly"):
        module_fields(str(bad))
    text = tmp_path / "notes.wasm"
    text.write_text("hello")
    with pytest.raises(ApiError, match="not a WebAssembly module"):
        module_fields(str(text))
    out = run("tasks", "create", "add", "--wasm", str(wat), "--manager-url", "http://127.0.0.1:9")
    assert out.returncode == 1 and "Cannot reach the manager" in out.stderr, out.stderr
    assert ".wat" in run("tasks", "create", "--help").stdout


def test_a_relative_wasm_in_a_job_workflow_or_round_file_is_read_from_the_files_folder(tmp_path: Path) -> None:
    # It was read from the current directory, so `jobs create jobs/nightly.json` run from elsewhere
    # said "no such file" for the add.wasm beside the JSON file.
    import base64

    from propeller.cli import _group_body

    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "add.wasm").write_bytes(b"\0asm\x01\0\0\0")
    tasks = [{"name": "add", "wasm": "add.wasm"}, {"name": "add", "wasm": "https://files.lan/add.wasm"}]
    (folder / "job.json").write_text(json.dumps({"name": "j", "tasks": tasks}))
    (folder / "workflow.json").write_text(json.dumps({"tasks": tasks}))
    (folder / "round.json").write_text(json.dumps({"round_id": "r", "model_ref": "m", "participants": ["p"],
                                                   "wasm": "add.wasm"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (["jobs", "create", "../jobs/job.json"], ["workflows", "create", "../jobs/workflow.json"],
                 ["fl", "start", "../jobs/round.json"]):
        out = run(*args, "--manager-url", "http://127.0.0.1:9", cwd=elsewhere)
        assert out.returncode == 1 and "Cannot reach the manager" in out.stderr, (args, out.stderr)
    body = _group_body(str(folder / "job.json"))
    assert base64.b64decode(body["tasks"][0]["file"]) == b"\0asm\x01\0\0\0"
    assert body["tasks"][1]["image_url"] == "https://files.lan/add.wasm"
    (folder / "missing.json").write_text(json.dumps({"tasks": [{"name": "add", "wasm": "nope.wasm"}]}))
    out = run("jobs", "create", "../jobs/missing.json", "--manager-url", "http://127.0.0.1:9", cwd=elsewhere)
    assert out.returncode == 1 and "nope.wasm: no such file" in out.stderr and f"looked in {folder}" in out.stderr
    assert "folder" in run("jobs", "create", "--help").stdout
