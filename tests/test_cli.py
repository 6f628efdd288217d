"""The command line, driven through typer's runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmedit.cli import app

runner = CliRunner()


def test_methods_lists_the_registered_methods():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    assert "FT-M" in result.output and "FT-L" in result.output


def test_models_lists_the_presets():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "smollm2-135m" in result.output


def test_unloadable_model_fails_with_a_message_and_exit_2(tmp_path):
    result = runner.invoke(app, ["run", "--model", str(tmp_path / "none"), "--limit", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "error" in result.output


@pytest.mark.embedded
def test_run_on_the_embedded_model_writes_a_run_folder(embedded, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--method", "FT-M", "--limit", "2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["post"]["rewrite_acc"] >= 0.9 > summary["pre"]["rewrite_acc"]
    assert len(summary["chunks"]) == 2
    assert "rewrite_acc" in result.output


@pytest.mark.embedded
def test_edit_shows_answers_before_and_after(embedded, tmp_path):
    result = runner.invoke(app, ["edit", "--prompt", "The Eiffel Tower is located in the city of", "--target", "Rome",
                                 "--rephrase", "The Eiffel Tower stands in", "--locality-prompt",
                                 "The capital of Germany is", "--save", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "before" in result.output and "Rome" in result.output
    assert (tmp_path / "e" / "edit.safetensors").is_file()


def test_run_records_retention_curves_on_request(tmp_path, monkeypatch):
    from conftest import build_tiny_llama, build_word_tokenizer

    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    tok = build_word_tokenizer()
    folder = tmp_path / "tiny"
    build_tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    records = [{"case_id": i, "prompt": f"the capital of {w} is", "target_new": "rome", "ground_truth": "paris",
                "subject": w, "rephrase_prompt": f"the city of {w} is", "locality_prompt": "the sky color is",
                "locality_ground_truth": "blue"} for i, w in enumerate("france italy germany london paris berlin".split())]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    base = ["run", "--method", "GRACE", "--model", str(folder), "--data", str(data), "--format", "counterfact",
            "--limit", "4", "--protocol",
            "sequential", "--T", "2", "--set", "inner_params=[model.layers.1.mlp.down_proj.weight]", "--set", "n_iter=5",
            "--out", str(out), "--no-progress"]
    result = runner.invoke(app, base + ["--retention-every", "1", "--retention-items", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["extra"]["data_format"] == "counterfact"  # as it was read
    held = json.loads((out / "held_out.json").read_text())  # from the records after the 4 edited ones
    assert len(held["probes"]) == 2 and all("italy" not in p["prompt"] for p in held["probes"])
    curves = json.loads((out / "lifelong.json").read_text())["curves"]
    assert curves["edits"] == [0, 1, 2] and curves["chunks"] == [0, 2, 2]  # each point averages both chunks
    assert curves["test_retention"][0] == 1.0 or held["require_correct"] is False
    bad = runner.invoke(app, base[:-3] + ["--out", str(tmp_path / "r2"), "--retention-every", "-1", "--no-progress"])
    assert bad.exit_code == 2 and "--retention-every" in bad.output


def test_report_prints_markdown_unwrapped_on_a_narrow_terminal(tmp_path):
    """`lmedit report runs/a runs/b > t.md` must give one table row per line, whatever the terminal width."""
    folders = []
    for name, method in (("a", "FT-M"), ("b", "AlphaEdit")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"method": method, "protocol": "sequential", "T": 100,
                                                        "batch_size": 1, "eval": {"mode": "teacher"}}))
        (folder / "summary.json").write_text(json.dumps({
            "n": 100, "complete": True, "timing": {"edit_seconds_per_request": 12.5},
            "pre": {"rewrite_acc": 0.25, "rephrase_acc": 0.25, "portability": 0.5},
            "post": {"rewrite_acc": 0.75, "rephrase_acc": 0.5, "locality": 0.875, "portability": 0.5}}))
        folders.append(str(folder))
    result = CliRunner(env={"COLUMNS": "40"}).invoke(app, ["report", *folders])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 4 and max(map(len, lines)) > 80  # header, rule, two runs; each longer than the terminal
    assert all(line.startswith("|") and line.endswith("|") for line in lines)


def test_report_leaves_out_a_run_that_has_not_finished_a_chunk(tmp_path):
    done, begun = tmp_path / "done", tmp_path / "begun"
    for folder in (done, begun):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"method": "FT-M", "protocol": "single", "eval": {"mode": "teacher"}}))
    (done / "summary.json").write_text(json.dumps({"n": 2, "complete": True, "pre": {"rewrite_acc": 0.25},
                                                   "post": {"rewrite_acc": 0.75}}))
    result = CliRunner().invoke(app, ["report", str(done), str(begun)])
    assert result.exit_code == 0, result.output
    assert "0.75" in result.output and f"left out: {begun} has no finished chunk yet" in " ".join(result.output.split())
    alone = CliRunner().invoke(app, ["report", str(begun)])
    assert alone.exit_code == 2 and "no finished chunk" in alone.output
