"""`propeller serve` as a real process, and the `propeller tasks|proplets|jobs|workflows` client against it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core import topics as t
from core.topics import Topics
from tests.fleet import assert_no_lost_exceptions
from tests.registry import running_registry
from tests.services import free_port, wait_port
from tests.wire import SyntheticProplet, eventually

pytestmark = pytest.mark.serial

PROPELLER = [sys.executable, "-m", "propeller"]
WASM = b"\0asm\x01\0\0\0"


class Serve:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.port = int(env["MANAGER_HTTP_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        started = time.monotonic()
        self.proc = subprocess.Popen([*PROPELLER, "serve"], env=self.env, stdout=self.log.open("ab"),
                                     stderr=subprocess.STDOUT)
        deadline = started + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError(f"serve did not answer:\n{self.log.read_text()}")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        self.proc = None
        return code


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    env = dict(os.environ)
    env["MANAGER_HTTP_PORT"] = str(free_port())
    # Nothing listens on this port, so serve starts its in-process broker there.
    env["MANAGER_DEFAULT_BROKER_PORT"] = str(free_port())
    env["MANAGER_ENTITY_ID"] = "serve-test-manager"
    server = Serve(env, tmp_path / "serve.log")
    yield server
    if server.proc is not None:
        server.proc.kill()
        server.proc.wait()
    assert_no_lost_exceptions(tmp_path)


def cli_blocking(serve: Serve, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROPELLER, *args, "--manager-url", serve.url], env=serve.env, capture_output=True,
                          text=True, timeout=30, input=input)


async def test_serve_with_no_configuration_dispatches_and_stores_results(serve: Serve) -> None:
    startup = serve.start()
    print(f"propeller serve answered /health {startup:.2f}s after launch")
    health = (await asyncio.to_thread(httpx.get, serve.url + "/health")).json()
    broker_port = int(serve.env["MANAGER_DEFAULT_BROKER_PORT"])
    assert health["broker"] == {"url": f"mqtt://127.0.0.1:{broker_port}", "connected": True, "embedded": True}
    assert health["store"].startswith("sqlite ") and health["store"].endswith("propeller/propeller.db")
    wait_port(broker_port)

    topics = Topics("propeller", "default")
    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", topics, "edge-1") as proplet:
        async with httpx.AsyncClient(base_url=serve.url) as api:
            await eventually(lambda: _has_proplet(api, "edge-1"))
            created = await api.post("/tasks", json={"name": "add", "inputs": [40, 2],
                                                     "file": base64.b64encode(WASM).decode()})
            assert created.status_code == 201
            tid = created.json()["id"]
            assert (await api.post(f"/tasks/{tid}/start")).json() == {"started": True}
            body = await eventually(lambda: _results(api, tid))
        assert body["results"] == "42" and proplet.starts[0]["id"] == tid

    assert serve.stop() == 0, serve.log.read_text()
    assert "Traceback" not in serve.log.read_text()

    # State is in the database: a new manager process still knows the task.
    serve.start()
    task = (await asyncio.to_thread(httpx.get, f"{serve.url}/tasks/{tid}")).json()
    assert (task["state_name"], task["results"]) == ("completed", "42")
    assert serve.stop() == 0


async def _has_proplet(api: httpx.AsyncClient, pid: str) -> bool:
    return any(p["id"] == pid for p in (await api.get("/proplets")).json()["proplets"])


async def _results(api: httpx.AsyncClient, tid: str) -> Any:
    body = (await api.get(f"/tasks/{tid}/results")).json()
    return body if body["state"] == 3 else None


async def cli(serve: Serve, *args: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the synthetic proplet answering the CLI's tasks lives on this event loop.
    return await asyncio.to_thread(cli_blocking, serve, *args)


async def test_cli_client_against_serve(serve: Serve, tmp_path: Path) -> None:
    serve.start()
    broker_port = int(serve.env["MANAGER_DEFAULT_BROKER_PORT"])
    module = tmp_path / "add.wasm"
    module.write_bytes(WASM)
    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", Topics("propeller", "default"), "cli-p"):
        listed = await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list"), timeout=10)
        assert [p["id"] for p in listed["proplets"]] == ["cli-p"]
        out = await cli(serve, "tasks", "create", "add", "--wasm", str(module), "-i", "5", "-i", "6", "--start",
                  "--wait", "10", "--json")
        assert out.returncode == 0, out.stderr
        task = json.loads(out.stdout)
        assert (task["state_name"], task["results"]) == ("completed", "11")
        tid = task["id"]
        assert (await cli(serve, "tasks", "results", tid)).stdout.strip() == "11"
        table = (await cli(serve, "tasks", "list")).stdout
        assert "completed" in table and "1 of 1 tasks" in table
        # Piped, the table was 80 columns wide and cut the id to "3a7f2f8d-569a-…"; `tasks get` needs it whole.
        assert re.search(rf"^{tid}\s+add\s+completed\s+cli-p\s", table, re.MULTILINE), table
        detail = (await cli(serve, "tasks", "get", tid, "--events")).stdout
        assert "dispatched to cli-p" in detail
        oci = json.loads((await cli(serve, "tasks", "create", "main", "--wasm", "registry.local/wasm/app:v1",
                              "--json")).stdout)
        assert oci["image_url"] == "registry.local/wasm/app:v1"
        url = json.loads((await cli(serve, "tasks", "create", "main", "--wasm", "https://example.test/m.wasm",
                              "--json")).stdout)
        assert url["image_url"] == "https://example.test/m.wasm"
        nightly = json.loads((await cli(serve, "tasks", "create", "add", "--wasm", str(module), "--schedule",
                                        "0 3 * * *", "--recurring", "--timezone", "Europe/Paris", "--json")).stdout)
        assert (nightly["schedule"], nightly["is_recurring"]) == ("0 3 * * *", True)
        assert nightly["timezone"] == "Europe/Paris"
        nightly_detail = (await cli(serve, "tasks", "get", nightly["id"])).stdout
        assert "next_run" in nightly_detail
        assert re.search(r"is_recurring\s+yes", nightly_detail), nightly_detail
        assert "is_recurring" not in (await cli(serve, "tasks", "get", tid)).stdout
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps({"name": "pair", "execution_mode": "sequential", "tasks": [
            {"id": first, "name": "add", "wasm": str(module), "inputs": [1, 2]},
            {"id": second, "name": "add", "wasm": str(module), "inputs": [3, 4]}]}))
        job = json.loads((await cli(serve, "jobs", "create", str(job_file), "--start", "--json")).stdout)

        async def job_done() -> bool:
            out = json.loads((await cli(serve, "jobs", "get", job["job_id"], "--json")).stdout)
            return out["state_name"] == "completed"

        await eventually(job_done, timeout=10)
        assert "pair" in (await cli(serve, "jobs", "list")).stdout
        workflow_file = tmp_path / "workflow.json"
        workflow_file.write_text(json.dumps({"tasks": [
            {"id": first, "name": "add", "wasm": str(module)},
            {"id": second, "name": "add", "wasm": str(module), "depends_on": [first]}]}))
        refused = await cli(serve, "workflows", "create", str(workflow_file))
        assert refused.returncode == 1 and "already exists" in refused.stderr
        assert "cli-p" in (await cli(serve, "proplets", "get", "cli-p")).stdout
        assert (await cli(serve, "tasks", "delete", tid, "--yes")).returncode == 0
        gone = await cli(serve, "tasks", "get", tid)
        assert gone.returncode == 1 and "404" in gone.stderr and "not found" in gone.stderr
    bad = await cli(serve, "tasks", "create", "x", "--wasm", str(tmp_path / "missing.wasm"))
    assert bad.returncode == 1 and "no such file" in bad.stderr
    serve.stop()
    down = await cli(serve, "tasks", "list")
    assert down.returncode == 1 and "Cannot reach the manager" in down.stderr


def _cli_json(serve: Serve, *args: str) -> Any:
    out = cli_blocking(serve, *args, "--json")
    body = json.loads(out.stdout) if out.returncode == 0 else None
    return body if body and body.get("total") else None


def test_serve_help_documents_the_environment() -> None:
    out = subprocess.run([*PROPELLER, "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for var in ("MANAGER_MQTT_ADDRESS", "MANAGER_HTTP_PORT", "MANAGER_STORAGE_TYPE", "MANAGER_SQLITE_PATH",
                "MANAGER_POSTGRES_HOST", "MANAGER_TENANT_ID", "MANAGER_API_KEY", "MANAGER_MQTT_QOS",
                "MANAGER_LOG_LEVEL", "MANAGER_HTTP_TOKENS"):
        assert var in out.stdout, var


def test_invalid_configuration_is_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, MANAGER_HTTP_PORT="not-a-port")
    out = subprocess.run([*PROPELLER, "serve"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "invalid configuration" in out.stderr and "http_port" in out.stderr
    env = dict(os.environ, MANAGER_MQTT_ADDRESS="ftp://nowhere", MANAGER_HTTP_PORT=str(free_port()))
    out = subprocess.run([*PROPELLER, "serve"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "unsupported broker scheme" in out.stderr
    # PostgreSQL's own name for itself, by env or in the config file: pydantic's text came as it was
    # ("1 validation error for ManagerSettings / storage_type / Input should be ... / For further
    # information visit https://errors.pydantic.dev/..."), naming neither the variable nor the key.
    env = dict(os.environ, MANAGER_STORAGE_TYPE="postgresql")
    out = subprocess.run([*PROPELLER, "serve"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "Error: invalid configuration: MANAGER_STORAGE_TYPE (storage_type in the config file's manager: section) "
        "is 'postgresql': Input should be 'sqlite', 'postgres' or 'memory'"), out.stderr
    config = tmp_path / "config.yaml"
    config.write_text("manager:\n  storage_type: postgresql\n  http_port: seventy\n")
    out = subprocess.run([*PROPELLER, "--config", str(config), "serve"], env=dict(os.environ), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1 and "errors.pydantic.dev" not in out.stderr, out.stderr
    assert "MANAGER_HTTP_PORT (http_port in the config file's manager: section) is 'seventy'" in out.stderr
    assert "MANAGER_STORAGE_TYPE (storage_type in the config file's manager: section) is 'postgresql'" in out.stderr


def _start_proplet(serve: Serve, name: str, broker_url: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = {**serve.env, "PROPLET_MQTT_ADDRESS": broker_url, "PROPLET_ENTITY_ID": name,
           "PROPLET_STATE_DIR": str(workdir / name), "PROPLET_CACHE_DIR": str(workdir / name / "cache")}
    return subprocess.Popen([*PROPELLER, "proplet"], env=env, stdout=(workdir / f"{name}.log").open("wb"),
                            stderr=subprocess.STDOUT)


async def test_cli_runs_federated_rounds_on_real_proplets(serve: Serve, tmp_path: Path) -> None:
    """`propeller fl` against `propeller serve` and two `propeller proplet` processes running the
    C training module: round 1 from nothing, round 2 from its model, the loss falls."""
    from tests.wasmfixtures import wasm_path

    serve.start()
    broker_port = int(serve.env["MANAGER_DEFAULT_BROKER_PORT"])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = [_start_proplet(serve, name, f"mqtt://127.0.0.1:{broker_port}", tmp_path) for name in ("fl-a", "fl-b")]

        async def both_online() -> bool:
            listed = await asyncio.to_thread(_cli_json, serve, "proplets", "list", "--status", "active")
            return listed is not None and {p["id"] for p in listed["proplets"]} >= {"fl-a", "fl-b"}

        await eventually(both_online, timeout=20, interval=0.2)
        losses = []
        for number, model in ((1, "global_model_v0"), (2, "global_model_v1")):
            config = tmp_path / f"round{number}.json"
            config.write_text(json.dumps({"round_id": f"cli-{number}", "model_ref": model,
                                          "participants": ["fl-a", "fl-b"], "hyperparams": {"lr": 0.02, "epochs": 20},
                                          "wasm": str(wasm_path("flclient"))}))
            out = await cli(serve, "fl", "start", str(config), "--wait", "--json")
            assert out.returncode == 0, out.stderr
            status = json.loads(out.stdout)
            assert (status["state"], status["num_updates"], status["model_version"]) == ("completed", 2, number)
            losses.append(max(u["metrics"]["loss"] for u in status["updates"]))
        assert losses[1] < losses[0] / 10, losses
        model = json.loads((await cli(serve, "fl", "model", "2", "--json")).stdout)
        assert len(model["w"]) == 2 and isinstance(model["b"], float)
        table = (await cli(serve, "fl", "rounds")).stdout
        assert "cli-2" in table and "2 of 2 rounds" in table
        assert "fl-a" in (await cli(serve, "fl", "status", "cli-1")).stdout
        missing = await cli(serve, "fl", "status", "nope")
        assert missing.returncode == 1 and "unknown" in missing.stderr
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(15)
    assert serve.stop() == 0
    assert "Traceback" not in serve.log.read_text()


async def test_create_start_wait_exits_non_zero_when_the_task_fails_or_does_not_finish(serve: Serve,
                                                                                      tmp_path: Path) -> None:
    # It exited 0 in both cases, so a script could not tell a failed or unfinished task from a result.
    serve.start()
    broker_port = int(serve.env["MANAGER_DEFAULT_BROKER_PORT"])
    module = tmp_path / "add.wasm"
    module.write_bytes(WASM)
    topics = Topics("propeller", "default")
    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", topics, "fails",
                                answer=lambda start: (None, "the module trapped: unreachable")):
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list"), timeout=10)
        failed = await cli(serve, "tasks", "create", "add", "--wasm", str(module), "--start", "--wait", "10")
        assert failed.returncode == 4, failed.stderr
        assert re.search(r"state_name\s+failed", failed.stdout), failed.stdout
        assert "failed: the module trapped: unreachable" in failed.stderr
        as_json = await cli(serve, "tasks", "create", "add", "--wasm", str(module), "--start", "--wait", "10",
                            "--json")
        assert as_json.returncode == 4 and json.loads(as_json.stdout)["state_name"] == "failed"
        # `tasks results` of that task printed 'error: ...' on stdout and exited 0, as for a result.
        failed_id = json.loads(as_json.stdout)["id"]
        results = await cli(serve, "tasks", "results", failed_id)
        assert results.returncode == 4, results.stdout + results.stderr
        assert f"task {failed_id} failed: the module trapped: unreachable" in results.stderr
        assert "trapped" not in results.stdout
    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", topics, "silent", answer=None):
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list", "--status", "active"),
                         timeout=10)
        late = await cli(serve, "tasks", "create", "add", "--wasm", str(module), "--start", "--wait", "0.5")
        assert late.returncode == 3, late.stderr
        tid = re.search(r"^id\s+(\S+)", late.stdout, re.MULTILINE)
        assert tid is not None, late.stdout
        assert "not finished after 0.5s" in late.stderr and f"propeller tasks get {tid[1]}" in late.stderr
        # A task still running had the result 'null'.
        pending = await cli(serve, "tasks", "results", tid[1])
        assert pending.returncode == 3 and pending.stdout == "", pending.stdout + pending.stderr
        assert f"task {tid[1]} has no result yet" in pending.stderr
        assert (await cli(serve, "tasks", "stop", tid[1])).returncode == 0
        again = await cli(serve, "tasks", "start", tid[1], "--wait", "0.5")
        assert again.returncode == 3 and "not finished after 0.5s" in again.stderr, again.stderr
    help_text = (await cli(serve, "tasks", "create", "--help")).stdout
    assert "Exit codes" in help_text and "3" in help_text and "4" in help_text
    serve.stop()


async def _ctrl_c_once_started(proc: asyncio.subprocess.Process, proplet: SyntheticProplet) -> tuple[bytes, bytes]:
    """SIGINT to a waiting CLI once `proplet` got its start (well into the wait); its output."""
    try:
        await eventually(lambda: proplet.starts, timeout=10)
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            return await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_ctrl_c_while_waiting_names_the_started_task_and_exits_130(serve: Serve, tmp_path: Path) -> None:
    # It printed only "Aborted!" (exit 1): the task, created and started, went on with no id to follow it by.
    serve.start()
    broker_port = int(serve.env["MANAGER_DEFAULT_BROKER_PORT"])
    module = tmp_path / "add.wasm"
    module.write_bytes(WASM)
    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", Topics("propeller", "default"), "silent",
                                answer=None) as proplet:
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list", "--status", "active"),
                         timeout=10)
        proc = await asyncio.create_subprocess_exec(
            *PROPELLER, "tasks", "create", "add", "--wasm", str(module), "--start", "--wait", "60",
            "--manager-url", serve.url, env=serve.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await _ctrl_c_once_started(proc, proplet)
    stdout, stderr = out.decode(), err.decode()
    tid = proplet.starts[0]["id"]
    assert proc.returncode == 130, (stdout, stderr)
    assert "Aborted!" not in stderr
    assert f"task {tid}" in stderr and f"propeller tasks get {tid}" in stderr, stderr
    help_text = (await cli(serve, "tasks", "create", "--help")).stdout
    assert re.search(r"130\s+interrupted by Ctrl-C", help_text), help_text
    serve.stop()


async def test_task_commands_take_the_consoles_short_ids(serve: Serve) -> None:
    # The console shows 8 characters of a task id; `tasks get` answered "400 ... task ids are UUIDs".
    serve.start()
    twins = ["beefcafe-0000-4000-8000-000000000001", "beefcafe-0000-4000-8000-000000000002"]
    file = base64.b64encode(WASM).decode()
    async with httpx.AsyncClient(base_url=serve.url) as api:
        made = await api.post("/workflows", json={"tasks": [{"id": i, "name": "add", "file": file} for i in twins]})
        assert made.status_code == 201, made.text
        lone = (await api.post("/tasks", json={"name": "add", "file": file})).json()["id"]
    short = lone[:8]
    got = await cli(serve, "tasks", "get", short, "--events")
    assert got.returncode == 0 and re.search(rf"^id\s+{lone}\s*$", got.stdout, re.MULTILINE), got.stderr
    assert json.loads((await cli(serve, "tasks", "results", short, "--json")).stdout)["state"] == 0
    ambiguous = await cli(serve, "tasks", "get", "beefcafe")
    assert ambiguous.returncode == 1 and "beefcafe matches 2 tasks" in ambiguous.stderr, ambiguous.stderr
    assert all(i in ambiguous.stderr for i in twins)
    assert (await cli(serve, "tasks", "get", "beefcafe-0000-4000-8000-000000000002")).returncode == 0
    assert (await cli(serve, "tasks", "get", "BEEFCAFE-0000-4000-8000-00000000000")).returncode == 1
    missing = await cli(serve, "tasks", "get", "0000dead")
    assert missing.returncode == 1 and "no task id starts with 0000dead" in missing.stderr, missing.stderr
    short_prefix = await cli(serve, "tasks", "get", "bee")
    assert short_prefix.returncode == 2 and "at least 4" in short_prefix.stderr, short_prefix.stderr
    assert "not hex" in (await cli(serve, "tasks", "get", "zzzzzzzz")).stderr
    stopped = await cli(serve, "tasks", "stop", "beefcafe-0000-4000-8000-0000000000")
    assert stopped.returncode == 1 and "matches 2 tasks" in stopped.stderr
    deleted = await cli(serve, "tasks", "delete", short, "--yes")
    assert deleted.returncode == 0 and f"deleted {lone}" in deleted.stdout, deleted.stderr
    serve.stop()


async def test_waiting_for_a_daemon_ends_once_it_is_up(serve: Serve, tmp_path: Path) -> None:
    # A daemon never finishes: `--start --wait 10` waited the whole 10 s, then exited 3, "not
    # finished", for a daemon serving since the first second.
    serve.start()
    broker_port = int(serve.env["MANAGER_DEFAULT_BROKER_PORT"])
    module = tmp_path / "serve.wasm"
    module.write_bytes(WASM)
    topics = Topics("propeller", "default")
    # It confirms starts (task_state): a start stays scheduled until it says it runs.
    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", topics, "serves", answer=None,
                                metadata={"capabilities": ["task_state"]}) as proplet:
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list"), timeout=10)

        confirmed: set[str] = set()

        async def confirm_running(report: str) -> None:
            start = await proplet.expect(t.START, lambda m: m["id"] not in confirmed)
            confirmed.add(start["id"])
            await asyncio.sleep(0.3)
            await proplet.publish(t.TASK_STATE, {"task_id": start["id"], "proplet_id": "serves", "state": "running",
                                                 "attempt": start["attempt"], "reason": report})

        async def create_daemon(wait: str, report: str | None) -> subprocess.CompletedProcess[str]:
            answering = asyncio.create_task(confirm_running(report)) if report is not None else None
            out = await cli(serve, "tasks", "create", "serve", "--wasm", str(module), "--daemon", "--start",
                            "--wait", wait)
            if answering is not None:
                await answering
            return out

        began = time.monotonic()
        up = await create_daemon("20", "serving HTTP on port 8222")
        assert up.returncode == 0, up.stderr
        assert re.search(r"^state_name\s+running", up.stdout, re.MULTILINE), up.stdout
        assert re.search(r"^results\s+serving HTTP on port 8222", up.stdout, re.MULTILINE), up.stdout
        assert time.monotonic() - began < 10  # not the whole wait
        # Running but reporting nothing: the whole wait, then running is what was asked for.
        silent = await create_daemon("1.5", "")
        assert silent.returncode == 0 and re.search(r"^state_name\s+running", silent.stdout, re.MULTILINE)
        # Never confirmed: not up, exit 3 as for any task.
        stuck = await create_daemon("0.5", None)
        assert stuck.returncode == 3 and "is scheduled, not finished after 0.5s" in stuck.stderr, stuck.stderr
    serve.stop()



async def test_a_latent_function_is_deployed_once_then_invoked_from_the_cli(serve: Serve, tmp_path: Path) -> None:
    """The FaaS path from the command line, on a real `propeller proplet`: `tasks create --latent
    --start --wait` returns once deployed, `tasks invoke` calls it with new inputs, and the exit
    code tells a call that failed on the proplet (4), one nobody answered in time (3) and one the
    manager refused (1). Before, the CLI could neither create a latent task nor invoke one."""
    from tests.wasmfixtures import wasm_path

    serve.start()
    broker_url = f"mqtt://127.0.0.1:{serve.env['MANAGER_DEFAULT_BROKER_PORT']}"
    component = str(wasm_path("greeter-component"))
    proplet = _start_proplet(serve, "faas-p", broker_url, tmp_path)
    try:
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list", "--status", "active"),
                         timeout=20, interval=0.2)
        began = time.monotonic()
        deployed = await cli(serve, "tasks", "create", "greet", "--wasm", component, "--latent", "-i", '"nobody"',
                             "--start", "--wait", "30", "--json")
        assert deployed.returncode == 0, deployed.stderr + serve.log.read_text()[-3000:]
        greet = json.loads(deployed.stdout)
        assert (greet["state_name"], greet["latent"], greet["results"]) == ("running", True, None)
        assert time.monotonic() - began < 20  # once deployed, not the whole wait
        short = greet["id"][:8]
        assert re.search(r"^latent\s+yes\s*$", (await cli(serve, "tasks", "get", short)).stdout, re.MULTILINE)
        called = await cli(serve, "tasks", "invoke", short, "-i", '"world"')
        assert (called.returncode, called.stdout) == (0, '"Hello, world!"\n'), called.stderr
        # No inputs: the task's own.
        assert (await cli(serve, "tasks", "invoke", short)).stdout == '"Hello, nobody!"\n'
        wrong = await cli(serve, "tasks", "invoke", short, "-i", "1", "-i", "2")
        assert wrong.returncode == 4 and "greet" in wrong.stderr and "faas-p" in wrong.stderr, wrong.stderr

        spin = json.loads((await cli(serve, "tasks", "create", "spin", "--wasm", component, "--latent",
                                     "--timeout", "0.5", "--start", "--wait", "30", "--json")).stdout)
        looped = await cli(serve, "tasks", "invoke", spin["id"])
        assert looped.returncode == 4 and "0.5 s limit" in looped.stderr, looped.stderr
        assert (await cli(serve, "tasks", "invoke", short, "-i", '"again"')).stdout == '"Hello, again!"\n'

        plain = json.loads((await cli(serve, "tasks", "create", "greet", "--wasm", component, "-i", '"x"',
                                      "--start", "--wait", "30", "--json")).stdout)
        refused = await cli(serve, "tasks", "invoke", plain["id"])
        assert refused.returncode == 1 and "not a latent task" in refused.stderr, refused.stderr
        assert (await cli(serve, "tasks", "stop", short)).returncode == 0
        stopped = await cli(serve, "tasks", "invoke", short)
        assert stopped.returncode == 1 and "interrupted; start it before invoking it" in stopped.stderr
    finally:
        proplet.send_signal(signal.SIGTERM)
        proplet.wait(15)

    # A proplet that never answers the call: exit 3 once the task's limit and the margin are over.
    topics = Topics("propeller", "default")
    async with SyntheticProplet(broker_url, topics, "mute-p", answer=None):
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list", "--status", "active"),
                         timeout=10)
        mute = json.loads((await cli(serve, "tasks", "create", "greet", "--wasm", component, "--latent",
                                     "--proplet", "mute-p", "--timeout", "0.5", "--start", "--json")).stdout)
        began = time.monotonic()
        silent = await cli(serve, "tasks", "invoke", mute["id"])
        assert silent.returncode == 3 and "timed out after 5.5 s" in silent.stderr, silent.stderr
        assert 5 < time.monotonic() - began < 20
    serve.stop()


async def test_tables_show_a_guests_output_as_printed(serve: Serve) -> None:
    # Rich read each cell as markup: "argv: [hello] [world]" showed as "argv:  ", every [word] taken
    # for a style, and a result or an error could be restyled by what a guest printed.
    serve.start()
    printed = "argv: [hello] [world] [/] [bold]x"

    def echo_argv(start: dict[str, Any]) -> tuple[Any, str | None]:
        return (printed, None) if start["name"] == "hello" else (None, "trap: [red]unreachable[/red]")

    broker_port = int(serve.env["MANAGER_DEFAULT_BROKER_PORT"])
    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", Topics("propeller", "default"), "echo-p",
                                answer=echo_argv):
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list"), timeout=10)
        made = await cli(serve, "tasks", "create", "hello", "--wasm", "registry.local/wasm/hello:v1", "--start",
                         "--wait", "10")
        assert made.returncode == 0, made.stderr
        assert re.search(rf"^results\s+{re.escape(printed)}\s*$", made.stdout, re.MULTILINE), made.stdout
        failed = await cli(serve, "tasks", "create", "boom", "--wasm", "registry.local/wasm/boom:v1", "--start",
                           "--wait", "10")
        assert failed.returncode == 4 and "trap: [red]unreachable[/red]" in failed.stdout + failed.stderr
        listed = (await cli(serve, "tasks", "list")).stdout
        assert printed in listed and "trap: [red]unreachable[/red]" in listed, listed
    # An external runtime is announced by its path: the table names its file, `proplets get` the path.
    external = {"wasm_runtime": "/opt/wasmtime-v40.0.0-aarch64-linux/wasmtime", "os": "linux", "cpu_arch": "aarch64"}
    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", Topics("propeller", "default"), "ext-p",
                                metadata=external):
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list", "--status", "active"),
                         timeout=10)
        table = (await cli(serve, "proplets", "list")).stdout
        assert re.search(r"^ext-p\s.*\swasmtime \(external\)\s+linux/aarch64\s*$", table, re.MULTILINE), table
        shown = (await cli(serve, "proplets", "get", "ext-p")).stdout
        assert "/opt/wasmtime-v40.0.0-aarch64-linux/wasmtime" in shown and "takes" not in shown, shown
    # A board: `proplets get` says what the manager sends it no more of, as the console's detail does.
    board = {"environment": "embedded", "max_module_bytes": 49152, "capabilities": ["task_state"]}
    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", Topics("propeller", "default"), "esp-p",
                                metadata=board):
        async def listed() -> bool:
            return (await cli(serve, "proplets", "get", "esp-p")).returncode == 0

        await eventually(listed, timeout=10)
        shown = (await cli(serve, "proplets", "get", "esp-p")).stdout
        assert re.search(r"^takes\s+modules up to 48\.0 KiB, core modules only, no WASI, no HTTP URLs, no latent "
                         r"tasks\s*$", shown, re.MULTILINE), shown
    serve.stop()


async def test_job_commands_take_a_start_of_the_id(serve: Serve) -> None:
    # `jobs get 1a2b3c4d` answered 404: only a whole job id was taken, while tasks took a start.
    serve.start()
    file = base64.b64encode(WASM).decode()
    async with httpx.AsyncClient(base_url=serve.url) as api:
        ids = [(await api.post("/jobs", json={"name": f"j{n}", "tasks": [{"name": "add", "file": file}]})).json()
               ["job_id"] for n in range(2)]
        listed = (await api.get("/jobs", params={"id_prefix": ids[0][:8]})).json()
        assert [j["job_id"] for j in listed["jobs"]] == [ids[0]] and listed["total"] == 1
        refused = await api.get("/jobs", params={"id_prefix": "zz"})
        assert refused.status_code == 400 and "start of a job id" in refused.text, refused.text
    got = await cli(serve, "jobs", "get", ids[1][:8], "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["job_id"] == ids[1], got.stderr
    stopped = await cli(serve, "jobs", "stop", ids[0][:6], "--json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["job_id"] == ids[0], stopped.stderr
    missing = await cli(serve, "jobs", "start", "0000dead")
    assert missing.returncode == 1 and "no job id starts with 0000dead" in missing.stderr, missing.stderr
    group_help = await asyncio.to_thread(subprocess.run, [*PROPELLER, "jobs", "--help"], capture_output=True,
                                         text=True, timeout=30)
    assert "JOB_ID may be" in group_help.stdout, group_help.stdout
    assert serve.stop() == 0


def _generate_keys(folder: Path) -> None:
    keys = subprocess.run([*PROPELLER, "keys", "generate", "--dir", str(folder)], capture_output=True, text=True,
                          timeout=30)
    assert keys.returncode == 0, keys.stderr


def _web_server(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """`python -m http.server`, as an operator serves a module."""
    return subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_a_url_task_runs_on_a_proplet_that_trusts_only_signed_modules_given_digest(
        serve: Serve, tmp_path: Path) -> None:
    """README, Security: with MANAGER_SIGNING_KEY and PROPLET_TRUSTED_KEYS, a task given by URL needs
    its wasm_digest. `tasks create` had no way to give it, and the failure said 'create the task
    with wasm_digest', which no option of the CLI set."""
    from tests.wasmfixtures import wasm

    add = wasm("add")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "add.wasm").write_bytes(add)
    _generate_keys(tmp_path)
    serve.env["MANAGER_SIGNING_KEY"] = str(tmp_path / "propeller-signing.pem")
    serve.env["PROPLET_TRUSTED_KEYS"] = str(tmp_path / "propeller-signing.pub.pem")
    serve.start()
    port = free_port()
    web = _web_server(tmp_path / "www", port)
    broker = f"mqtt://127.0.0.1:{serve.env['MANAGER_DEFAULT_BROKER_PORT']}"
    proplet = _start_proplet(serve, "signed-p", broker, tmp_path)
    try:
        wait_port(port)
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list", "--status", "active"),
                         timeout=20, interval=0.2)
        url = f"http://127.0.0.1:{port}/add.wasm"
        bare = await cli(serve, "tasks", "create", "add", "--wasm", url, "-i", "1", "-i", "2", "--start",
                         "--wait", "20")
        assert bare.returncode == 4, bare.stdout + bare.stderr
        assert "propeller tasks create --digest" in bare.stderr, bare.stderr
        digest = "sha256:" + hashlib.sha256(add).hexdigest()
        pinned = await cli(serve, "tasks", "create", "add", "--wasm", url, "--digest", digest, "-i", "1", "-i", "2",
                           "--start", "--wait", "20", "--json")
        assert pinned.returncode == 0, pinned.stdout + pinned.stderr
        task = json.loads(pinned.stdout)
        assert (task["results"], task["wasm_digest"]) == ("3", digest)
        wrong = await cli(serve, "tasks", "create", "add", "--wasm", url, "--digest", "sha256:abc")
        assert wrong.returncode == 1 and "wasm_digest" in wrong.stderr, wrong.stderr
        local = await cli(serve, "tasks", "create", "add", "--wasm", str(tmp_path / "www" / "add.wasm"),
                          "--digest", digest)
        assert local.returncode == 2 and "--digest" in local.stderr, local.stderr
    finally:
        web.terminate()
        proplet.send_signal(signal.SIGTERM)
        web.wait(10)
        proplet.wait(15)
    assert serve.stop() == 0


def _serve_with_round(serve: Serve, tmp_path: Path, round_id: str, participant: str) -> int:
    """Start the manager and write tmp_path/round.json (one participant); the embedded broker's port."""
    serve.start()
    (tmp_path / "m.wasm").write_bytes(WASM)
    (tmp_path / "round.json").write_text(json.dumps({"round_id": round_id, "model_ref": "global_model_v0",
                                                     "participants": [participant], "wasm": "m.wasm"}))
    return int(serve.env["MANAGER_DEFAULT_BROKER_PORT"])


async def test_fl_start_wait_exits_4_naming_why_a_round_failed(serve: Serve, tmp_path: Path) -> None:
    # README's round with a module that prints no update (examples/hello.wasm): `fl start --wait`
    # showed 'failed: no update arrived before every started task ended' and exited 0.
    broker_port = _serve_with_round(serve, tmp_path, "hello-1", "fl-hello")

    def hello(start: dict[str, Any]) -> tuple[Any, str | None]:
        output = base64.b64encode(b"Hello from Propeller!\n").decode()
        return {"task_id": start["id"], "round_id": "hello-1", "num_samples": 1, "update_b64": output,
                "format": "f32-delta", "metrics": {}}, None

    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", Topics("propeller", "default"), "fl-hello",
                                answer=hello):
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list", "--status", "active"),
                         timeout=10)
        out = await cli(serve, "fl", "start", str(tmp_path / "round.json"), "--wait")
    assert out.returncode == 4, out.stdout + out.stderr
    assert re.search(r"state\s+failed", out.stdout), out.stdout
    assert ("round hello-1 failed: no update arrived before every started task ended: fl-hello: its task's "
            "output is not an update") in out.stderr, out.stderr
    help_text = (await cli(serve, "fl", "start", "--help")).stdout
    assert "4" in help_text and "failed" in help_text
    assert serve.stop() == 0


async def test_ctrl_c_while_a_round_is_awaited_names_the_round_and_exits_130(serve: Serve, tmp_path: Path) -> None:
    # `fl start --wait` printed only "Aborted!" (exit 1), the round going on for up to its 300 s.
    broker_port = _serve_with_round(serve, tmp_path, "slow-1", "fl-slow")
    async with SyntheticProplet(f"mqtt://127.0.0.1:{broker_port}", Topics("propeller", "default"), "fl-slow",
                                answer=None) as proplet:
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list", "--status", "active"),
                         timeout=10)
        proc = await asyncio.create_subprocess_exec(
            *PROPELLER, "fl", "start", str(tmp_path / "round.json"), "--wait", "--manager-url", serve.url,
            env=serve.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await _ctrl_c_once_started(proc, proplet)
    stderr = err.decode()
    assert proc.returncode == 130, (out.decode(), stderr)
    assert "Aborted!" not in stderr
    assert "round slow-1" in stderr and "propeller fl status slow-1" in stderr, stderr
    serve.stop()


async def test_serve_hosting_the_oci_proxy_runs_a_pushed_module_with_no_proxy_service(serve: Serve,
                                                                                   tmp_path: Path) -> None:
    """One box: `propeller serve` with MANAGER_OCI_PROXY, a `propeller proplet`, no `propeller proxy`.
    A module pushed with `propeller push` runs by its reference, and by a reference without a
    registry host (PROXY_REGISTRY_URL, read by the hosted proxy as by the service)."""

    with running_registry(tmp_path / "registry") as registry:
        await _run_pushed_module_on_serve_hosting_the_proxy(serve, registry.host, tmp_path)


async def _run_pushed_module_on_serve_hosting_the_proxy(serve: Serve, registry_host: str, tmp_path: Path) -> None:
    from tests.wasmfixtures import wasm_path

    serve.env.update({"MANAGER_OCI_PROXY": "true", "PROXY_REGISTRY_URL": registry_host})
    serve.start()
    repository = f"wasm/hosted-{uuid.uuid4().hex[:8]}"
    pushed = await asyncio.to_thread(subprocess.run, [*PROPELLER, "push", str(wasm_path("add")),
                                                      f"{registry_host}/{repository}:v1", "--json"],
                                     capture_output=True, text=True, timeout=60)
    assert pushed.returncode == 0, pushed.stderr
    module_digest = json.loads(pushed.stdout)["module_digest"]
    broker_port = int(serve.env["MANAGER_DEFAULT_BROKER_PORT"])
    proplet = _start_proplet(serve, "oci-p", f"mqtt://127.0.0.1:{broker_port}", tmp_path)
    try:
        await eventually(lambda: asyncio.to_thread(_cli_json, serve, "proplets", "list", "--status", "active"),
                         timeout=20, interval=0.2)
        for reference, inputs in ((f"{registry_host}/{repository}:v1", ("40", "2")), (f"{repository}:v1", ("5", "6"))):
            out = await cli(serve, "tasks", "create", "add", "--wasm", reference, "--digest", module_digest,
                            "-i", inputs[0], "-i", inputs[1], "--start", "--wait", "20", "--json")
            assert out.returncode == 0, out.stderr + serve.log.read_text()[-3000:]
            task = json.loads(out.stdout)
            assert (task["state_name"], task["results"]) == ("completed", str(int(inputs[0]) + int(inputs[1])))
        health = (await asyncio.to_thread(httpx.get, serve.url + "/health")).json()
        # Both tasks ran on the one proplet, which fetched the module once (then its cache had it).
        assert health["oci_proxy"]["pulls"] == 1 and health["oci_proxy"]["errors"] == 0, health
    finally:
        proplet.send_signal(signal.SIGTERM)
        proplet.wait(15)
    assert serve.stop() == 0
    assert "hosting the OCI proxy" in serve.log.read_text()
