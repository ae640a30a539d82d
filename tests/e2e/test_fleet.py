"""A whole fleet as separate processes: Mosquitto, `propeller serve`, two `propeller proplet`, the
`propeller proxy` in front of a real docker-registry, and an HTTP server. Driven over REST."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.registry import DockerRegistry, running_registry
from tests.services import Mosquitto, free_port, wait_port
from tests.wasmfixtures import big_module_byte, wasm
from tests.wire import eventually

pytestmark = pytest.mark.serial

PROPELLER = [sys.executable, "-m", "propeller"]


@dataclass
class Fleet:
    workdir: Path
    broker: Mosquitto
    registry: DockerRegistry
    domain: str = field(default_factory=lambda: f"fleet-{uuid.uuid4().hex[:6]}")
    api_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **extra}

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.procs[name] = proc
        return proc

    def start_manager(self) -> None:
        self.spawn("manager", [*PROPELLER, "serve"], self.env(
            MANAGER_MQTT_ADDRESS=self.broker.url, MANAGER_TENANT_ID=self.domain,
            MANAGER_ENTITY_ID=f"{self.domain}-manager", MANAGER_HTTP_PORT=str(self.api_port),
            MANAGER_SQLITE_PATH=str(self.workdir / "manager.db")))
        wait_port(self.api_port, 20)

    def start_proplet(self, name: str) -> None:
        self.spawn(name, [*PROPELLER, "proplet"], self.env(
            PROPLET_MQTT_ADDRESS=self.broker.url, PROPLET_TENANT_ID=self.domain, PROPLET_ENTITY_ID=name,
            PROPLET_CACHE_DIR=str(self.workdir / name / "cache"), PROPLET_STATE_DIR=str(self.workdir / name),
            PROPLET_LIVELINESS_INTERVAL="1s", PROPLET_MQTT_KEEP_ALIVE="5"))

    def start_proxy(self) -> None:
        self.spawn("proxy", [*PROPELLER, "proxy"], self.env(
            PROXY_MQTT_ADDRESS=self.broker.url, PROXY_TENANT_ID=self.domain,
            PROXY_ENTITY_ID=f"{self.domain}-proxy", PROXY_REGISTRY_URL=self.registry.host))

    def start_http(self, root: Path) -> None:
        self.spawn("http", [sys.executable, "-m", "http.server", str(self.http_port), "--bind", "127.0.0.1",
                            "--directory", str(root)], self.env())
        wait_port(self.http_port)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.workdir.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    broker = Mosquitto(workdir / "mosquitto")
    broker.start()
    with running_registry(workdir / "registry") as registry:
        f = Fleet(workdir, broker, registry)
        web = workdir / "web"
        web.mkdir()
        (web / "add.wasm").write_bytes(wasm("add"))
        f.start_http(web)
        f.start_manager()
        f.start_proxy()
        for name in ("edge-1", "edge-2"):
            f.start_proplet(name)
        try:
            yield f
        finally:
            f.stop_all()
            broker.stop()


async def submit(api: httpx.AsyncClient, **body: Any) -> str:
    r = await api.post("/tasks", json=body)
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    assert (await api.post(f"/tasks/{tid}/start")).status_code == 200
    return tid


async def finished(api: httpx.AsyncClient, tid: str, timeout: float = 30) -> dict[str, Any]:
    async def done() -> Any:
        task = (await api.get(f"/tasks/{tid}")).json()
        return task if task["state_name"] in ("completed", "failed", "interrupted") else None
    return await eventually(done, timeout, interval=0.05)


@pytest.fixture
async def api(fleet: Fleet) -> Any:
    async with httpx.AsyncClient(base_url=fleet.api, timeout=10) as client:
        async def both_online() -> bool:
            body = (await client.get("/proplets", params={"status": "active"})).json()
            return {"edge-1", "edge-2"} <= {p["id"] for p in body["proplets"]}
        try:
            await eventually(both_online, 30, interval=0.1)
        except AssertionError:
            pytest.fail("the proplets never came online:\n" + fleet.logs())
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_inline_tasks_run_on_both_proplets(api: httpx.AsyncClient) -> None:
    ids = [await submit(api, name="add", file=b64(wasm("add")), inputs=[i, 100]) for i in range(4)]
    tasks = [await finished(api, tid) for tid in ids]
    assert [t["results"] for t in tasks] == ["100", "101", "102", "103"]
    assert {t["proplet_id"] for t in tasks} == {"edge-1", "edge-2"}


async def test_http_module(api: httpx.AsyncClient, fleet: Fleet) -> None:
    tid = await submit(api, name="add", image_url=f"http://127.0.0.1:{fleet.http_port}/add.wasm", inputs=[20, 1])
    task = await finished(api, tid)
    assert (task["state_name"], task["results"]) == ("completed", "21"), task


async def test_oci_module_through_the_proxy_by_tag_and_digest(api: httpx.AsyncClient, fleet: Fleet) -> None:
    repo = f"wasm/{fleet.domain}"
    fleet.registry.push(repo, "v1", wasm("add"))
    fleet.registry.push(repo, "v2", wasm("traps"))
    tid = await submit(api, name="add", image_url=fleet.registry.ref(repo, "v1"), inputs=[2, 3])
    task = await finished(api, tid)
    assert (task["state_name"], task["results"]) == ("completed", "5"), task
    # v2 is another module: the tag is honoured, not "latest".
    tid = await submit(api, name="add", image_url=fleet.registry.ref(repo, "v2"), inputs=[2, 3])
    task = await finished(api, tid)
    assert task["state_name"] == "failed" and "add" in task["error"]
    missing = await submit(api, name="add", image_url=fleet.registry.ref(repo, "nope"))
    task = await finished(api, missing)
    assert task["state_name"] == "failed" and "nope" in task["error"], task


async def test_ten_megabyte_module_over_chunks(api: httpx.AsyncClient) -> None:
    big = wasm("big")
    tid = await submit(api, name="probe", file=b64(big), inputs=[4_000_000])
    task = await finished(api, tid, timeout=60)
    assert (task["state_name"], task["results"]) == ("completed", str(big_module_byte(4_000_000))), task


async def test_stop_interrupts_an_infinite_loop(api: httpx.AsyncClient) -> None:
    tid = await submit(api, name="spin", file=b64(wasm("spin")))
    await eventually(lambda: _state(api, tid, "running"), 10)
    await asyncio.sleep(0.3)
    assert (await api.post(f"/tasks/{tid}/stop")).status_code == 200
    assert (await finished(api, tid))["state_name"] == "interrupted"
    # The proplet that ran it is free again: a follow-up pinned there completes.
    proplet = (await api.get(f"/tasks/{tid}")).json()["proplet_id"]
    follow = await submit(api, name="add", file=b64(wasm("add")), inputs=[1, 1], proplet_id=proplet)
    assert (await finished(api, follow))["results"] == "2"


async def _state(api: httpx.AsyncClient, tid: str, name: str) -> bool:
    return bool((await api.get(f"/tasks/{tid}")).json()["state_name"] == name)


async def test_memory_bomb_is_refused(api: httpx.AsyncClient) -> None:
    tid = await submit(api, name="_start", file=b64(wasm("membomb")), limits={"memory_bytes": 16 * 1024 * 1024})
    task = await finished(api, tid)
    assert task["state_name"] == "failed" and "16 MiB" in task["error"], task


async def test_broker_restart_in_the_middle_of_a_run(api: httpx.AsyncClient, fleet: Fleet) -> None:
    tid = await submit(api, name="_start", file=b64(wasm("busy")), inputs=["1500"])
    await eventually(lambda: _state(api, tid, "running"), 10)
    fleet.broker.kill()
    await asyncio.sleep(0.5)
    fleet.broker.start()
    back = time.monotonic()
    task = await finished(api, tid, timeout=30)
    print(f"task finished {time.monotonic() - back:.2f}s after the broker came back")
    assert task["state_name"] == "completed" and task["results"].startswith("start="), task
    after = await submit(api, name="add", file=b64(wasm("add")), inputs=[7, 8])
    assert (await finished(api, after))["results"] == "15"


async def test_killed_proplet_is_offline_at_once(api: httpx.AsyncClient, fleet: Fleet) -> None:
    proc = fleet.procs["edge-2"]
    killed = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    async def offline() -> bool:
        return not (await api.get("/proplets/edge-2")).json()["alive"]

    await eventually(offline, 5, interval=0.02)
    took = time.monotonic() - killed
    print(f"edge-2 marked offline {took * 1000:.0f} ms after SIGKILL")
    assert took < 1.0
    assert "Last Will" in (await api.get("/proplets/edge-2")).json()["offline_reason"]
