"""A fleet of real processes for end-to-end and fault-injection tests.

Mosquitto, `propeller serve`, `propeller proplet` and `propeller proxy` run as separate processes,
each logging to its own file, so tests can kill, freeze and restart them and read what they did.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tests.services import Mosquitto, free_port, wait_port

PROPELLER = [sys.executable, "-m", "propeller"]
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_ASYNCIO_ERROR = re.compile(r"^\S+ \S+ (ERROR|CRITICAL)\s+asyncio: ")


@dataclass
class Fleet:
    workdir: Path
    broker: Mosquitto
    registry: Any = None  # tests.registry.DockerRegistry when the test has one
    domain: str = field(default_factory=lambda: f"fleet-{uuid.uuid4().hex[:6]}")
    api_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    manager_env: dict[str, str] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.log_path(name).open("ab")
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.workdir)
        self.procs[name] = proc
        return proc

    def start_manager(self, **extra: str) -> float:
        """Start `propeller serve`; return the seconds until its API answered."""
        env = {"MANAGER_MQTT_ADDRESS": self.broker.url, "MANAGER_TENANT_ID": self.domain,
               "MANAGER_ENTITY_ID": f"{self.domain}-manager", "MANAGER_HTTP_PORT": str(self.api_port),
               "MANAGER_SQLITE_PATH": str(self.workdir / "manager.db"), **self.manager_env, **extra}
        self.manager_env = {k: v for k, v in env.items() if k not in ("MANAGER_MQTT_ADDRESS",)}
        started = time.monotonic()
        self.spawn("manager", [*PROPELLER, "serve"], env)
        deadline = started + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.api + "/health", timeout=0.5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                time.sleep(0.01)
        raise AssertionError("the manager did not answer:\n" + self.logs())

    def start_proplet(self, name: str, **extra: str) -> None:
        self.spawn(name, [*PROPELLER, "proplet"], {
            "PROPLET_MQTT_ADDRESS": self.broker.url, "PROPLET_TENANT_ID": self.domain, "PROPLET_ENTITY_ID": name,
            "PROPLET_CACHE_DIR": str(self.workdir / name / "cache"), "PROPLET_STATE_DIR": str(self.workdir / name),
            "PROPLET_LIVELINESS_INTERVAL": "1s", "PROPLET_MQTT_KEEP_ALIVE": "5",
            # A test's teardown (stop_all) does not wait out the default 20 s for a task left running.
            "PROPLET_SHUTDOWN_GRACE": "2s",
            # Several proplets on one machine: only one could have :9092.
            "PROPLET_METRICS_ENABLED": "false", **extra})

    def start_proxy(self) -> None:
        self.spawn("proxy", [*PROPELLER, "proxy"], {
            "PROXY_MQTT_ADDRESS": self.broker.url, "PROXY_TENANT_ID": self.domain,
            "PROXY_ENTITY_ID": f"{self.domain}-proxy", "PROXY_REGISTRY_URL": self.registry.host})

    def start_http(self, root: Path) -> None:
        """A plain HTTP server for modules fetched by URL."""
        self.spawn("http", [sys.executable, "-m", "http.server", str(self.http_port), "--bind", "127.0.0.1",
                            "--directory", str(root)], {})
        wait_port(self.http_port)

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.workdir.glob("*.log")))

    def log_lines(self, name: str, pattern: str) -> list[tuple[datetime, str]]:
        """Timestamped lines of a process's log matching `pattern` (a regex)."""
        rx = re.compile(pattern)
        out = []
        for line in self.log_path(name).read_text(errors="replace").splitlines():
            m = _LOG_TIME.match(line)
            if m and rx.search(line):
                out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), line))
        return out

    def executions(self, proplets: list[str]) -> dict[str, int]:
        """How many times each task ran, counted from the proplets' logs."""
        counts: dict[str, int] = {}
        for name in proplets:
            for _, line in self.log_lines(name, r"running task "):
                task_id = line.split("running task ", 1)[1].split(" ", 1)[0]
                counts[task_id] = counts.get(task_id, 0) + 1
        return counts

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def assert_no_lost_exceptions(folder: Path) -> None:
    """Nothing that asyncio's default handler logged in the processes whose logs (*.log) are in
    `folder`: an exception raised in a callback or by a task nobody awaited reached no caller, a bug
    whatever the test saw (the in-process counterpart is tests.conftest.no_exception_lost_in_asyncio)."""
    lost = [f"{path.stem}: {line}" for path in sorted(folder.glob("*.log"))
            for line in path.read_text(errors="replace").splitlines() if _ASYNCIO_ERROR.match(line)]
    assert not lost, lost


def make_fleet(workdir: Path, *, persistence: bool = False) -> Fleet:
    broker = Mosquitto(workdir / "mosquitto", persistence=persistence)
    broker.start()
    return Fleet(workdir, broker)


__all__ = ["PROPELLER", "Fleet", "assert_no_lost_exceptions", "make_fleet", "wait_port"]
