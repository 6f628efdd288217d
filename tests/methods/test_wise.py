"""WISE invariants on tiny random models: accumulation in one adapter, exact restore across shard saves and
merges, no state change while evaluating (EasyEdit merges during evaluation), padding-independent routing,
sharding masks, merging rules, save/load in a new process."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_tiny_llama, snapshot, state_equal
from lmedit.adapters import AdapterError
from lmedit.evaluation import EvalConfig, Evaluator, score_teacher_forced
from lmedit.handles import restore_all
from lmedit.hparams import HyperParamsError
from lmedit.methods.wise import WiseAdapter, merge_task_vectors, scored_tokens
from lmedit.registry import get_method
from lmedit.requests import EditRequest
from lmedit.spec import get_module
from test_grace import run_in_new_process

LLAMA_PATH = "model.layers.1.mlp.down_proj"
FACTS = [
    EditRequest("the capital of france is", "rome", case_id="france", locality={"n": [("the sky color is", "blue")]}),
    EditRequest("who wrote hamlet", "tolstoy", case_id="hamlet", locality={"n": [("the sun is a", "star")]}),
    EditRequest("the mother tongue of the queen is", "italian", case_id="queen",
                locality={"n": [("the river flows through london", "city")]}),
    EditRequest("the sport of the king is", "tennis", case_id="king", locality={"n": [("grass is", "green")]}),
]


def _hparams(**overrides):
    info = get_method("WISE")
    values = {"inner_params": [f"{LLAMA_PATH}.weight"], "n_iter": 15, "edit_lr": 30.0, "template_lengths": [2],
              "act_margin": [0.01, 0.02, 0.01], "norm_constraint": None, **overrides}
    return info, info.load_hparams(overrides=values)


def _edit_all(model, tok, requests, **overrides):
    info, hparams = _hparams(**overrides)
    return [info.apply(model, tok, [r], hparams) for r in requests]


def _holds(model, tok, request) -> bool:
    return score_teacher_forced(model, tok, [(request.prompt, request.target_new)], packing=False)[0].token_accuracy == 1.0


def _memory_state(adapter: WiseAdapter) -> tuple:
    return (adapter.side.clone(), adapter.mask.clone(), None if adapter.main is None else adapter.main.clone(),
            [m.clone() for m in adapter.memories], list(adapter.memory_min_act), adapter.side_min_act,
            adapter.edit_count, adapter.merge_count, list(adapter.edit_log))


def _same(a: tuple, b: tuple) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y
    return all(eq(x, y) for x, y in zip(a, b))


def test_sequential_edits_accumulate_in_one_adapter_and_restore_exactly(tiny_llama, word_tok):
    # Retention of earlier edits: test_after_n_sequential_edits_all_n_still_hold (these facts share most words).
    original_module = get_module(tiny_llama, LLAMA_PATH)
    original_state = snapshot(tiny_llama)
    info, hparams = _hparams()
    handles = []
    for request in FACTS[:3]:
        handles.append(info.apply(tiny_llama, word_tok, [request], hparams))
        assert _holds(tiny_llama, word_tok, request), request.case_id  # each edit takes effect
    adapter = get_module(tiny_llama, LLAMA_PATH)
    assert isinstance(adapter, WiseAdapter) and adapter.edit_count == 3 and adapter.edit_log == ["france", "hamlet", "queen"]
    assert all(h.adapter is adapter for h in handles)  # never rebuilt (EasyEdit's WISE rebuilds it every call)
    assert adapter.side_min_act == min(h.info["in_scope_deviation"] for h in handles)
    restore_all(handles)
    assert get_module(tiny_llama, LLAMA_PATH) is original_module
    assert state_equal(tiny_llama, original_state)
    assert not tiny_llama._forward_pre_hooks and not tiny_llama._forward_hooks


def test_undo_records_keep_only_the_masked_entries_and_each_undo_is_exact(tiny_llama, word_tok):
    """After the first edit an undo record holds mask_ratio of the layer, and undoing edits one by one retraces
    every earlier memory state bit for bit."""
    info, hparams = _hparams()
    states, handles = [], []
    for request in FACTS[:3]:
        adapter = get_module(tiny_llama, LLAMA_PATH)
        states.append(_memory_state(adapter) if isinstance(adapter, WiseAdapter) else None)
        handles.append(info.apply(tiny_llama, word_tok, [request], hparams))
    adapter = get_module(tiny_llama, LLAMA_PATH)
    sides = [h._records[0].state["side"] for h in handles]  # the undo record each apply keeps
    assert sides[0].values is None  # the first edit starts from W: nothing to keep
    total = adapter.side.numel()
    for side in sides[1:]:
        assert side.mask is not None and side.values.numel() == int(side.mask.sum()) < 0.3 * total
    for handle, state in zip(reversed(handles[1:]), reversed(states[1:])):
        handle.restore()
        assert _same(_memory_state(adapter), state)
    restore_all(handles)


def test_a_side_memory_that_differs_from_w_off_the_mask_is_kept_whole():
    from lmedit.methods.wise import SideUndo

    base = torch.randn(4, 6)
    mask = torch.rand(4, 6) < 0.3
    side = torch.where(mask, base + 1.0, base)
    kept = SideUndo.of(side, mask, base)
    assert kept.mask is mask and torch.equal(kept.rebuild(base), side)
    side[~mask] += 1e-7  # off the mask too: only a whole copy restores it
    whole = SideUndo.of(side, mask, base)
    assert whole.mask is None and torch.equal(whole.rebuild(base), side)
    fresh = SideUndo.of(base.clone(), mask, base)  # a fresh shard's side memory is W
    assert fresh.values is None and torch.equal(fresh.rebuild(base), base)


# Facts with no word in common, for the retention test below: on a tiny random model the inputs of prompts that share
# most of their words ("the ... of ... is") are nearly parallel, so any update for one moves the others.
DISJOINT = [
    EditRequest("eiffel tower located in", "berlin", case_id="tower", locality={"n": [("grass green", "sky")]}),
    EditRequest("who wrote hamlet", "tolstoy", case_id="hamlet", locality={"n": [("sun moon", "star")]}),
    EditRequest("river flows through london", "madrid", case_id="river", locality={"n": [("big small", "red")]}),
    EditRequest("mother tongue queen", "german", case_id="queen", locality={"n": [("president king", "blue")]}),
]


def _confident_llama(word_tok, seed: int):
    """A tiny Llama whose LM head can express a confident prediction (weights x30).

    With the default init the logits span about ±0.5, so the best target NLL one layer can reach is ~3.4
    (close to uniform) and any later change flips an earlier argmax: retention would be a coin toss.
    """
    model = build_tiny_llama(len(word_tok), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("sharding", ["one shard", "a shard per edit"])
def test_after_n_sequential_edits_all_n_still_hold(word_tok, seed, sharding):
    model = _confident_llama(word_tok, seed)
    shards = {"save_freq": 1, "merge_freq": 1000} if sharding == "a shard per edit" else {}
    assert not any(_holds(model, word_tok, r) for r in DISJOINT)
    handles = _edit_all(model, word_tok, DISJOINT, n_iter=30, edit_lr=1.0, **shards)
    assert [r.case_id for r in DISJOINT if _holds(model, word_tok, r)] == [r.case_id for r in DISJOINT]
    adapter = get_module(model, LLAMA_PATH)
    assert len(adapter.memories) == (len(DISJOINT) if shards else 0)  # retrieval picked the right memory each time
    restore_all(handles)


def test_gradient_mask_confines_a_shard_to_its_subspace(tiny_llama, word_tok):
    (handle,) = _edit_all(tiny_llama, word_tok, FACTS[:1], mask_ratio=0.3)
    adapter = get_module(tiny_llama, LLAMA_PATH)
    changed = adapter.side != adapter.original.weight
    assert changed.any() and not (changed & ~adapter.mask).any()
    assert 0.2 < adapter.mask.float().mean().item() < 0.4
    handle.restore()


@pytest.mark.parametrize("retrieve", [True, False])
def test_shards_are_saved_and_merged_and_restore_crosses_them_exactly(tiny_llama, word_tok, retrieve):
    original_state = snapshot(tiny_llama)
    handles = _edit_all(tiny_llama, word_tok, FACTS[:3], save_freq=1, merge_freq=2, retrieve=retrieve)
    adapter = get_module(tiny_llama, LLAMA_PATH)
    after_three = _memory_state(adapter)
    handles.append(_edit_all(tiny_llama, word_tok, FACTS[3:], save_freq=1, merge_freq=2, retrieve=retrieve)[0])
    assert adapter.merge_count == 2
    if retrieve:  # two merged memories (edits 1+2 and 3+4), each with its routing threshold
        assert len(adapter.memories) == len(adapter.memory_min_act) == 2 and adapter.main is None
    else:  # everything merged into the main memory
        assert adapter.memories == [] and adapter.main is not None
    assert torch.equal(adapter.side, adapter.original.weight)  # the side memory restarts after each shard
    handles[-1].restore()
    assert _same(_memory_state(adapter), after_three)
    restore_all(handles)
    assert state_equal(tiny_llama, original_state)


@pytest.mark.parametrize("retrieve", [True, False])
def test_evaluation_changes_no_state_and_batches_equal_one_at_a_time(tiny_llama, word_tok, retrieve):
    # save_freq=1 is the setting in which EasyEdit's WISE-Merge merges on every evaluation forward pass
    handles = _edit_all(tiny_llama, word_tok, FACTS[:3], save_freq=1, merge_freq=2, retrieve=retrieve)
    adapter = get_module(tiny_llama, LLAMA_PATH)
    state, memory = snapshot(tiny_llama), _memory_state(adapter)
    results = {}
    for batch_size in (1, 8):
        evaluator = Evaluator(word_tok, EvalConfig(mode="both", batch_size=batch_size, packing=False))
        pre = evaluator.capture(tiny_llama, FACTS)
        results[batch_size] = (pre.metrics, evaluator.score(tiny_llama, FACTS, pre))
    for one, batched in zip(results[1][0] + results[1][1], results[8][0] + results[8][1]):
        assert one.keys() == batched.keys()  # the same decisions; perplexities equal up to float rounding
        assert all(one[k] == pytest.approx(batched[k], rel=1e-5) for k in one)
    assert state_equal(tiny_llama, state) and _same(_memory_state(adapter), memory)
    assert adapter._input_mask is None  # the padding mask seen during a forward pass is not kept
    restore_all(handles)


def test_routing_ignores_left_padding(tiny_llama, word_tok):
    handles = _edit_all(tiny_llama, word_tok, FACTS[:2])
    adapter = get_module(tiny_llama, LLAMA_PATH)
    x = torch.randn(1, 4, adapter.in_features)
    padded = torch.cat([torch.randn(1, 3, adapter.in_features) * 50, x], dim=1)  # wild values in the padding
    adapter._input_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    out_padded = adapter(padded)[:, 3:]
    adapter._input_mask = None
    assert torch.allclose(out_padded, adapter(x), atol=1e-6)
    restore_all(handles)


def test_scored_tokens_leave_out_padding_and_optionally_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert scored_tokens(mask, 5, False).tolist() == mask.bool().tolist()
    assert scored_tokens(mask, 5, True).int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert scored_tokens(mask, 1, True).tolist() == [[True], [True]]  # generation step: the first token is cached
    assert scored_tokens(torch.tensor([[0, 0, 1]]), 3, True).int().tolist() == [[0, 0, 1]]  # nothing else to score


@pytest.mark.parametrize("exclude", [True, False])
def test_a_wild_first_token_routes_only_when_it_is_scored(tiny_llama, word_tok, exclude):
    handles = _edit_all(tiny_llama, word_tok, FACTS[:2], exclude_first_token=exclude)
    adapter = get_module(tiny_llama, LLAMA_PATH)
    x = torch.randn(1, 6, adapter.in_features) * 1e-3  # real tokens far below the routing threshold
    x[:, 0] = torch.randn(adapter.in_features) * 1e3  # an attention-sink-like first token
    out = adapter(x)[:, 1:]
    base, side = adapter.original(x)[:, 1:], adapter.with_weight(x, adapter.side)[:, 1:]
    assert not torch.allclose(base, side)
    assert torch.allclose(out, base if exclude else side)
    restore_all(handles)


def test_save_then_load_in_a_new_process_gives_identical_outputs(tiny_llama, word_tok, tmp_path):
    handles = _edit_all(tiny_llama, word_tok, FACTS[:3], save_freq=2, merge_freq=2)
    text = "the capital of france is rome"
    ids = torch.tensor([word_tok(text).input_ids])
    edited = tiny_llama(ids).logits
    handles[-1].save(tmp_path / "wise")
    meta = json.loads((tmp_path / "wise" / "edit.json").read_text())
    assert meta["kind"] == "WISE" and meta["state"]["memories"] == 1 and meta["edit_log"] == ["france", "hamlet", "queen"]
    restore_all(handles)
    child = run_in_new_process(tmp_path / "wise", text, tmp_path / "out.safetensors")
    assert torch.equal(child["edited"], edited)
    assert torch.equal(child["restored"], tiny_llama(ids).logits)


def test_irrelevant_prompts_come_from_a_file_or_the_request(tiny_llama, word_tok, tmp_path):
    info, hparams = _hparams()
    with pytest.raises(AdapterError, match="irrelevant prompt"):
        info.apply(tiny_llama, word_tok, [EditRequest("who wrote hamlet", "tolstoy")], hparams)
    assert not isinstance(get_module(tiny_llama, LLAMA_PATH), WiseAdapter)  # a failed first edit leaves nothing behind
    pool = tmp_path / "train.json"
    pool.write_text(json.dumps([{"loc": "the sun is a", "loc_ans": "star"}]))
    handle = info.apply(tiny_llama, word_tok, [EditRequest("who wrote hamlet", "tolstoy")],
                        hparams.replace(irrelevant_file=str(pool)))
    assert handle.info["irrelevant_deviation"] >= 0
    handle.restore()
    with pytest.raises(HyperParamsError, match="multiple of save_freq"):
        get_method("WISE").load_hparams(overrides={"save_freq": 3, "merge_freq": 4})


def test_a_later_edit_cannot_change_the_memory_layout(tiny_llama, word_tok):
    info, hparams = _hparams()
    handle = info.apply(tiny_llama, word_tok, [FACTS[0]], hparams)
    with pytest.raises(AdapterError, match="retrieve"):
        info.apply(tiny_llama, word_tok, [FACTS[1]], hparams.replace(retrieve=False))
    handle.restore()


# ------------------------------------------------------------------------- merging rules on small tensors


def test_ties_keeps_the_largest_entries_and_the_majority_sign():
    base = torch.zeros(4)
    a = torch.tensor([3.0, -1.0, 0.1, 2.0])
    b = torch.tensor([1.0, 2.0, -0.2, -4.0])
    merged = merge_task_vectors("ties", [0.5, 0.5], base, [a, b], density=0.5)
    # top-2 by magnitude: a keeps {3, 2}, b keeps {2, -4}; signs: entry 0 +, entry 1 +, entry 3 (1 - 2 < 0) -
    assert torch.allclose(merged, torch.tensor([3.0, 2.0, 0.0, -4.0]))


def test_linear_is_the_weighted_mean_of_all_task_vectors():
    base = torch.ones(3)
    shards = [base + torch.tensor([1.0, 0.0, 2.0]), base + torch.tensor([3.0, 2.0, 0.0])]
    merged = merge_task_vectors("linear", [0.5, 0.5], base, shards, density=1.0)
    assert torch.allclose(merged, base + torch.tensor([2.0, 1.0, 1.0]))


def test_dare_rescales_what_it_keeps():
    base = torch.zeros(20000)
    shard = torch.ones(20000)
    generator = torch.Generator().manual_seed(0)
    merged = merge_task_vectors("dare_ties", [1.0], base, [shard], density=0.25, generator=generator)
    kept = merged[merged != 0]
    assert torch.allclose(kept, torch.full_like(kept, 4.0)) and math.isclose(len(kept) / 20000, 0.25, abs_tol=0.02)
    plain = merge_task_vectors("dare_linear", [1.0], base, [shard], density=0.25, generator=generator)
    assert set(plain.unique().tolist()) == {0.0, 1.0}


def test_presets_load_and_llama_7b_has_easyedit_values():
    info = get_method("WISE")
    hparams = info.load_hparams(preset="llama-7b")
    assert (hparams.layer, hparams.module) == (27, "mlp_out")
    assert (hparams.edit_lr, hparams.n_iter, hparams.act_margin, hparams.act_ratio) == (1.0, 70, [5.0, 20.0, 10.0], 0.88)
    assert (hparams.save_freq, hparams.merge_freq, hparams.merge_alg, hparams.retrieve) == (500, 1000, "ties", True)
    smollm2 = info.load_hparams(preset="smollm2-135m")
    assert (smollm2.edit_lr, smollm2.act_ratio, smollm2.exclude_first_token) == (0.5, 0.88, True)
    assert (smollm2.save_freq, smollm2.merge_freq, smollm2.retrieve) == (1, 1000, True)  # a memory per edit
    assert hparams.exclude_first_token is False  # the reference keeps the first token in the deviation


def test_a_training_pass_equals_the_loss_and_deviations_of_each_row_alone(tiny_llama, word_tok):
    """The template rows and the long irrelevant row run as separately padded batches, the edit loss
    through the streamed head; both must give what each row computes unpadded, on its own."""
    from lmedit.adapters import ensure_adapter, frozen_model, remove_adapter
    from lmedit.forward import pad_id_of, tokenize_pair
    from lmedit.methods.wise import _EditContext, _TrainingPass

    adapter = ensure_adapter(tiny_llama, LLAMA_PATH, WiseAdapter, lambda original: WiseAdapter(original, LLAMA_PATH))
    side = (adapter.original.weight.detach() + 0.05 * torch.randn(adapter.original.weight.shape,
                                                                   generator=torch.Generator().manual_seed(0)))
    pairs = [tokenize_pair(word_tok, template.format(FACTS[0].prompt), FACTS[0].target_new)
             for template in ("{}", "yes the sky {}", "i think that {}")]
    irrelevant = word_tok("the river flows through london and the sun is a star and grass is green").input_ids
    context = _EditContext(side, torch.zeros(0, 0, dtype=torch.bool))
    adapter._editing = context
    try:
        with frozen_model(tiny_llama), torch.no_grad():
            training_pass = _TrainingPass(tiny_llama, LLAMA_PATH, context, pairs, irrelevant, pad_id_of(word_tok),
                                          exclude_first=True)
            assert training_pass.edit[1].uses_shortcut and training_pass.irrelevant[1].uses_shortcut
            loss, deviations = training_pass()
            row_losses, row_deviations = [], []
            for ids, targets in [(list(p.ids), list(p.target_ids)) for p in pairs] + [(irrelevant, [])]:
                context.scored = scored_tokens(torch.ones(1, len(ids), dtype=torch.bool), len(ids), True)
                logits = tiny_llama(input_ids=torch.tensor([ids])).logits[0].float()
                row_deviations.append(float(context.deviations[0]))
                if targets:
                    n = len(targets)
                    row_losses.append(torch.nn.functional.cross_entropy(logits[-n - 1 : -1], torch.tensor(targets)))
    finally:
        adapter._editing = None
        remove_adapter(tiny_llama, adapter)
    assert loss.item() == pytest.approx(torch.stack(row_losses).mean().item(), rel=1e-5)
    assert deviations.tolist() == pytest.approx(row_deviations, rel=1e-5)
    assert min(row_deviations) > 0
