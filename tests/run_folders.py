"""Fixture `runs_root`: a finished run folder with retention curves and a run still going, made on a tiny model."""

from __future__ import annotations

import json
import shutil

import pytest

from lmedit.editor import Editor
from lmedit.evaluation import EvalConfig
from lmedit.experiment import RetentionSettings, make_spec, run_experiment

WORDS = "france italy germany london paris berlin".split()


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """``root/runs/grace-t2`` (complete, with lifelong.png), ``root/runs/going`` (1 of 2 chunks), ``root/notes``."""
    from conftest import build_tiny_llama, build_word_tokenizer
    from lmedit.data import load_requests

    root = tmp_path_factory.mktemp("approot")
    data = root / "cf.json"
    data.write_text(json.dumps([
        {"case_id": i, "prompt": f"the capital of {w} is", "target_new": "rome", "ground_truth": "paris", "subject": w,
         "locality_prompt": "the sky color is", "locality_ground_truth": "blue"} for i, w in enumerate(WORDS)]))
    tok = build_word_tokenizer()
    editor = Editor(build_tiny_llama(len(tok)), tok, "GRACE", eval_config=EvalConfig(mode="teacher"), model_name="tiny",
                    overrides={"inner_params": ["model.layers.1.mlp.down_proj.weight"], "n_iter": 5})
    requests = load_requests(data, limit=4)
    spec = make_spec(editor, requests, protocol="sequential", T=2, data=str(data), limit=4)
    run_experiment(editor, requests, spec, root / "runs" / "grace-t2", show_progress=False,
                   retention=RetentionSettings(every=1, items=2, data=data))
    going = root / "runs" / "going"  # a run stopped after its first chunk: its records, no summary
    going.mkdir()
    shutil.copy(root / "runs" / "grace-t2" / "config.json", going)
    first = [line for line in (root / "runs" / "grace-t2" / "results.jsonl").read_text().splitlines()
             if json.loads(line)["chunk"] == 0]
    (going / "results.jsonl").write_text("\n".join(first) + "\n")
    (root / "notes").mkdir()
    return root
