"""Progress bars for long work (calibration, validation, searches), silent when nobody watches."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TaskID, TextColumn, TimeElapsedColumn

__all__ = ["Progress", "Task"]


@dataclass
class Task:
    """One bar; ``advance`` after each step, ``close`` when done."""

    _owner: Progress
    _id: TaskID | None

    def advance(self, steps: int = 1) -> None:
        if self._id is not None and self._owner._bars is not None:
            self._owner._bars.advance(self._id, steps)

    def close(self) -> None:
        if self._id is not None and self._owner._bars is not None:
            self._owner._bars.remove_task(self._id)
            self._id = None

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Progress:
    """Draws bars on stderr when enabled (an interactive terminal, unless ``--quiet``)."""

    enabled: bool = field(default_factory=lambda: sys.stderr.isatty())
    _bars: RichProgress | None = None

    def __post_init__(self) -> None:
        if self.enabled:
            self._bars = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True,
            )
            self._bars.start()

    def task(self, description: str, total: int | None = None) -> Task:
        """Start a bar of ``total`` steps (unknown when None)."""
        if self._bars is None:
            return Task(self, None)
        return Task(self, self._bars.add_task(description, total=total))

    def stop(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
