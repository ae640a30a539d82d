"""Module trust (digests and Ed25519 signatures), the sandbox's grants, and secrets in logs."""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from core import topics as t
from core.domain import TaskState
from core.protocol import sha256_digest
from core.schemas import TaskCreate
from core.signing import generate_keypair
from proplet.agent import PropletAgent
from proplet.config import PropletSettings
from tests.fleet import make_fleet
from tests.wasmfixtures import wasm, wasmtime_cli, with_custom_section
from tests.wire import WireClient, eventually


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@asynccontextmanager
async def proplet(core: Any, broker: Any, tmp_path: Path, pid: str, **settings: Any) -> AsyncIterator[PropletAgent]:
    s = PropletSettings.load(mqtt_address=broker.url, tenant_id=core.topics.domain, entity_id=pid,
                        cache_dir=tmp_path / pid / "c", state_dir=tmp_path / pid / "s", **settings)
    async with PropletAgent(s) as agent:
        await eventually(lambda: pid in core.proplets and core.proplets[pid].online, 10)
        yield agent


async def run(core: Any, **body: Any) -> Any:
    task = await core.create_task(TaskCreate.model_validate(body))
    await core.start_task(task.id)

    async def finished() -> Any:
        current = await core.get_task(task.id)
        return current if current.state.is_terminal else None

    return await eventually(finished, 30)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    """A plain HTTP server for modules fetched by URL."""
    root = tmp_path / "web"
    root.mkdir()
    (root / "add.wasm").write_bytes(wasm("add"))
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


async def test_signed_modules_run_and_everything_else_is_refused(manager_factory: Any, broker: Any, tmp_path: Path,
                                                                 web: str) -> None:
    private, public = generate_keypair(tmp_path / "keys")
    _, other_public = generate_keypair(tmp_path / "other", "other")
    add = wasm("add")
    async with manager_factory(signing_key=private) as core, \
            WireClient(broker.url, core.topics, subscribe=[t.START]) as spy, \
            proplet(core, broker, tmp_path, "trusting", trusted_keys=[public]):
        done = await run(core, name="add", file=b64(add), inputs=[1, 2])
        assert done.state is TaskState.COMPLETED and done.results == "3", done.error
        start = await spy.expect(t.START)
        assert start["wasm_digest"] == sha256_digest(add) and len(base64.b64decode(start["wasm_signature"])) == 64
        # A module by URL is signed too when its digest is pinned at creation...
        pinned = await run(core, name="add", image_url=f"{web}/add.wasm", wasm_digest=sha256_digest(add),
                           inputs=[2, 2])
        assert pinned.results == "4", pinned.error
        # ...and without a digest there is nothing to sign: the trusting proplet refuses it.
        unpinned = await run(core, name="add", image_url=f"{web}/add.wasm", inputs=[2, 2])
        assert unpinned.state is TaskState.FAILED and "names no module digest" in unpinned.error
        # Bytes that are not the pinned ones never run, signed digest or not.
        wrong = await run(core, name="add", image_url=f"{web}/add.wasm", wasm_digest=sha256_digest(b"other"))
        assert wrong.state is TaskState.FAILED and "sha256" in wrong.error
    async with manager_factory(signing_key=private) as core, \
            proplet(core, broker, tmp_path, "other-key", trusted_keys=[other_public]):
        refused = await run(core, name="add", file=b64(add), inputs=[1, 2])
        assert refused.state is TaskState.FAILED and "not from a key this proplet trusts" in refused.error
    async with manager_factory() as core, proplet(core, broker, tmp_path, "unsigned", trusted_keys=[public]):
        refused = await run(core, name="add", file=b64(add), inputs=[1, 2])
        assert refused.state is TaskState.FAILED and "is not signed" in refused.error
    print("\nSECURITY signatures: signed inline and pinned-URL modules ran; unsigned, foreign-key, unpinned and "
          "wrong-digest modules refused before running")


@pytest.mark.parametrize("runtime", ["internal", "external"])
async def test_guests_see_no_host_environment(manager: Any, broker: Any, tmp_path: Path, runtime: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREETING", "a secret of the host")
    extra = {"external_wasm_runtime": wasmtime_cli()} if runtime == "external" else {}
    async with proplet(manager, broker, tmp_path, f"env-{runtime}", **extra):
        bare = await run(manager, name="_start", file=b64(wasm("hello")))
        assert "GREETING=(unset)" in bare.results, bare.results
        given = await run(manager, name="_start", file=b64(wasm("hello")), env={"GREETING": "from the task"})
        assert "GREETING=from the task" in given.results


async def test_network_needs_the_task_and_the_proplet(manager: Any, broker: Any, tmp_path: Path) -> None:
    async with proplet(manager, broker, tmp_path, "no-net"):
        refused = await run(manager, name="add", file=b64(wasm("add")), inputs=[1, 1], cli_args=["-S", "http"])
        assert refused.state is TaskState.FAILED and "PROPLET_ALLOW_NETWORK" in refused.error
    async with proplet(manager, broker, tmp_path, "net-ok", allow_network=True):
        allowed = await run(manager, name="add", file=b64(wasm("add")), inputs=[1, 1], cli_args=["-S", "http"],
                            proplet_id="net-ok")
        assert allowed.results == "2", allowed.error


SECRETS = {"MANAGER_API_KEY": "mgr-pass-7f3a9c", "PROPLET_API_KEY": "plt-pass-4b2e8d",
           "MANAGER_HTTP_TOKENS": "tok-91c0ffee"}


@pytest.mark.serial
async def test_secrets_never_reach_the_logs(tmp_path: Path) -> None:
    marker = b"TOP-SECRET-PAYLOAD-31337"
    module = wasm("add") + b"\0" * 0  # the module itself must not be logged either
    custom = with_custom_section(module, "secret", marker)
    fleet = make_fleet(tmp_path)
    try:
        await asyncio.to_thread(fleet.start_manager, MANAGER_LOG_LEVEL="debug", MANAGER_API_KEY=SECRETS[
            "MANAGER_API_KEY"], MANAGER_HTTP_TOKENS=SECRETS["MANAGER_HTTP_TOKENS"])
        fleet.start_proplet("quiet", PROPLET_LOG_LEVEL="debug", PROPLET_API_KEY=SECRETS["PROPLET_API_KEY"])
        headers = {"Authorization": f"Bearer {SECRETS['MANAGER_HTTP_TOKENS']}"}
        async with httpx.AsyncClient(base_url=fleet.api, headers=headers, timeout=30) as api:
            async def online() -> bool:
                return any(p["id"] == "quiet" for p in (await api.get("/proplets")).json()["proplets"])
            await eventually(online, 30, interval=0.1)
            tid = (await api.post("/tasks", json={"name": "add", "file": b64(custom), "inputs": [1, 2]})).json()["id"]
            await api.post(f"/tasks/{tid}/start")
            bad = await api.post("/tasks", json={"name": "add", "file": "!!" + b64(custom)[2:]})
            assert bad.status_code == 400

            async def done() -> bool:
                return (await api.get(f"/tasks/{tid}")).json()["state_name"] == "completed"
            await eventually(done, 30, interval=0.05)
    finally:
        fleet.stop_all()
        fleet.broker.stop()
    logs = await asyncio.to_thread(lambda: "".join(p.read_text() for p in sorted(tmp_path.glob("*.log"))))
    assert "running task" in logs and logs.count("DEBUG") > 20, "debug logging (with the MQTT packet trace) was on"
    assert "Sending CONNECT" in logs and "Received PUBLISH" in logs
    for name, secret in SECRETS.items():
        assert secret not in logs, name
    assert marker.decode() not in logs
    assert b64(custom)[:40] not in logs
    print(f"\nSECURITY logs: {len(logs)} characters of debug logs from manager and proplet contain no API key, "
          "password, token or module content")
