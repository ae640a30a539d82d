"""Module delivery throughput, each figure next to a same-run baseline.

    .venv/bin/python benchmarks/bench_delivery.py [--size-mib 10] [--runs 7] [--qos 1]

1. Chunks over MQTT, verified: ChunkServer (the manager's blob server / the proxy's engine) →
   Mosquitto → ChunkSource → ModuleFetcher (sha256 checked against the expected digest), against
   a plain aiomqtt publisher/subscriber moving the same bytes raw in the same chunk size, QoS and
   publish window, through the same broker. Chunks go as our proplet asks for them (raw bytes
   after a JSON header line, on registry/server/binary) and as upstream's proxy sends them
   (base64 inside JSON). 1b repeats them with the server in a child process, as when the proxy or
   manager and the proplet run apart.
2. The OCI proxy end to end (docker-registry + OciProxy), cold (pulled from the registry) and warm
   (served from the proxy's cache), when docker-registry is installed.
3. HTTP: HttpSource (streams, caps, hashes) against a raw httpx download of the same file from the
   same local server, which runs in a process of its own as a web server would.
4. Where the chunk path's CPU goes: encode, decode (base64 inside JSON) and sha256 of the module.

Sections 1, 2 and 4 run in one process and one event loop, both ends included, like the in-process
manager and a proplet on one box; 1b and 3 put the server in a child process. A Mosquitto of its
own with set_tcp_nodelay. Prints figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from core import protocol
from core.chunks import Artifact, ChunkServer
from core.mqtt import MqttBus, MqttConnection, make_client, parse_broker_url
from core.topics import Topics
from proplet.sources import ChunkSource, HttpSource, ModuleFetcher, WasmRef
from tests.services import Mosquitto

MiB = 1024 * 1024


def conn(url: str, name: str, qos: int) -> MqttConnection:
    cid = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    return MqttConnection(parse_broker_url(url), cid, username=cid, qos=qos, timeout=30)


@contextlib.asynccontextmanager
async def running(bus: MqttBus) -> AsyncIterator[MqttBus]:
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(10)
        yield bus
    finally:
        await bus.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def timed(runs: int, once: Callable[[int], Awaitable[None]]) -> list[float]:
    await once(-1)  # warm-up: connections, caches, first-touch allocations
    times = []
    for i in range(runs):
        started = time.perf_counter()
        await once(i)
        times.append(time.perf_counter() - started)
    return times


def line(label: str, size: int, times: list[float], baseline: float | None = None) -> float:
    med = statistics.median(times)
    rate = size / med / 1e6
    extra = f"   {rate / baseline:.2f}x baseline" if baseline else ""
    print(f"  {label:<44} median {med * 1000:7.1f} ms  (min {min(times) * 1000:6.1f})  {rate:7.1f} MB/s{extra}")
    return rate


# ---- 1. chunks vs raw MQTT ---------------------------------------------------------------------


async def raw_mqtt(url: str, data: bytes, chunk_size: int, qos: int, window: int, runs: int) -> list[float]:
    """The same bytes, raw, same chunking/QoS/window: what the broker and aiomqtt can do."""
    topic = f"bench/{uuid.uuid4().hex[:8]}/raw"
    pieces = protocol.split_chunks(data, chunk_size)
    done: asyncio.Event = asyncio.Event()
    received = 0
    async with make_client(conn(url, "rawsub", qos)) as sub, \
            make_client(conn(url, "rawpub", qos), max_concurrent_outgoing_calls=window) as pub:
        await sub.subscribe(topic, qos=qos)

        async def reader() -> None:
            nonlocal received
            async for message in sub.messages:
                received += len(message.payload)  # type: ignore[arg-type]
                if received >= len(data):
                    done.set()

        task = asyncio.create_task(reader())
        slots = asyncio.Semaphore(window)

        async def one(piece: bytes) -> None:
            async with slots:
                await pub.publish(topic, piece, qos=qos)

        async def once(_: int) -> None:
            nonlocal received
            received = 0
            done.clear()
            await asyncio.gather(*(one(p) for p in pieces))
            await done.wait()

        try:
            return await timed(runs, once)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def chunk_receiver(source: Callable[[], ChunkSource | None]) -> Callable[[str, bytes], Awaitable[None]]:
    """Hands both chunk topics to a ChunkSource, as the agent does."""

    async def on_message(topic: str, payload: bytes) -> None:
        chunks = source()
        assert chunks is not None
        chunks.on_payload(payload, topic)

    return on_message


async def chunk_delivery(url: str, data: bytes, chunk_size: int, qos: int,
                         runs: int, binary: bool) -> list[float]:
    topics = Topics(f"bench-{uuid.uuid4().hex[:6]}", "default")
    digest = protocol.sha256_digest(data)
    source: ChunkSource | None = None
    server: ChunkServer | None = None

    async def to_server(topic: str, payload: bytes) -> None:
        assert server is not None
        server.submit(protocol.decode_registry_request(payload, topic))

    async def resolve(name: str) -> Artifact:
        return Artifact(data, digest)

    server_bus = MqttBus(conn(url, "server", qos), subscriptions=[topics.registry_request], on_message=to_server)
    proplet_bus = MqttBus(conn(url, "proplet", qos),
                          subscriptions=[topics.registry_chunk, topics.registry_chunk_binary],
                          on_message=chunk_receiver(lambda: source))
    server = ChunkServer(server_bus, topics.registry_chunk, resolve=resolve, accepts=lambda _: True,
                         chunk_size=chunk_size, binary_topic=topics.registry_chunk_binary)
    source = ChunkSource(proplet_bus.publish, topics.registry_request, binary=binary)
    fetcher = ModuleFetcher([source])
    async with running(server_bus), running(proplet_bus):
        serving = asyncio.create_task(server.run())

        async def once(i: int) -> None:
            # A new ref each time: nothing on the proplet side is reused between runs.
            got, got_digest = await fetcher.fetch(WasmRef(f"t{i}", image_url=f"bench/module-{i}:v1", digest=digest))
            assert got_digest == digest and len(got) == len(data)

        try:
            return await timed(runs, once)
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving


# ---- 1b. the same with the server in its own process (the real topology) ----------------------


async def child_server(url: str, domain: str, path: str, qos: int, chunk_size: int) -> None:
    """Runs in a child process: a ChunkServer for every ref, and raw binary pieces of the same
    module on `bench/raw` when asked for `raw:<n>`, both from the same connection."""
    data = Path(path).read_bytes()  # noqa: ASYNC240  (once, before anything else runs)
    digest = protocol.sha256_digest(data)
    topics = Topics(domain, "default")
    pieces = protocol.split_chunks(data, chunk_size)
    server: ChunkServer | None = None
    pending: set[asyncio.Task[None]] = set()

    async def publish_raw() -> None:
        slots = asyncio.Semaphore(8)

        async def one(piece: bytes) -> None:
            async with slots:
                await bus.publish(topics.topic("bench/raw"), piece)

        await asyncio.gather(*(one(p) for p in pieces))

    async def on_request(topic: str, payload: bytes) -> None:
        assert server is not None
        request = protocol.decode_registry_request(payload, topic)
        if request.app_name.startswith("raw:"):
            task = asyncio.create_task(publish_raw())
            pending.add(task)
            task.add_done_callback(pending.discard)
        else:
            server.submit(request)

    async def resolve(name: str) -> Artifact:
        return Artifact(data, digest)

    bus = MqttBus(conn(url, "child", qos), subscriptions=[topics.registry_request], on_message=on_request)
    server = ChunkServer(bus, topics.registry_chunk, resolve=resolve, accepts=lambda _: True, chunk_size=chunk_size,
                         binary_topic=topics.registry_chunk_binary)
    async with running(bus):
        print("ready", flush=True)
        await server.run()


async def cross_process(url: str, data: bytes, chunk_size: int, qos: int, runs: int,
                        workdir: Path) -> tuple[list[float], list[float], list[float]]:
    topics = Topics(f"bench-{uuid.uuid4().hex[:6]}", "default")
    module_file = workdir / "module.wasm"
    module_file.write_bytes(data)
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child-server", url, topics.domain, str(module_file), str(qos), str(chunk_size),
        stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        async with asyncio.timeout(20):
            assert (await child.stdout.readline()).strip() == b"ready"
        digest = protocol.sha256_digest(data)
        received = 0
        done = asyncio.Event()
        sources: dict[bool, ChunkSource] = {}
        to_source = chunk_receiver(lambda: sources[current])
        current = True

        async def on_message(topic: str, payload: bytes) -> None:
            nonlocal received
            if topic == raw_topic:
                received += len(payload)
                if received >= len(data):
                    done.set()
            else:
                await to_source(topic, payload)

        raw_topic = topics.topic("bench/raw")
        bus = MqttBus(conn(url, "proplet", qos),
                      subscriptions=[topics.registry_chunk, topics.registry_chunk_binary, raw_topic],
                      on_message=on_message)
        sources = {b: ChunkSource(bus.publish, topics.registry_request, binary=b) for b in (True, False)}
        async with running(bus):
            async def raw(i: int) -> None:
                nonlocal received
                received = 0
                done.clear()
                await bus.publish(topics.registry_request,
                                  protocol.encode_registry_request(protocol.RegistryRequest(f"raw:{i}")))
                await done.wait()

            async def chunks(i: int) -> None:
                fetcher = ModuleFetcher([sources[current]])
                got, _ = await fetcher.fetch(WasmRef(f"t{i}", image_url=f"bench/x-{current}-{i}:v1", digest=digest))
                assert len(got) == len(data)

            raw_times = await timed(runs, raw)
            binary_times = await timed(runs, chunks)
            current = False
            return raw_times, binary_times, await timed(runs, chunks)
    finally:
        child.terminate()
        await child.wait()


# ---- 2. the OCI proxy --------------------------------------------------------------------------


async def proxy_delivery(url: str, data: bytes, qos: int, runs: int, workdir: Path,
                         binary: bool) -> tuple[float, list[float]] | None:
    import shutil

    if shutil.which("docker-registry") is None:
        return None
    from proplet.proxy import OciProxy, ProxySettings
    from tests.registry import running_registry

    with running_registry(workdir / "registry") as registry:
        registry.push("bench/module", "v1", data)
        ref = registry.ref("bench/module", "v1")
        digest = protocol.sha256_digest(data)
        topics = Topics(f"bench-{uuid.uuid4().hex[:6]}", "default")
        settings = ProxySettings(mqtt_address=url, tenant_id=topics.domain, mqtt_qos=qos,
                                 entity_id=f"bench-proxy-{uuid.uuid4().hex[:6]}")
        source: ChunkSource | None = None
        proplet_bus = MqttBus(conn(url, "proplet", qos),
                              subscriptions=[topics.registry_chunk, topics.registry_chunk_binary],
                              on_message=chunk_receiver(lambda: source))
        source = ChunkSource(proplet_bus.publish, topics.registry_request, binary=binary)
        fetcher = ModuleFetcher([source])
        async with OciProxy(settings) as proxy, running(proplet_bus):
            await proxy.wait_connected(10)
            started = time.perf_counter()
            got, _ = await fetcher.fetch(WasmRef("cold", image_url=ref, digest=digest))
            cold = time.perf_counter() - started
            assert got == data

            async def once(i: int) -> None:
                await fetcher.fetch(WasmRef(f"t{i}", image_url=ref, digest=digest))

            return cold, await timed(runs, once)


# ---- 3. HTTP -----------------------------------------------------------------------------------


async def http_server(path: str) -> None:
    """Runs in a child process: serves the module over HTTP/1.1 keep-alive, as a web server or an
    object store does, on a process (and a GIL) of its own."""
    data = Path(path).read_bytes()  # noqa: ASYNC240  (once, before anything else runs)
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/wasm\r\nContent-Length: {len(data)}\r\n\r\n").encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                if not await reader.readline():
                    return
                while (await reader.readline()).strip():
                    pass
                writer.write(head)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return  # the client hung up, or the benchmark is closing the server
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


async def http_delivery(data: bytes, runs: int, workdir: Path) -> tuple[list[float], list[float]]:
    module = workdir / "module.wasm"
    module.write_bytes(data)
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--child-http", str(module), stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        port = int((await child.stdout.readline()).decode())
        url = f"http://127.0.0.1:{port}/module.wasm"
        async with httpx.AsyncClient() as raw_client:
            async def raw(_: int) -> None:
                response = await raw_client.get(url)
                assert len(response.content) == len(data)

            raw_times = await timed(runs, raw)
        async with HttpSource() as http:
            async def ours(_: int) -> None:
                got, _digest = await http.fetch_with_digest(WasmRef("t", image_url=url))
                assert len(got) == len(data)

            ours_times = await timed(runs, ours)
        return raw_times, ours_times
    finally:
        child.kill()
        await child.wait()


# ---- 4. CPU breakdown --------------------------------------------------------------------------


def cpu_breakdown(data: bytes, chunk_size: int) -> None:
    pieces = protocol.split_chunks(data, chunk_size)
    digest = protocol.sha256_digest(data)

    def clock(fn: Callable[[], object], reps: int = 5) -> float:
        best = float("inf")
        for _ in range(reps):
            started = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - started)
        return best

    messages = [protocol.ChunkMessage("bench/m:v1", i, len(pieces), p, digest=digest, size=len(data))
                for i, p in enumerate(pieces)]
    payloads = [protocol.encode_chunk(m) for m in messages]
    binary_payloads = [protocol.encode_binary_chunk(m) for m in messages]
    import base64
    import binascii

    import orjson

    texts = [orjson.loads(p)["data"] for p in payloads]
    rows = [
        ("encode_chunk (base64 + JSON), server side", clock(lambda: [protocol.encode_chunk(m) for m in messages])),
        ("decode_chunk (JSON + base64), proplet side", clock(lambda: [protocol.decode_chunk(p) for p in payloads])),
        ("  of which orjson.loads", clock(lambda: [orjson.loads(p) for p in payloads])),
        ("  of which base64.b64decode(validate=True)",
         clock(lambda: [base64.b64decode(t, validate=True) for t in texts])),
        ("  binascii.a2b_base64(strict_mode=True)",
         clock(lambda: [binascii.a2b_base64(t, strict_mode=True) for t in texts])),
        ("encode_binary_chunk (header + bytes)", clock(lambda: [protocol.encode_binary_chunk(m) for m in messages])),
        ("decode_binary_chunk", clock(lambda: [protocol.decode_binary_chunk(p) for p in binary_payloads])),
        ("sha256 of the module", clock(lambda: hashlib.sha256(data).digest())),
        ("b''.join of the chunks", clock(lambda: b"".join(pieces))),
    ]
    print(f"  (payload on the wire: {sum(map(len, payloads)) / MiB:.2f} MiB as JSON chunks, "
          f"{sum(map(len, binary_payloads)) / MiB:.2f} MiB as binary ones, for {len(data) / MiB:.2f} MiB of module)")
    for label, seconds in rows:
        print(f"  {label:<44} {seconds * 1000:7.1f} ms  {len(data) / seconds / 1e6:8.0f} MB/s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--qos", type=int, default=1, choices=[0, 1, 2])
    parser.add_argument("--chunk-size", type=int, default=protocol.UPSTREAM_CHUNK_SIZE)
    parser.add_argument("--child-server", nargs=5, metavar=("URL", "DOMAIN", "FILE", "QOS", "CHUNK"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--child-http", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_http:
        await http_server(args.child_http)
        return
    if args.child_server:
        url, domain, path, qos, chunk = args.child_server
        await child_server(url, domain, path, int(qos), int(chunk))
        return
    size = int(args.size_mib * MiB)
    data = b"\0asm\1\0\0\0" + os.urandom(size - 8)

    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            print(f"module {size / MiB:.1f} MiB, chunks of {args.chunk_size} bytes, QoS {args.qos}, "
                  f"{args.runs} runs (median), Mosquitto with TCP_NODELAY, one process")
            print("\n1. chunks over MQTT (verified) vs raw MQTT publish of the same bytes")
            raw = await raw_mqtt(broker.url, data, args.chunk_size, args.qos, 8, args.runs)
            base = line("raw aiomqtt pub -> sub (binary, window 8)", size, raw)
            for binary, label in ((True, "binary chunks"), (False, "JSON chunks (upstream's)")):
                times = await chunk_delivery(broker.url, data, args.chunk_size, args.qos, args.runs, binary)
                line(f"ChunkServer -> ChunkSource, {label}", size, times, base)

            print("\n1b. the same with the server in a process of its own (proxy or manager and proplet apart)")
            raw_x, binary_x, json_x = await cross_process(broker.url, data, args.chunk_size, args.qos, args.runs,
                                                          Path(tmp))
            base_x = line("raw binary pieces, child -> this process", size, raw_x)
            line("ChunkServer (child) -> ChunkSource, binary", size, binary_x, base_x)
            line("ChunkServer (child) -> ChunkSource, JSON", size, json_x, base_x)

            print("\n2. OCI proxy end to end (docker-registry -> OciProxy -> ChunkSource, verified)")
            for binary, label in ((True, "binary chunks"), (False, "JSON chunks")):
                proxy = await proxy_delivery(broker.url, data, args.qos, args.runs, Path(tmp), binary)
                if proxy is None:
                    print("  skipped: docker-registry is not installed (apt-get install docker-registry)")
                    break
                cold, warm = proxy
                line(f"cold (registry pull + {label})", size, [cold])
                line(f"warm (proxy cache + {label})", size, warm, base)
        finally:
            broker.stop()

    print("\n3. HTTP vs a raw httpx download of the same file from the same server (in its own process)")
    with tempfile.TemporaryDirectory(prefix="bench-delivery-http-") as tmp:
        raw_http, ours_http = await http_delivery(data, args.runs, Path(tmp))
    base_http = line("raw httpx AsyncClient.get", size, raw_http)
    line("HttpSource.fetch_with_digest (caps + sha256)", size, ours_http, base_http)

    print("\n4. CPU of the chunk path for this module (best of 5)")
    cpu_breakdown(data, args.chunk_size)


if __name__ == "__main__":
    asyncio.run(main())
