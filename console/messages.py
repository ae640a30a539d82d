"""App-wide console messages: small, typed, past tense (STYLE rule 21). Widget-specific ones are nested
in their widget (`DispatchScreen.Dispatched`, `FirmwareScreen.JobEnded`)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass
class TaskDeletedHere(Message):
    """The operator deleted a task from the console: its detail screen, if open, closes."""

    task_id: str


@dataclass
class TaskInvokedHere(Message):
    """The operator called a latent task from the console: its detail screen, if open, shows the call."""

    task_id: str
    inputs: list[str]
    results: str
    seconds: float
