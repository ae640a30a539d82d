"""Prometheus metrics and a health check over HTTP, as upstream's proplet serves them on :9092.

`GET /metrics`: upstream's `proplet_*` metrics (same names and meanings) plus a few of ours;
`GET /health`: `{"status":"ok","running_tasks":N}` as upstream answers, plus ours. The figures are
read from the agent's counters when a scrape comes (`PropletCollector`), so a task costs nothing
more for being counted. prometheus_client serves it on a thread of its own (a server thread and one
per request): a scrape never waits for the event loop, nor the loop for a scrape. The reads it makes
of the agent's state are of single values, which the GIL keeps whole.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector

from proplet.process import cgroup_memory, rss_bytes

if TYPE_CHECKING:
    from proplet.agent import PropletAgent

log = logging.getLogger(__name__)

_CGROUP_MEMORY_HELP = {"container_usage_bytes": "Memory the proplet's cgroup uses (cgroup v2), bytes",
                       "container_limit_bytes": "Memory limit of the proplet's cgroup (cgroup v2; absent when "
                                                "unlimited), bytes"}


class PropletCollector(Collector):
    """The agent's figures as Prometheus metrics, read at each scrape."""

    def __init__(self, agent: PropletAgent) -> None:
        self.agent = agent
        # For the CPU ratio: the process's CPU time and the clock at the last scrape.
        self._cpu_sample = (_cpu_seconds(), time.monotonic())
        self._lock = threading.Lock()  # two scrapes at once share the sample

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        counters = agent.counters
        labels = ["proplet_id"]
        pid = [agent.id]

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, text, labels=labels)
            family.add_metric(pid, value)
            return family

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, text, labels=labels)
            family.add_metric(pid, value)
            return family

        held = list(agent.running.values())  # one C-level copy: the loop may change the dict meanwhile
        executing = sum(1 for r in held if r.executing)
        bus = agent.bus
        http = agent.http
        times = os.times()
        # Upstream's metrics, same names and meanings.
        yield counter("proplet_tasks_started", "Tasks started", counters.started)
        yield counter("proplet_tasks_completed", "Tasks completed", counters.completed)
        yield counter("proplet_tasks_failed", "Tasks failed", counters.failed)
        yield gauge("proplet_tasks_running", "Tasks running now", executing)
        yield counter("proplet_mqtt_reconnects", "Connections to the broker after the first",
                      max(0, bus.counters.connects - 1) if bus is not None else 0)
        yield counter("proplet_wasm_fetch_bytes", "Module bytes fetched over HTTP(S)",
                      http.fetched_bytes if http is not None else 0)
        yield gauge("proplet_cpu_usage_ratio", "CPU used since the previous scrape, in cores (1 = one core busy)",
                    self._cpu_ratio(times.user + times.system))
        # Gauges, as upstream's are: its names have no _total.
        yield gauge("proplet_cpu_user_seconds", "CPU time in user mode, seconds", times.user)
        yield gauge("proplet_cpu_system_seconds", "CPU time in the kernel, seconds", times.system)
        yield gauge("proplet_memory_rss_bytes", "Resident memory, bytes", rss_bytes())
        for key, value in cgroup_memory().items():
            yield gauge(f"proplet_memory_{key}", _CGROUP_MEMORY_HELP[key], value)
        # Ours.
        yield gauge("proplet_tasks_waiting", "Starts held for a free slot (or fetching their module)",
                    len(held) - executing)
        yield counter("proplet_tasks_given_back", "Unfinished tasks given back to the manager at shutdown",
                      counters.given_back)
        yield counter("proplet_duplicate_starts", "Starts of a task already running or run, not run again",
                      counters.duplicate_starts)
        yield counter("proplet_rejected_messages", "MQTT messages rejected as malformed", counters.rejected_messages)
        yield gauge("proplet_latent_tasks", "Latent tasks deployed here, waiting for invocations",
                    agent.latent_deployed)
        yield gauge("proplet_calls_in_flight", "Invocations of latent tasks running or waiting", agent.calls_in_flight)
        yield counter("proplet_tasks_unsupported", "Starts this proplet cannot run, answered so for another to run",
                      counters.unsupported)
        yield counter("proplet_calls_refused", "Invocations answered busy (too many in flight)", counters.calls_refused)
        yield gauge("proplet_results_unconfirmed", "Results kept until the manager confirms them",
                    len(agent.outbox))
        yield gauge("proplet_mqtt_connected", "1 while connected to the broker",
                    1 if bus is not None and bus.connected.is_set() else 0)
        yield gauge("proplet_draining", "1 while shutting down (finishing its tasks, taking no new one)",
                    1 if agent.draining else 0)

    def _cpu_ratio(self, cpu: float) -> float:
        now = time.monotonic()
        with self._lock:
            cpu0, t0 = self._cpu_sample
            self._cpu_sample = (cpu, now)
        return round((cpu - cpu0) / (now - t0), 4) if now > t0 else 0.0


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the proplet's log."""


class MetricsServer:
    """`/metrics` and `/health` on `host:port`, served on threads until close()."""

    def __init__(self, host: str, port: int, collectors: Iterable[Collector], health: Callable[[], dict[str, Any]]
                 ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            registry.register(collector)
        metrics = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            if environ.get("PATH_INFO") == "/health":
                start_response("200 OK", [("Content-Type", "application/json")])
                return [orjson.dumps(health())]
            return list(metrics(environ, start_response))

        self._server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)


def start_metrics_server(agent: PropletAgent) -> MetricsServer | None:
    """The agent's endpoint, or None (logged) when its port cannot be had: the proplet runs without it."""
    s = agent.settings

    def health() -> dict[str, Any]:
        bus = agent.bus
        return {"status": "ok", "running_tasks": len(agent.running), "proplet_id": agent.id,
                "mqtt_connected": bus is not None and bus.connected.is_set(), "draining": agent.draining}

    try:
        server = MetricsServer(s.metrics_host, s.metrics_port, [PropletCollector(agent)], health)
    except OSError as exc:
        log.warning("proplet %s serves no /metrics or /health: it cannot listen on %s:%d (%s). Set "
                    "PROPLET_METRICS_PORT to a free port, or PROPLET_METRICS_ENABLED=false.", agent.id,
                    s.metrics_host, s.metrics_port, exc.strerror or exc)
        return None
    log.info("proplet %s: metrics on http://%s:%d/metrics, health on /health", agent.id, s.metrics_host, server.port)
    return server
