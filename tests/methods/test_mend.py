"""MEND on a tiny Llama: a short training makes edits work, restore is exact, checkpoints are checked."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import capital_edit_examples, build_tiny_llama, snapshot, state_equal
from lmedit.registry import load_edit
from lmedit.methods.mend import MENDHyperParams, MENDTrainingParams, apply_mend, train_mend
from lmedit.registry import get_method
from lmedit.requests import EditRequest
from lmedit.training import CheckpointError, EditExample



def _examples(n: int, seed: int) -> list[EditExample]:
    return capital_edit_examples(n, seed)


def _params(**changes) -> MENDTrainingParams:
    base = dict(layers=[1, 2], rank=8, max_steps=40, batch_size=8, val_every=20, val_examples=16, save_every=10,
                lr=1e-3, lr_lr=1e-4, edit_lr=1e-2, cedit=1.0, patience=10)
    return MENDTrainingParams(**{**base, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, word_tok):
    model = build_tiny_llama(len(word_tok))
    folder = tmp_path_factory.mktemp("mend")
    result = train_mend(model, word_tok, _params(), _examples(200, 0), _examples(16, 1), folder, show_progress=False)
    return model, folder, result


def _score(model, tok, prompt: str, target: str):
    from lmedit.evaluation.scoring import score_teacher_forced

    return score_teacher_forced(model, tok, [(prompt, target)])[0]


def test_training_improves_validation_and_keeps_its_best(trained):
    _model, folder, result = trained
    assert result.status == "finished" and result.steps == 40
    assert result.curve[0]["pre_rewrite_acc"] < result.curve[-1]["rewrite_acc"]
    config = json.loads((folder / "config.json").read_text())
    assert config["method"] == "MEND" and config["training"]["step"] == result.best_step
    assert [w["name"] for w in config["weights"]] == ["model.layers.1.mlp.down_proj.weight",
                                                     "model.layers.2.mlp.down_proj.weight"]


def test_edit_takes_effect_and_restore_is_exact(trained, word_tok):
    model, folder, _ = trained
    before = snapshot(model)
    hparams = MENDHyperParams(archive=str(folder))
    requests = [EditRequest(e.prompt, e.target) for e in _examples(6, 7)]
    improved = 0
    for request in requests:
        pre = _score(model, word_tok, request.prompt, request.target_new)
        handle = apply_mend(model, word_tok, [request], hparams)
        assert set(handle.param_names) == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
        post = _score(model, word_tok, request.prompt, request.target_new)
        # a random tiny model's logits are nearly uniform: the edit moves the argmax, the NLL only a little
        improved += pre.token_accuracy == 0 and post.token_accuracy == 1 and post.mean_nll < pre.mean_nll - 0.1
        handle.restore()
        assert state_equal(model, before)
    assert improved >= len(requests) - 1


def test_batched_edit_and_saved_edit_round_trip(trained, word_tok, tmp_path):
    model, folder, _ = trained
    before = snapshot(model)
    requests = [EditRequest(e.prompt, e.target) for e in _examples(3, 9)]
    assert get_method("MEND").supports_batch
    handle = apply_mend(model, word_tok, requests, MENDHyperParams(archive=str(folder)))
    edited = snapshot(model)
    assert not state_equal(model, before)
    handle.save(tmp_path / "edit")
    handle.restore()
    assert state_equal(model, before)
    loaded = load_edit(model, tmp_path / "edit")
    assert state_equal(model, edited)
    loaded.restore()
    assert state_equal(model, before)


def test_missing_checkpoint_names_the_training_command(word_tok, tmp_path):
    model = build_tiny_llama(len(word_tok))
    with pytest.raises(CheckpointError, match="lmedit train mend"):
        apply_mend(model, word_tok, [EditRequest("the capital of france is", "rome")],
                   MENDHyperParams(archive=str(tmp_path / "none")))


def test_checkpoint_of_another_model_is_refused(trained, word_tok):
    _model, folder, _ = trained
    other = build_tiny_llama(len(word_tok), seed=5)
    with pytest.raises(CheckpointError, match="another model"):
        apply_mend(other, word_tok, [EditRequest("the capital of france is", "rome")], MENDHyperParams(archive=str(folder)))


def test_mend_training_resumes_exactly(word_tok, tmp_path):
    train, val = _examples(64, 2), _examples(8, 3)
    params = _params(max_steps=12, val_every=6, save_every=4)
    straight_model = build_tiny_llama(len(word_tok))
    train_mend(straight_model, word_tok, params, train, val, tmp_path / "a", show_progress=False)
    train_mend(build_tiny_llama(len(word_tok)), word_tok, _params(max_steps=8, val_every=6, save_every=4),
               train, val, tmp_path / "b", show_progress=False)
    result = train_mend(build_tiny_llama(len(word_tok)), word_tok, params, train, val, tmp_path / "b", show_progress=False)
    assert result.resumed_from == 8 and result.steps == 12
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "resume" / "state.safetensors"))
    b = load_file(str(tmp_path / "b" / "resume" / "state.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.embedded
def test_embedded_short_training_then_edit_and_exact_restore(embedded, shared_data, tmp_path):
    from lmedit.training import load_examples

    model, tok = embedded
    train = load_examples(shared_data / "counterfact" / "counterfact-train.json", limit=8)
    val = load_examples(shared_data / "counterfact" / "counterfact-val.json", limit=4)
    params = MENDTrainingParams(max_steps=2, batch_size=4, val_every=2, val_examples=4)
    result = train_mend(model, tok, params, train, val, tmp_path, show_progress=False)
    assert result.best_step == 2
    before = snapshot(model)
    request = EditRequest("The Eiffel Tower is located in the city of", "Rome")
    handle = apply_mend(model, tok, [request], MENDHyperParams(archive=str(tmp_path)))
    assert set(handle.delta_norms()) == {f"model.layers.{i}.mlp.down_proj.weight" for i in (27, 28, 29)}
    assert all(v > 0 for v in handle.delta_norms().values())
    handle.restore()
    assert state_equal(model, before)


def test_training_on_a_bfloat16_model_runs_with_float32_networks(word_tok, tmp_path):
    """The float32 network's factors meet bfloat16 activations in the training forward (they raised a dtype error)."""
    model = build_tiny_llama(len(word_tok)).to(torch.bfloat16)
    result = train_mend(model, word_tok, _params(max_steps=4, val_every=2, save_every=2), _examples(32, 4),
                        _examples(8, 5), tmp_path / "bf16", show_progress=False)
    assert result.status == "finished" and result.steps == 4
    assert all(torch.isfinite(torch.tensor(point["rewrite_acc"])) for point in result.curve)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_training_moves_the_editor_network_not_only_its_steps(trained):
    """Every part of the editor layers must leave its start (with relu at the identity start, none of them did)."""
    from safetensors.torch import load_file

    _model, folder, _ = trained
    tensors = load_file(folder / "model.safetensors")
    starts = {"U": 0.0, "bias": 0.0, "scale": 1.0, "shift": 0.0}
    for name, start in starts.items():
        moved = [float((t - start).abs().max()) for key, t in tensors.items() if key.endswith(f".{name}")]
        assert moved and min(moved) > 0, f"{name} never trained: {moved}"
