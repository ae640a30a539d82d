"""The firmware view's link to propeller/firmware.py (build, flash, monitor, provision, ports).

No Textual here. `FirmwareJob` is what a running tool leaves for the view: output lines (bounded,
oldest dropped) and the last progress percentage parsed from them. The view renders it at the
console's cadence, so a build printing thousands of lines a second costs one Log write per frame.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from console.settings import FirmwareSettings


class FirmwareUnavailable(Exception):
    """propeller/firmware.py is missing or broken in this installation."""


def tools() -> Any:
    try:
        from propeller import firmware
    except Exception as exc:  # the module is optional; the view says what is missing
        raise FirmwareUnavailable(
            f"The firmware tools (propeller/firmware.py) cannot be loaded: {exc}. Reinstall Propeller with "
            "pip install -e '.[firmware]'.") from None
    return firmware


@dataclass(slots=True)
class FirmwareJob:
    name: str
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=5000))
    total_lines: int = 0
    progress: float | None = None
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    error: str = ""
    outcome: str = ""
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return self.finished_at is None

    def on_line(self, line: str, progress: float | None = None) -> None:
        self.lines.append(line)
        self.total_lines += 1
        if progress is not None:
            self.progress = progress

    def lines_since(self, total: int) -> list[str]:
        new = self.total_lines - total
        if new <= 0:
            return []
        return list(self.lines)[-min(new, len(self.lines)):]

    def finish(self, outcome: str = "", error: str = "") -> None:
        self.outcome = outcome
        self.error = error
        self.finished_at = time.monotonic()


class Firmware:
    """The operations the view offers, with the console's templates and timeouts applied."""

    def __init__(self, settings: FirmwareSettings) -> None:
        self.settings = settings

    def project(self) -> Any:
        fw = tools()
        directory = self.settings.project or fw.DEFAULT_FIRMWARE_DIR
        return fw.FirmwareProject(Path(directory), self.settings.env)

    async def ports(self) -> list[Any]:
        fw = tools()
        return await asyncio.to_thread(fw.list_ports)

    async def build(self, job: FirmwareJob) -> None:
        fw = tools()
        kwargs: dict[str, Any] = {"on_line": job.on_line, "timeout": self.settings.build_timeout}
        if self.settings.build:
            kwargs["template"] = self.settings.build
        project = self.project()
        job.on_line(f"$ build {project.env} in {project.directory}")
        # The registry probe does a DNS lookup and a connect: keep it off the event loop.
        await asyncio.to_thread(fw.check_can_build)
        await fw.build(project, **kwargs)
        job.progress = 100.0

    async def flash(self, job: FirmwareJob, port: str) -> None:
        fw = tools()
        kwargs: dict[str, Any] = {"on_line": job.on_line, "timeout": self.settings.flash_timeout,
                                  "baud": self.settings.baud}
        if self.settings.flash:
            kwargs["template"] = self.settings.flash
        job.on_line(f"$ flash {self.settings.env} to {port}")
        await fw.flash(self.project(), port, **kwargs)
        job.progress = 100.0

    def monitor(self, job: FirmwareJob, port: str) -> None:
        """Blocking: runs in a thread worker until job.stop is set."""
        fw = tools()
        job.on_line(f"$ monitor {port} (x stops)")
        for line in fw.monitor_lines(port, stop=job.stop):
            job.on_line(line)

    def provision(self, job: FirmwareJob, port: str, values: dict[str, str]) -> dict[str, str]:
        """Blocking: runs in a thread worker."""
        fw = tools()
        job.on_line(f"$ provision {port}")
        return dict(fw.provision(port, values, on_line=job.on_line))

    def error_types(self) -> tuple[type[BaseException], ...]:
        try:
            return (tools().FirmwareError, FirmwareUnavailable)
        except FirmwareUnavailable:
            return (FirmwareUnavailable,)
