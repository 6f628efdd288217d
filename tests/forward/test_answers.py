"""Answer passes through a shared prefix: inputs by hand, and scores equal to full passes."""

from __future__ import annotations

import pytest
import torch

import lmedit.forward.prefix as prefix_module
from conftest import LONG_DEMOS
from lmedit.evaluation.scoring import score_teacher_forced
from lmedit.evaluation.suites._forward import answer_passes
from lmedit.forward import SharedPrefix, answer_batches, build_inputs, tokenize_pair

DEMOS = LONG_DEMOS
PAIRS = [(DEMOS + "what language is spoken in france", "french"), (DEMOS + "who wrote hamlet", "shakespeare"),
         (DEMOS + "the sun is a", "star"), (DEMOS + "the eiffel tower is located in", "paris city"),
         ("what sport is tennis", "sport"), ("the moon", "small red")]


def test_inputs_after_a_prefix_continue_its_positions_and_see_its_columns():
    prefix = SharedPrefix(3, ())
    packed = build_inputs([[0, 1], [2]], [[5, 6], [7, 8, 9], [4]], pad_id=0, mask_dtype=torch.float32, prefix=prefix)
    assert packed.position_ids.tolist() == [[3, 4, 3, 4, 5], [0, 0, 0, 0, 3]]
    allowed = packed.attention_mask[0, 0] == 0
    assert allowed.shape == (5, 8)
    assert allowed[3].tolist() == [True, True, True, False, False, True, True, False]
    padded = build_inputs([[0], [1]], [[5, 6], [7]], pad_id=0, mask_dtype=torch.float32, prefix=prefix)
    assert padded.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]]
    assert padded.position_ids[:, -1].tolist() == [4, 3]


@pytest.mark.parametrize("packing", [True, False])
def test_scores_through_a_shared_prefix_equal_scores_one_at_a_time(tiny_model, word_tok, packing):
    tokenized = [tokenize_pair(word_tok, p, a) for p, a in PAIRS]
    batches = list(answer_batches(tiny_model, word_tok, tokenized, batch_size=8, packing=packing))
    shared = [b.inputs.prefix.length for b in batches if b.inputs.prefix is not None]
    # packing marks a causal pass, the condition for sharing; without it every sequence is fed whole
    assert shared == ([len(word_tok(DEMOS).input_ids)] if packing else [])
    assert sorted(i for b in batches for i in b.members) == list(range(len(PAIRS)))
    # batch size 1 stays the plain one-prompt-at-a-time reference
    assert all(b.inputs.prefix is None for b in answer_batches(tiny_model, word_tok, tokenized, batch_size=1))
    together = score_teacher_forced(tiny_model, word_tok, PAIRS, batch_size=8, packing=packing)
    alone = [score_teacher_forced(tiny_model, word_tok, [p], batch_size=1)[0] for p in PAIRS]
    for t, a in zip(together, alone):
        assert t.predicted_ids == a.predicted_ids
        assert t.target_logprobs == pytest.approx(a.target_logprobs, abs=1e-4)


def test_suite_passes_read_the_same_logits_and_head_inputs_through_the_prefix(tiny_llama, word_tok):
    def passes(pairs):
        return {p.index: p for batch in answer_passes(tiny_llama, word_tok, pairs, keep_hidden=True) for p in batch}

    together = passes(PAIRS)
    for index, pair in enumerate(PAIRS):
        alone = passes([pair])[0]
        assert torch.allclose(together[index].logits, alone.logits, atol=1e-4)
        assert torch.allclose(together[index].hidden, alone.hidden, atol=1e-4)


def test_a_prefix_that_fails_its_check_is_not_used(tiny_llama, word_tok, monkeypatch):
    real = prefix_module.logits_at
    checks = []

    def off_in_the_check(model, inputs, read):
        logits = real(model, inputs, read)
        if inputs.input_ids.shape[0] == 1 and inputs.prefix is not None:  # the check's single row
            checks.append(True)
            return logits + 1e-2
        return logits

    monkeypatch.setattr(prefix_module, "logits_at", off_in_the_check)
    tokenized = [tokenize_pair(word_tok, p, a) for p, a in PAIRS]
    batches = list(answer_batches(tiny_llama, word_tok, tokenized, batch_size=8))
    assert checks and all(b.inputs.prefix is None for b in batches)
    assert sorted(i for b in batches for i in b.members) == list(range(len(PAIRS)))
