"""FT-L and FT-M invariants on tiny random models: effect, exact restore, accumulation, save/load."""

from __future__ import annotations

import pytest
import torch

from conftest import snapshot, state_equal
from lmedit.evaluation import EvalConfig, Evaluator, score_teacher_forced
from lmedit.handles import restore_all
from lmedit.registry import load_edit
from lmedit.registry import get_method
from lmedit.requests import EditRequest

FACT_A = EditRequest("the capital of france is", "rome", case_id="a")
FACT_B = EditRequest("who wrote hamlet", "tolstoy", case_id="b")


def _acc(model, tok, request):
    return score_teacher_forced(model, tok, [(request.prompt, request.target_new)])[0].token_accuracy


def _ft_m(**overrides):
    info = get_method("FT-M")
    return info, info.load_hparams(overrides={"layers": [1], "lr": 5e-2, "num_steps": 40, **overrides})


def test_ft_m_edit_takes_effect_and_restores_bit_exactly(tiny_model, word_tok):
    info, hparams = _ft_m()
    original = snapshot(tiny_model)
    assert _acc(tiny_model, word_tok, FACT_A) == 0.0
    handle = info.apply(tiny_model, word_tok, [FACT_A], hparams)
    assert _acc(tiny_model, word_tok, FACT_A) == 1.0
    assert not state_equal(tiny_model, original)
    handle.restore()
    assert state_equal(tiny_model, original)
    assert not any(p.requires_grad for p in tiny_model.parameters())


def test_ft_l_restores_bit_exactly_and_respects_the_norm_constraint(tiny_model, word_tok):
    info = get_method("FT-L")
    hparams = info.load_hparams(overrides={"layers": [1], "lr": 1e-2, "norm_constraint": 1e-3})
    original = snapshot(tiny_model)
    handle = info.apply(tiny_model, word_tok, [FACT_A], hparams)
    changed = dict(tiny_model.named_parameters())
    for name in handle.param_names:
        delta = (changed[name] - original[name]).abs().max().item()
        assert 0 < delta <= 1e-3 + 1e-7
    handle.restore()
    assert state_equal(tiny_model, original)


def test_only_the_chosen_layer_changes(tiny_llama, word_tok):
    info, hparams = _ft_m()
    original = snapshot(tiny_llama)
    handle = info.apply(tiny_llama, word_tok, [FACT_A], hparams)
    changed = [k for k, v in tiny_llama.state_dict().items() if not torch.equal(v, original[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"] == handle.param_names
    handle.restore()


def test_sequential_edits_accumulate_and_restore_in_reverse(tiny_llama, word_tok):
    info, hparams = _ft_m()
    original = snapshot(tiny_llama)
    first = info.apply(tiny_llama, word_tok, [FACT_A], hparams)
    second = info.apply(tiny_llama, word_tok, [FACT_B], hparams)
    assert _acc(tiny_llama, word_tok, FACT_A) == 1.0
    assert _acc(tiny_llama, word_tok, FACT_B) == 1.0
    restore_all([first, second])
    assert state_equal(tiny_llama, original)


def test_batch_edit(tiny_llama, word_tok):
    info, hparams = _ft_m(num_steps=60)
    handle = info.apply(tiny_llama, word_tok, [FACT_A, FACT_B], hparams)
    assert _acc(tiny_llama, word_tok, FACT_A) == 1.0
    assert _acc(tiny_llama, word_tok, FACT_B) == 1.0
    handle.restore()


def test_save_then_load_reproduces_outputs(tiny_llama, word_tok, tmp_path):
    from conftest import build_tiny_llama

    info, hparams = _ft_m()
    handle = info.apply(tiny_llama, word_tok, [FACT_A], hparams)
    ids = torch.tensor([word_tok("the capital of france is").input_ids])
    edited_logits = tiny_llama(ids).logits
    handle.save(tmp_path / "edit")
    fresh = build_tiny_llama(len(word_tok))  # same seed: the same original weights
    original_logits = fresh(ids).logits
    loaded = load_edit(fresh, tmp_path / "edit")
    assert torch.equal(fresh(ids).logits, edited_logits)
    loaded.restore()
    assert torch.equal(fresh(ids).logits, original_logits)


def test_load_edit_onto_a_different_model_fails_clearly(tiny_llama, word_tok, tmp_path):
    from conftest import build_tiny_gpt2
    from lmedit.handles import EditHandleError

    info, hparams = _ft_m()
    info.apply(tiny_llama, word_tok, [FACT_A], hparams).save(tmp_path / "edit")
    with pytest.raises(EditHandleError, match="not on this model"):
        load_edit(build_tiny_gpt2(len(word_tok)), tmp_path / "edit")


def test_bad_layer_is_reported(tiny_llama, word_tok):
    from lmedit.hparams import HyperParamsError

    info, hparams = _ft_m(layers=[7])
    with pytest.raises(HyperParamsError, match="layer 7 does not exist"):
        info.apply(tiny_llama, word_tok, [FACT_A], hparams)


def test_evaluation_after_edit_sees_the_change(tiny_llama, word_tok):
    info, hparams = _ft_m()
    request = EditRequest("the capital of france is", "rome", locality={"n": [("sky", "blue green")]})
    evaluator = Evaluator(word_tok, EvalConfig())
    pre = evaluator.capture(tiny_llama, [request])
    handle = info.apply(tiny_llama, word_tok, [request], hparams)
    post = evaluator.score(tiny_llama, [request], pre)[0]
    handle.restore()
    assert pre.metrics[0]["rewrite_acc"] == 0.0 and post["rewrite_acc"] == 1.0
    assert 0.0 <= post["locality"] <= 1.0
