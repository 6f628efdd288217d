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


def test_a_run_over_a_whole_file_draws_its_held_out_probes_from_another_without_edited_prompts(
        tiny_llama, word_tok, data_file, tmp_path):
    from lmedit.data import load_requests
    from lmedit.lifelong import LifelongError

    editor = _editor(tiny_llama, word_tok)
    requests = load_requests(data_file, limit=3)
    spec = make_spec(editor, requests, protocol="sequential", T=3, data=str(data_file), limit=3)
    other = tmp_path / "other.json"  # shares two of the edited prompts, as KnowEdit's ZsRE shares zsRE's questions
    other.write_text(json.dumps([
        {"prompt": f"the capital of {w} is", "target_new": "rome", "ground_truth": "paris", "subject": w}
        for w in ["france", "italy", "london", "paris"]]))
    _, out = run_experiment(editor, requests, spec, tmp_path / "run", show_progress=False,
                            retention=RetentionSettings(every=3, items=2, data=data_file, held_out_data=other))
    prompts = {p["prompt"] for p in json.loads((out / "held_out.json").read_text())["probes"]}
    assert prompts and prompts <= {"the capital of london is", "the capital of paris is"}

    everything = load_requests(data_file)
    whole = make_spec(editor, everything, protocol="sequential", T=6, data=str(data_file))
    with pytest.raises(LifelongError, match="--retention-data"):
        run_experiment(editor, everything, whole, tmp_path / "whole", show_progress=False,
                       retention=RetentionSettings(every=3, items=2, data=data_file))


def test_a_run_stopped_inside_a_chunk_continues_from_its_checkpoint(tiny_llama, word_tok, data_file, tmp_path):
    from lmedit.data import load_requests
    from lmedit.runner import read_records

    requests = load_requests(data_file, limit=4)

    def run(out, stop_at=None, minutes=1e-9):
        editor = _editor(tiny_llama, word_tok)
        steps = []

        def after_step(chunk, done):
            steps.append(done)
            if done == stop_at:
                raise KeyboardInterrupt  # the process ends here
        spec = make_spec(editor, requests, protocol="sequential", T=4, data=str(data_file), limit=4)
        summary, _ = run_experiment(editor, requests, spec, out, show_progress=False, after_step=after_step,
                                    checkpoint_minutes=minutes)
        return summary, steps

    reference, _ = run(tmp_path / "reference", minutes=0)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", stop_at=3)
    assert (tmp_path / "stopped" / "checkpoints" / "chunk-0" / "progress.json").is_file()
    summary, steps = run(tmp_path / "stopped")
    assert steps == [3, 4]  # the two edits the checkpoint holds are not made again
    assert not (tmp_path / "stopped" / "checkpoints").exists()  # the chunk's records are written: it has served
    strip = lambda rows: [{k: v for k, v in r.items() if k in ("index", "pre", "post")} for r in rows]  # noqa: E731
    assert strip(read_records(tmp_path / "stopped" / "results.jsonl")) == strip(
        read_records(tmp_path / "reference" / "results.jsonl"))
    assert summary["complete"] and summary["post"] == reference["post"]
