"""A whole fleet as separate processes: Mosquitto, `propeller serve`, two `propeller proplet`, the
`propeller proxy` in front of a real docker-registry, and an HTTP server. Driven over REST."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fleet import Fleet, assert_no_lost_exceptions, make_fleet
from tests.registry import running_registry
from tests.wasmfixtures import big_module_byte, wasm
from tests.wire import eventually

pytestmark = pytest.mark.serial

@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    with running_registry(workdir / "registry") as registry:
        f = make_fleet(workdir)
        f.registry = registry
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
            f.broker.stop()
        assert_no_lost_exceptions(f.workdir)


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


async def test_a_module_pushed_with_propeller_push_runs_by_its_reference(api: httpx.AsyncClient, fleet: Fleet,
                                                                        tmp_path: Path) -> None:
    """The operator's path with no oras CLI: `propeller push`, then a task naming what it printed."""
    module = tmp_path / "add.wasm"
    module.write_bytes(wasm("add"))
    reference = f"{fleet.registry.host}/wasm/{fleet.domain}-pushed:v1"
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "propeller", "push", str(module), reference,
                                                   "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pushed = json.loads(out.stdout)
    by_tag = await submit(api, name="add", image_url=pushed["reference"], wasm_digest=pushed["module_digest"],
                          inputs=[30, 12])
    task = await finished(api, by_tag)
    assert (task["state_name"], task["results"], task["wasm_digest"]) == ("completed", "42", pushed["module_digest"])
    by_manifest = await submit(api, name="add", image_url=pushed["pinned"], inputs=[1, 2])
    assert (await finished(api, by_manifest))["results"] == "3"


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
