"""The "Not finished" section of a reproduction's table: what is left of hours of runs, and about how long it needs."""

from __future__ import annotations

from typing import Any, Sequence


def unfinished_section(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown for :func:`lmedit.reproduce.unfinished_runs`' rows ("" when every run is finished).

    A started run shows its chunks written and its minutes of work, and the minutes left if it goes on at that
    rate; the total covers the started runs only (a run not started has no rate yet).
    """
    if not rows:
        return ""
    lines = ["| Run | chunks written | minutes of work so far | minutes left at that rate |", "|---|---|---|---|"]
    for row in rows:
        if row["state"] != "started":  # "not started", "failed" (tried by this reproduction), "unreadable" records
            lines.append(f"| {row['run']} | {row['state']} | — | — |")
            continue
        left = "—" if row["minutes_left"] is None else f"{row['minutes_left']:.1f}"
        lines.append(f"| {row['run']} | {row['chunks_done']} of {row['chunks'] or '?'} | {row['work_minutes']:.1f} "
                     f"| {left} |")
    started = [r for r in rows if r["state"] == "started"]
    hours = sum(r["minutes_left"] or 0.0 for r in started) / 60
    waiting = sum(r["state"] == "not started" for r in rows)
    return ("\n## Not finished\n\n" + "\n".join(lines)
            + f"\n\nAbout {hours:.1f} h of work left in the {len(started)} started run(s) (edits and scores, without "
            f"a pre-edit capture per session); {waiting} not started.\n")
