"""Local proplets: `propeller proplet` subprocesses pointed at the console's own manager.

No Textual here. `LocalFleet` launches processes from the configured command template, keeps the
last lines of each one's output (bounded, oldest dropped) and stops them: SIGTERM to the process
group, then SIGKILL after a grace period. The console stops them all when it exits; on Linux each
child also gets SIGTERM from the kernel if the console dies without doing so (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

STOP_GRACE = 5.0


class LaunchError(Exception):
    """A local proplet could not be started; the message says why and what to do."""


def _die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel to SIGTERM it when the console dies."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass(slots=True)
class LocalProplet:
    id: str
    argv: list[str]
    process: asyncio.subprocess.Process | None = None
    started_at: float = field(default_factory=time.monotonic)
    # Output lines, bounded: the oldest are dropped; `total_lines` keeps counting.
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=2000))
    total_lines: int = 0
    returncode: int | None = None
    stopping: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.returncode is None

    @property
    def status(self) -> str:
        if self.returncode is not None:
            return "stopped" if self.stopping else f"exited ({self.returncode})"
        return "stopping" if self.stopping else "running"

    def lines_since(self, total: int) -> list[str]:
        new = self.total_lines - total
        if new <= 0:
            return []
        return list(self.lines)[-min(new, len(self.lines)):]


def _host_slug() -> str:
    return re.sub(r"[^a-zA-Z0-9-]", "-", socket.gethostname())[:20].strip("-") or "host"


class LocalFleet:
    def __init__(self, *, command: str, env: dict[str, str], state_root: Path, max_lines: int = 2000,
                 id_prefix: str | None = None, on_output: Callable[[], None] | None = None) -> None:
        self.command = command
        self.env = env
        self.state_root = state_root
        self.max_lines = max_lines
        self.id_prefix = id_prefix or f"local-{_host_slug()}"
        self.on_output = on_output
        self.proplets: dict[str, LocalProplet] = {}
        self._readers: set[asyncio.Task[None]] = set()
        self._next = 1

    def _new_id(self) -> str:
        while True:
            candidate = f"{self.id_prefix}-{self._next}"
            self._next += 1
            existing = self.proplets.get(candidate)
            if existing is None or not existing.running:
                return candidate

    def render(self, proplet_id: str) -> list[str]:
        values = {
            "python": sys.executable, "id": proplet_id, "broker": self.env.get("PROPLET_MQTT_ADDRESS", ""),
            "tenant": self.env.get("PROPLET_TENANT_ID", ""), "channel": self.env.get("PROPLET_CHANNEL_ID", ""),
        }
        quoted = {k: shlex.quote(v) for k, v in values.items()}
        try:
            argv = shlex.split(self.command.format(**quoted))
        except (KeyError, IndexError, ValueError) as exc:
            raise LaunchError(
                f"The local proplet command {self.command!r} cannot be used ({exc}). Fix console.local_proplet_command "
                "in the config file; placeholders: {python}, {id}, {broker}, {tenant}, {channel}.") from None
        if not argv:
            raise LaunchError("console.local_proplet_command is empty; set it to e.g. '{python} -m propeller proplet'")
        return argv

    async def launch(self, count: int = 1) -> list[LocalProplet]:
        started = []
        for _ in range(count):
            started.append(await self._launch_one())
        return started

    async def _launch_one(self) -> LocalProplet:
        proplet_id = self._new_id()
        argv = self.render(proplet_id)
        state = self.state_root / proplet_id
        # Its shutdown grace within the console's STOP_GRACE, so that a stop drains it (unless
        # configured otherwise) rather than killing it with its tasks. No /metrics endpoint unless
        # configured: local proplets are several on one machine, and only one could have :9092.
        env = {"PROPLET_SHUTDOWN_GRACE": f"{STOP_GRACE - 2:g}", "PROPLET_METRICS_ENABLED": "false", **os.environ,
               **self.env,
               "PROPLET_ENTITY_ID": proplet_id, "PROPLET_STATE_DIR": str(state / "state"),
               "PROPLET_CACHE_DIR": str(state / "cache"),
               # Plain output: the console shows it in a log view, not a terminal.
               "NO_COLOR": "1", "TERM": "dumb"}
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        except FileNotFoundError:
            raise LaunchError(
                f"Cannot start a local proplet: {argv[0]} was not found. Check console.local_proplet_command "
                "in the config file.") from None
        except OSError as exc:
            raise LaunchError(f"Cannot start a local proplet with {argv[0]}: {exc}") from None
        proplet = LocalProplet(proplet_id, argv, process, lines=deque(maxlen=self.max_lines))
        self.proplets[proplet_id] = proplet
        reader = asyncio.ensure_future(self._read(proplet))
        reader.set_name(f"local-proplet-output {proplet_id}")
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        log.info("launched local proplet %s (pid %s): %s", proplet_id, process.pid, shlex.join(argv))
        return proplet

    async def _read(self, proplet: LocalProplet) -> None:
        assert proplet.process is not None and proplet.process.stdout is not None
        stream = proplet.process.stdout
        try:
            while True:
                raw = await stream.readline()
                if not raw:
                    break
                proplet.lines.append(raw.decode(errors="replace").rstrip())
                proplet.total_lines += 1
                if self.on_output is not None:
                    self.on_output()
        finally:
            proplet.returncode = await proplet.process.wait()
            proplet.lines.append(f"[{proplet.id} {proplet.status}]")
            proplet.total_lines += 1
            if self.on_output is not None:
                self.on_output()

    async def stop(self, proplet_id: str, grace: float = STOP_GRACE) -> None:
        proplet = self.proplets.get(proplet_id)
        if proplet is None or proplet.process is None or not proplet.running:
            return
        proplet.stopping = True
        process = proplet.process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await process.wait()
        except TimeoutError:
            log.warning("local proplet %s did not stop within %.0fs; killing it", proplet_id, grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        proplet.returncode = process.returncode

    async def stop_all(self, grace: float = STOP_GRACE) -> None:
        await asyncio.gather(*(self.stop(pid, grace) for pid in list(self.proplets)))
        # The readers end on EOF once the processes are gone.
        if self._readers:
            await asyncio.wait(list(self._readers), timeout=2)

    def forget_stopped(self) -> None:
        for proplet_id in [k for k, p in self.proplets.items() if not p.running]:
            del self.proplets[proplet_id]

    @property
    def running_count(self) -> int:
        return sum(1 for p in self.proplets.values() if p.running)
