"""``lmedit trace`` end to end on a tiny saved model (no download)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from conftest import build_tiny_llama, build_word_tokenizer
from lmedit.analysis.tracing import greedy_next_tokens
from lmedit.cli import app

runner = CliRunner()

PROMPTS = [("{} is located in the city of", "eiffel tower"), ("the mother tongue of {} is", "tolstoy"),
           ("{} plays", "shakespeare")]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama and the word tokenizer saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_word_tokenizer()
    model = build_tiny_llama(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def _write_counterfact(path, model, tok, *, known: int) -> None:
    """ROME-layout records; the first `known` have the model's own prediction as true target."""
    records = []
    for index, (template, subject) in enumerate(PROMPTS):
        predicted = tok.decode([greedy_next_tokens(model, tok, [template.format(subject)])[0]]).strip()
        target = predicted if index < known else ("violin" if predicted != "violin" else "guitar")
        records.append({"case_id": index, "requested_rewrite": {
            "prompt": template, "subject": subject, "target_new": {"str": "rome"}, "target_true": {"str": target}}})
    path.write_text(json.dumps(records))


def _invoke(*args):
    return runner.invoke(app, ["trace", "--samples", "2", "--window", "2", "--no-progress", *map(str, args)])


def test_trace_writes_json_and_heatmaps(tiny_folder, tmp_path):
    pytest.importorskip("matplotlib")
    folder, model, tok = tiny_folder
    data = tmp_path / "cf.json"
    _write_counterfact(data, model, tok, known=0)
    out = tmp_path / "out"
    result = _invoke("--model", folder, "--data", data, "--all", "--limit", 2, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "trace.json").read_text())
    assert report["num_facts"] == 2 and report["known_only"] is False
    assert set(report["summary"]) == {"hidden", "mlp", "attn"}
    assert report["settings"]["samples"] == 2 and report["noise_std"] > 0
    assert report["suggestion"]["rome_layer"] in range(3)
    assert report["facts"][0]["prompt"] == "eiffel tower is located in the city of"
    for name in ("trace_avg_hidden.png", "trace_avg_mlp.png", "trace_avg_attn.png", "trace_fact0_mlp.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "subj. peak" in result.output and "suggested edit layers: ROME" in result.output


def test_known_only_keeps_the_facts_the_model_predicts(tiny_folder, tmp_path):
    folder, model, tok = tiny_folder
    data = tmp_path / "cf.json"
    _write_counterfact(data, model, tok, known=1)
    out = tmp_path / "out"
    result = _invoke("--model", folder, "--data", data, "--kinds", "hidden", "--no-plots", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "trace.json").read_text())
    assert report["num_facts"] == 1 and report["facts"][0]["subject"] == "eiffel tower"
    assert report["records_scanned_for_known"] == 3 and "1 known facts among the first 3" in result.output
    assert list(report["summary"]) == ["hidden"] and report["suggestion"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--data", "missing.json"], "not found"), (["--kinds", "hidden,resid"], "--kinds"), (["--samples", "0"], "positive")],
)
def test_bad_arguments_exit_2_with_a_message(tiny_folder, tmp_path, args, message):
    folder, _, _ = tiny_folder
    result = _invoke("--model", folder, "--no-plots", "--out", tmp_path / "o", *args)
    assert result.exit_code == 2 and message in result.output


def test_no_known_facts_is_an_error(tiny_folder, tmp_path):
    folder, model, tok = tiny_folder
    data = tmp_path / "cf.json"
    _write_counterfact(data, model, tok, known=0)
    result = _invoke("--model", folder, "--data", data, "--no-plots", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "no facts to trace" in result.output


def test_missing_matplotlib_says_how_to_install(tiny_folder, tmp_path, monkeypatch):
    folder, _, _ = tiny_folder
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = _invoke("--model", folder, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "pip install" in result.output and "--no-plots" in result.output
