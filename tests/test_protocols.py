"""Chunk planning and the chunk runner: the order of edits, evaluation and restore."""

from __future__ import annotations

import pytest

from conftest import snapshot, state_equal
from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.handles import EditHandle
from lmedit.hparams import HyperParams
from lmedit.protocols import EditSession, ProtocolError, plan_chunks, run_chunk
from lmedit.registry import MethodInfo, get_method
from lmedit.requests import EditRequest


def test_sequential_plan_follows_the_wise_protocol():
    chunks = plan_chunks(1037, "sequential", T=100)
    assert len(chunks) == 11
    assert [len(c.requests) for c in chunks] == [100] * 10 + [37]
    assert chunks[1].requests[0] == 100 and all(len(s) == 1 for s in chunks[0].steps)
    assert [c.requests for c in plan_chunks(3, "single")] == [(0,), (1,), (2,)]
    assert plan_chunks(5, "batch", batch_size=2)[0].steps == ((0, 1),)
    assert plan_chunks(5, "sequential", T=4, batch_size=2)[0].steps == ((0, 1), (2, 3))


@pytest.mark.parametrize("kwargs, message", [
    ({"protocol": "sequential"}, "needs T"),
    ({"protocol": "single", "T": 5}, "sequential protocol only"),
    ({"protocol": "single", "batch_size": 3}, "one request at a time"),
    ({"protocol": "fancy"}, "unknown protocol"),
])
def test_bad_plans_are_explained(kwargs, message):
    with pytest.raises(ProtocolError, match=message):
        plan_chunks(10, **kwargs)


class Counter:
    """A fake method that only counts how many of its edits are in force."""

    def __init__(self) -> None:
        self.active = 0
        self.calls: list[int] = []

    def apply(self, model, tok, requests, hparams):
        self.active += 1
        self.calls.append(len(requests))
        counter = self

        class Handle(EditHandle):
            def _restore(self) -> None:
                counter.active -= 1

        return Handle("COUNT")


def _session(model, tok, counter, *, batch=False, eval_each=False):
    info = MethodInfo("COUNT", counter.apply, HyperParams, batch, False, "counts edits")
    evaluator = Evaluator(tok, EvalConfig())
    seen: list[tuple[int, int]] = []
    original_score = evaluator.score

    def spying_score(model, requests, pre, progress=None):
        seen.append((len(requests), counter.active))
        return original_score(model, requests, pre, progress)

    evaluator.score = spying_score  # type: ignore[method-assign]
    return EditSession(model, tok, info, HyperParams(), evaluator, eval_each=eval_each), seen


REQUESTS = [EditRequest(f"the capital of {w} is", "rome", case_id=str(i))
            for i, w in enumerate("france paris berlin madrid london rome sky".split())]


def _run_all(session, protocol, **plan):
    records = []
    for chunk in plan_chunks(len(REQUESTS), protocol, **plan):
        pre = session.evaluator.capture(session.model, [REQUESTS[i] for i in chunk.requests])
        records += run_chunk(session, REQUESTS, chunk, pre).records
    return records


def test_sequential_evaluates_all_T_after_the_T_th_edit_then_restores(tiny_llama, word_tok):
    counter = Counter()
    session, seen = _session(tiny_llama, word_tok, counter)
    records = _run_all(session, "sequential", T=3)
    assert seen == [(3, 3), (3, 3), (1, 1)]
    assert counter.active == 0
    assert [r["chunk"] for r in records] == [0, 0, 0, 1, 1, 1, 2]
    assert all("post_each" not in r for r in records)
    for chunk in (0, 1, 2):  # each edit's own step time, which sums to the chunk's edit time
        in_chunk = [r for r in records if r["chunk"] == chunk]
        assert all(r["step_seconds"] > 0 for r in in_chunk)
        assert sum(r["step_seconds"] for r in in_chunk) == pytest.approx(in_chunk[0]["edit_seconds"] * len(in_chunk))


def test_eval_each_scores_each_request_right_after_its_own_edit(tiny_llama, word_tok):
    counter = Counter()
    session, seen = _session(tiny_llama, word_tok, counter, eval_each=True)
    records = _run_all(session, "sequential", T=3)
    assert seen[:4] == [(1, 1), (1, 2), (1, 3), (3, 3)]
    assert all("post_each" in r for r in records)


def test_batch_protocol_makes_one_call_per_batch(tiny_llama, word_tok):
    counter = Counter()
    session, _ = _session(tiny_llama, word_tok, counter, batch=True)
    _run_all(session, "batch", batch_size=3)
    assert counter.calls == [3, 3, 1]


def test_batch_protocol_rejects_a_method_without_batch_support(tiny_llama, word_tok):
    session, _ = _session(tiny_llama, word_tok, Counter(), batch=False)
    with pytest.raises(ProtocolError, match="cannot take a batch"):
        session.check(REQUESTS, plan_chunks(len(REQUESTS), "batch", batch_size=2))


def test_chunk_restores_the_model_even_when_the_method_fails(tiny_llama, word_tok):
    info = get_method("FT-M")
    hparams = info.load_hparams(overrides={"layers": [1], "lr": 1e-2, "num_steps": 2})
    calls = {"n": 0}

    def flaky(model, tok, requests, hp):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return info.apply(model, tok, requests, hp)

    session = EditSession(tiny_llama, word_tok, MethodInfo("FLAKY", flaky, type(hparams), False, False, ""), hparams,
                          Evaluator(word_tok))
    original = snapshot(tiny_llama)
    chunk = plan_chunks(3, "sequential", T=3)[0]
    pre = session.evaluator.capture(tiny_llama, REQUESTS[:3])
    with pytest.raises(RuntimeError, match="boom"):
        run_chunk(session, REQUESTS, chunk, pre)
    assert state_equal(tiny_llama, original)


def test_real_sequential_chunk_restores_bit_exactly(tiny_llama, word_tok):
    info = get_method("FT-M")
    hparams = info.load_hparams(overrides={"layers": [1], "lr": 1e-2, "num_steps": 3})
    session = EditSession(tiny_llama, word_tok, info, hparams, Evaluator(word_tok))
    original = snapshot(tiny_llama)
    chunk = plan_chunks(4, "sequential", T=4)[0]
    pre = session.evaluator.capture(tiny_llama, REQUESTS[:4])
    result = run_chunk(session, REQUESTS, chunk, pre)
    assert state_equal(tiny_llama, original)
    assert len(result.records) == 4 and all("rewrite_acc" in r["post"] for r in result.records)
