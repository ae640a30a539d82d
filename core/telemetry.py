"""Prometheus metrics of one manager core (its own registry, so several cores can share a process)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)


class CoreMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.api_requests = Counter(
            "manager_api_request_count", "REST requests by route name.", ["method"], registry=r
        )
        self.api_latency = Histogram(
            "manager_api_request_latency_seconds", "REST request latency by route name.", ["method"],
            registry=r, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
        )
        self.messages_in = Counter(
            "manager_mqtt_messages_received_total", "MQTT messages received by topic.", ["topic"], registry=r
        )
        self.messages_rejected = Counter(
            "manager_mqtt_messages_rejected_total",
            "MQTT messages refused (malformed, unknown task, wrong proplet...).", ["topic", "reason"], registry=r,
        )
        self.tasks_dispatched = Counter("manager_tasks_dispatched_total", "Start messages published.", registry=r)
        self.tasks_finished = Counter(
            "manager_tasks_finished_total", "Tasks that reached a terminal state.", ["state"], registry=r
        )
        self.duplicate_results = Counter(
            "manager_duplicate_results_total", "Results for tasks that already had one (ignored).", registry=r
        )
        self.tasks_retried = Counter("manager_tasks_retried_total", "Tasks re-queued for another attempt.", registry=r)
        self.tasks_unsupported = Counter(
            "manager_tasks_unsupported_total",
            "Starts a proplet answered it cannot run (task_state unsupported): sent to another, or failed.", registry=r
        )
        self.starts_republished = Counter(
            "manager_starts_republished_total", "Starts sent again because no proplet confirmed them.", registry=r
        )
        self.proplets_online = Gauge("manager_proplets_online", "Proplets with a recent heartbeat.", registry=r)
        self.backlog = Gauge("manager_dispatch_backlog", "Tasks waiting for a proplet.", registry=r)
        self.broker_connected = Gauge("manager_broker_connected", "1 while connected to the broker.", registry=r)
        self.rejections: defaultdict[tuple[str, str], int] = defaultdict(int)
        # Counter children by topic: `labels()` costs a lock and a tuple per call, once per message.
        self._messages_in_by_topic: dict[str, Any] = {}
        self._reject_log_window = 0.0
        self._reject_logged = 0

    def message_in(self, topic: str) -> None:
        child = self._messages_in_by_topic.get(topic)
        if child is None:
            child = self._messages_in_by_topic[topic] = self.messages_in.labels(topic)
        child.inc()

    def reject(self, topic: str, reason: str, detail: str) -> None:
        """Count a refused message and log it, at most 20 warnings a minute (then debug)."""
        self.messages_rejected.labels(topic, reason).inc()
        self.rejections[(topic, reason)] += 1
        now = time.monotonic()
        if now - self._reject_log_window > 60:
            self._reject_log_window = now
            self._reject_logged = 0
        self._reject_logged += 1
        level = logging.WARNING if self._reject_logged <= 20 else logging.DEBUG
        log.log(level, "rejected a message on %s (%s): %s", topic, reason, detail)

    def watch_writer(self, writer: Any) -> None:
        """Export the store writer's figures (a `core.store.writer.StoreWriter`), read at each scrape."""
        self.registry.register(_WriterCollector(writer))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _WriterCollector:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def collect(self) -> Iterator[Any]:
        w = self.writer
        yield GaugeMetricFamily("manager_store_connected", "1 while the database takes writes, 0 during an outage.",
                                value=int(w.reachable and w.store.holds_manager_lock))
        yield GaugeMetricFamily("manager_store_write_backlog", "Writes queued and not yet committed.", value=w.backlog)
        yield CounterMetricFamily("manager_store_outages", "Times the database became unreachable.",
                                  value=w.stats.outages)
        yield CounterMetricFamily("manager_store_write_retries",
                                  "Batches tried again while the database was unreachable.", value=w.stats.retries)
        yield CounterMetricFamily("manager_store_writes_abandoned",
                                  "Awaited writes given up during an outage (their callers were told).",
                                  value=w.stats.abandoned)
        yield CounterMetricFamily("manager_store_write_failures", "Writes the database refused.",
                                  value=w.stats.failures)
