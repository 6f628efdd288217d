"""Memory limits: weight copies kept once per chunk, per-edit state and evaluation passes checked before work."""

from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import snapshot, state_equal
from lmedit import limits
from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.handles import EditHandle, EditHandleError, WeightSnapshotHandle, keep_first_copies, restore_all
from lmedit.protocols import EditSession, ProtocolError, plan_chunks, run_chunk
from lmedit.registry import get_method
from lmedit.requests import EditRequest

FACTS = [EditRequest(f"the capital of {c} is", t, subject=c)
         for c, t in [("france", "rome"), ("spain", "paris"), ("italy", "madrid"), ("germany", "rome")]]


def _session(model, tok, method: str, config: EvalConfig | None = None, **overrides) -> EditSession:
    info = get_method(method)
    return EditSession(model, tok, info, info.load_hparams(overrides=overrides), Evaluator(tok, config or EvalConfig()))


# --------------------------------------------------------------------------- weight copies, once per chunk


def test_later_handles_release_the_copies_an_older_one_holds(tiny_llama, word_tok):
    info = get_method("FT-M")
    hparams = info.load_hparams(overrides={"layers": [1], "num_steps": 2})
    reference = snapshot(tiny_llama)
    chain = []
    for fact in FACTS:
        handle = info.apply(tiny_llama, word_tok, [fact], hparams)
        keep_first_copies(chain, handle)
        chain.append(handle)
    assert chain[0].param_names and not chain[0].released_names
    assert all(h.param_names == [] and h.released_names == chain[0].param_names for h in chain[1:])
    with pytest.raises(EditHandleError, match="released to an older edit"):
        chain[-1].save("never-written")
    assert not state_equal(tiny_llama, reference)
    restore_all(chain)
    assert state_equal(tiny_llama, reference)


def test_a_chain_with_other_handles_keeps_every_copy(tiny_llama):
    """Another kind of handle in the chain (an adapter) may rewire the model: then nothing is released."""
    names = ["model.layers.1.mlp.down_proj.weight"]
    chain = [WeightSnapshotHandle("FT-M", tiny_llama, names), EditHandle("GRACE")]
    handle = WeightSnapshotHandle("FT-M", tiny_llama, names)
    keep_first_copies(chain, handle)
    assert handle.param_names == names and not handle.released_names
    keep_first_copies(chain[:1], handle)
    assert handle.param_names == [] and handle.released_names == names


def test_a_sequential_chunk_restores_exactly_with_one_copy_per_weight(tiny_llama, word_tok, monkeypatch):
    session = _session(tiny_llama, word_tok, "FT-M", layers=[0, 1], num_steps=2)
    chunk = plan_chunks(len(FACTS), "sequential", T=len(FACTS))[0]
    reference = snapshot(tiny_llama)
    held = []
    monkeypatch.setattr("lmedit.protocols.restore_all", lambda handles: (
        held.append(sum(len(h.param_names) for h in handles)), restore_all(handles)))
    pre = session.evaluator.capture(tiny_llama, FACTS)
    run_chunk(session, FACTS, chunk, pre)
    assert held == [2]  # two layers' copies for four edits, not eight
    assert state_equal(tiny_llama, reference)


# --------------------------------------------------------------------------- per-edit state


def test_wise_state_estimate_by_hand(tiny_llama, word_tok):
    from lmedit.methods.wise import wise_kept_state

    hparams = get_method("WISE").load_hparams(overrides={"layer": 1, "save_freq": 2, "merge_freq": 4})
    needed, what, _fix = wise_kept_state(tiny_llama, hparams, 5)
    weight = tiny_llama.model.layers[1].mlp.down_proj.weight
    value = weight.numel() * 4
    masked = math.ceil(0.2 * weight.numel()) * 4  # mask_ratio 0.2 of the entries, float32
    assert needed == 5 * masked + 3 * (value + weight.numel()) + 2 * value  # 5 undo records, 3 shards, 2 merges
    assert "masked entries (mask_ratio=0.2" in what
    every_edit_a_shard = get_method("WISE").load_hparams(overrides={"layer": 1, "save_freq": 1})
    needed, what, _fix = wise_kept_state(tiny_llama, every_edit_a_shard, 5)
    assert needed == 5 * (value + weight.numel()) + value and "masked entries" not in what  # 5 shards, 1 merge
    assert "model.layers.1.mlp.down_proj" in what


@pytest.mark.parametrize("method, overrides, words", [
    ("WISE", {"layer": 1}, ("WISE keeps a copy of model.layers.1.mlp.down_proj.weight and its mask", "per shard", "lower --T")),
    ("DEFER", {"layer": 1}, ("DEFER keeps a copy of its gate and value network",)),
    ("GRACE", {"layer": 1}, ("GRACE keeps a codebook row",)),
])
def test_a_chunk_whose_state_would_not_fit_is_refused_before_editing(tiny_llama, word_tok, monkeypatch, method,
                                                                     overrides, words):
    session = _session(tiny_llama, word_tok, method, EvalConfig(max_batch_tokens=16), **overrides)
    needed, _what, _fix = session.method.kept_state(tiny_llama, session.hparams, 1000)
    monkeypatch.setattr(limits, "available_memory", lambda device: needed // 2)
    requests = FACTS * 250
    with pytest.raises(ProtocolError) as caught:
        session.check(requests, plan_chunks(len(requests), "sequential", T=1000))
    message = str(caught.value)
    for word in words:
        assert word in message
    assert re.search(r"edit at most about (29\d|300) in one chunk", message)  # 0.9 x half of 1000 edits' tensors, x 1/1.5
    session.check(requests, plan_chunks(len(requests), "sequential", T=100))  # a tenth fits


def test_unknown_free_memory_refuses_nothing(tiny_llama, word_tok, monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda device: None)
    session = _session(tiny_llama, word_tok, "WISE", layer=1)
    session.check(FACTS * 250, plan_chunks(1000, "sequential", T=1000))


# --------------------------------------------------------------------------- evaluation passes


def test_eval_max_tokens_beyond_memory_is_refused_with_a_value_that_fits(tiny_llama, word_tok):
    config = EvalConfig(max_batch_tokens=10**12)
    with pytest.raises(limits.MemoryLimitError, match=r"--eval-max-tokens 1,000,000,000,000: .* use --eval-max-tokens 2,048"):
        limits.check_eval_memory_for(tiny_llama, word_tok, config, FACTS)


def test_a_generation_batch_beyond_memory_is_refused(tiny_llama, word_tok, monkeypatch):
    config = EvalConfig(mode="generate", batch_size=1000, max_batch_tokens=1)
    longest = len(word_tok(max((f"{r.prompt} {r.target_new}" for r in FACTS), key=len)).input_ids) + 16
    one_row = limits.generation_batch_bytes(tiny_llama, 1, longest)
    monkeypatch.setattr(limits, "available_memory", lambda device: 2 * one_row)
    with pytest.raises(limits.MemoryLimitError, match=r"--eval-batch-size 1,000 with generation: a batch of 4 prompts"):
        limits.check_eval_memory_for(tiny_llama, word_tok, config, FACTS)
    limits.check_eval_memory_for(tiny_llama, word_tok, EvalConfig(mode="generate", batch_size=1, max_batch_tokens=1), FACTS)


def test_free_memory_is_read_on_this_machine():
    free = limits.available_memory("cpu")
    assert free is None or free > 0
    assert limits.available_memory(torch.device("meta")) is None


def test_memory_sizes_are_read_with_their_units() -> None:
    from lmedit.limits import MemoryLimitError, parse_memory

    assert parse_memory("8GiB") == 8 * 1024**3 and parse_memory("500MB") == 500 * 1000**2
    assert parse_memory("1.5 tib") == int(1.5 * 1024**4) and parse_memory("4096") == 4096
    for bad in ("lots", "-1GiB", "8 parsecs", ""):
        with pytest.raises(MemoryLimitError, match="not a size"):
            parse_memory(bad)


def test_statistics_batch_shrinks_to_the_budget_and_refuses_below_one_sample(tiny_llama) -> None:
    from lmedit.limits import MemoryLimitError, activation_bytes_per_token, statistics_batch_tokens

    per_token = activation_bytes_per_token(tiny_llama)
    sums = 8 * (64 * 64 + 64)
    weights = 10_000
    budget = weights + sums + 1000 * per_token
    assert statistics_batch_tokens(tiny_llama, [64], budget, 2048, 256, weights) == 1000
    assert statistics_batch_tokens(tiny_llama, [64], budget, 512, 256, weights) == 512  # never more than asked
    with pytest.raises(MemoryLimitError, match="at least one sample of 256 tokens"):
        statistics_batch_tokens(tiny_llama, [64], weights + sums + 100 * per_token, 2048, 256, weights)


def test_weights_on_disk_are_counted_in_the_dtype_they_will_load_in(tmp_path, tiny_llama) -> None:
    from lmedit.limits import weights_bytes_on_disk

    tiny_llama.save_pretrained(tmp_path / "m")
    count = sum(p.numel() for p in tiny_llama.state_dict().values())
    assert weights_bytes_on_disk(tmp_path / "m", torch.float32) == 4 * count
    assert weights_bytes_on_disk(tmp_path / "m", torch.bfloat16) == 2 * count
    assert weights_bytes_on_disk(tmp_path / "nothing", torch.float32) is None


def test_evaluation_and_kept_edits_are_held_to_the_memory_budget(tiny_llama, word_tok, monkeypatch) -> None:
    """Free memory is plenty, but --max-memory leaves room for 1,000 tokens per pass beside the weights."""
    monkeypatch.setattr(limits, "available_memory", lambda device: 10**15)
    weights = sum(p.numel() * p.element_size() for p in tiny_llama.parameters())
    per_token = limits.activation_bytes_per_token(tiny_llama)
    limits.set_memory_budget(tiny_llama, weights + 1000 * per_token)
    try:
        assert limits.room_for_work(tiny_llama)[0] == 1000 * per_token
        with pytest.raises(limits.MemoryLimitError, match=r"left under --max-memory .* use --eval-max-tokens 900\b"):
            limits.check_eval_memory_for(tiny_llama, word_tok, EvalConfig(max_batch_tokens=2048), FACTS)
        limits.check_eval_memory_for(tiny_llama, word_tok, EvalConfig(max_batch_tokens=800), FACTS)
        with pytest.raises(limits.MemoryLimitError, match="left under --max-memory"):
            limits.check_state_memory("WISE", 10**12, 10, tiny_llama, what="memories", fix="lower it")
    finally:
        limits.set_memory_budget(tiny_llama, None)
    assert limits.room_for_work(tiny_llama) == (10**15, "free")
    limits.check_eval_memory_for(tiny_llama, word_tok, EvalConfig(max_batch_tokens=2048), FACTS)
