"""Progress bars for long work (rich), silent when asked to be.

On a terminal (or in a notebook) this is a rich bar. Redirected to a file (``nohup lmedit ... > run.log``), a rich bar
draws only its final state, so a run of hours would say nothing until it ends; there a plain line with the count,
the elapsed time and an estimate of the rest is written instead, at most once per ``interval`` seconds, and at the end.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOG_LINE_SECONDS = 60.0


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True,
                 console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar on stderr while the block runs (lines in a log file)."""
    if not enabled or total <= 0:
        yield lambda n=1: None
        return
    console = console or Console(stderr=True)
    if not (console.is_terminal or console.is_jupyter):
        lines = LogLineProgress(description, total, stream=console.file)
        yield lines.advance
        lines.finish()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False, console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


class LogLineProgress:
    """Progress as plain lines, for output that is not a terminal: one line when ``interval`` seconds have passed
    since the last one, and one at the end, so a log shows how far a long run is and when it should end."""

    def __init__(self, description: str, total: int, *, stream: TextIO, interval: float = LOG_LINE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.description, self.total, self.stream = description, total, stream
        self.interval, self.clock = interval, clock
        self.done = 0
        self.started = self.last_line = clock()
        self.finished = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.clock() - self.last_line >= self.interval:
            self._write()

    def finish(self) -> None:
        """The last line, once; not written when the block ended before any work was done."""
        if not self.finished and self.done > 0:
            self._write()
        self.finished = True

    def line(self) -> str:
        elapsed = self.clock() - self.started
        text = f"{self.description}: {self.done}/{self.total} ({100.0 * self.done / self.total:.1f}%) · {_clock(elapsed)} elapsed"
        if 0 < self.done < self.total:
            text += f" · eta {_clock(elapsed * (self.total - self.done) / self.done)}"
        return text

    def _write(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self.last_line = self.clock()


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(max(0.0, seconds))))
