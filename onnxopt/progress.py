"""Progress of long work (calibration, validation, searches): bars on a terminal, plain lines in a log.

On an interactive terminal, rich bars that vanish when done. When stderr is a
file or a pipe (CI, ``nohup``, ``2> log``), bars would be lost or garble the log,
so a task writes a plain line instead, at most every :data:`LINE_SECONDS` and
when a task that took that long ends: a short run writes nothing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TaskID, TextColumn, TimeElapsedColumn

__all__ = ["Progress", "Task", "LINE_SECONDS"]

#: A task in plain-line mode writes at most one line per this many seconds.
LINE_SECONDS = 30.0


@dataclass
class Task:
    """One bar; ``advance`` after each step, ``close`` when done."""

    _owner: Progress
    _id: TaskID | None
    description: str = ""
    total: int | None = None
    done: int = 0
    _start: float = field(default_factory=time.monotonic)
    _last_line: float = field(default_factory=time.monotonic)
    _closed: bool = False

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self._id is not None and self._owner._bars is not None:
            self._owner._bars.advance(self._id, steps)
        elif self._owner.lines and not self._closed and time.monotonic() - self._last_line >= LINE_SECONDS:
            self._line("")

    def close(self) -> None:
        if self._id is not None and self._owner._bars is not None:
            self._owner._bars.remove_task(self._id)
            self._id = None
        elif self._owner.lines and not self._closed and time.monotonic() - self._start >= LINE_SECONDS:
            self._line(" done")
        self._closed = True

    def _line(self, end: str) -> None:
        now = time.monotonic()
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        print(f"onnxopt: {self.description}: {count}{end} ({_elapsed(now - self._start)})", file=sys.stderr, flush=True)
        self._last_line = now

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Progress:
    """Draws bars on stderr when enabled (an interactive terminal, unless ``--quiet``); with ``lines`` (and not
    enabled) writes a task's plain progress line now and then instead (stderr is a log)."""

    enabled: bool = field(default_factory=lambda: sys.stderr.isatty())
    lines: bool = False
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
            return Task(self, None, description, total)
        return Task(self, self._bars.add_task(description, total=total), description, total)

    def stop(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
