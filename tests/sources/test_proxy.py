"""The OCI proxy end to end: docker-registry (pushed with oras) → OciProxy → Mosquitto → ChunkSource."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from core.lifecycle import cancel_and_wait
from core.topics import Topics
from propeller.oci import push_module
from proplet.proxy import OciProxy, ProxySettings, run_proxy
from proplet.sources import ChunkSource, FetchError, ModuleFetcher, WasmRef
from tests.conftest import unique
from tests.registry import DockerRegistry, running_registry
from tests.services import Mosquitto, free_port, need
from tests.sources.conftest import proplet_side
from tests.tls import non_loopback_address, self_signed
from tests.wasmfixtures import wasm

pytestmark = pytest.mark.timeout(120)


def module(size: int) -> bytes:
    return b"\0asm\1\0\0\0" + os.urandom(size - 8)


@asynccontextmanager
async def proxy_and_proplet(broker: Mosquitto, *, binary: bool = False,
                            **settings: Any) -> AsyncIterator[tuple[OciProxy, ChunkSource]]:
    topics = Topics(unique("t"), "default")
    values: dict[str, Any] = {"mqtt_address": broker.url, "tenant_id": topics.domain,
                              "entity_id": unique("proxy"), "mqtt_timeout": 5.0}
    values.update(settings)
    async with OciProxy(ProxySettings(**values)) as proxy, \
            proplet_side(broker.url, topics, stall_timeout=10, max_resumes=1, binary=binary) as source:
        await proxy.wait_connected(5)
        yield proxy, source


async def test_the_requested_tag_or_digest_is_served_not_latest(broker: Mosquitto, registry: DockerRegistry) -> None:
    repo = unique("wasm/app")
    v1, v2, latest = module(5_000), module(6_000), module(7_000)
    v1_manifest = registry.push(repo, "v1", v1)
    registry.push(repo, "v2", v2)
    registry.push(repo, "latest", latest)
    async with proxy_and_proplet(broker, chunk_size=1024) as (proxy, source):
        assert await source.fetch(WasmRef("a", image_url=registry.ref(repo, "v1"))) == v1
        assert await source.fetch(WasmRef("b", image_url=registry.ref(repo, "v2"))) == v2
        assert await source.fetch(WasmRef("c", image_url=registry.ref(repo, v1_manifest))) == v1
    # v1 by digest is the layer already pulled for v1 by tag.
    assert (proxy.counters.pulls, proxy.counters.cache_hits) == (2, 1)


async def test_a_moved_tag_is_noticed_after_the_tag_ttl(broker: Mosquitto, registry: DockerRegistry) -> None:
    repo = unique("wasm/app")
    first, second = module(3_000), module(3_000)
    registry.push(repo, "v1", first)
    async with proxy_and_proplet(broker, tag_ttl=0) as (proxy, source):
        assert await source.fetch(WasmRef("a", image_url=registry.ref(repo, "v1"))) == first
        # Served from the digest cache: the manifest is asked again, the layer is not pulled again.
        assert await source.fetch(WasmRef("b", image_url=registry.ref(repo, "v1"))) == first
        assert (proxy.counters.pulls, proxy.counters.cache_hits) == (1, 1)
        registry.push(repo, "v1", second)
        assert await source.fetch(WasmRef("c", image_url=registry.ref(repo, "v1"))) == second


async def test_an_unknown_tag_fails_at_once_with_the_reason(broker: Mosquitto, registry: DockerRegistry) -> None:
    repo = unique("wasm/app")
    registry.push(repo, "v1", module(1_000))
    ref = registry.ref(repo, "nope")
    async with proxy_and_proplet(broker) as (proxy, source):
        with pytest.raises(FetchError) as failure:
            # Well under the 10 s stall timeout: the answer is an error chunk, not silence.
            await asyncio.wait_for(source.fetch(WasmRef("a", image_url=ref)), 5)
    assert str(failure.value) == (
        f"OCI proxy (propeller proxy) cannot serve {ref}: {ref} does not exist in the registry at "
        f"{registry.host} (no manifest for 'nope'); check the image name and tag, or push it with propeller push")
    assert proxy.counters.errors == 1


async def test_an_unreachable_registry_fails_at_once(broker: Mosquitto) -> None:
    ref = f"127.0.0.1:{free_port()}/wasm/app:v1"
    async with proxy_and_proplet(broker) as (_, source):
        expected = r"cannot reach the registry at http://127\.0\.0\.1:\d+ \(connection refused\)"
        with pytest.raises(FetchError, match=expected):
            await asyncio.wait_for(source.fetch(WasmRef("a", image_url=ref)), 5)


async def test_not_a_reference_is_refused_with_the_expected_form(broker: Mosquitto) -> None:
    async with proxy_and_proplet(broker) as (_, source):
        with pytest.raises(FetchError, match="is not an OCI reference: write it without a scheme"):
            await asyncio.wait_for(source.fetch(WasmRef("a", image_url="ftp://x/y:1")), 5)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_a_10_mb_module_arrives_intact(broker: Mosquitto, registry: DockerRegistry, binary: bool) -> None:
    repo = unique("wasm/big")
    data = module(10 * 1024 * 1024)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.push(repo, "v1", data)
    async with proxy_and_proplet(broker, binary=binary) as (_, source):
        fetched, fetched_digest = await ModuleFetcher([source]).fetch(
            WasmRef("a", image_url=registry.ref(repo, "v1"), digest=digest))
    assert fetched_digest == digest and fetched == data
    assert source.counters.chunks == 21  # 512000-byte chunks, as upstream
    assert source.counters.binary_chunks == (21 if binary else 0)


async def test_the_wasm_layer_wins_over_a_larger_other_layer(broker: Mosquitto, registry: DockerRegistry,
                                                             tmp_path: Path) -> None:
    import oras.client

    repo = unique("wasm/two-layers")
    wasm, readme = module(2_000), os.urandom(20_000)
    (tmp_path / "app.wasm").write_bytes(wasm)
    (tmp_path / "README.bin").write_bytes(readme)
    oras.client.OrasClient(hostname=registry.host, insecure=True).push(
        target=f"{registry.host}/{repo}:v1", disable_path_validation=True, quiet=True,
        files=[f"{tmp_path / 'app.wasm'}:application/wasm", f"{tmp_path / 'README.bin'}:application/octet-stream"])
    async with proxy_and_proplet(broker) as (_, source):
        assert await source.fetch(WasmRef("a", image_url=registry.ref(repo, "v1"))) == wasm


async def test_an_oversized_layer_is_refused_before_it_is_pulled(broker: Mosquitto, registry: DockerRegistry) -> None:
    repo = unique("wasm/big")
    registry.push(repo, "v1", module(50_000))
    async with proxy_and_proplet(broker, max_artifact_bytes=10_000) as (proxy, source):
        with pytest.raises(FetchError, match=r"over the proxy's limit of 10000 bytes .*PROXY_MAX_ARTIFACT_BYTES"):
            await asyncio.wait_for(source.fetch(WasmRef("a", image_url=registry.ref(repo, "v1"))), 5)
    assert proxy.counters.pulls == 0


async def test_a_resume_request_listing_one_index_many_times_gets_it_once(broker: Mosquitto,
                                                                         registry: DockerRegistry) -> None:
    """A `missing` list is a set of indexes: one listing index 0 a thousand times (at 1024-byte chunks
    1,000 copies; at upstream's 512000 bytes it was 500 MB published for one request) gets it once."""
    from core import protocol
    from core.mqtt import make_client
    from core.protocol import RegistryRequest
    from tests.sources.conftest import connection

    repo = unique("wasm/app")
    registry.push(repo, "v1", module(2_000))
    ref = registry.ref(repo, "v1")
    async with proxy_and_proplet(broker, chunk_size=1024) as (proxy, _), \
            make_client(connection(broker.url, "asker")) as client:
        await client.subscribe(proxy.topics.registry_chunk, qos=1)
        await client.publish(proxy.topics.registry_request, protocol.encode_registry_request(
            RegistryRequest(ref, missing=(0,) * 1000)), qos=1)
        # Chunks of one publisher on one topic arrive in order: once the proxy has served the first
        # request, a second one for chunk 1 marks the end of whatever the first one sent.
        async with asyncio.timeout(30):
            while proxy.chunks is None or proxy.chunks.served < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await client.publish(proxy.topics.registry_request, protocol.encode_registry_request(
            RegistryRequest(ref, missing=(1,))), qos=1)
        indexes: list[int] = []
        async with asyncio.timeout(30):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                indexes.append(protocol.decode_chunk(message.payload).chunk_idx)
                if indexes[-1] == 1:
                    break
    assert indexes == [0, 1]


@asynccontextmanager
async def scripted_registry(blob: bytes, send_blob: Any,
                            send_manifest: Any = None) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A registry of one artifact (repository wasm/app, tag v1) on a real local HTTP server whose
    blob is sent by `send_blob(writer)` (and manifest by `send_manifest(writer, manifest)`, headers
    included, when given): for registries that misbehave as docker-registry never does. Yields the
    reference and an event set when the proxy hung up."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
                                      "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest()},
                           "layers": [{"mediaType": "application/wasm", "digest": digest,
                                       "size": len(blob)}]}).encode()
    hung_up = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                path = line.split()[1].decode()
                while (await reader.readline()).strip():
                    pass
                if path == "/v2/wasm/app/manifests/v1" and send_manifest is not None:
                    await send_manifest(writer, manifest)
                elif path == "/v2/wasm/app/manifests/v1":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(manifest) + manifest)
                elif path == f"/v2/wasm/app/blobs/{digest}":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(blob))
                    await send_blob(writer)
                else:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except ConnectionError:
            hung_up.set()
        except asyncio.CancelledError:
            pass  # the test's loop closing; left cancelled, asyncio 3.11's start_server callback raises
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}/wasm/app:v1", hung_up
    finally:
        server.close()


async def test_a_registry_dripping_the_layer_is_abandoned_at_the_pull_timeout(broker: Mosquitto) -> None:
    """requests' timeout bounds each read, not the pull: a registry sending a byte every 0.2 s never
    trips a 1 s read timeout, and a 2,000-byte layer took 400 s. The pull now ends at
    PROXY_PULL_TIMEOUT (within one read timeout), the proplet is answered with the reason, and the
    proxy hangs up on the registry."""
    blob = module(2_000)

    async def drip(writer: asyncio.StreamWriter) -> None:
        for i in range(len(blob)):
            writer.write(blob[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.2)

    async with scripted_registry(blob, drip) as (ref, hung_up), \
            proxy_and_proplet(broker, registry_timeout=1.0, pull_timeout=1.5) as (proxy, source):
        with pytest.raises(FetchError, match=r"took longer than 1\.5 s .*PROXY_PULL_TIMEOUT"):
            await asyncio.wait_for(source.fetch(WasmRef("a", image_url=ref)), 8)
        await asyncio.wait_for(hung_up.wait(), 5)
    assert proxy.counters.errors == 1


async def test_a_manifest_larger_than_a_registry_would_send_is_refused_while_it_streams(broker: Mosquitto) -> None:
    """A manifest was read whole, with no limit: a registry (any host a reference names) sending
    200 MB of manifest had it all held in the proxy's memory. Manifests are capped at 4 MiB, as
    distribution caps those it accepts, and the proxy hangs up once past it."""
    sent = 0

    async def huge(writer: asyncio.StreamWriter, manifest: bytes) -> None:
        nonlocal sent
        size = 3_000 * 65536
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (size + len(manifest)))
        piece = b" " * 65536  # JSON whitespace: the body stays a valid manifest
        while sent < size:
            writer.write(piece)
            sent += len(piece)
            await writer.drain()
        writer.write(manifest)

    blob = module(2_000)

    async def whole(writer: asyncio.StreamWriter) -> None:
        writer.write(blob)

    async with scripted_registry(blob, whole, huge) as (ref, hung_up), \
            proxy_and_proplet(broker) as (_, source):
        with pytest.raises(FetchError, match=r"manifest of .* is over the proxy's limit of 4194304 bytes"):
            await asyncio.wait_for(source.fetch(WasmRef("a", image_url=ref)), 8)
        await asyncio.wait_for(hung_up.wait(), 5)
    assert sent < 50_000_000


async def test_blob_refs_are_left_to_the_manager(broker: Mosquitto) -> None:
    async with proxy_and_proplet(broker) as (proxy, source):
        source.stall_timeout, source.max_resumes = 0.3, 0
        with pytest.raises(FetchError, match="is the manager running"):
            await source.fetch(WasmRef("a", image_url="blob:sha256:" + "0" * 64))
    assert proxy.counters.ignored == 1 and proxy.counters.errors == 0


async def test_a_registry_with_basic_auth(broker: Mosquitto, tmp_path: Path) -> None:
    with running_registry(tmp_path / "auth-registry", credentials=("alice", "s3cret")) as registry:
        data = module(2_000)
        registry.push("wasm/private", "v1", data)
        ref = registry.ref("wasm/private", "v1")
        async with proxy_and_proplet(broker) as (_, source):
            with pytest.raises(FetchError, match=r"requires credentials .* PROXY_AUTHENTICATE=true"):
                await asyncio.wait_for(source.fetch(WasmRef("a", image_url=ref)), 5)
        async with proxy_and_proplet(broker, authenticate=True, registry_url=registry.host,
                                     registry_username="alice", registry_password="wrong") as (_, source):
            with pytest.raises(FetchError, match="refused the proxy's credentials"):
                await asyncio.wait_for(source.fetch(WasmRef("a", image_url=ref)), 5)
        async with proxy_and_proplet(broker, authenticate=True, registry_url=registry.host,
                                     registry_username="alice", registry_password="s3cret") as (_, source):
            assert await source.fetch(WasmRef("a", image_url=ref)) == data
            # A reference without a registry host goes to PROXY_REGISTRY_URL.
            assert await source.fetch(WasmRef("b", image_url="wasm/private:v1")) == data


async def test_run_proxy_in_a_task_group_of_another_program(broker: Mosquitto, registry: DockerRegistry) -> None:
    repo = unique("wasm/app")
    data = module(4_000)
    registry.push(repo, "v1", data)
    topics = Topics(unique("t"), "default")
    settings = ProxySettings(mqtt_address=broker.url, tenant_id=topics.domain, entity_id=unique("proxy"))
    async with asyncio.TaskGroup() as group:
        proxy_task = group.create_task(run_proxy(settings))
        async with proplet_side(broker.url, topics) as source:
            # The request may go out before the proxy has subscribed; the stall resume covers that.
            source.stall_timeout = 0.5
            assert await source.fetch(WasmRef("a", image_url=registry.ref(repo, "v1"))) == data
        proxy_task.cancel()
    assert proxy_task.cancelled()


async def test_health_endpoint(broker: Mosquitto) -> None:
    async with proxy_and_proplet(broker, http_port=0) as (proxy, _):
        assert proxy.health_url is not None
        async with httpx.AsyncClient() as client:
            response = await client.get(proxy.health_url)
            assert response.json() == {"status": "ok", "service": "proxy", "mqtt": "connected"}
            assert (await client.get(proxy.health_url.replace("/health", "/nope"))).status_code == 404


async def test_a_stop_as_a_chunk_is_acknowledged_ends_every_loop(broker: Mosquitto) -> None:
    """The stop starts in the turn of the loop that reads the broker's PUBACK for the chunk just
    served, as in the CI runs where `propeller proxy` got its SIGTERM the moment the proplet had
    its answer. The chunk worker must still end: a cancel lost in that turn sent it back to its
    queue, where it waited until the stop gave up on it ("proxy-chunks did not stop within 10 s")."""
    topics = Topics(unique("t"), "default")
    settings = ProxySettings(mqtt_address=broker.url, tenant_id=topics.domain, entity_id=unique("proxy"),
                             mqtt_timeout=5.0)
    unreachable = f"127.0.0.1:{free_port()}/wasm/app:v1"
    async with proplet_side(broker.url, topics, stall_timeout=10) as source:
        async with OciProxy(settings) as proxy:
            await proxy.wait_connected(5)
            assert proxy.bus is not None
            loops = list(proxy._loops)
            paho = proxy.bus._client._client
            acknowledged = paho.on_publish

            def on_publish(*args: Any) -> None:
                acknowledged(*args)
                proxy.request_shutdown()  # what the SIGTERM handler of the command does

            paho.on_publish = on_publish
            fetch = asyncio.create_task(source.fetch(WasmRef("a", image_url=unreachable)))
            await proxy.wait_closed()
        try:
            assert [t.get_name() for t in loops if not t.done()] == []
        finally:
            await cancel_and_wait(loops, timeout=1, owner="test")
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)


# ---- settings and command ------------------------------------------------------------------


def test_settings_read_upstreams_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = ProxySettings()
    assert (defaults.tenant_id, defaults.channel_id, defaults.chunk_size) == ("propeller", "default", 512000)
    for var, value in {"PROXY_MQTT_ADDRESS": "tcp://broker:1884", "PROXY_TENANT_ID": "acme",
                       "PROXY_CHANNEL_ID": "edge", "PROXY_ENTITY_ID": "px", "PROXY_API_KEY": "k",
                       "PROXY_MQTT_QOS": "2", "PROXY_CHUNK_SIZE": "65536", "PROXY_REGISTRY_URL": "reg:5000",
                       "PROXY_AUTHENTICATE": "true", "PROXY_REGISTRY_USERNAME": "u",
                       "PROXY_REGISTRY_PASSWORD": "p", "PROXY_HTTP_PORT": "9191",
                       "PROXY_REGISTRY_INSECURE": "true"}.items():
        monkeypatch.setenv(var, value)
    s = ProxySettings()
    assert (s.mqtt_address, s.tenant_id, s.channel_id, s.entity_id, s.api_key, s.mqtt_qos, s.chunk_size) == (
        "tcp://broker:1884", "acme", "edge", "px", "k", 2, 65536)
    assert (s.registry_url, s.authenticate, s.registry_username, s.registry_password, s.http_port,
            s.registry_insecure) == ("reg:5000", True, "u", "p", 9191, True)


def test_settings_from_the_config_files_proxy_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("manager: {chunk_size: 4096}\nproxy: {chunk_size: 131072, tenant_id: from-file}\n")
    monkeypatch.setenv("PROPELLER_CONFIG", str(config))
    monkeypatch.setenv("PROXY_TENANT_ID", "from-env")
    s = ProxySettings()
    assert (s.chunk_size, s.tenant_id) == (131072, "from-env")


def test_credentials_without_a_registry_are_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="PROXY_AUTHENTICATE needs PROXY_REGISTRY_URL"):
        ProxySettings(authenticate=True, registry_token="t")


def test_a_ca_without_a_registry_or_that_is_no_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PROXY_REGISTRY_CA_CERT needs PROXY_REGISTRY_URL"):
        ProxySettings(registry_ca_cert=str(tmp_path))
    with pytest.raises(ValueError, match=r"PROXY_REGISTRY_CA_CERT names .*missing.pem, which is not a file"):
        ProxySettings(registry_url="registry.lan:5000", registry_ca_cert=str(tmp_path / "missing.pem"))


async def test_a_registry_whose_certificate_comes_from_a_private_ca(broker: Mosquitto, tmp_path: Path) -> None:
    address = non_loopback_address()  # a loopback registry is spoken to over plain HTTP
    need(address is not None, "a non-loopback IPv4 address", "run the tests on a machine with a network interface")
    assert address is not None
    cert, key = self_signed(tmp_path / "tls", address)
    with running_registry(tmp_path / "registry", address=address, tls=(cert, key)) as registry:
        data = wasm("add")
        push_module(data, "add.wasm", f"{registry.host}/wasm/private-ca:v1", ca_cert=str(cert))
        ref = registry.ref("wasm/private-ca", "v1")
        async with proxy_and_proplet(broker) as (_, source):
            with pytest.raises(FetchError, match=r"TLS with the registry at https://.* failed \(self-signed "
                                                 r"certificate\)\. If its certificate comes from a private CA, set "
                                                 r"PROXY_REGISTRY_URL to it and PROXY_REGISTRY_CA_CERT"):
                await asyncio.wait_for(source.fetch(WasmRef("a", image_url=ref)), 5)
        async with proxy_and_proplet(broker, registry_url=registry.host, registry_ca_cert=str(cert)) as (_, source):
            assert await source.fetch(WasmRef("a", image_url=ref)) == data


def test_the_command_documents_every_variable() -> None:
    from proplet.proxy_cli import proxy_command

    result = CliRunner().invoke(proxy_command, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in ProxySettings.model_fields:
        assert f"PROXY_{name.upper()}" in result.output


def test_propeller_has_the_proxy_command() -> None:
    from propeller.cli import main

    assert main.get_command(None, "proxy") is not None  # type: ignore[arg-type]


async def test_the_command_serves_until_sigterm(broker: Mosquitto, tmp_path: Path) -> None:
    """`propeller proxy` as a process: configured by PROXY_* variables, answers a request, and
    exits cleanly on SIGTERM."""
    import signal
    import subprocess
    import sys

    topics = Topics(unique("t"), "default")
    # PYTHONFAULTHANDLER: a proxy that does not exit is sent SIGABRT below, and prints every
    # thread's stack into the failure message.
    env = {**os.environ, "PROXY_MQTT_ADDRESS": broker.url, "PROXY_TENANT_ID": topics.domain,
           "PROXY_ENTITY_ID": unique("proxy"), "PROPELLER_CONFIG": str(tmp_path / "none.yaml"),
           "PYTHONFAULTHANDLER": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from propeller.cli import main; main()", "proxy", env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            while b"proxy ready" not in (line := await process.stdout.readline()):
                assert line, "the proxy exited before it was ready"
        # Read what it says from here on: a full pipe cannot block it, and a failure shows its log.
        output: list[bytes] = []

        async def drain() -> None:
            assert process.stdout is not None
            while line := await process.stdout.readline():
                output.append(line)

        reader = asyncio.create_task(drain())
        async with proplet_side(broker.url, topics, stall_timeout=10) as source:
            unreachable = f"127.0.0.1:{free_port()}/wasm/app:v1"
            with pytest.raises(FetchError, match="cannot reach the registry"):
                await asyncio.wait_for(source.fetch(WasmRef("a", image_url=unreachable)), 15)
        process.send_signal(signal.SIGTERM)
        try:
            # More than the proxy's own 10 s for its loops to stop, so a slow stop shows as the proxy's
            # own warning in the output rather than as this abort (a SIGTERM in the turn a chunk's PUBACK
            # was read once cost all 10 s: see the test above). A proxy that hangs still fails here.
            code = await asyncio.wait_for(process.wait(), 25)
        except TimeoutError:
            code = None
            process.send_signal(signal.SIGABRT)  # the stacks of its threads, into `output`
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, 5)
        assert code == 0, f"exit code {code} after SIGTERM; its output:\n" + b"".join(output).decode(errors="replace")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_manager_hosting_the_proxy_serves_oci_references_and_its_own_modules_on_one_connection(
        broker: Mosquitto, registry: DockerRegistry, manager_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from core.chunks import blob_ref
    from core.schemas import TaskCreate

    monkeypatch.setenv("PROXY_REGISTRY_URL", registry.host)  # the proxy's own variables, read by the manager
    repo = unique("wasm/hosted")
    oci_module, inline_module = module(3_000), module(700_000)
    registry.push(repo, "v1", oci_module)
    async with manager_factory(oci_proxy=True) as core:
        task = await core.create_task(TaskCreate(name="add", file=base64.b64encode(inline_module).decode()))
        async with proplet_side(broker.url, core.topics, stall_timeout=10, max_resumes=1, binary=True) as source:
            assert await source.fetch(WasmRef("a", image_url=f"{repo}:v1")) == oci_module  # via PROXY_REGISTRY_URL
            assert await source.fetch(WasmRef("b", image_url=blob_ref(task.wasm_digest))) == inline_module
        counters = core.oci_artifacts.counters
        assert (counters.requests, counters.pulls, counters.errors) == (1, 1, 0)
        api = httpx.AsyncClient(base_url=core.api_url)
        async with api:
            health = (await api.get("/health")).json()
        assert health["oci_proxy"] == {"requests": 1, "pulls": 1, "cache_hits": 0, "errors": 0}


async def test_invalid_proxy_settings_stop_a_manager_that_hosts_the_proxy(manager_factory: Any, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from core.errors import InvalidRequest

    monkeypatch.setenv("PROXY_REGISTRY_URL", "registry.lan:5000")
    monkeypatch.setenv("PROXY_REGISTRY_CA_CERT", str(tmp_path / "missing.pem"))
    with pytest.raises(InvalidRequest, match=r"MANAGER_OCI_PROXY: the proxy's settings are invalid: .*"
                                             r"PROXY_REGISTRY_CA_CERT names .*missing.pem, which is not a file"):
        async with manager_factory(oci_proxy=True):
            pass
    async with manager_factory() as core:  # not hosting it, the manager does not read them
        assert core.oci_artifacts is None
