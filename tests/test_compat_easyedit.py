"""EasyEdit's Python API over lmedit (lmedit.compat.easyedit), on tiny random models.

The metrics a script gets back must have EasyEdit's structure (checked against a hand-written
example of it, read from EasyEdit's ``editor.py`` and ``evaluate.py``), single edits must leave
the model bit for bit as it was, sequential edits must keep every edit, and ``weights_copy``
must work both ways EasyEdit's does (a mapping of original tensors, and a restore callable).
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import build_tiny_llama, snapshot, state_equal
from lmedit.compat.easyedit import (
    BaseEditor, EasyEditHyperParams, FTHyperParams, GraceHyperParams, ROMEHyperParams, ZsreDataset, macro_f1,
    prepare_requests, summary_metrics, to_edit_request,
)
from lmedit.registry import get_method

# One request's entry of EasyEdit's metrics list (teacher-forced scoring, one rephrase, one probe per
# group), as BaseEditor.edit returns it and examples/run_zsre_llama2.py dumps it: `pre` is computed for
# every request before any edit; locality keeps the argmax tokens at the answer positions
# (`<name>_output`, a list per probe) and `post` adds their agreement with `pre` (`<name>_acc`).
EASYEDIT_EXAMPLE: dict[str, Any] = {
    "pre": {
        "rewrite_acc": [0.25],
        "rephrase_acc": [0.5],
        "locality": {"neighborhood_output": [[29, 234, 334]]},
        "portability": {"one_hop_acc": [0.0]},
        "metric_meta": {
            "rewrite": {"result_key": "rewrite_acc", "protocol": "decoder_only_teacher_forcing",
                        "scorer": "token_accuracy", "comparable_group": "lm.decoder_only_teacher_forcing.token_accuracy"},
            "rephrase": {"result_key": "rephrase_acc", "protocol": "decoder_only_teacher_forcing",
                         "scorer": "token_accuracy", "comparable_group": "lm.decoder_only_teacher_forcing.token_accuracy"},
        },
    },
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "Who wrote Hamlet?",
        "target_new": "Tolstoy",
        "ground_truth": "Shakespeare",
        "portability": {"one_hop": {"prompt": "The author of Hamlet was born in", "ground_truth": "Russia"}},
        "locality": {"neighborhood": {"prompt": "nq question: who sang thriller", "ground_truth": "Michael Jackson"}},
        "subject": "Hamlet",
        "rephrase_prompt": "Hamlet was written by",
    },
    "time": 1.5,
    "post": {
        "rewrite_acc": [1.0],
        "rephrase_acc": [0.5],
        "locality": {"neighborhood_output": [[29, 234, 333]], "neighborhood_acc": [0.6666666666666666]},
        "portability": {"one_hop_acc": [0.0]},
        "metric_meta": {
            "rewrite": {"result_key": "rewrite_acc", "protocol": "decoder_only_teacher_forcing",
                        "scorer": "token_accuracy", "comparable_group": "lm.decoder_only_teacher_forcing.token_accuracy"},
            "rephrase": {"result_key": "rephrase_acc", "protocol": "decoder_only_teacher_forcing",
                         "scorer": "token_accuracy", "comparable_group": "lm.decoder_only_teacher_forcing.token_accuracy"},
            "locality.neighborhood": {"result_key": "locality.neighborhood_acc", "protocol": "pre_post_argmax_token_match",
                                      "scorer": "token_match", "comparable_group": "locality.lm.pre_post_argmax_token_match"},
        },
    },
}

PROMPTS = ["the capital of france", "who wrote hamlet", "the sport of the king"]
TARGETS = ["rome", "tolstoy", "tennis"]
EDIT_ARGS: dict[str, Any] = {
    "prompts": PROMPTS,
    "target_new": TARGETS,
    "ground_truth": ["paris", "shakespeare", "football"],
    "rephrase_prompts": ["where is the capital of france", "hamlet was written by", "the king plays the sport"],
    "locality_inputs": {"neighborhood": {"prompt": ["the sky color is", "the sun is", "the grass is"],
                                         "ground_truth": ["blue", "big", "green"]}},
    "portability_inputs": {"one_hop": {"prompt": ["the capital city of france is", "the author of hamlet", "the king plays"],
                                       "ground_truth": ["rome", "tolstoy", "tennis"]}},
    "subject": ["france", "hamlet", "king"],
}


def _structure(value: Any) -> Any:
    """The shape of a JSON value: dict keys (recursively), list element shapes, scalar kinds."""
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return ["list", *sorted({json.dumps(_structure(v), sort_keys=True) for v in value})]
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _hparams(cls: type[EasyEditHyperParams], method: str, model: torch.nn.Module, tok: Any, tmp_path: Path) -> EasyEditHyperParams:
    """Hyperparameters as ``from_hparams`` makes them, with the method's tiny-model settings and a loaded model."""
    info = get_method(method)
    hparams = info.load_hparams(overrides=info.tiny_setup(model, tok, tmp_path))
    config = types.SimpleNamespace(method=method, hparams=hparams, model_name=(model, tok), device=None, dtype=None,
                                   mappings=[], ignored=[], source="test")
    return cls(config)


@pytest.fixture
def ft_editor(word_tok: Any, tmp_path: Path) -> BaseEditor:
    model = build_tiny_llama(len(word_tok))
    return BaseEditor.from_hparams(_hparams(FTHyperParams, "FT-M", model, word_tok, tmp_path))


def test_metrics_have_easyedit_structure(ft_editor: BaseEditor) -> None:
    metrics, _, _ = ft_editor.edit(**{k: v[:1] if isinstance(v, list) else
                                      {g: {p: x[:1] for p, x in s.items()} for g, s in v.items()}
                                      for k, v in EDIT_ARGS.items()})
    written = json.loads(json.dumps(metrics))  # what json.dump(metrics, ...) puts in the results file
    assert len(written) == 1
    example = json.loads(json.dumps(EASYEDIT_EXAMPLE))
    assert _structure(written[0]) == _structure(example)
    assert list(written[0]) == ["pre", "case_id", "requested_rewrite", "time", "post"]


def test_single_edits_restore_the_model_exactly(ft_editor: BaseEditor) -> None:
    before = snapshot(ft_editor.model)
    metrics, edited, weights_copy = ft_editor.edit(**EDIT_ARGS)
    assert edited is ft_editor.model and state_equal(edited, before)
    assert [m["case_id"] for m in metrics] == [0, 1, 2]
    assert all(m["post"]["rewrite_acc"] == [1.0] for m in metrics)  # every edit took effect
    # EasyEdit's weights_copy: the originals of what the last edit touched; restoring with it changes nothing now
    params = dict(ft_editor.model.named_parameters())
    assert len(weights_copy) >= 1 and all(torch.equal(params[name], value) for name, value in weights_copy.items())
    weights_copy()
    assert state_equal(ft_editor.model, before)


def test_sequential_edit_keeps_every_edit_and_weights_copy_undoes_them(ft_editor: BaseEditor) -> None:
    before = snapshot(ft_editor.model)
    metrics, edited, weights_copy = ft_editor.edit(**EDIT_ARGS, sequential_edit=True)
    assert not state_equal(edited, before)
    # scored after all edits (EasyEdit's documented protocol): re-scoring the final model gives the same numbers
    requests = [to_edit_request(r, i) for i, r in enumerate(prepare_requests(**EDIT_ARGS))]
    probes = ft_editor.editor.evaluator.probes(requests)
    final = ft_editor.editor.evaluator.run_probes(ft_editor.model, probes)
    rewrites = [o.teacher_accuracy for o, p in zip(final, probes) if p.kind == "rewrite"]
    assert [m["post"]["rewrite_acc"][0] for m in metrics] == rewrites
    # the mapping holds each touched parameter as it was before the first edit
    params = dict(before)
    assert all(torch.equal(params[name], value) for name, value in weights_copy.items())
    weights_copy()
    assert state_equal(ft_editor.model, before)


def test_batch_edit_chunks_by_batch_size_and_restores(ft_editor: BaseEditor) -> None:
    before = snapshot(ft_editor.model)
    ft_editor.hparams.batch_size = 2
    metrics, _, _ = ft_editor.batch_edit(**{k: v for k, v in EDIT_ARGS.items() if k != "subject"})
    assert [m["case_id"] for m in metrics] == [0, 1, 2]  # EasyEdit restarts at 0 in every chunk
    assert metrics[0]["time"] == metrics[1]["time"] != metrics[2]["time"]  # two requests shared one edit call
    assert state_equal(ft_editor.model, before)


def test_batch_edit_names_the_methods_that_can(word_tok: Any, tmp_path: Path) -> None:
    model = build_tiny_llama(len(word_tok))
    editor = BaseEditor.from_hparams(_hparams(ROMEHyperParams, "ROME", model, word_tok, tmp_path))
    with pytest.raises(ValueError, match="ROME cannot batch edit; .*MEMIT"):
        editor.batch_edit(PROMPTS, TARGETS)


def test_edit_dataset_reads_zsre_items(ft_editor: BaseEditor, tmp_path: Path) -> None:
    records = [
        {"subject": "france", "src": "the capital of france", "alt": "rome", "answers": ["paris"], "rephrase": "where is the capital of france",
         "loc": "nq question: the sky color is", "loc_ans": "blue"},
        {"subject": "hamlet", "src": "who wrote hamlet", "alt": "", "answers": ["shakespeare"], "rephrase": "hamlet was written by",
         "loc": "nq question: the sun is", "loc_ans": "big"},
        {"subject": "king", "src": "the sport of the king", "alt": "tennis", "answers": ["football"], "rephrase": "the king plays",
         "loc": "nq question: the grass is", "loc_ans": "green"},
    ]
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(records))
    ds = ZsreDataset(str(path))
    assert len(ds) == 2 and ds[1]["case_id"] == 2 and ds[0]["locality_ground_truth"] == "blue"  # empty alt skipped
    metrics, _, _ = ft_editor.edit_dataset(ds)
    assert [m["case_id"] for m in metrics] == [0, 2]
    assert set(metrics[0]["post"]["locality"]) == {"neighborhood_output", "neighborhood_acc"}


def test_grace_is_scored_by_generation_as_in_easyedit(word_tok: Any, tmp_path: Path) -> None:
    model = build_tiny_llama(len(word_tok))
    editor = BaseEditor.from_hparams(_hparams(GraceHyperParams, "GRACE", model, word_tok, tmp_path))
    before = snapshot(model)
    metrics, _, weights_copy = editor.edit(**{k: v[:1] if isinstance(v, list) else v for k, v in EDIT_ARGS.items()
                                              if k not in ("locality_inputs", "portability_inputs")})
    post = metrics[0]["post"]
    assert {"rewrite_acc", "rewrite_F1", "rephrase_acc", "rephrase_F1"} <= set(post)
    assert post["metric_meta"]["rewrite"]["protocol"] == "vanilla_generation"
    assert state_equal(model, before)


def test_keep_original_weight_is_named_not_swallowed(ft_editor: BaseEditor, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lmedit.compat.easyedit"):
        ft_editor.edit(PROMPTS[0], TARGETS[0], keep_original_weight=True, no_such_option=1)
    assert "keep_original_weight=True" in caplog.text and "no_such_option" in caplog.text


def test_bad_inputs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="target_new has 1 item"):
        prepare_requests(PROMPTS[:2], ["rome"])
    with pytest.raises(ValueError, match="subject 'paris' does not occur"):
        prepare_requests(PROMPTS[0], TARGETS[0], subject="paris")
    with pytest.raises(ValueError, match=r"locality_inputs\['n'\] has 1 prompt"):
        prepare_requests(PROMPTS[:2], TARGETS[:2], locality_inputs={"n": {"prompt": ["a"], "ground_truth": ["b"]}})


def test_summary_metrics_by_hand() -> None:
    metrics = [
        {"pre": {"rewrite_acc": [0.0], "locality": {}, "portability": {"one_hop_acc": [0.5, 1.0]}},
         "post": {"rewrite_acc": [1.0], "rephrase_acc": [0.5], "locality": {"nb_output": [[1, 2]], "nb_acc": [1.0, 0.5]},
                  "portability": {"one_hop_acc": [1.0, 1.0]}}},
        {"pre": {"rewrite_acc": [0.5], "locality": {}, "portability": {"one_hop_acc": [0.0]}},
         "post": {"rewrite_acc": [0.5], "rephrase_acc": [0.0], "locality": {"nb_output": [[3]], "nb_acc": [0.0]},
                  "portability": {"one_hop_acc": [0.5]}}},
    ]
    summary = summary_metrics(metrics)
    assert summary == {
        "pre": {"rewrite_acc": 0.25, "portability": {"one_hop_acc": (0.75 + 0.0) / 2}},
        "post": {"rewrite_acc": 0.75, "rephrase_acc": 0.25, "locality": {"nb_acc": (0.75 + 0.0) / 2},
                 "portability": {"one_hop_acc": (1.0 + 0.5) / 2}},
    }


def test_macro_f1_matches_sklearn_definition() -> None:
    # labels {1, 2, 3, 4}: 1 -> P=1/2, R=1 (F1 2/3); 2 and 3 never predicted, 4 never right: F1 0
    assert macro_f1([1, 2, 3], [1, 1, 4]) == pytest.approx((2 / 3) / 4)
    assert macro_f1([5, 6], [5, 6]) == 1.0


def test_from_hparams_reads_easyedit_values_and_refuses_another_method(word_tok: Any) -> None:
    model = build_tiny_llama(len(word_tok))
    values = {"alg_name": "FT", "model_name": "unused", "device": 0, "layers": [2], "num_steps": 5, "lr": "5e-2",
              "objective_optimization": "target_new", "batch_size": 2,
              "rewrite_module_tmp": "model.layers.{}.mlp.down_proj.weight", "model_parallel": False}
    hparams = FTHyperParams.from_hparams(values)
    assert (hparams.method, hparams.layers, hparams.lr, hparams.batch_size) == ("FT-M", [2], 5e-2, 2)
    hparams.model_name = (model, word_tok)  # EasyEdit's way to pass a loaded model
    metrics, _, _ = BaseEditor.from_hparams(hparams).edit(PROMPTS[0], TARGETS[0])
    assert metrics[0]["post"]["rewrite_acc"] == [1.0]
    with pytest.raises(ValueError, match="EasyEdit file for GRACE.*GraceHyperParams.from_hparams"):
        FTHyperParams.from_hparams({"alg_name": "GRACE", "model_name": "x", "device": 0,
                                    "inner_params": ["model.layers[2].mlp.down_proj.weight"]})


@pytest.mark.embedded
def test_easyedit_style_script_writes_easyedit_results(embedded: Any, shared_data: Path, tmp_path: Path) -> None:
    """docs/examples/run_zsre_easyedit_style.py (EasyEdit's zsRE script, import changed) on two zsRE records."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "docs/examples/run_zsre_easyedit_style.py"), "--editing_method", "FT-M",
                    "--hparams_dir", str(root / "docs/examples/easyedit-hparams/FT-M.yaml"),
                    "--data_dir", str(shared_data / "zsre"), "--ds_size", "2", "--metrics_save_dir", str(tmp_path)],
                   check=True, capture_output=True, cwd=tmp_path)
    written = json.loads((tmp_path / "FT-M_results.json").read_text())
    assert len(written) == 2
    example = json.loads(json.dumps(EASYEDIT_EXAMPLE))
    for entry in written:  # EasyEdit's script passes no ground_truth: the request's is None
        assert set(entry["requested_rewrite"]) == set(example["requested_rewrite"])
        assert _structure({k: v for k, v in entry.items() if k != "requested_rewrite"}) == \
            _structure({k: v for k, v in example.items() if k != "requested_rewrite"})
