"""End to end: the Python manager dispatches tasks to the embedded proplet's host build over
the session's real Mosquitto, and the host build runs them with the real wasmtime C library.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from datetime import datetime
from typing import Any

import pytest

from core import protocol
from core import topics as t
from core.domain import TaskState, utcnow
from core.schemas import LimitsBody, TaskCreate
from core.topics import Topics
from tests.conftest import unique
from tests.wire import WireClient, eventually

pytestmark = pytest.mark.slow


def module(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def online(core: Any, proplet_id: str, timeout: float = 15.0) -> Any:
    return await eventually(lambda: (p := core.proplets.get(proplet_id)) is not None and p.online and p,
                            timeout=timeout)


async def finished(core: Any, task_id: str, timeout: float = 20.0) -> Any:
    async def check() -> Any:
        task = await core.get_task(task_id)
        return task if task.state.is_terminal else None

    return await eventually(check, timeout=timeout, interval=0.05)


async def run_task(core: Any, proplet_id: str, **fields: Any) -> Any:
    task = await core.create_task(TaskCreate(proplet_id=proplet_id, **fields))
    await core.start_task(task.id)
    return await finished(core, task.id)


async def test_add_style_exports_get_their_inputs_converted(manager_factory, host_proplets, wasm) -> None:
    async with manager_factory() as core:
        proplet = host_proplets(core, "esp-add")
        await online(core, "esp-add")
        done = await run_task(core, "esp-add", name="add", file=module(wasm["add"]), inputs=["2", "40"])
        assert done.state is TaskState.COMPLETED, (done.error, proplet.log)
        assert done.results == "42"
        assert done.error == ""
        # Several results of mixed types, joined as core/wasmvalues.py formats them.
        done = await run_task(core, "esp-add", name="mix", file=module(wasm["add"]), inputs=["7.5", "-4"])
        assert done.state is TaskState.COMPLETED, done.error
        assert done.results == "1.875,12,0.1"
        # The proplet confirmed the start before it finished (SCHEDULED -> RUNNING -> COMPLETED).
        states = [event.state for event in await core.task_events(done.id)]
        assert states[-3:] == [TaskState.SCHEDULED, TaskState.RUNNING, TaskState.COMPLETED]


async def test_bad_inputs_fail_with_the_reason(manager_factory, host_proplets, wasm) -> None:
    async with manager_factory() as core:
        host_proplets(core, "esp-inputs")
        await online(core, "esp-inputs")
        done = await run_task(core, "esp-inputs", name="add", file=module(wasm["add"]), inputs=["2", "forty"])
        assert done.state is TaskState.FAILED
        assert done.error == "input 1 ('forty') is not an integer, but the parameter is i32"
        done = await run_task(core, "esp-inputs", name="add", file=module(wasm["add"]), inputs=["2"])
        assert done.state is TaskState.FAILED
        assert done.error == "the export 'add' takes 2 parameters but the task has 1 inputs"


async def test_a_module_with_wasi_imports_is_refused_clearly(manager_factory, host_proplets, wasm) -> None:
    async with manager_factory() as core:
        host_proplets(core, "esp-wasi")
        await online(core, "esp-wasi")
        done = await run_task(core, "esp-wasi", name="_start", file=module(wasm["wasi"]))
        assert done.state is TaskState.FAILED
        assert "imports wasi_snapshot_preview1.fd_write" in done.error
        assert "no WASI" in done.error


async def test_a_trap_fails_the_task_with_a_clear_error(manager_factory, host_proplets, wasm) -> None:
    async with manager_factory() as core:
        host_proplets(core, "esp-trap")
        await online(core, "esp-trap")
        done = await run_task(core, "esp-trap", name="div", file=module(wasm["trap"]), inputs=["1", "0"])
        assert done.state is TaskState.FAILED
        assert done.error == "the export 'div' trapped: integer divide by zero"
        assert done.results == ""


async def test_a_large_module_arrives_in_chunks(manager_factory, host_proplets, wasm, broker) -> None:
    data = wasm["chunked"]
    assert len(data) > 4096  # more than one chunk, and well over the inline limit
    async with manager_factory(inline_limit=1024, chunk_size=4096) as core:
        topics = Topics(core.settings.tenant_id, core.settings.channel_id)
        subscribe = [t.START, t.REGISTRY_REQUEST, t.REGISTRY_CHUNK, t.REGISTRY_CHUNK_BINARY]
        async with WireClient(broker.url, topics, subscribe=subscribe) as wire:
            proplet = host_proplets(core, "esp-chunks")
            await online(core, "esp-chunks")
            done = await run_task(core, "esp-chunks", name="checksum", file=module(data))
            assert done.state is TaskState.COMPLETED, (done.error, proplet.log)
            assert done.results == str(sum((i * 7 + 3) % 251 for i in range(6000)))
            start = await wire.expect(t.START)
            assert "file" not in start and start["image_url"].startswith("blob:sha256:")
            request = await wire.expect(t.REGISTRY_REQUEST)
            # The device asks for raw-byte chunks, and the manager answers with them, not base64 JSON.
            assert request == {"app_name": start["image_url"], "proplet_id": "esp-chunks", "encoding": "binary"}
            chunks = [protocol.decode_binary_chunk(raw) for raw in wire.received[t.REGISTRY_CHUNK_BINARY]]
            chunks = [c for c in chunks if c.app_name == start["image_url"]]
            assert {c.chunk_idx for c in chunks} == {0, 1}
            assert all(c.digest == start["wasm_digest"] for c in chunks)
            assert b"".join(bytes(c.data) for c in sorted(chunks, key=lambda c: c.chunk_idx)) == data
            assert not [c for c in wire.messages(t.REGISTRY_CHUNK) if c["app_name"] == start["image_url"]]


async def test_a_module_too_large_for_the_proplet_fails_clearly(manager_factory, host_proplets, wasm) -> None:
    async with manager_factory(inline_limit=1024, chunk_size=4096) as core:
        host_proplets(core, "esp-small", "--max-module-bytes", "2048")
        await online(core, "esp-small")
        done = await run_task(core, "esp-small", name="checksum", file=module(wasm["chunked"]))
        assert done.state is TaskState.FAILED
        assert done.error.endswith(f"is {len(wasm['chunked'])} bytes but this proplet holds at most 2048; use a "
                                   "smaller module or run the task on a proplet with more memory")


async def test_a_module_the_board_cannot_run_goes_to_a_proplet_that_can(manager_factory, host_proplets, broker,
                                                                          tmp_path, monkeypatch) -> None:
    """A mixed fleet, tasks by OCI reference: the manager does not know those modules, so round robin
    sends some to the board. A component, a module over the board's limit, or a WASI program used to
    fail there while a Linux proplet sat idle; now the board answers `unsupported` once it sees the
    module's size, kind or imports in its chunks, and the task runs on the Python proplet."""
    from proplet.agent import PropletAgent
    from proplet.config import PropletSettings
    from tests.registry import running_registry
    from tests.wasmfixtures import wasm as fixture, with_custom_section

    with running_registry(tmp_path / "registry") as registry:
        component = fixture("greeter-component")
        big = with_custom_section(fixture("add"), "padding", bytes(8192))
        registry.push("wasm/greeter", "v1", component)
        registry.push("wasm/big-add", "v1", big)
        registry.push("wasm/hello", "v1", fixture("hello"))  # a WASI command: the board has no WASI
        monkeypatch.setenv("PROXY_REGISTRY_URL", registry.host)
        async with manager_factory(oci_proxy=True, chunk_size=4096) as core:
            board = host_proplets(core, "esp-mixed", "--max-module-bytes", "4096")
            settings = PropletSettings.load(
                mqtt_address=broker.url, tenant_id=core.settings.tenant_id, channel_id=core.settings.channel_id,
                entity_id="linux-mixed", cache_dir=tmp_path / "linux" / "cache", state_dir=tmp_path / "linux" / "state",
                liveliness_interval=1.0, metrics_enabled=False)
            async with PropletAgent(settings) as linux:
                await online(core, "esp-mixed")
                await online(core, "linux-mixed")
                unsupported_before = core.metrics.tasks_unsupported._value.get()
                tasks = []
                for i in range(3):
                    tasks.append(await core.create_task(TaskCreate(
                        name="add", image_url=f"{registry.host}/wasm/greeter:v1", inputs=[str(i), "2"])))
                    tasks.append(await core.create_task(TaskCreate(
                        name="add", image_url=f"{registry.host}/wasm/big-add:v1", inputs=[str(i), "3"])))
                    tasks.append(await core.create_task(TaskCreate(
                        name="_start", image_url=f"{registry.host}/wasm/hello:v1", inputs=[f"arg{i}"])))
                for task in tasks:
                    await core.start_task(task.id)
                for task in tasks:
                    done = await finished(core, task.id, timeout=30)
                    assert done.state is TaskState.COMPLETED, (done.error, board.log)
                    assert done.proplet_id == "linux-mixed"
                    if task.name == "_start":
                        assert f"[{task.inputs[0]}]" in done.results, done.results
                    else:
                        assert done.results == str(int(task.inputs[0]) + int(task.inputs[1]))
                handed_over = core.metrics.tasks_unsupported._value.get() - unsupported_before
                assert handed_over >= 1  # round robin over two proplets sent some to the board first
                log = board.log
                assert any(why in log for why in ("is a WebAssembly component", "this proplet holds at most 4096",
                                                  "imports wasi_snapshot_preview1")), log
                assert linux.counters.unsupported == 0


async def test_a_module_at_an_http_url_is_not_for_the_board(manager_factory, host_proplets, wasm) -> None:
    """The board asked for an HTTP URL's module in chunks, which no one serves: the task failed after
    the fetch's retries (12 s). The manager now sends such a task only to a proplet that downloads
    it; pinned to the board, it fails at once, saying why."""
    async with manager_factory() as core:
        host_proplets(core, "esp-web")
        await online(core, "esp-web")
        unpinned = await core.create_task(TaskCreate(name="add", image_url="http://127.0.0.1:9/add.wasm"))
        await core.start_task(unpinned.id)
        started = utcnow()
        done = await run_task(core, "esp-web", name="add", image_url="http://127.0.0.1:9/add.wasm")
        assert done.state is TaskState.FAILED
        assert "takes modules in chunks over MQTT only, not from an HTTP URL" in done.error
        assert (utcnow() - started).total_seconds() < 5
        waiting = await core.get_task(unpinned.id)
        assert waiting.state is TaskState.PENDING and "fetched from an HTTP URL" in waiting.reason


async def test_stop_interrupts_a_looping_task(manager_factory, host_proplets, wasm, broker) -> None:
    async with manager_factory() as core:
        topics = Topics(core.settings.tenant_id, core.settings.channel_id)
        async with WireClient(broker.url, topics, subscribe=[t.RESULTS, t.ALIVE]) as wire:
            proplet = host_proplets(core, "esp-spin")
            await online(core, "esp-spin")
            task = await core.create_task(TaskCreate(name="spin", file=module(wasm["spin"]), proplet_id="esp-spin"))
            await core.start_task(task.id)
            await eventually(lambda: core.active.get(task.id) is not None
                             and core.active[task.id].state is TaskState.RUNNING, timeout=10)
            await asyncio.sleep(0.3)  # well inside the endless loop
            stopped = await core.stop_task(task.id)
            assert stopped.state is TaskState.INTERRUPTED
            # The proplet really interrupted the loop: it reports the task and frees the slot.
            result = await wire.expect(t.RESULTS, lambda r: r["task_id"] == task.id, timeout=5)
            assert result["error"] == "stopped by request"
            await wire.expect(t.ALIVE, lambda a: a["proplet_id"] == "esp-spin" and "running" not in a, timeout=5)
            # The freed slot takes the next task.
            done = await run_task(core, "esp-spin", name="add", file=module(wasm["add"]), inputs=["1", "2"])
            assert done.results == "3", proplet.log


async def test_a_time_limit_interrupts_a_looping_task(manager_factory, host_proplets, wasm) -> None:
    async with manager_factory() as core:
        host_proplets(core, "esp-timeout")
        await online(core, "esp-timeout")
        done = await run_task(core, "esp-timeout", name="spin", file=module(wasm["spin"]),
                              limits=LimitsBody(timeout_s=0.5))
        assert done.state is TaskState.FAILED
        assert done.error == ("exceeded its time limit of 0.5 s; raise limits.timeout_s or make the export "
                              "finish sooner")


async def test_only_modules_signed_by_a_trusted_key_run(manager_factory, host_proplets, wasm, tmp_path) -> None:
    """PROPLET_TRUSTED_KEYS on the embedded proplet, as on the Python one (tests/security/test_trust.py)."""
    from core.signing import generate_keypair

    private, public = generate_keypair(tmp_path / "keys")
    _, other_public = generate_keypair(tmp_path / "other", "other")
    add, chunked = wasm["add"], wasm["chunked"]
    async with manager_factory(signing_key=private, inline_limit=1024, chunk_size=4096) as core:
        trusting = host_proplets(core, "esp-trusting", env={"PROPLET_TRUSTED_KEYS": str(public)})
        await online(core, "esp-trusting")
        assert "only modules signed by one of 1 trusted keys run" in trusting.log
        done = await run_task(core, "esp-trusting", name="add", file=module(add), inputs=["2", "40"])
        assert (done.state, done.results) == (TaskState.COMPLETED, "42"), (done.error, trusting.log)
        # Chunked delivery: the signed digest is checked before the chunks are asked for.
        assert len(chunked) > 1024
        done = await run_task(core, "esp-trusting", name="checksum", file=module(chunked))
        assert done.state is TaskState.COMPLETED, (done.error, trusting.log)

        foreign = host_proplets(core, "esp-foreign", env={"PROPLET_TRUSTED_KEYS": str(other_public)})
        await online(core, "esp-foreign")
        for name, data, inputs in (("add", add, ["2", "40"]), ("checksum", chunked, [])):
            refused = await run_task(core, "esp-foreign", name=name, file=module(data), inputs=inputs)
            assert refused.state is TaskState.FAILED
            assert refused.error.startswith(f"the signature of module {protocol.sha256_digest(data)} is not from "
                                            "a key this proplet trusts; check its trusted keys"), refused.error
            # Refused before anything ran or was fetched: the proplet never confirmed it as running
            # (the manager records a run only because a result came).
            running = [e.detail for e in await core.task_events(refused.id) if e.state is TaskState.RUNNING]
            assert running == ["running on esp-foreign (reported with its result)"], running
            assert f"task {refused.id} accepted" not in foreign.log
            assert f"task {refused.id} failed: the signature of module" in foreign.log
        assert "fetching its module" not in foreign.log

    async with manager_factory() as core:
        host_proplets(core, "esp-unsigned", env={"PROPLET_TRUSTED_KEYS": f" {public} :"})
        await online(core, "esp-unsigned")
        refused = await run_task(core, "esp-unsigned", name="add", file=module(add), inputs=["1", "2"])
        assert refused.state is TaskState.FAILED
        assert refused.error == (f"the module {protocol.sha256_digest(add)} is not signed, and this proplet only "
                                 "runs signed modules; configure MANAGER_SIGNING_KEY on the manager")


async def test_a_trusted_key_that_cannot_be_used_stops_the_proplet_at_start(host_proplets, tmp_path) -> None:
    from core.signing import generate_keypair

    private, public = generate_keypair(tmp_path / "keys")
    cases = {
        str(private): f"{private} is not an Ed25519 public key",
        f"{public}:{tmp_path / 'missing.pem'}": f"cannot read the trusted key {tmp_path / 'missing.pem'}: No such file",
    }
    for n, (paths, error) in enumerate(cases.items()):
        proplet = host_proplets(None, f"esp-badkey-{n}", "--broker", "mqtt://127.0.0.1:9", "--id", f"esp-badkey-{n}",
                                join=False, env={"PROPLET_TRUSTED_KEYS": paths})
        assert proplet.process is not None
        assert await asyncio.to_thread(proplet.process.wait, 10) == 2
        assert error in proplet.log
    # --trusted-keys wins over the environment, as command-line values do.
    proplet = host_proplets(None, "esp-badkey-flag", "--broker", "mqtt://127.0.0.1:9", "--id", "esp-badkey-flag",
                            "--trusted-keys", str(private), join=False, env={"PROPLET_TRUSTED_KEYS": str(public)})
    assert proplet.process is not None
    assert await asyncio.to_thread(proplet.process.wait, 10) == 2
    assert f"{private} is not an Ed25519 public key" in proplet.log


async def test_heartbeats_keep_the_proplet_online_with_its_metadata(manager_factory, host_proplets) -> None:
    async with manager_factory() as core:
        host_proplets(core, "esp-beat", "--slots", "3")
        p = await online(core, "esp-beat")
        await eventually(lambda: len(core.proplets["esp-beat"].alive_history) >= 3, timeout=10)
        meta = p.metadata
        assert meta["wasm_runtime"] == "wasmtime-c-api"
        assert meta["max_concurrent_tasks"] == 3
        assert meta["heartbeat_interval"] == 1
        assert meta["capabilities"] == ["task_state", "result_ack"]
        assert meta["proplet_version"] and meta["os"] == "linux" and meta["total_memory_bytes"] > 0
        assert p.namespace == "embedded"
        assert p.max_tasks == 3 and "task_state" in p.capabilities
        page = await eventually(lambda: core.proplet_metrics("esp-beat", 0, 10), timeout=10)
        assert page.items[0].memory_metrics["rss_bytes"] > 0


async def test_a_manager_started_after_the_proplet_learns_its_discovery(manager_factory, host_proplets,
                                                                        broker) -> None:
    """Before: the proplet announced itself on connect only, so a manager started after it (both
    started at boot) knew it from heartbeats: no metadata, and without its capabilities no result
    acknowledgements. Now the manager's request (control/manager/discover) brings the discovery."""
    tenant = unique("early")
    early = host_proplets(None, "esp-early", "--broker", broker.url, "--id", "esp-early", "--domain", tenant,
                          "--channel", "default", join=False)
    early.wait_for_log("connected to")
    async with manager_factory(tenant_id=tenant) as core:
        await online(core, "esp-early")
        meta = await eventually(lambda: core.proplets["esp-early"].metadata or None, timeout=5)
        assert meta["capabilities"] == ["task_state", "result_ack"], meta
        assert "task_state" in core.proplets["esp-early"].capabilities


async def test_a_killed_proplet_goes_offline_through_its_last_will(manager_factory, host_proplets) -> None:
    async with manager_factory(heartbeat_interval=30) as core:
        proplet = host_proplets(core, "esp-kill", "--heartbeat", "30")
        await online(core, "esp-kill")
        proplet.kill()
        # Well inside the 90 s liveness timeout: only the Last Will can explain it.
        await eventually(lambda: not core.proplets["esp-kill"].online, timeout=5)
        assert "Last Will" in core.proplets["esp-kill"].offline_reason


async def test_the_proplet_comes_back_after_a_broker_restart(manager_factory, host_proplets, own_broker, tmp_path,
                                                             wasm) -> None:
    """Reconnect and re-subscribe: after the broker restarts, tasks reach the proplet again."""

    tenant = unique("t")
    async with manager_factory(mqtt_address=own_broker.url, tenant_id=tenant) as core:
        proplet = host_proplets(None, "esp-reconnect", "--broker", own_broker.url, "--id", "esp-reconnect",
                                "--domain", tenant, "--channel", core.settings.channel_id, join=False)
        await online(core, "esp-reconnect")
        restarted_at = utcnow()
        own_broker.kill()
        own_broker.start()
        await eventually(lambda: "lost the connection" in proplet.log, timeout=10)
        await eventually(lambda: proplet.log.count("and subscribed") >= 2, timeout=20)
        # Heartbeats reach the manager again: both sides are back on the restarted broker.
        await eventually(lambda: core.proplets["esp-reconnect"].last_alive_at > restarted_at, timeout=20)
        done = await run_task(core, "esp-reconnect", name="add", file=module(wasm["add"]), inputs=["20", "22"])
        assert done.results == "42", proplet.log


async def test_a_result_finished_while_the_broker_was_down_arrives_once_it_is_back(
        manager_factory, host_proplets, own_broker, wasm) -> None:
    """A task that ends while the broker is unreachable still reports its result once it is back: the
    device keeps it unconfirmed and sends it again once, on the connect (paho, like the device's
    client, also buffers the first send). That it is not sent again on a timer while the broker is
    away is the C unit test does_not_resend_on_a_timer_while_disconnected."""

    tenant = unique("t")
    async with manager_factory(mqtt_address=own_broker.url, tenant_id=tenant) as core:
        proplet = host_proplets(None, "esp-outbox", "--broker", own_broker.url, "--id", "esp-outbox",
                                "--domain", tenant, "--channel", core.settings.channel_id, join=False)
        await online(core, "esp-outbox")
        # About 1.5-3 s of computation: time for the broker to go away before it ends.
        task = await core.create_task(TaskCreate(name="cpu", file=module(wasm["bench_cpu"]), inputs=["2147483647"],
                                                 proplet_id="esp-outbox"))
        await core.start_task(task.id)
        await eventually(lambda: core.active.get(task.id) is not None
                         and core.active[task.id].state is TaskState.RUNNING, timeout=10)
        own_broker.kill()
        await eventually(lambda: f"task {task.id} completed" in proplet.log, timeout=30)
        own_broker.start()
        done = await finished(core, task.id, timeout=30)
        assert (done.state, done.results) == (TaskState.COMPLETED, "1073741824"), (done.error, proplet.log)
        # The device logs the resend once it went out: the manager may have taken it in before that.
        resent_line = f"sent the result of task {task.id} again"
        await eventually(lambda: resent_line in proplet.log, timeout=5)
        await asyncio.sleep(1.0)  # a second resend on the same connect would be logged by now
        # Once on the connect; again only on the resend timer (5 s), when the manager, not yet
        # subscribed again on the restarted broker, missed that one.
        resent_at = [datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
                     for line in proplet.log.splitlines() if resent_line in line]
        gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(resent_at)]
        assert all(gap >= 4.5 for gap in gaps), proplet.log


async def test_results_are_acknowledged_by_the_manager_and_not_sent_again(manager_factory, host_proplets, wasm,
                                                                          broker) -> None:
    """The device announces `result_ack`; the manager confirms each stored result, so a result goes
    out once, while one the manager never confirms would go out again every 5 s."""
    async with manager_factory() as core:
        topics = Topics(core.settings.tenant_id, core.settings.channel_id)
        async with WireClient(broker.url, topics, subscribe=[t.RESULTS, t.RESULT_ACK]) as wire:
            proplet = host_proplets(core, "esp-ack")
            p = await online(core, "esp-ack")
            assert "result_ack" in p.capabilities
            done = await run_task(core, "esp-ack", name="add", file=module(wasm["add"]), inputs=["1", "2"])
            assert done.results == "3", proplet.log
            ack = await wire.expect(t.RESULT_ACK, lambda a: a["task_id"] == done.id)
            assert ack["proplet_id"] == "esp-ack"
            await asyncio.sleep(6)  # longer than the device's resend interval
            sent = [r for r in wire.messages(t.RESULTS) if r["task_id"] == done.id]
            assert len(sent) == 1, proplet.log


async def test_a_proplet_deleted_while_online_announces_itself_again_once_results_wait(
        manager_factory, host_proplets, wasm, broker) -> None:
    """Deleted while online, the device comes back by its heartbeats alone: the manager lacks its
    capabilities, so it never confirms its results. A result left unconfirmed for the resend period
    (5 s) makes the device send its discovery again before the result, and the manager confirms."""
    async with manager_factory() as core:
        topics = Topics(core.settings.tenant_id, core.settings.channel_id)
        async with WireClient(broker.url, topics, subscribe=[t.RESULT_ACK]) as wire:
            proplet = host_proplets(core, "esp-deleted")
            await online(core, "esp-deleted")
            done = await run_task(core, "esp-deleted", name="add", file=module(wasm["add"]), inputs=["1", "2"])
            await wire.expect(t.RESULT_ACK, lambda a: a["task_id"] == done.id)  # the device sees acks
            await core.delete_proplet("esp-deleted")
            p = await online(core, "esp-deleted", timeout=5)  # back by its next heartbeat
            assert "result_ack" not in p.capabilities
            done = await run_task(core, "esp-deleted", name="add", file=module(wasm["add"]), inputs=["40", "2"])
            assert done.results == "42", proplet.log
            await wire.expect(t.RESULT_ACK, lambda a: a["task_id"] == done.id, timeout=15)
            assert "result_ack" in core.proplets["esp-deleted"].capabilities
            assert proplet.log.count("announcing this proplet again") == 1, proplet.log
