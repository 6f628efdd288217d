"""Probe scoring and the evaluator's metrics checked against hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from types import SimpleNamespace

from lmedit.evaluation.evaluator import EvalConfig, Evaluator, aggregate, locality_agreement
from lmedit.evaluation.scoring import score_teacher_forced, token_match
from lmedit.requests import EditRequest


class SuccessorModel(torch.nn.Module):
    """Predicts token (t + 1) mod V after token t, whatever the padding: hand-computable argmaxes."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen_positions: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **_):
        self.seen_positions.append((position_ids, attention_mask))
        logits = torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float() * 10
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


def test_token_match_and_locality_hand_cases():
    assert locality_agreement([29, 234, 334], [29, 234, 333]) == pytest.approx(2 / 3)
    assert token_match([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_match([1], [1, 2]) == 0.5  # generation that stopped early counts missing tokens as wrong
    assert token_match([9, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    with pytest.raises(ValueError):
        token_match([1], [])


def test_teacher_forced_accuracy_hand_computed_with_mixed_lengths(word_tok):
    model = SuccessorModel(len(word_tok))
    vocab = word_tok.get_vocab()
    # "the capital" -> ids 3,4 ; successor of "capital"(4) is 5 == "of": answer "of france" -> [5, 6]
    # prediction after "of"(5) is 6 == "france": both tokens right -> 1.0
    # "paris"(8) answer after "is"(7): successor of 7 is 8 -> right; "rome" after "paris": successor 9 == "rome" -> right
    # "sky" answer after a long prompt: wrong unless successor matches
    pairs = [
        ("the capital", "of france"),
        ("the capital of france is", "paris rome"),
        ("the capital of france is", "berlin"),
        ("who", "wrote hamlet shakespeare"),
    ]
    expected = []
    for prompt, answer in pairs:
        ids = [vocab[w] for w in f"{prompt} {answer}".split()]
        n_prompt = len(prompt.split())
        hits = [((ids[i - 1] + 1) % len(word_tok)) == ids[i] for i in range(n_prompt, len(ids))]
        expected.append(sum(hits) / len(hits))
    assert expected == [1.0, 1.0, 0.0, 1.0]  # keeps the hand computation honest
    scores = score_teacher_forced(model, word_tok, pairs, batch_size=3)
    assert [s.token_accuracy for s in scores] == expected
    assert scores[2].predicted_ids == (vocab["paris"],)
    # positions given to the model must restart at 0 after left padding
    for positions, mask in model.seen_positions:
        assert positions[:, -1].tolist() == (mask.sum(dim=1) - 1).tolist()
        assert (positions[mask.bool()].min().item()) == 0


@pytest.mark.parametrize("packing", [True, False])
def test_batched_scores_equal_one_at_a_time_on_a_real_model(tiny_model, word_tok, packing):
    pairs = [("the capital of france is", "paris"), ("who wrote", "hamlet"),
             ("the eiffel tower is located in the city of", "rome berlin"), ("sky", "blue green"),
             ("the", "red"), ("what language is spoken in italy", "italian")]
    batched = score_teacher_forced(tiny_model, word_tok, pairs, batch_size=6, packing=packing)
    alone = [score_teacher_forced(tiny_model, word_tok, [p], batch_size=1)[0] for p in pairs]
    for b, a in zip(batched, alone):
        assert b.predicted_ids == a.predicted_ids
        assert b.target_logprobs == pytest.approx(a.target_logprobs, abs=1e-4)


def test_evaluator_metrics_for_one_request(word_tok):
    model = SuccessorModel(len(word_tok))
    request = EditRequest(
        "the capital of france is", "paris rome",
        rephrase=["the capital", "who"],
        locality={"nb": [("the capital", "of france")]},
        portability={"hop": [("who", "wrote")]},
    )
    evaluator = Evaluator(word_tok, EvalConfig(batch_size=2))
    pre = evaluator.capture(model, [request])
    post = evaluator.score(model, [request], pre)[0]
    vocab = word_tok.get_vocab()
    # rephrase "the capital" -> "paris rome": successor of capital(4) is of(5) != paris -> 0; paris->rome right: 0.5
    # rephrase "who"(wrote?) -> successor of who is wrote != paris -> 0; paris->rome right -> 0.5
    assert vocab["wrote"] == vocab["who"] + 1
    assert post["rewrite_acc"] == 1.0
    assert post["rephrase_acc"] == 0.5
    assert post["portability"] == 1.0
    assert post["locality"] == 1.0  # same model before and after
    assert pre.metrics[0]["rewrite_acc"] == 1.0
    assert "locality" not in pre.metrics[0]


def test_aggregate_averages_groups_before_requests():
    from lmedit.evaluation.evaluator import ProbeOutcome, ProbeRef

    probes = [ProbeRef(0, "locality", "a", "p", "x"), ProbeRef(0, "locality", "a", "q", "x"),
              ProbeRef(0, "locality", "b", "r", "x")]
    pre = [ProbeOutcome(teacher_predicted=(1, 2), teacher_accuracy=1.0)] * 3
    post = [ProbeOutcome(teacher_predicted=(1, 2), teacher_accuracy=1.0),
            ProbeOutcome(teacher_predicted=(1, 3), teacher_accuracy=1.0),
            ProbeOutcome(teacher_predicted=(0, 0), teacher_accuracy=0.0)]
    row = aggregate(probes, post, reference=pre, n_requests=1)[0]
    assert row["locality/a"] == pytest.approx(0.75)
    assert row["locality/b"] == 0.0
    assert row["locality"] == pytest.approx(0.375)  # mean of group means, not of the 3 probes (0.5)


def test_capture_does_not_change_the_model(tiny_llama, word_tok):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    request = EditRequest("the capital of france is", "rome", rephrase=["who"], locality={"n": [("sky", "blue")]})
    evaluator = Evaluator(word_tok, EvalConfig(mode="both"))
    pre = evaluator.capture(tiny_llama, [request])
    evaluator.score(tiny_llama, [request], pre)
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_score_rejects_a_capture_of_other_requests(tiny_llama, word_tok):
    evaluator = Evaluator(word_tok)
    pre = evaluator.capture(tiny_llama, [EditRequest("who", "wrote")])
    with pytest.raises(ValueError, match="capture"):
        evaluator.score(tiny_llama, [EditRequest("sky", "blue")], pre)
