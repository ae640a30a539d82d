"""Test clients that speak the wire protocol with a real MQTT connection.

`WireClient` publishes and collects raw JSON on chosen topics (conformance tests assert on the exact
bytes). `SyntheticProplet` acts like an upstream proplet: it announces itself, heartbeats and
answers every start addressed to it with a callback's result. Both get their MQTT client from the
project's one factory (core.mqtt.make_client), so TCP_NODELAY and identity are set as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import aiomqtt
import orjson

from core import topics as t
from core.mqtt import MqttConnection, make_client, parse_broker_url
from core.topics import Topics


class WireClient:
    def __init__(self, broker_url: str, topics: Topics, *, subscribe: list[str] | None = None,
                 client_id: str | None = None, will: aiomqtt.Will | None = None, qos: int = 1) -> None:
        self.topics = topics
        self.client_id = client_id or f"wire-{uuid.uuid4().hex[:8]}"
        self.qos = qos
        self._conn = MqttConnection(parse_broker_url(broker_url), self.client_id,
                                    username=self.client_id, qos=qos, keepalive=5)
        self._will = will
        self._subscribe = subscribe or []
        self.received: defaultdict[str, list[bytes]] = defaultdict(list)
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self.client: aiomqtt.Client | None = None

    async def __aenter__(self) -> WireClient:
        self.client = make_client(self._conn, will=self._will)
        await self.client.__aenter__()
        if self._subscribe:
            await self.client.subscribe([(self.topics.topic(s), self.qos) for s in self._subscribe])
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        if self.client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        assert self.client is not None
        async for message in self.client.messages:
            suffix = self.topics.suffix(message.topic.value) or message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else b""
            async with self._arrived:
                self.received[suffix].append(payload)
                self._arrived.notify_all()
            await self.on_message(suffix, payload)

    async def on_message(self, suffix: str, payload: bytes) -> None:
        """Subclasses react to messages here."""

    async def publish(self, suffix: str, body: dict[str, Any] | bytes, *, raw_topic: bool = False) -> None:
        assert self.client is not None
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        await self.client.publish(suffix if raw_topic else self.topics.topic(suffix), payload, qos=self.qos)

    async def expect(self, suffix: str, where: Callable[[dict[str, Any]], bool] | None = None,
                     timeout: float = 5.0) -> dict[str, Any]:
        """The first (JSON) message on `suffix` matching `where`, waiting up to `timeout`."""
        seen = 0

        def match() -> dict[str, Any] | None:
            nonlocal seen
            items = self.received.get(suffix, [])
            for raw in items[seen:]:
                obj = orjson.loads(raw)
                if where is None or where(obj):
                    return obj
            seen = len(items)
            return None

        async with asyncio.timeout(timeout), self._arrived:
            while (found := match()) is None:
                await self._arrived.wait()
            return found

    def messages(self, suffix: str) -> list[dict[str, Any]]:
        return [orjson.loads(raw) for raw in self.received.get(suffix, [])]


Answer = Callable[[dict[str, Any]], tuple[Any, str | None]]


def add_inputs(start: dict[str, Any]) -> tuple[Any, str | None]:
    return str(sum(int(x) for x in start.get("inputs", []))), None


class SyntheticProplet(WireClient):
    """A proplet that answers starts without running wasm (the manager tests' stand-in)."""

    def __init__(self, broker_url: str, topics: Topics, proplet_id: str | None = None, *,
                 answer: Answer | None = add_inputs, metadata: dict[str, Any] | None = None,
                 heartbeat: float | None = None, last_will: bool = True, delay: float = 0.0) -> None:
        self.proplet_id = proplet_id or f"proplet-{uuid.uuid4().hex[:8]}"
        will = aiomqtt.Will(topics.alive, orjson.dumps({"status": "offline", "proplet_id": self.proplet_id,
                                                        "namespace": "default"}), qos=1) if last_will else None
        super().__init__(broker_url, topics, subscribe=[t.START, t.STOP, t.INVOKE, t.RESULT_ACK],
                         client_id=self.proplet_id, will=will)
        self.answer = answer
        self.metadata = metadata or {"os": "linux", "cpu_arch": "x86_64", "wasm_runtime": "synthetic"}
        self.heartbeat = heartbeat
        self.delay = delay
        self.starts: list[dict[str, Any]] = []
        self._beat: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> SyntheticProplet:
        await super().__aenter__()
        await self.announce()
        if self.heartbeat:
            self._beat = asyncio.create_task(self._beats())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._beat is not None:
            self._beat.cancel()
        for job in self._jobs:
            job.cancel()
        # A clean exit says goodbye, as the real proplet does; the Last Will covers crashes only.
        with contextlib.suppress(aiomqtt.MqttError):
            await self.publish(t.ALIVE, {"proplet_id": self.proplet_id, "status": "offline",
                                         "namespace": "default"})
        await super().__aexit__(*exc)

    async def announce(self) -> None:
        await self.publish(t.CREATE, {"proplet_id": self.proplet_id, "namespace": "default",
                                      "metadata": self.metadata})
        await self.alive()

    async def alive(self) -> None:
        await self.publish(t.ALIVE, {"proplet_id": self.proplet_id, "status": "alive", "namespace": "default"})

    async def _beats(self) -> None:
        assert self.heartbeat
        while True:
            await asyncio.sleep(self.heartbeat)
            with contextlib.suppress(aiomqtt.MqttError):
                await self.alive()

    async def on_message(self, suffix: str, payload: bytes) -> None:
        if suffix != t.START:
            return
        start = orjson.loads(payload)
        if start.get("proplet_id") not in ("", None, self.proplet_id) and not start.get("broadcast"):
            return
        self.starts.append(start)
        if self.answer is None:
            return
        job = asyncio.create_task(self._reply(start))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _reply(self, start: dict[str, Any]) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        assert self.answer is not None
        results, error = self.answer(start)
        body = {"task_id": start["id"], "proplet_id": self.proplet_id, "results": results, "error": error}
        with contextlib.suppress(aiomqtt.MqttError):
            await self.publish(t.RESULTS, body)


async def eventually(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; fail with its last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)


async def start_synthetic_process(broker_url: str, domain: str, proplet_id: str, *,
                                  heartbeat: float | None = None) -> subprocess.Popen[bytes]:
    """A silent synthetic proplet in a process of its own (`main` below), for tests that kill it."""
    args = [sys.executable, "-m", "tests.wire", "--broker", broker_url, "--domain", domain, "--id", proplet_id,
            "--silent"]
    if heartbeat is not None:
        args += ["--heartbeat", str(heartbeat)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE)  # noqa: ASYNC220 - once; then its "ready" line is awaited
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    assert line.strip() == b"ready", line
    return proc


def main() -> None:
    """Run a synthetic proplet as its own process (tests kill it with SIGKILL; benchmarks load it)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--channel", default="default")
    parser.add_argument("--id", required=True)
    parser.add_argument("--silent", action="store_true", help="never answer starts")
    parser.add_argument("--heartbeat", type=float, default=None)
    args = parser.parse_args()

    async def run() -> None:
        async with SyntheticProplet(args.broker, Topics(args.domain, args.channel), args.id,
                                    answer=None if args.silent else add_inputs, heartbeat=args.heartbeat):
            print("ready", flush=True)
            await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
