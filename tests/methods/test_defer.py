"""DEFER invariants on tiny random models: effect, hard gate, exact restore, save/load in a new process,
no state change while evaluating, batch-independent (left-padded) evaluation."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_same_metrics, snapshot, state_equal
from lmedit.adapters import AdapterError
from lmedit.evaluation import EvalConfig, Evaluator, score_teacher_forced
from lmedit.forward import generate_greedy
from lmedit.handles import EditHandleError, restore_all
from lmedit.hparams import HyperParamsError
from lmedit.methods.defer import DeferAdapter
from lmedit.registry import get_method
from lmedit.requests import EditRequest
from lmedit.spec import get_module
from test_grace import run_in_new_process

LLAMA_PATH = "model.layers.1.mlp.down_proj"
FACT = EditRequest("the capital of france is", "rome", case_id="france", rephrase=("the city of france is",),
                   locality={"n": [("who wrote hamlet", "shakespeare"), ("the sky color is", "blue")]})
OTHER = EditRequest("who wrote hamlet", "tolstoy", case_id="hamlet")


def _apply(model, tok, requests, path=LLAMA_PATH, **overrides):
    info = get_method("DEFER")
    hparams = info.load_hparams(overrides={"inner_params": [f"{path}.weight"], "n_iter": 40, "edit_lr": 1e-2, **overrides})
    return info.apply(model, tok, requests, hparams)


def test_edit_takes_effect_under_both_scorings(tiny_llama, word_tok):
    handle = _apply(tiny_llama, word_tok, [FACT])
    assert score_teacher_forced(tiny_llama, word_tok, [(FACT.prompt, "rome")], packing=False)[0].token_accuracy == 1.0
    assert generate_greedy(tiny_llama, word_tok, [FACT.prompt], [1])[0] == tuple(word_tok("rome").input_ids)
    handle.restore()


def test_restore_is_bit_exact_and_puts_the_original_layer_back(tiny_model, word_tok):
    path = LLAMA_PATH if hasattr(tiny_model, "model") else "transformer.h.1.mlp.c_proj"
    original_module = get_module(tiny_model, path)
    original_state = snapshot(tiny_model)
    ids = torch.tensor([word_tok("the capital of france is rome").input_ids])
    original_logits = tiny_model(ids).logits
    handle = _apply(tiny_model, word_tok, [FACT], path)
    adapter = get_module(tiny_model, path)
    assert isinstance(adapter, DeferAdapter) and handle.info["losses"][-1] < handle.info["losses"][0]
    handle.restore()
    assert get_module(tiny_model, path) is original_module
    assert state_equal(tiny_model, original_state)
    assert torch.equal(tiny_model(ids).logits, original_logits)
    assert not any(p.requires_grad for p in tiny_model.parameters())


def test_inference_gate_is_hard_and_reads_the_last_real_token(tiny_llama, word_tok):
    handle = _apply(tiny_llama, word_tok, [FACT])
    adapter = get_module(tiny_llama, LLAMA_PATH)
    x = torch.randn(3, 5, adapter.in_features)
    out = adapter(x)
    base = adapter.original(x)
    value = adapter.value_net(x[:, -1])
    fired = adapter.gate_values(x) >= adapter.threshold
    for row in range(3):
        expected = value[row].expand(5, -1) if fired[row] else base[row]
        assert torch.equal(out[row], expected)
    handle.restore()


def test_sequential_edits_share_one_adapter_and_restore_newest_first(tiny_llama, word_tok):
    original_state = snapshot(tiny_llama)
    first = _apply(tiny_llama, word_tok, [FACT])
    adapter = get_module(tiny_llama, LLAMA_PATH)
    after_first = snapshot(tiny_llama)
    second = _apply(tiny_llama, word_tok, [OTHER])
    assert get_module(tiny_llama, LLAMA_PATH) is adapter and adapter.edit_log == ["france", "hamlet"]
    with pytest.raises(EditHandleError, match="newest first"):
        first.restore()
    second.restore()
    assert state_equal(tiny_llama, after_first)
    first.restore()
    assert state_equal(tiny_llama, original_state)


def test_evaluation_changes_no_state_and_batches_equal_one_at_a_time(tiny_llama, word_tok):
    handles = [_apply(tiny_llama, word_tok, [FACT]), _apply(tiny_llama, word_tok, [OTHER])]
    state = snapshot(tiny_llama)
    requests = [FACT, OTHER, EditRequest("the sky color is", "green grass", locality={"n": [("the sun", "star")]})]
    results = {}
    for batch_size in (1, 8):
        evaluator = Evaluator(word_tok, EvalConfig(mode="both", batch_size=batch_size, packing=False))
        pre = evaluator.capture(tiny_llama, requests)
        results[batch_size] = (pre.metrics, evaluator.score(tiny_llama, requests, pre))
    for part in (0, 1):
        assert_same_metrics(results[1][part], results[8][part])
    assert state_equal(tiny_llama, state)
    assert get_module(tiny_llama, LLAMA_PATH).edit_log == ["france", "hamlet"]
    restore_all(handles)


def test_save_then_load_in_a_new_process_gives_identical_outputs(tiny_llama, word_tok, tmp_path):
    handle = _apply(tiny_llama, word_tok, [FACT, OTHER])
    text = "the capital of france is rome"
    ids = torch.tensor([word_tok(text).input_ids])
    edited = tiny_llama(ids).logits
    handle.save(tmp_path / "defer")
    handle.restore()
    child = run_in_new_process(tmp_path / "defer", text, tmp_path / "out.safetensors")
    assert torch.equal(child["edited"], edited)
    assert torch.equal(child["restored"], tiny_llama(ids).logits)


def test_settings_are_checked(tiny_llama, word_tok):
    with pytest.raises(HyperParamsError, match="threshold"):
        get_method("DEFER").load_hparams(overrides={"threshold": 1.5})
    handle = _apply(tiny_llama, word_tok, [FACT])
    with pytest.raises(AdapterError, match="cannot change"):
        _apply(tiny_llama, word_tok, [OTHER], threshold=0.7)
    handle.restore()


def test_llama_7b_preset_has_easyedit_values():
    hparams = get_method("DEFER").load_hparams(preset="llama-7b")
    assert (hparams.layer, hparams.module) == (27, "mlp_out")
    assert (hparams.edit_lr, hparams.n_iter, hparams.threshold) == (7e-5, 100, 0.5)
