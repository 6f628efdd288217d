"""GRACE invariants on tiny random models: effect, accumulation, rollback of any edit, exact restore,
save/load in a new process, no state change while evaluating, batch-independent evaluation."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_metrics, snapshot, state_equal
from lmedit.adapters import AdapterError
from lmedit.evaluation import EvalConfig, Evaluator, score_teacher_forced
from lmedit.forward import generate_greedy
from lmedit.handles import EditHandleError, restore_all
from lmedit.registry import load_edit
from lmedit.methods.grace import GraceAdapter, rollback
from lmedit.registry import get_method
from lmedit.requests import EditRequest
from lmedit.spec import get_module

LLAMA_PATH = "model.layers.1.mlp.down_proj"
GPT2_PATH = "transformer.h.1.mlp.c_proj"
FACTS = [
    EditRequest("the capital of france is", "rome", case_id="france", rephrase=("the city of france is",),
                locality={"n": [("who wrote hamlet", "shakespeare")]}),
    EditRequest("who wrote hamlet", "tolstoy", case_id="hamlet", locality={"n": [("the sky color is", "blue")]}),
    EditRequest("the sky color is", "green", case_id="sky"),
    EditRequest("the mother tongue of the queen is", "italian", case_id="queen"),
    EditRequest("the sport of the king is", "tennis", case_id="king"),
]


def _hparams(path: str = LLAMA_PATH, **overrides):
    info = get_method("GRACE")
    return info, info.load_hparams(overrides={"inner_params": [f"{path}.weight"], "n_iter": 25, "edit_lr": 1.0,
                                              "eps": 1.0, **overrides})


def _path(model) -> str:
    return LLAMA_PATH if hasattr(model, "model") else GPT2_PATH


def _holds(model, tok, request) -> bool:
    return score_teacher_forced(model, tok, [(request.prompt, request.target_new)], packing=False)[0].token_accuracy == 1.0


def _edit_all(model, tok, requests, **overrides):
    info, hparams = _hparams(_path(model), **overrides)
    return [info.apply(model, tok, [r], hparams) for r in requests]


def test_edit_takes_effect_and_restore_is_bit_exact(tiny_model, word_tok):
    path = _path(tiny_model)
    original_module = get_module(tiny_model, path)
    original_state = snapshot(tiny_model)
    ids = torch.tensor([word_tok("the capital of france is rome").input_ids])
    original_logits = tiny_model(ids).logits
    assert not _holds(tiny_model, word_tok, FACTS[0])
    (handle,) = _edit_all(tiny_model, word_tok, FACTS[:1])
    assert isinstance(get_module(tiny_model, path), GraceAdapter)
    assert _holds(tiny_model, word_tok, FACTS[0])
    handle.restore()
    assert get_module(tiny_model, path) is original_module
    assert state_equal(tiny_model, original_state)
    assert torch.equal(tiny_model(ids).logits, original_logits)
    assert not any(p.requires_grad for p in tiny_model.parameters())


def test_sequential_edits_all_hold_and_keys_labels_ids_stay_aligned(tiny_llama, word_tok):
    original_state = snapshot(tiny_llama)
    handles = _edit_all(tiny_llama, word_tok, FACTS)
    adapter = get_module(tiny_llama, LLAMA_PATH)
    assert [h.edit_ids for h in handles] == [[f.case_id] for f in FACTS]
    assert adapter.edit_log == [f.case_id for f in FACTS]
    for request in FACTS:
        assert _holds(tiny_llama, word_tok, request), request.case_id
    # every entry's label is the target of the edit that owns it, in insertion order
    by_id = {f.case_id: tuple(word_tok(f"{f.prompt} {f.target_new}").input_ids[len(word_tok(f.prompt).input_ids):])
             for f in FACTS}
    assert len(adapter.keys) == len(adapter.values) == len(adapter.radii) == len(adapter.labels) == len(adapter.owners)
    for label, owners in zip(adapter.labels, adapter.owners):
        assert all(by_id[o] == label for o in owners)
    restore_all(handles)
    assert state_equal(tiny_llama, original_state)


@pytest.mark.parametrize("k", range(len(FACTS)))
def test_rollback_of_any_single_edit_leaves_the_others(edited_five, word_tok, k):
    model, handles = copy.deepcopy(edited_five)
    rollback(model, FACTS[k].case_id)
    assert not _holds(model, word_tok, FACTS[k])
    for j, request in enumerate(FACTS):
        if j != k:
            assert _holds(model, word_tok, request), (k, request.case_id)
    restore_all(handles)  # the rolled-back edit's handle has nothing left to undo
    assert not isinstance(get_module(model, LLAMA_PATH), GraceAdapter)


@pytest.fixture(scope="module")
def edited_five():
    from conftest import build_tiny_llama, build_word_tokenizer

    tok = build_word_tokenizer()
    model = build_tiny_llama(len(tok))
    return model, _edit_all(model, tok, FACTS)


def test_rolling_back_every_edit_removes_the_adapter(tiny_llama, word_tok):
    original_module = get_module(tiny_llama, LLAMA_PATH)
    handles = _edit_all(tiny_llama, word_tok, FACTS[:2])
    rollback(tiny_llama, "hamlet")
    rollback(tiny_llama, "france")
    assert get_module(tiny_llama, LLAMA_PATH) is original_module
    with pytest.raises(AdapterError, match="no GRACE edit 'france'"):
        rollback(tiny_llama, "france")
    restore_all(handles)


def test_restoring_out_of_order_is_refused(tiny_llama, word_tok):
    first, second = _edit_all(tiny_llama, word_tok, FACTS[:2])
    with pytest.raises(EditHandleError, match="newest first"):
        first.restore()
    restore_all([first, second])


def _query_distance(model, tok, a: str, b: str) -> float:
    from lmedit.methods.grace import _layer_input

    adapter = get_module(model, LLAMA_PATH)
    ka, kb = (_layer_input(model, adapter, tok(p).input_ids, len(tok(p).input_ids) - 1) for p in (a, b))
    return float((ka - kb).norm())


def test_split_and_expand_rules(tiny_llama, word_tok):
    info, hparams = _hparams(n_iter=2)
    first = info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    distance = _query_distance(tiny_llama, word_tok, FACTS[0].prompt, "the city of france is")
    first.restore()
    # radius 0.75 d: the second query is outside the ball but within reach (eps + radius = 1.5 d)
    info, hparams = _hparams(n_iter=2, eps=0.75 * distance)
    info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    adapter = get_module(tiny_llama, LLAMA_PATH)
    handle = info.apply(tiny_llama, word_tok, [EditRequest("the city of france is", "rome", case_id="same")], hparams)
    assert handle.info["action"] == "expanded" and len(adapter) == 1 and adapter.owners == [["france", "same"]]
    assert float(adapter.radii[0]) == pytest.approx(distance, rel=1e-4)  # coverage: radius = distance
    handle.restore()
    assert float(adapter.radii[0]) == pytest.approx(0.75 * distance) and adapter.owners == [["france"]]
    handle = info.apply(tiny_llama, word_tok, [EditRequest("the city of france is", "berlin", case_id="other")], hparams)
    assert handle.info["action"] == "split" and len(adapter) == 2 and adapter.labels[0] != adapter.labels[1]
    assert float(adapter.radii[0]) == pytest.approx(distance / 2 - 1e-5, rel=1e-4)
    assert float(adapter.radii[1]) == pytest.approx(distance / 2, rel=1e-4)
    far = info.apply(tiny_llama, word_tok, [EditRequest("the sky color is", "red", case_id="far")], hparams.replace(eps=1e-9))
    assert far.info["action"] == "added" and len(adapter) == 3


def test_moving_average_moves_the_key_halfway(tiny_llama, word_tok):
    info, hparams = _hparams(n_iter=2, eps=1e-9)
    info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    distance = _query_distance(tiny_llama, word_tok, FACTS[0].prompt, "the city of france is")
    adapter = get_module(tiny_llama, LLAMA_PATH)
    adapter.radii[0] = 0.75 * distance
    before = adapter.keys[0].clone()
    hparams = hparams.replace(eps=0.75 * distance, eps_expand="moving_avg")
    handle = info.apply(tiny_llama, word_tok, [EditRequest("the city of france is", "rome")], hparams)
    assert handle.info["action"] == "expanded"
    assert float((adapter.keys[0] - before).norm()) == pytest.approx(distance / 2, rel=1e-3)
    handle.restore()
    assert torch.equal(adapter.keys[0], before)


@pytest.mark.parametrize("replacement", ["replace_last", "replace_prompt", "replace_all"])
def test_evaluation_changes_no_state_and_batches_equal_one_at_a_time(tiny_llama, word_tok, replacement):
    handles = _edit_all(tiny_llama, word_tok, FACTS[:3], replacement=replacement)
    adapter = get_module(tiny_llama, LLAMA_PATH)
    state = snapshot(tiny_llama)
    book = (list(adapter.entry_ids), list(adapter.labels), [list(o) for o in adapter.owners], list(adapter.edit_log))
    results = {}
    for batch_size in (1, 16):
        evaluator = Evaluator(word_tok, EvalConfig(mode="both", batch_size=batch_size, packing=False))
        pre = evaluator.capture(tiny_llama, FACTS)
        results[batch_size] = (pre.metrics, evaluator.score(tiny_llama, FACTS, pre))
    for part in (0, 1):
        assert_same_metrics(results[1][part], results[16][part])
    assert state_equal(tiny_llama, state)
    assert book == (adapter.entry_ids, adapter.labels, adapter.owners, adapter.edit_log)
    post = results[1][1]
    assert all(post[i]["rewrite_acc"] == 1.0 for i in range(3))
    restore_all(handles)


def test_replace_last_holds_under_generation_too(tiny_llama, word_tok):
    handles = _edit_all(tiny_llama, word_tok, FACTS)
    prompts = [f.prompt for f in FACTS]
    generated = generate_greedy(tiny_llama, word_tok, prompts, [1] * len(FACTS), batch_size=len(FACTS))
    assert [g[0] for g in generated] == [word_tok(f.target_new).input_ids[0] for f in FACTS]
    restore_all(handles)


def test_a_later_edit_cannot_switch_the_replacement_mode(tiny_llama, word_tok):
    info, hparams = _hparams()
    handle = info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    with pytest.raises(AdapterError, match="cannot switch"):
        info.apply(tiny_llama, word_tok, [FACTS[1]], hparams.replace(replacement="replace_all"))
    handle.restore()


def test_batch_call_edits_each_request_and_restores_together(tiny_llama, word_tok):
    original_state = snapshot(tiny_llama)
    info, hparams = _hparams()
    handle = info.apply(tiny_llama, word_tok, FACTS[:3], hparams)
    assert handle.edit_ids == ["france", "hamlet", "sky"]
    assert all(_holds(tiny_llama, word_tok, f) for f in FACTS[:3])
    handle.restore()
    assert state_equal(tiny_llama, original_state)


CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import build_tiny_llama, build_word_tokenizer
from safetensors.torch import save_file
from lmedit.registry import load_edit
tok = build_word_tokenizer()
model = build_tiny_llama(len(tok))
ids = torch.tensor([tok({text!r}).input_ids])
handle = load_edit(model, {edit!r})
edited = model(ids).logits
handle.restore()
save_file({{"edited": edited.contiguous(), "restored": model(ids).logits.contiguous()}}, {out!r})
"""


def run_in_new_process(edit_dir: Path, text: str, out: Path) -> dict[str, torch.Tensor]:
    """Load a saved edit onto a freshly built tiny Llama in another Python process; return its logits."""
    tests = str(Path(__file__).resolve().parents[1])
    script = CHILD.format(tests=tests, text=text, edit=str(edit_dir), out=str(out))
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)
    return load_file(str(out))


def test_save_then_load_in_a_new_process_gives_identical_outputs(tiny_llama, word_tok, tmp_path):
    handles = _edit_all(tiny_llama, word_tok, FACTS[:3])
    text = "the capital of france is rome"
    ids = torch.tensor([word_tok(text).input_ids])
    edited = tiny_llama(ids).logits
    handles[-1].save(tmp_path / "grace")
    restore_all(handles)
    original = tiny_llama(ids).logits
    assert not (tmp_path / "grace" / "edit.safetensors").read_bytes().startswith(b"\x80")  # not a pickle
    child = run_in_new_process(tmp_path / "grace", text, tmp_path / "out.safetensors")
    assert torch.equal(child["edited"], edited)
    assert torch.equal(child["restored"], original)


def test_loaded_edit_onto_a_model_without_that_layer_fails_clearly(tiny_llama, tiny_gpt2, word_tok, tmp_path):
    (handle,) = _edit_all(tiny_llama, word_tok, FACTS[:1])
    handle.save(tmp_path / "grace")
    with pytest.raises(EditHandleError, match="not on this model: its type is gpt2"):
        load_edit(tiny_gpt2, tmp_path / "grace")
    with pytest.raises(EditHandleError, match="already holds a GRACE adapter"):
        load_edit(tiny_llama, tmp_path / "grace")


def test_presets_load_and_llama_7b_has_easyedit_values():
    info = get_method("GRACE")
    hparams = info.load_hparams(preset="llama-7b")
    assert (hparams.layer, hparams.module) == (27, "mlp_out")
    assert (hparams.edit_lr, hparams.n_iter, hparams.eps, hparams.replacement) == (1.0, 50, 1.0, "replace_last")
    assert info.load_hparams(preset="smollm2-135m").layer == 22
