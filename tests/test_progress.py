"""Progress output: a rich bar on a terminal, plain timed lines in a log file."""

from __future__ import annotations

import io

from rich.console import Console

from lmedit.progress import LogLineProgress, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_are_written_once_per_interval_and_at_the_end() -> None:
    clock, stream = FakeClock(), io.StringIO()
    lines = LogLineProgress("MELO sequential", 1000, stream=stream, interval=60.0, clock=clock)
    for _ in range(59):
        clock.now += 1.0
        lines.advance()
    assert stream.getvalue() == ""  # 59 s: under the interval
    clock.now = 1000.0 + 200.0
    lines.advance(141)  # 200 edits in 200 s: 800 left, 800 s to go
    assert stream.getvalue() == "MELO sequential: 200/1000 (20.0%) · 0:03:20 elapsed · eta 0:13:20\n"
    clock.now += 30.0
    lines.advance(800)
    assert stream.getvalue().count("\n") == 1  # under a minute since the last line
    lines.finish()
    lines.finish()
    assert stream.getvalue().splitlines()[-1] == "MELO sequential: 1000/1000 (100.0%) · 0:03:50 elapsed"
    assert stream.getvalue().count("\n") == 2


def test_nothing_is_written_when_no_work_was_done() -> None:
    stream = io.StringIO()
    lines = LogLineProgress("edits", 10, stream=stream, clock=FakeClock())
    lines.finish()
    assert stream.getvalue() == ""


def test_progress_bar_writes_plain_lines_when_the_console_is_not_a_terminal() -> None:
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False, force_jupyter=False)
    with progress_bar("pre-edit evaluation", 3, console=console) as advance:
        for _ in range(3):
            advance(1)
    text = stream.getvalue()
    assert text.startswith("pre-edit evaluation: 3/3 (100.0%) · 0:00:00 elapsed")
    assert "\x1b[" not in text and "━" not in text  # no bar, no escape codes in a log


def test_progress_bar_draws_a_rich_bar_on_a_terminal() -> None:
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=100)
    with progress_bar("training", 2, console=console) as advance:
        advance(2)
    assert "━" in stream.getvalue() and "2/2" in stream.getvalue()


def test_a_disabled_bar_writes_nothing() -> None:
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False)
    with progress_bar("quiet", 5, enabled=False, console=console) as advance:
        advance(5)
    assert stream.getvalue() == ""
