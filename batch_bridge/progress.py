"""Progress reporting, passed into the core so that it never prints.

The CLI gives a reporter that writes to stderr (one line per step, a live line on a terminal);
tests and library callers get `Silent`, or collect events with `Recorder`.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def step(self, message: str) -> None:
        """A milestone: 'exported 50,000 rows into 1 batch (98.2 MB)'."""

    def tick(self, what: str, done: int, total: int | None = None) -> None:
        """A counter moving: rows exported, batches ended, results loaded."""


class Silent:
    def step(self, message: str) -> None:
        pass

    def tick(self, what: str, done: int, total: int | None = None) -> None:
        pass


class Recorder:
    """Keeps every event; useful in tests and for --json summaries."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.ticks: list[tuple[str, int, int | None]] = []

    def step(self, message: str) -> None:
        self.steps.append(message)

    def tick(self, what: str, done: int, total: int | None = None) -> None:
        self.ticks.append((what, done, total))
