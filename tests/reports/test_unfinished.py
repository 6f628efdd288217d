"""The "Not finished" section of a reproduction's table, by hand."""

from __future__ import annotations

from lmedit.reports.unfinished import unfinished_section


def _row(run, state, done=0, chunks=None, minutes=0.0, left=None):
    return {"run": run, "state": state, "chunks_done": done, "chunks": chunks, "work_minutes": minutes,
            "minutes_left": left}


def test_every_state_and_the_total_of_the_started_runs():
    text = unfinished_section([
        _row("WikiBio/MEMIT", "started", 6, 50, 14.94, 109.56),
        _row("WikiBio/WISE", "started", 3, None, 4.0),  # a folder whose plan was not recorded: no rate to extend
        _row("ZsRE/SERAC", "failed"),
        _row("ZsRE/MEND", "not started"),
    ])
    assert text.startswith("\n## Not finished\n\n| Run | chunks written |")
    assert "| WikiBio/MEMIT | 6 of 50 | 14.9 | 109.6 |" in text
    assert "| WikiBio/WISE | 3 of ? | 4.0 | — |" in text
    assert "| ZsRE/SERAC | failed | — | — |" in text and "| ZsRE/MEND | not started | — | — |" in text
    assert "About 1.8 h of work left in the 2 started run(s)" in text and "; 1 not started." in text


def test_nothing_unfinished_writes_nothing():
    assert unfinished_section([]) == ""
