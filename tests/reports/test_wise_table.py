"""The WISE Table 2 layout from run folders: rows, layout detection, cost along the chunk, `lmedit report`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmedit.cli import app
from lmedit.reports import ReportError, get_layout, load_run
from lmedit.reports.wise_table import WiseTable, cost_along_chunk, cost_table

runner = CliRunner()


def _write_run(root, method, T, mode="teacher", rel=0.9, pre=0.1, n=4, complete=True, rephrase=True):
    """A finished run folder as `lmedit reproduce wise-table` writes it (only what the table reads)."""
    folder = root / f"{method}-T{T}"
    folder.mkdir(parents=True)
    config = {"method": method, "model": "tiny", "protocol": "sequential", "T": T, "data": "/d/zsre.json",
              "offset": 0, "limit": n, "eval": {"mode": mode}, "extra": {"reproduce": "wise-table"}}
    post = {"rewrite_acc": rel, "locality": 0.5, "rewrite_ppl": 3.0}
    before = {"rewrite_acc": pre, "rewrite_ppl": 9.0}
    if rephrase:
        post["rephrase_acc"], before["rephrase_acc"] = rel / 2, pre
    if mode == "both":
        post.update(rewrite_gen_acc=rel / 3, rephrase_gen_acc=0.1, locality_gen=0.2)
    summary = {"n": n, "complete": complete, "pre": before,
               "post": post, "timing": {"edit_seconds_per_request": 1.5}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def reproduction(tmp_path):
    root = tmp_path / "wise-table"
    for T in (1, 10):  # written in name order, as a shell glob passes them; the table is in the paper's order
        _write_run(root, "GRACE", T, mode="both")
        _write_run(root, "FT-M", T, rel=0.5, complete=T == 1)
    (root / "held_out.json").write_text("{}")  # a reproduction's other files are not runs
    return root


def test_report_prints_the_paper_layout_from_run_folders(reproduction):
    result = runner.invoke(app, ["report", "--layout", "wise-table", *map(str, sorted(reproduction.glob("*-T*")))])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == ("| Method | T=1 Rel. | T=1 Gen. | T=1 Loc. | T=1 Avg. | T=10 Rel. | T=10 Gen. | T=10 Loc. "
                        "| T=10 Avg. |")
    assert [line.split(" | ")[0] for line in lines[2:6]] == ["| unedited", "| FT-M", "| GRACE", "| GRACE (gen)"]
    assert lines[3].startswith("| FT-M | 0.50 | 0.25 | 0.50 | 0.42 | 0.50* |")  # T=10 unfinished: starred
    # no locality before editing; at T=10 the pre-edit scores come from FT-M's unfinished run, so they are starred too
    assert lines[2] == "| unedited | 0.10 | 0.10 | — | — | 0.10* | 0.10* | —* | —* |"
    assert "| GRACE | 1.5 | 1.5 |" in result.output  # seconds per edit
    assert "tiny, sequential protocol, data zsre.json (offset 0, limit 4)" in result.output
    parent = runner.invoke(app, ["report", "--layout", "wise-table", str(reproduction)])  # the folder of the runs
    assert parent.exit_code == 0 and parent.output == result.output


def test_rows_round_trip_through_json_and_draw_the_plot(reproduction, tmp_path):
    out = tmp_path / "report" / "table"
    result = runner.invoke(app, ["report", "--layout", "wise-table", str(reproduction), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["row"] for r in rows] == ["unedited", "FT-M", "GRACE", "GRACE (gen)"]
    assert rows[2]["cells"]["10"]["Rel."] == 0.9 and rows[3]["seconds_per_edit"] == {"1": 1.5, "10": 1.5}
    assert get_layout("wise-table").table(rows) == out.with_suffix(".md").read_text() == result.output
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_passages_without_rephrasings_get_the_hallucination_layout(tmp_path):
    runs = [load_run(_write_run(tmp_path, "WISE", 1, rephrase=False))]
    rows = get_layout("wise-table").rows(runs)
    assert rows[1]["layout"] == "hallucination" and rows[1]["cells"]["1"]["Rel. (PPL)"] == 3.0
    assert get_layout("wise-table").table(rows).startswith("| Method | T=1 Rel. (PPL) | T=1 Loc. |\n")


def test_runs_the_table_cannot_hold_are_named(tmp_path):
    single = _write_run(tmp_path / "a", "ROME", 1)
    config = json.loads((single / "config.json").read_text())
    (single / "config.json").write_text(json.dumps({**config, "T": None, "protocol": "single"}))
    with pytest.raises(ReportError, match="has no T .*--protocol sequential"):
        get_layout("wise-table").rows([load_run(single)])
    twice = [load_run(_write_run(tmp_path / d, "FT-M", 1)) for d in ("b", "c")]
    with pytest.raises(ReportError, match="more than one run of FT-M at T=1"):
        get_layout("wise-table").rows(twice)
    result = runner.invoke(app, ["report", "--layout", "wise-table", str(single)])
    assert result.exit_code == 2 and "has no T" in " ".join(result.output.split())


def test_cost_along_the_chunk_is_read_per_position_and_binned(tmp_path):
    table = WiseTable(layout="zsre", methods=("FT-M", "GRACE"), Ts=(1, 8))
    folder = tmp_path / "GRACE-T8"
    folder.mkdir()
    # one chunk of 8 edits, each slower than the one before: 1, 2, ..., 8 seconds
    records = [{"index": i, "chunk": 0, "step_seconds": float(i + 1), "edit_seconds": 4.5} for i in range(8)]
    (folder / "results.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    grace = {"folder": str(folder), "config": {"method": "GRACE", "T": 8}, "summary": {"complete": False}}
    assert cost_along_chunk([grace], table) == {}  # an unfinished run is left out
    grace["summary"] = {"complete": True}
    short = tmp_path / "FT-M-T1"  # T=1 chunks have one position: too short for a curve, so no FT-M entry
    short.mkdir()
    (short / "results.jsonl").write_text(json.dumps({"index": 0, "chunk": 0, "step_seconds": 1.0}) + "\n")
    ft = {"folder": str(short), "config": {"method": "FT-M", "T": 1}, "summary": {"complete": True}}
    cost = cost_along_chunk([grace, ft], table)
    assert list(cost) == ["GRACE"] and cost["GRACE"]["T"] == 8
    assert [b["seconds"] for b in cost["GRACE"]["bins"]] == [1.5, 3.5, 5.5, 7.5]
    assert [b["edits"] for b in cost["GRACE"]["bins"]] == ["1-2", "3-4", "5-6", "7-8"]
    assert "| GRACE | 8 | 1.5 (edits 1-2) |" in cost_table(cost) and "| 5.00 |" in cost_table(cost)
