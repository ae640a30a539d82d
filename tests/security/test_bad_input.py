"""Bad input: hostile wasm, malformed messages to a running proplet, and the REST API fuzzed from
its own OpenAPI schema. Nothing crashes, every rejection is counted, valid work still flows."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core import topics as t
from core.domain import TaskState
from core.schemas import TaskCreate
from proplet.agent import PropletAgent
from proplet.config import PropletSettings
from tests.fleet import make_fleet
from tests.wasmfixtures import wasm
from tests.wire import WireClient, eventually


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def run(core: Any, body: dict[str, Any]) -> Any:
    task = await core.create_task(TaskCreate.model_validate(body))
    await core.start_task(task.id)

    async def finished() -> Any:
        current = await core.get_task(task.id)
        return current if current.state.is_terminal else None

    return await eventually(finished, 30)


HOSTILE = [
    ("infinite loop", {"name": "spin", "file": "spin", "limits": {"timeout_s": 0.5}}, "0.5 s limit"),
    ("fuel budget", {"name": "spin", "file": "spin", "limits": {"fuel": 100_000}}, "fuel"),
    ("memory bomb (C malloc)", {"name": "_start", "file": "membomb", "limits": {"memory_bytes": 8 << 20}},
     "8 MiB limit"),
    ("memory bomb (memory.grow)", {"name": "bomb", "file": "membomb-wat",
                                   "limits": {"memory_bytes": 8 << 20}}, "8 MiB"),
    ("deep recursion", {"name": "recurse", "file": "traps", "inputs": ["0"]}, "stack"),
    ("huge stdout", {"name": "_start", "file": "bigout", "inputs": ["16"]}, "more than the 1 MiB"),
    ("division by zero", {"name": "div", "file": "traps", "inputs": ["1", "0"]}, "divided an integer by zero"),
    ("unreachable", {"name": "boom", "file": "traps"}, "unreachable"),
    ("missing export", {"name": "nothere", "file": "add"}, "add"),
    ("wrong argument type", {"name": "add", "file": "add", "inputs": ["1", "x"]}, "not an integer"),
    ("wrong argument count", {"name": "add", "file": "add", "inputs": ["1"]}, "2"),
    ("invalid module", {"name": "add", "file": b"\0asm\x01\0\0\0\x01\xff\xff\xff"}, "not valid WebAssembly"),
]


async def test_hostile_wasm_fails_precisely_and_the_proplet_survives(manager: Any, broker: Any,
                                                                     tmp_path: Path) -> None:
    settings = PropletSettings.load(mqtt_address=broker.url, tenant_id=manager.topics.domain, entity_id="hostile-p",
                               cache_dir=tmp_path / "c", state_dir=tmp_path / "s")
    async with PropletAgent(settings) as agent:
        await eventually(lambda: "hostile-p" in manager.proplets and manager.proplets["hostile-p"].online, 10)
        outcomes = []
        for label, body, expected in HOSTILE:
            module = body["file"] if isinstance(body["file"], bytes) else wasm(body["file"])
            done = await run(manager, {**body, "file": b64(module)})
            outcomes.append((label, done.state.label, done.error[:90]))
            assert done.state is TaskState.FAILED, (label, done.results)
            assert expected in done.error, (label, done.error)
        fine = await run(manager, {"name": "add", "file": b64(wasm("add")), "inputs": [20, 22]})
        assert fine.results == "42" and manager.proplets["hostile-p"].online
        print("\nBAD INPUT hostile wasm:", len(HOSTILE), "modules, all failed with a precise error; "
              f"proplet still running ({agent.counters})")
        for row in outcomes:
            print("  ", row)


MALFORMED_FOR_PROPLET = [
    (t.START, b"{not json"),
    (t.START, b"[]"),
    (t.START, b'{"id": 5, "name": "x", "file": "AA=="}'),
    (t.START, b'{"id": "a", "name": "x"}'),  # no module, not addressed to us: no answer expected
    (t.START, b'{"id": "a", "name": "x", "file": "@@@not base64"}'),
    (t.START, b'{"id": "a", "name": "x", "image_url": "y", "inputs": [{"n": 1}]}'),
    (t.START, b'{"id": "a", "name": "x", "image_url": "y", "limits": {"timeout_s": "soon"}}'),
    (t.STOP, b'{"broadcast": true}'),
    (t.STOP, b'\xff\xfe'),
    (t.INVOKE, b'{"inputs": ["1"]}'),
    (t.RESULT_ACK, b'{"task_id": 1}'),
    (t.REGISTRY_CHUNK, b'{"app_name": "x", "chunk_idx": 9, "total_chunks": 2, "data": "AA=="}'),
    (t.REGISTRY_CHUNK, b"garbage"),
    (t.REGISTRY_CHUNK_BINARY, b"no header line"),
    (t.REGISTRY_CHUNK_BINARY, b'{"app_name": 7}\n\x00asm'),
    (t.START, b'{"id": "' + b"y" * 3_000_000 + b'", "name": "x", "image_url": "z", "proplet_id": "another"}'),
]


async def test_malformed_messages_to_a_running_proplet(manager: Any, broker: Any, tmp_path: Path) -> None:
    settings = PropletSettings.load(mqtt_address=broker.url, tenant_id=manager.topics.domain, entity_id="mal-p",
                               cache_dir=tmp_path / "c", state_dir=tmp_path / "s")
    async with PropletAgent(settings) as agent, WireClient(broker.url, manager.topics) as attacker:
        await eventually(lambda: "mal-p" in manager.proplets, 10)
        for suffix, payload in MALFORMED_FOR_PROPLET:
            await attacker.publish(suffix, payload)
        # Stops and acks for tasks nobody knows are valid messages and simply change nothing.
        await attacker.publish(t.STOP, {"id": "no-such-task", "proplet_id": "mal-p"})
        await attacker.publish(t.RESULT_ACK, {"task_id": "no-such-task", "proplet_id": "mal-p", "attempt": 1})
        # Counted: everything but the chunks (dropped unread: nobody asked for them) and the last start,
        # which is valid JSON for a task this proplet does not run (it is not addressed to it).
        expected = sum(1 for s, _ in MALFORMED_FOR_PROPLET if s not in (t.REGISTRY_CHUNK, t.REGISTRY_CHUNK_BINARY)) - 1
        await eventually(lambda: agent.counters.rejected_messages >= expected, 10)
        done = await run(manager, {"name": "add", "file": b64(wasm("add")), "inputs": [1, 2]})
        assert done.results == "3" and agent.counters.started == 1
        print(f"\nBAD INPUT proplet: {len(MALFORMED_FOR_PROPLET) + 2} messages sent, "
              f"{agent.counters.rejected_messages} rejected and counted, valid task completed")


@pytest.mark.serial
def test_rest_api_fuzzed_from_its_openapi_schema(tmp_path: Path) -> None:
    """schemathesis generates requests from /openapi.json (coverage, fuzzing and stateful phases)
    against a real `propeller serve`; no request may get a 5xx."""
    fleet = make_fleet(tmp_path)
    try:
        fleet.start_manager()
        schemathesis = Path(sys.executable).with_name("schemathesis")
        out = subprocess.run(
            [str(schemathesis), "run", f"{fleet.api}/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", os.environ.get("PROPELLER_FUZZ_EXAMPLES", "40"), "--seed", "20261123"],
            capture_output=True, text=True, timeout=900)
    finally:
        fleet.stop_all()
        fleet.broker.stop()
    summary = out.stdout[-6000:]
    # The manager's own account of any server error: the exception and where it was raised.
    errors = [line for line in fleet.log_path("manager").read_text(errors="replace").splitlines()
              if "unexpected error" in line or "Error:" in line or line.startswith("  File \"/")]
    assert out.returncode == 0, "\n".join(errors[-40:]) + "\n" + summary[-3000:] + out.stderr[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
    assert generated and generated.group(1) == generated.group(2), summary
    print(f"\nBAD INPUT REST fuzz: {generated.group(1)} requests generated from the OpenAPI schema, "
          "no server error")
    assert "Traceback" not in fleet.log_path("manager").read_text()
