"""run_experiment: the one run function behind Editor.run, `lmedit run` and `lmedit reproduce`."""

from __future__ import annotations

import json

import pytest

from lmedit.editor import Editor
from lmedit.evaluation import EvalConfig
from lmedit.experiment import RetentionSettings, make_spec, run_experiment

WORDS = "france italy germany london paris berlin".split()


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([
        {"case_id": i, "prompt": f"the capital of {w} is", "target_new": "rome", "ground_truth": "paris", "subject": w,
         "locality_prompt": "the sky color is", "locality_ground_truth": "blue"} for i, w in enumerate(WORDS)]))
    return path


def _editor(model, tok):
    return Editor(model, tok, "GRACE", overrides={"inner_params": ["model.layers.1.mlp.down_proj.weight"], "n_iter": 5},
                  eval_config=EvalConfig(mode="teacher"), model_name="tiny")


def test_retention_and_another_hook_share_the_run(tiny_llama, word_tok, data_file, tmp_path):
    from lmedit.data import load_requests

    editor = _editor(tiny_llama, word_tok)
    requests = load_requests(data_file, limit=2)
    spec = make_spec(editor, requests, protocol="sequential", T=2, data=str(data_file), limit=2,
                     extra={"reproduce": "test"})
    shared = tmp_path / "shared" / "held_out.json"
    calls = []
    summary, out = run_experiment(editor, requests, spec, tmp_path / "run", show_progress=False,
                                  retention=RetentionSettings(every=1, items=2, data=data_file, held_out_file=shared),
                                  after_step=lambda chunk, steps: calls.append(steps))
    assert calls == [1, 2] and summary["complete"] is True
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "GRACE" and config["model"] == "tiny" and config["extra"]["reproduce"] == "test"
    held = json.loads(shared.read_text())  # from the records after the two edited ones
    assert not (out / "held_out.json").exists() and all("france" not in p["prompt"] for p in held["probes"])
    curves = json.loads((out / "lifelong.json").read_text())
    assert curves["title"] == "GRACE, sequential T=2" and curves["every"] == 1 and curves["curves"]["edits"] == [0, 1, 2]


def test_editor_run_writes_what_run_experiment_writes(tiny_llama, word_tok, tmp_path):
    from lmedit.requests import EditRequest

    editor = _editor(tiny_llama, word_tok)
    requests = [EditRequest("the capital of france is", "rome", case_id="0")]
    editor.run(requests, out_dir=tmp_path / "a", show_progress=False, seed=3)
    run_experiment(editor, requests, make_spec(editor, requests, seed=3), tmp_path / "b", show_progress=False)
    first, second = (json.loads((tmp_path / f / "config.json").read_text()) for f in "ab")
    assert first == second


def test_retention_settings_say_what_is_wrong():
    with pytest.raises(ValueError, match="--retention-every must be 0 .off. or a positive"):
        RetentionSettings(every=-1)
    with pytest.raises(ValueError, match="--retention-items"):
        RetentionSettings(every=1, items=0)
