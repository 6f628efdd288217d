"""`lmedit reproduce wise-table` on a tiny random model: one folder per (method, T), the table in the paper's
layout from those folders, generation rows for GRACE/DEFER, resume after an interruption, failures reported."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from lmedit.cli import app
from lmedit.commands.reproduce import parse_method_overrides, parse_methods
from lmedit.reports.wise_table import collect_rows, markdown_table
from lmedit.reproduce import ReproduceError, WiseTableConfig, plan_runs, run_wise_table, write_table
from lmedit.registry import get_method
from lmedit.runner import read_records

TINY = {
    "FT-M": {"layers": [1], "num_steps": 10, "lr": 5e-2},
    "GRACE": {"inner_params": ["model.layers[1].mlp.down_proj.weight"], "n_iter": 10, "eps": 1.0},
}
RECORDS = [
    ("the capital of france is", "rome", "paris", "the city of france is", "who wrote hamlet", "shakespeare"),
    ("who wrote hamlet", "tolstoy", "shakespeare", "who wrote the plays", "the sky color is", "blue"),
    ("the mother tongue of the queen is", "italian", "french", "the language of the queen is", "grass is", "green"),
    ("the sport of the king is", "tennis", "football", "the king plays", "the sun is a", "star"),
    ("the eiffel tower is located in", "berlin", "paris", "the tower is in", "the moon is", "small"),
]


@pytest.fixture
def zsre_file(tmp_path):
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([
        {"subject": src.split()[1], "src": src, "alt": alt, "answers": [truth], "rephrase": reph, "loc": loc,
         "loc_ans": loc_ans, "pred": truth, "cond": ""}
        for src, alt, truth, reph, loc, loc_ans in RECORDS
    ]))
    return path


def _collected(config):
    """The table's cells from the reproduction's run folders."""
    return collect_rows(plan_runs(config), config.table)


def _config(zsre_file, tmp_path, **changes):
    values = dict(data=zsre_file, out=tmp_path / "table", methods=("FT-M", "GRACE"), Ts=(1, 2), limit=2,
                  eval_batch_size=8, overrides=TINY)
    return WiseTableConfig(**{**values, **changes})


def test_config_checks_its_settings(zsre_file, tmp_path):
    with pytest.raises(ReproduceError, match="larger than --limit"):
        _config(zsre_file, tmp_path, Ts=(1, 10))
    with pytest.raises(ReproduceError, match="does not exist"):
        _config(tmp_path / "missing.json", tmp_path)
    with pytest.raises(ValueError, match="unknown method|no method|not registered"):
        _config(zsre_file, tmp_path, methods=("NOPE",))
    config = _config(zsre_file, tmp_path, methods=("grace", "ft-m"), Ts=(2, 1, 2))
    assert config.methods == ("GRACE", "FT-M") and config.Ts == (1, 2)
    assert config.plan() == [("GRACE", 1), ("FT-M", 1), ("GRACE", 2), ("FT-M", 2)]  # every method at small T first
    assert config.eval_mode_for("GRACE") == "both" and config.eval_mode_for("FT-M") == "teacher"
    assert replace(config, eval_mode="generate").eval_mode_for("DEFER") == "generate"


def test_wise_table_runs_every_pair_and_writes_the_paper_layout(zsre_file, tmp_path, tiny_llama, word_tok):
    config = _config(zsre_file, tmp_path, retention_every=1, retention_items=2)
    seen = []
    payload = run_wise_table(config, model=tiny_llama, tok=word_tok, show_progress=False, on_run=seen.append)
    assert [(o.method, o.T, o.status) for o in seen] == [("FT-M", 1, "ran"), ("GRACE", 1, "ran"),
                                                          ("FT-M", 2, "ran"), ("GRACE", 2, "ran")]
    out = config.out
    grace = json.loads((out / "GRACE-T2" / "summary.json").read_text())
    assert json.loads((out / "GRACE-T2" / "config.json").read_text())["eval"]["mode"] == "both"
    assert json.loads((out / "FT-M-T1" / "config.json").read_text())["protocol"] == "sequential"
    rows = payload["rows"]
    assert set(rows) == {"unedited", "FT-M", "GRACE", "GRACE (gen)"}  # GRACE is also reported by generation
    assert rows["unedited"]["2"]["Rel."] == grace["pre"]["rewrite_acc"] and rows["unedited"]["2"]["Loc."] is None
    cell = rows["GRACE"]["2"]
    assert cell["Rel."] == grace["post"]["rewrite_acc"] and cell["Loc."] == grace["post"]["locality"]
    assert rows["GRACE (gen)"]["2"]["Rel."] == grace["post"]["rewrite_gen_acc"]
    assert cell["Avg."] == pytest.approx((cell["Rel."] + cell["Gen."] + cell["Loc."]) / 3)
    table = (out / "wise-table.md").read_text()
    assert "| Method | T=1 Rel. | T=1 Gen. | T=1 Loc. | T=1 Avg. | T=2 Rel." in table
    assert table.index("| unedited |") < table.index("| FT-M |") < table.index("| GRACE |") < table.index("| GRACE (gen) |")
    assert json.loads((out / "wise-table.json").read_text())["rows"] == rows
    held = json.loads((out / "held_out.json").read_text())
    assert held["require_correct"] is True and all(p["pre_accuracy"] == 1.0 for p in held["probes"])
    curves = json.loads((out / "GRACE-T2" / "lifelong.json").read_text())["curves"]
    assert curves["edits"][-2:] == [1, 2]  # a retention row after each edit of the chunk
    retention = payload["retention"]  # every method's curves at its largest T, side by side
    assert set(retention) == {"FT-M", "GRACE"} and retention["GRACE"]["T"] == 2
    assert retention["GRACE"]["edit_retention"] == curves["edit_retention"]
    assert "| GRACE | 2 |" in table[table.index("Retention along the longest chunk"):]
    # the report command reads the same table back from the run folders (the reproduction's folder stands for them)
    report = CliRunner().invoke(app, ["report", "--layout", "wise-table", str(out)])
    assert report.exit_code == 0, report.output
    main, note = report.output.split("\nsmollm2-135m, sequential protocol")
    assert table.startswith(main) and table.endswith("smollm2-135m, sequential protocol" + note)
    pytest.importorskip("matplotlib")
    assert (out / "wise-table.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "wise-table-retention.png").read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_reproduction_resumes_where_it_stopped(zsre_file, tmp_path, tiny_llama, word_tok):
    config = _config(zsre_file, tmp_path)
    run_wise_table(config, model=tiny_llama, tok=word_tok, show_progress=False)
    before = _collected(config)
    folder = config.folder("GRACE", 1)
    lines = (folder / "results.jsonl").read_text().splitlines()
    (folder / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:15])  # interrupted while writing
    (folder / "summary.json").unlink()
    shutil.rmtree(config.folder("GRACE", 2))
    unfinished = write_table(config)["unfinished"]
    assert [(r["run"], r["state"], r["chunks_done"], r["chunks"]) for r in unfinished] == [
        ("GRACE T=1", "started", 1, 2), ("GRACE T=2", "not started", 0, None)]
    section = (config.out / "wise-table.md").read_text().split("## Not finished")[1]
    assert "| GRACE T=1 | 1 of 2 |" in section and "| GRACE T=2 | not started | — | — |" in section
    seen = []
    run_wise_table(config, model=tiny_llama, tok=word_tok, show_progress=False, on_run=seen.append)
    assert [(o.method, o.T, o.status) for o in seen] == [("FT-M", 1, "done"), ("GRACE", 1, "ran"),
                                                          ("FT-M", 2, "done"), ("GRACE", 2, "ran")]
    assert "## Not finished" not in (config.out / "wise-table.md").read_text()
    records = read_records(folder / "results.jsonl")
    assert [(r["index"], r["chunk"]) for r in records] == [(0, 0), (1, 1)]  # only the torn chunk was redone
    assert _collected(config)["rows"] == before["rows"]  # the resumed run gives the same table
    with pytest.raises(ReproduceError, match="differs in"):
        changed = _config(zsre_file, tmp_path, overrides={**TINY, "GRACE": {**TINY["GRACE"], "n_iter": 11}})
        (changed.folder("GRACE", 1) / "summary.json").unlink()
        run_wise_table(changed, model=tiny_llama, tok=word_tok, show_progress=False)


def test_a_failing_method_is_reported_and_the_others_run(zsre_file, tmp_path, tiny_llama, word_tok):
    overrides = {**TINY, "GRACE": {"inner_params": ["model.layers[9].mlp.down_proj.weight"]}}  # no such layer
    config = _config(zsre_file, tmp_path, Ts=(1,), overrides=overrides)
    payload = run_wise_table(config, model=tiny_llama, tok=word_tok, show_progress=False)
    status = {(o["method"], o["T"]): o["status"] for o in payload["outcomes"]}
    assert status == {("FT-M", 1): "ran", ("GRACE", 1): "failed"}
    assert set(payload["rows"]) == {"unedited", "FT-M"}
    assert [(r["run"], r["state"]) for r in payload["unfinished"]] == [("GRACE T=1", "failed")]
    assert "| GRACE T=1 | failed | — | — |" in (config.out / "wise-table.md").read_text()
    table = markdown_table(config.table, _collected(config))
    assert "| GRACE |" not in table.split("Seconds per edit")[0]


def test_command_line_parsing_and_errors(tmp_path):
    assert parse_methods("GRACE, WISE", ("X",)) == ("GRACE", "WISE") and parse_methods(None, ("X",)) == ("X",)
    assert parse_method_overrides(["WISE.n_iter=50", "GRACE.inner_params=[a, b]"]) == {
        "WISE": {"n_iter": 50}, "GRACE": {"inner_params": ["a", "b"]}}
    with pytest.raises(ValueError, match="METHOD.key=value"):
        parse_method_overrides(["n_iter=50"])
    result = CliRunner().invoke(app, ["reproduce", "wise-table", "--data", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["reproduce", "wise-table", "--data", str(tmp_path / "none.json"), "--T", "0"])
    assert result.exit_code == 2
    assert get_method("AlphaEdit").name == "AlphaEdit"  # every method of the table is registered


def test_hallucination_data_gets_the_perplexity_layout(tmp_path, tiny_llama, word_tok):
    path = tmp_path / "hallucination.json"
    path.write_text(json.dumps([
        {"prompt": "the capital of france is", "target_new": "rome and berlin", "subject": "france",
         "locality_prompt": "the sky color is", "locality_ground_truth": "blue"},
        {"prompt": "who wrote hamlet", "target_new": "tolstoy wrote hamlet", "subject": "hamlet",
         "locality_prompt": "grass is", "locality_ground_truth": "green"},
    ]))
    config = WiseTableConfig(data=path, out=tmp_path / "h", methods=("FT-M",), Ts=(1,), limit=2, overrides=TINY)
    payload = run_wise_table(config, model=tiny_llama, tok=word_tok, show_progress=False)
    summary = json.loads((config.folder("FT-M", 1) / "summary.json").read_text())
    assert payload["layout"] == "hallucination"
    assert payload["rows"]["FT-M"]["1"]["Rel. (PPL)"] == summary["post"]["rewrite_ppl"]
    assert "Avg." not in payload["rows"]["FT-M"]["1"]
    assert "| Method | T=1 Rel. (PPL) | T=1 Loc. |" in (config.out / "wise-table.md").read_text()
    # a table rebuilt later from the folders alone (--table-only) finds the layout from the data too
    (config.out / "wise-table.md").unlink()
    assert write_table(WiseTableConfig(data=path, out=config.out, methods=("FT-M",), Ts=(1,), limit=2))["layout"] == "hallucination"
    assert "| Method | T=1 Rel. (PPL) | T=1 Loc. |" in (config.out / "wise-table.md").read_text()
    report = CliRunner().invoke(app, ["report", "--layout", "wise-table", str(config.folder("FT-M", 1))])
    assert report.output.startswith("| Method | T=1 Rel. (PPL) | T=1 Loc. |\n")  # found from the run's metrics alone


def test_table_only_writes_the_table_from_finished_folders_and_runs_nothing(zsre_file, tmp_path, tiny_llama, word_tok):
    config = _config(zsre_file, tmp_path, methods=("FT-M",), Ts=(1,))
    run_wise_table(config, model=tiny_llama, tok=word_tok, show_progress=False)
    (config.out / "wise-table.md").unlink()
    result = CliRunner().invoke(app, ["reproduce", "wise-table", "--data", str(zsre_file), "--out", str(config.out),
                                      "--limit", "2", "--methods", "FT-M,GRACE", "--T", "1", "--T", "2", "--table-only"])
    assert result.exit_code == 0, result.output
    table = (config.out / "wise-table.md").read_text()
    assert "| FT-M |" in table
    assert "| GRACE | — | — |" in table  # GRACE was never run, and is not run now: shown as missing
    assert sorted(p.name for p in config.out.iterdir() if p.is_dir()) == ["FT-M-T1"]
    missing = CliRunner().invoke(app, ["reproduce", "wise-table", "--data", str(zsre_file),
                                       "--out", str(tmp_path / "nothing-here"), "--limit", "2", "--T", "1", "--table-only"])
    assert missing.exit_code != 0 and "does not exist" in " ".join(missing.output.split())


def test_run_progress_counts_chunks_not_records_and_every_session(tmp_path):
    from lmedit.reproduce import run_progress

    assert run_progress(tmp_path) is None  # no run started here
    sessions = [{"chunks_done": 0, "chunks": 4}, {"chunks_done": 1, "chunks": 4}]
    (tmp_path / "sessions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sessions))
    records = [(0, 0, 30.0, 6.0), (1, 0, 30.0, 6.0), (2, 1, 40.0, 8.0)]  # two sequences: items 0-1, then item 2
    (tmp_path / "results.jsonl").write_text("".join(
        json.dumps({"index": i, "chunk": c, "pre": {"rewrite_acc": 0.0}, "post": {"rewrite_acc": 1.0},
                    "edit_seconds": e, "eval_seconds": v}) + "\n" for i, c, e, v in records) + '{"index": 3, "ch')
    progress = run_progress(tmp_path)  # the torn last line of a stopped run is skipped
    assert progress == {"chunks_done": 2, "chunks": 4, "work_minutes": pytest.approx(2.0),
                        "minutes_left": pytest.approx(2.0)}


def test_a_damaged_folder_is_reported_and_the_others_are_still_listed(tmp_path):
    from lmedit.reproduce import unfinished_runs

    damaged, fine = tmp_path / "damaged", tmp_path / "fine"
    for folder in (damaged, fine):
        folder.mkdir()
        (folder / "sessions.jsonl").write_text(json.dumps({"chunks_done": 0, "chunks": 2}) + "\n" + '{"chunks_d')
    (damaged / "results.jsonl").write_text("not json\n" + json.dumps({"index": 1, "chunk": 1}) + "\n")
    rows = unfinished_runs([("damaged", damaged), ("fine", fine)])
    assert [(r["run"], r["state"], r["chunks"]) for r in rows] == [("damaged", "unreadable", None), ("fine", "started", 2)]
