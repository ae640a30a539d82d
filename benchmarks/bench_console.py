"""Console responsiveness under MQTT load: key press -> screen updated, and dispatch latency with the
console open against the same manager headless.

A separate process floods the manager's topics at 2,000 messages/s (heartbeats from 200 proplet ids, the
chatter of a large fleet); a synthetic proplet process (benchmarks/loadgen.py) records when each start
message arrives. Phases, each on a fresh manager and database, same broker, same flood:

- headless: the manager alone; dispatch latency (submit -> start on the wire at the proplet).
- console: the console hosting the manager in-process exactly as `propeller` does (the core on a
  thread and event loop of its own, console.hosting.CoreThread, the console's thread standing aside
  while the core has a start or a result in hand, console.hosting.StandAside; `--without-stand-aside`
  measures without that), on the MQTT traffic view (the busiest one). In the first console phase,
  keys are delivered the way a terminal delivers them (through the driver) and the time to the first
  frame that shows their effect is measured; the frames are fully rendered to terminal sequences (a
  driver that discards them instead of writing to a TTY). Then dispatch latency again, submitted on
  the core's loop as the REST API submits.

The two alternate for `--rounds` rounds (headless first in even rounds, the console first in odd
ones), so that a VM whose speed drifts during the run (they do, by tens of percent) weighs on both
alike: a p99 of one phase of 1,000 dispatches moved by 2x from run to run on its own. The dispatch
figures are pooled over the rounds, and each round's ratio is printed too.

Figures are printed next to each other; nothing is asserted (see tests/console for behaviour).

    .venv/bin/python benchmarks/bench_console.py [--rate 2000] [--keys 200] [--dispatches 1000] [--rounds 3]
                                                 [--without-stand-aside]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_dispatch import arrivals  # noqa: E402
from core.config import ManagerSettings  # noqa: E402
from core.schemas import TaskCreate  # noqa: E402
from core.service import ManagerCore  # noqa: E402
from tests.services import Mosquitto  # noqa: E402

WASM = base64.b64encode((ROOT / "examples" / "add.wasm").read_bytes()).decode()
DOMAIN = "bench"
PREFIX = f"m/{DOMAIN}/c/default/"


class GcPauses:
    """Garbage collections during a phase, by generation: they stop every thread, core included.

    Timed from gc's start callback to its stop callback: an upper bound, since another thread may
    take the GIL while the callbacks themselves run."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append((time.perf_counter() - self._started) * 1000)

    def summary(self) -> str:
        return "   ".join(f"gen {gen}: {len(p):,} (max {max(p, default=0):.1f} ms, total {sum(p):.0f} ms)"
                           for gen, p in self.pauses.items())


def progress(text: str) -> None:
    # The console redirects sys.stdout/stderr while it runs; the original stream still reaches the terminal.
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.__stderr__, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> str:
    return (f"p50 {pct(values, 0.5):7.2f} ms   p99 {pct(values, 0.99):7.2f} ms   max {max(values):7.2f} ms   "
            f"(n={len(values)}, mean {statistics.mean(values):.2f})")


# ------------------------------------------------------------------------------------------
# the flood, as its own process


def flood(port: int, rate: int, proplets: int) -> None:
    """Publish heartbeats of `proplets` ids at `rate` messages/s until stdin closes."""
    import socket
    import threading

    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-flood", clean_session=True)
    client.max_inflight_messages_set(10_000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port, keepalive=30)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    payloads = [json.dumps({"proplet_id": f"fleet-{i:03d}", "status": "alive", "namespace": "bench"}).encode()
                for i in range(proplets)]
    topic = PREFIX + "control/proplet/alive"
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    sent = 0
    started = time.monotonic()
    i = 0
    while not stop.is_set():
        for _ in range(per_tick):
            client.publish(topic, payloads[i % proplets], qos=1)
            i += 1
        sent += per_tick
        # Pace against the start, not the last tick, so the average rate holds.
        delay = started + sent / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - started}), flush=True)
    client.loop_stop()


def start_process(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "ready", line
    return proc


def stop_flood(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    result = json.loads(proc.stdout.readline())
    proc.wait(10)
    return dict(result)


# ------------------------------------------------------------------------------------------
# dispatch latency (as benchmarks/bench_dispatch.py measures it)


async def dispatch_latency(core: ManagerCore, proplet: subprocess.Popen[str], samples: int) -> list[float]:
    # Pinned: the flood's proplets are online too, but nobody answers for them.
    ids = [(await core.create_task(TaskCreate(name="add", file=WASM, proplet_id="bench-proplet"))).id
           for _ in range(samples + 20)]
    progress(f"created {len(ids)} tasks")
    await arrivals(proplet)
    progress("proplet answered")
    submitted: dict[str, int] = {}
    for n, tid in enumerate(ids):
        submitted[tid] = time.monotonic_ns()
        await core.start_task(tid)
        waited = time.monotonic()
        while core.active:
            await asyncio.sleep(0.0005)
            if time.monotonic() - waited > 10:
                stuck = [(t.id[:8], t.state.label, t.proplet_id, t.reason) for t in core.active.values()]
                progress(f"task {n} still active after 10 s: {stuck}")
                waited = time.monotonic()
        # Spread the submissions over the console's frame cadence.
        await asyncio.sleep(random.uniform(0.0, 0.02))
    progress("all dispatched")
    got = await arrivals(proplet)
    return [(got[tid] - submitted[tid]) / 1e6 for tid in ids[20:] if tid in got]


def manager_settings(broker: Mosquitto, tmp: Path, name: str) -> ManagerSettings:
    return ManagerSettings(mqtt_address=broker.url, tenant_id=DOMAIN, entity_id=f"bench-{name}",
                           sqlite_path=tmp / f"{name}.db", http_enabled=False, _env_file=None)


async def wait_for_proplet(core: ManagerCore, proplet_id: str) -> None:
    while proplet_id not in core.proplets or not core.proplets[proplet_id].online:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------
# the console phase


def null_driver_class() -> type:
    from textual.drivers.headless_driver import HeadlessDriver

    class RenderingNullDriver(HeadlessDriver):
        """Frames are rendered to terminal sequences as for a real terminal, then discarded."""

        written = 0

        @property
        def is_headless(self) -> bool:
            return False

        def write(self, data: str) -> None:
            RenderingNullDriver.written += len(data)

    return RenderingNullDriver


async def console_phase(manager: ManagerSettings, proplet: subprocess.Popen[str], keys: int,
                        dispatches: int) -> dict[str, Any]:
    from textual import events

    from console.app import ConsoleApp
    from console.settings import ConsoleSettings

    # As `propeller` does: the console hosts the core on its own thread.
    app = ConsoleApp(settings=ConsoleSettings(cursor_blink=False), manager_settings=manager, freeze_startup=True)
    driver_class = null_driver_class()
    app.driver_class = driver_class
    # The frame that shows a key's effect: the first one written (by the driver) after the effect
    # was applied, checked when the frame is written rather than by a poll that may wake late.
    waiting: dict[str, Any] = {}
    original_display = app._display

    def display(screen: Any, renderable: Any) -> None:
        original_display(screen, renderable)
        done = waiting.get("done")
        if renderable is not None and not app._batch_count and done is not None and done(screen):
            waiting["frame"] = time.perf_counter()
            waiting["done"] = None

    app._display = display  # type: ignore[method-assign]
    results: dict[str, Any] = {}

    async def send_and_wait(key: str, done: Any, timeout: float = 5.0) -> float:
        """`done(screen)`: the effect is visible in a frame of `screen`."""
        assert app._driver is not None
        waiting.clear()
        sent = waiting["sent"] = time.perf_counter()
        waiting["done"] = done
        app._driver.send_message(events.Key(key, key if len(key) == 1 else None))
        deadline = sent + timeout
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
            if "frame" in waiting:
                return (waiting["frame"] - sent) * 1000
        raise RuntimeError(f"no frame showed the effect of {key!r} within {timeout}s")

    async def drive() -> None:
        while not app.counts_loaded:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        link = app.manager
        assert link.threaded
        await link.on_core(wait_for_proplet, link.core, "bench-proplet")
        await asyncio.sleep(2.0)  # let the flood's proplets appear
        progress("console loaded; measuring key presses")
        # Warm-up: compose the views once.
        def shows_mode(mode: str) -> Any:
            # The view's screen, caught up with what arrived while it was hidden (not a stale frame).
            def shown(screen: Any) -> bool:
                return app.current_mode == mode and screen is app.screen and screen.flushed_at >= waiting["sent"]
            return shown

        for key, mode in (("3", "proplets"), ("2", "tasks"), ("4", "traffic")):
            await send_and_wait(key, shows_mode(mode))
        await asyncio.sleep(1.0)
        switch: list[float] = []
        pause: list[float] = []
        for i in range(keys):
            if i % 2 == 0:
                target = "tasks" if app.current_mode == "traffic" else "traffic"
                key = "2" if target == "tasks" else "4"
                switch.append(await send_and_wait(key, shows_mode(target)))
            else:
                await send_and_wait("4", shows_mode("traffic"))
                traffic = app.screen
                before = traffic.paused  # type: ignore[attr-defined]
                pause.append(await send_and_wait(
                    "p", lambda screen, traffic=traffic, before=before: screen is traffic and traffic.paused != before))
            await asyncio.sleep(random.uniform(0.05, 0.3))
        if getattr(app.screen, "paused", False):
            await send_and_wait("p", lambda screen: not screen.paused)
        results["switch"] = switch
        results["pause"] = pause
        progress("measuring dispatch latency with the console open")
        with GcPauses() as pauses:
            results["dispatch"] = await link.on_core(dispatch_latency, link.core, proplet, dispatches)
        results["gc"] = pauses
        results["traffic_seen"] = app.traffic.seq
        results["traffic_dropped"] = app.traffic.dropped
        results["events_dropped"] = app._event_sub.dropped
        results["proplets_shown"] = len(app.fleet.proplets)
        aside = app._core_thread.stand_aside if app._core_thread is not None else None
        results["stand_aside"] = (None if aside is None else
                                  (aside.signals, aside.waits, aside.waited_s, aside.skipped))
        app.exit()

    started = time.perf_counter()
    driver_task = asyncio.create_task(app.run_async(headless=False, size=(160, 45)))
    # run_async takes over only once started; drive from alongside it.
    while app._driver is None:
        if driver_task.done():
            driver_task.result()  # the hosted core failed to start: raise why
        await asyncio.sleep(0.01)
    try:
        await drive()
    finally:
        await driver_task
    results["seconds"] = time.perf_counter() - started
    results["bytes_written"] = driver_class.written
    return results


# ------------------------------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=2000, help="flood messages per second")
    parser.add_argument("--proplets", type=int, default=200, help="proplet ids the flood speaks for")
    parser.add_argument("--keys", type=int, default=200, help="key presses measured")
    parser.add_argument("--dispatches", type=int, default=1000, help="dispatch latency samples per phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of a headless and a console phase, alternated")
    parser.add_argument("--without-stand-aside", action="store_true",
                        help="the console's thread does not stand aside for the core (console.hosting.StandAside), "
                             "to measure what it changes")
    parser.add_argument("--flood", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        flood(args.port, args.rate, args.proplets)
        return
    if args.without_stand_aside:
        from console.hosting import StandAside

        StandAside.install = lambda self: False  # type: ignore[method-assign]

    headless: list[float] = []
    headless_gc = GcPauses()
    console: dict[str, Any] = {"switch": [], "pause": [], "dispatch": [], "gc": GcPauses()}
    rounds: list[tuple[list[float], list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broker = Mosquitto(tmp / "broker")
        broker.start()
        loadgen = str(ROOT / "benchmarks" / "loadgen.py")
        try:
            proplet = start_process(loadgen, "proplet", "--port", str(broker.port), "--domain", DOMAIN,
                                    "--id", "bench-proplet")
            flooder = start_process(__file__, "--flood", "--port", str(broker.port), "--rate", str(args.rate),
                                    "--proplets", str(args.proplets))
            try:
                for n in range(args.rounds):
                    phases: dict[str, list[float]] = {}
                    for phase in (("headless", "console") if n % 2 == 0 else ("console", "headless")):
                        if phase == "headless":
                            progress(f"round {n + 1}/{args.rounds}: headless manager")
                            async with ManagerCore(manager_settings(broker, tmp, f"headless-{n}")) as core:
                                await wait_for_proplet(core, "bench-proplet")
                                await asyncio.sleep(2.0)  # let the flood's proplets appear
                                with headless_gc:
                                    phases[phase] = await dispatch_latency(core, proplet, args.dispatches)
                            headless += phases[phase]
                        else:
                            progress(f"round {n + 1}/{args.rounds}: the console on the same load")
                            shown = await console_phase(manager_settings(broker, tmp, f"console-{n}"), proplet,
                                                        args.keys if n == 0 else 0, args.dispatches)
                            phases[phase] = shown["dispatch"]
                            for key in ("switch", "pause", "dispatch"):
                                console[key] += shown[key]
                            console.setdefault("stand_aside", []).append(shown["stand_aside"])
                            for gen, pauses in shown["gc"].pauses.items():
                                console["gc"].pauses[gen] += pauses
                            if n == 0:
                                console.update({k: v for k, v in shown.items() if k not in (
                                    "switch", "pause", "dispatch", "gc", "stand_aside")})
                    rounds.append((phases["headless"], phases["console"]))
            finally:
                sent = stop_flood(flooder)
                proplet.kill()
        finally:
            broker.stop()

    rate = sent["sent"] / sent["seconds"]
    print(f"flood: {rate:,.0f} messages/s achieved ({sent['sent']:,} heartbeats from {args.proplets} proplet ids, "
          f"QoS 1, separate process); target {args.rate:,}/s")
    print()
    print("key press -> first frame showing its effect (console on the MQTT traffic view, 160x45):")
    keys = console["switch"] + console["pause"]
    print(f"  all keys                    {summary(keys)}   target p99 <= 100 ms")
    print(f"  view switch (2 / 4)         {summary(console['switch'])}")
    print(f"  pause the stream (p)        {summary(console['pause'])}")
    print()
    print(f"dispatch latency, submit -> start on the wire at the proplet ({args.rounds} rounds, alternated):")
    h50, h99 = pct(headless, 0.5), pct(headless, 0.99)
    c50, c99 = pct(console["dispatch"], 0.5), pct(console["dispatch"], 0.99)
    print(f"  headless manager            {summary(headless)}")
    print(f"  console open                {summary(console['dispatch'])}")
    print(f"  console / headless          p50 {c50 / h50:.2f}x   p99 {c99 / h99:.2f}x   target <= 2x")
    for n, (alone, beside) in enumerate(rounds, 1):
        print(f"    round {n}: headless p99 {pct(alone, 0.99):6.2f} ms, console p99 {pct(beside, 0.99):6.2f} ms: "
              f"p50 {pct(beside, 0.5) / pct(alone, 0.5):.2f}x   p99 {pct(beside, 0.99) / pct(alone, 0.99):.2f}x")
    for n, aside in enumerate(console["stand_aside"], 1):
        if aside is None:
            print(f"    console phase {n}: the console's thread did not stand aside for the core (not installed)")
        else:
            signals, waits, waited, skipped = aside
            print(f"    console phase {n}: the console's thread stood aside for the core {waits:,} times "
                  f"({signals:,} signalled in a frame), {waited * 1000:.0f} ms in all; {skipped:,} left out "
                  "(its share of a window was spent)")
    print(f"  garbage collections while dispatching, headless: {headless_gc.summary()}")
    print(f"                                     console open: {console['gc'].summary()}")
    print()
    print(f"console (first round): {console['traffic_seen']:,} MQTT messages seen by the traffic view, "
          f"{console['traffic_dropped']:,} dropped by its bounded tap, {console['events_dropped']:,} core events "
          f"dropped; {console['proplets_shown']} proplets in the fleet view; "
          f"{console['bytes_written'] / 1e6:.1f} MB of terminal output rendered in {console['seconds']:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
