"""Load generators for the benchmarks, run as separate processes.

`echo`: answers every request on a topic (the raw MQTT round-trip baseline).
`proplet`: a synthetic proplet that records when each start arrives and answers it at once.
Both use raw paho-mqtt with TCP_NODELAY: they must not be the bottleneck they measure.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time

import paho.mqtt.client as mqtt

PREFIX = "m/{domain}/c/{channel}/"


def _client(client_id: str, host: str, port: int) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.username_pw_set(client_id)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=30)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def echo(args: argparse.Namespace) -> None:
    client = _client("bench-echo", args.host, args.port)

    def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        c.publish(args.reply, msg.payload, qos=1)

    client.on_message = on_message
    client.subscribe(args.request, qos=1)
    print("ready", flush=True)
    client.loop_forever()


def proplet(args: argparse.Namespace) -> None:
    prefix = PREFIX.format(domain=args.domain, channel=args.channel)
    client = _client(args.id, args.host, args.port)
    arrivals: list[tuple[str, int]] = []
    lock = threading.Lock()

    def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic_ns()
        start = json.loads(msg.payload)
        if start.get("proplet_id") not in ("", None, args.id):
            return
        with lock:
            arrivals.append((start["id"], now))
        if not args.silent:
            c.publish(prefix + "control/proplet/results", json.dumps({
                "task_id": start["id"], "proplet_id": args.id, "results": "ok", "error": None,
                "attempt": start.get("attempt", 0)}), qos=1)

    client.on_message = on_message
    client.subscribe(prefix + "control/manager/start", qos=1)
    meta = {"os": "linux", "wasm_runtime": "synthetic", "heartbeat_interval": 5}
    client.publish(prefix + "control/proplet/create",
                   json.dumps({"proplet_id": args.id, "namespace": "bench", "metadata": meta}), qos=1)
    client.publish(prefix + "control/proplet/alive", json.dumps({"proplet_id": args.id, "status": "alive"}), qos=1)
    client.loop_start()
    print("ready", flush=True)

    def heartbeats() -> None:
        while True:
            time.sleep(5)
            client.publish(prefix + "control/proplet/alive",
                           json.dumps({"proplet_id": args.id, "status": "alive"}), qos=1)

    threading.Thread(target=heartbeats, daemon=True).start()
    # The parent asks for the arrival times by writing a line; we answer with JSON and go on.
    for _line in sys.stdin:
        with lock:
            batch, arrivals[:] = list(arrivals), []
        print(json.dumps(batch), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--request", required=True)
    e.add_argument("--reply", required=True)
    p = sub.add_parser("proplet")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--channel", default="default")
    p.add_argument("--id", required=True)
    p.add_argument("--silent", action="store_true")
    args = parser.parse_args()
    {"echo": echo, "proplet": proplet}[args.mode](args)


if __name__ == "__main__":
    main()
