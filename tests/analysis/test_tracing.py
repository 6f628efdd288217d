"""Causal tracing: the batched engine against an unbatched ROME-style reference, and its invariants."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import snapshot, state_equal
from lmedit.analysis.tracing import (
    CATEGORIES,
    Fact,
    FactTrace,
    KindSummary,
    TracingError,
    answer_token_id,
    category_tokens,
    embedding_std,
    greedy_next_tokens,
    load_facts,
    report_from_dict,
    select_known_facts,
    subject_token_range,
    suggest_edit_layers,
    summarize,
    trace_fact,
    trace_facts,
    window_layers,
)
from lmedit.spec import ModelSpec, get_module

PROMPT = "the eiffel tower is located in the city of"
SUBJECT = "eiffel tower"


# --------------------------------------------------------------------------- reference


def reference_probability(model, tok, kind, token, layer, *, noise_std, samples, window, seed, answer_id):
    """One restoration the slow way: full prompt, every block computed, one forward per restoration."""
    spec = ModelSpec.from_model(model)
    ids, (b, e) = subject_token_range(tok, PROMPT, SUBJECT)
    ids = torch.tensor(ids)
    generator = torch.Generator().manual_seed(seed)
    noise = noise_std * torch.randn(samples, e - b, spec.hidden_size, generator=generator)
    path = {"hidden": spec.block, "mlp": spec.mlp, "attn": spec.attn}[kind]
    layers = [layer] if kind == "hidden" else list(window_layers(layer, spec.num_layers, window))
    untuple = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    clean, handles = {}, []
    for L in layers:
        handles.append(get_module(model, path(L)).register_forward_hook(
            lambda m, i, o, L=L: clean.__setitem__(L, untuple(o)[0].clone())))
    with torch.no_grad():
        model(ids[None])
    for h in handles:
        h.remove()

    def add_noise(m, i, o):
        o = o.clone()
        o[:, b:e] += noise
        return o

    def restore(L):
        def hook(m, i, o):
            h = untuple(o).clone()
            h[:, token] = clean[L][token]
            return (h,) + o[1:] if isinstance(o, tuple) else h
        return hook

    handles = [get_module(model, spec.embed_path).register_forward_hook(add_noise)]
    handles += [get_module(model, path(L)).register_forward_hook(restore(L)) for L in layers]
    try:
        with torch.no_grad():
            logits = model(ids[None].expand(samples, -1)).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return float(torch.softmax(logits, -1)[:, answer_id].mean())


def no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in model.modules())


# --------------------------------------------------------------------------- tokens and settings


def test_subject_range_covers_exactly_the_subject_tokens(word_tok):
    ids, (b, e) = subject_token_range(word_tok, PROMPT, SUBJECT)
    assert (b, e) == (1, 3)
    assert word_tok.decode(ids[b:e]) == SUBJECT
    with pytest.raises(TracingError, match="does not occur"):
        subject_token_range(word_tok, PROMPT, "hamlet")


def test_window_is_centred_like_rome():
    assert list(window_layers(0, 30, 10)) == list(range(0, 5))
    assert list(window_layers(15, 30, 10)) == list(range(10, 20))
    assert list(window_layers(29, 30, 10)) == list(range(24, 30))
    assert list(window_layers(4, 30, 1)) == [4]


def test_answer_token_is_the_first_token_of_the_continuation(word_tok):
    assert answer_token_id(word_tok, PROMPT, "paris rome") == word_tok.convert_tokens_to_ids("paris")


@pytest.mark.parametrize("bad", [{"kinds": ("hidden", "resid")}, {"samples": 0}, {"window": 0}])
def test_bad_settings_are_rejected(tiny_llama, word_tok, bad):
    with pytest.raises(TracingError):
        trace_fact(tiny_llama, word_tok, PROMPT, SUBJECT, noise_std=1.0, **bad)


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_batched_trace_equals_unbatched_reference(tiny_model, word_tok, reuse_prefix):
    settings = dict(noise_std=1.0, samples=3, window=2, seed=7)
    trace = trace_fact(tiny_model, word_tok, PROMPT, SUBJECT, reuse_prefix=reuse_prefix, max_batch_tokens=50, **settings)
    assert trace.subject_range == (1, 3) and len(trace.tokens) == 9
    for kind in ("hidden", "mlp", "attn"):
        for token in (1, 5, 8):
            for layer in range(3):
                expected = reference_probability(tiny_model, word_tok, kind, token, layer, answer_id=trace.answer_id, **settings)
                assert trace.restored[kind][token, layer].item() == pytest.approx(expected, abs=1e-6), (kind, token, layer)


def test_restoration_invariants(tiny_model, word_tok):
    trace = trace_fact(tiny_model, word_tok, PROMPT, SUBJECT, noise_std=2.0, samples=4, kinds=("hidden", "mlp"))
    hidden = trace.restored["hidden"]
    # The last block's output at the last token is all the logits read: restoring it gives the clean run.
    assert hidden[-1, -1].item() == pytest.approx(trace.p_clean, abs=1e-6)
    # Tokens before the subject are identical in every run.
    assert torch.equal(trace.indirect_effect("mlp")[0], torch.zeros(3))
    assert trace.p_corrupted != pytest.approx(trace.p_clean, abs=1e-6)
    assert trace.answer_id == int(
        tiny_model(torch.tensor([subject_token_range(word_tok, PROMPT, SUBJECT)[0]])).logits[0, -1].argmax())


def test_without_noise_every_restoration_gives_the_clean_probability(tiny_llama, word_tok):
    trace = trace_fact(tiny_llama, word_tok, PROMPT, SUBJECT, noise_std=0.0, samples=2)
    assert trace.p_corrupted == pytest.approx(trace.p_clean, abs=1e-6)
    for kind in trace.restored:
        assert torch.allclose(trace.restored[kind], torch.full_like(trace.restored[kind], trace.p_clean), atol=1e-6)


def test_noise_is_seeded_and_local(tiny_llama, word_tok):
    torch.manual_seed(123)
    before = torch.rand(1)
    a = trace_fact(tiny_llama, word_tok, PROMPT, SUBJECT, noise_std=1.0, samples=2, kinds=("attn",), seed=1)
    b = trace_fact(tiny_llama, word_tok, PROMPT, SUBJECT, noise_std=1.0, samples=2, kinds=("attn",), seed=1)
    c = trace_fact(tiny_llama, word_tok, PROMPT, SUBJECT, noise_std=1.0, samples=2, kinds=("attn",), seed=2)
    assert torch.equal(a.restored["attn"], b.restored["attn"]) and a.p_corrupted == b.p_corrupted
    assert a.p_corrupted != c.p_corrupted
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the global generator was not touched


def test_tracing_leaves_the_model_unchanged(tiny_model, word_tok):
    tiny_model.train()
    reference = snapshot(tiny_model)
    ids = torch.tensor([subject_token_range(word_tok, PROMPT, SUBJECT)[0]])
    with torch.no_grad():
        logits_before = tiny_model.eval()(ids).logits
    tiny_model.train()
    trace_fact(tiny_model, word_tok, PROMPT, SUBJECT, noise_std=1.0, samples=2, max_batch_tokens=30)
    assert tiny_model.training  # mode restored
    assert state_equal(tiny_model, reference) and no_hooks_left(tiny_model)
    with torch.no_grad():
        assert torch.equal(tiny_model.eval()(ids).logits, logits_before)


def test_hooks_and_skipped_blocks_are_removed_when_a_forward_fails(tiny_llama, word_tok):
    def fail_on_restoration_batches(module, inputs, output):
        if inputs[0].shape[0] > 2:  # the clean (1 row) and corrupted (2 rows) passes go through
            raise RuntimeError("boom")

    handle = tiny_llama.lm_head.register_forward_hook(fail_on_restoration_batches)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            trace_fact(tiny_llama, word_tok, PROMPT, SUBJECT, noise_std=1.0, samples=2)
    finally:
        handle.remove()
    assert no_hooks_left(tiny_llama)


def test_embedding_std_is_the_std_of_the_subject_token_embeddings(tiny_llama, word_tok):
    subjects = ["eiffel tower", "shakespeare", "river"]
    ids = [word_tok.convert_tokens_to_ids(w) for s in subjects for w in s.split()]
    expected = tiny_llama.model.embed_tokens.weight[ids].std().item()
    assert embedding_std(tiny_llama, word_tok, subjects) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- facts


def _prediction(model, tok, prompt):
    return tok.decode([greedy_next_tokens(model, tok, [prompt])[0]]).strip()


def test_greedy_batches_match_single_prompts(tiny_model, word_tok):
    prompts = [PROMPT, "who wrote hamlet", "the sky is"]
    single = [int(tiny_model(torch.tensor([word_tok(p).input_ids])).logits[0, -1].argmax()) for p in prompts]
    assert greedy_next_tokens(tiny_model, word_tok, prompts, batch_size=3) == single


def test_known_facts_are_those_the_model_predicts(tiny_llama, word_tok):
    predicted = _prediction(tiny_llama, word_tok, PROMPT)
    other = "violin" if predicted != "violin" else "guitar"
    facts = [Fact(PROMPT, SUBJECT, other), Fact(PROMPT, SUBJECT, predicted), Fact(PROMPT, SUBJECT, predicted)]
    assert select_known_facts(tiny_llama, word_tok, facts) == facts[1:]
    assert select_known_facts(tiny_llama, word_tok, facts, limit=1, batch_size=1) == facts[1:2]
    with pytest.raises(TracingError, match="no true target"):
        select_known_facts(tiny_llama, word_tok, [Fact(PROMPT, SUBJECT)])


def test_facts_load_from_rome_and_flat_counterfact(tmp_path):
    rome = [{"case_id": 3, "requested_rewrite": {"prompt": "{} is located in", "subject": "eiffel tower",
                                                 "target_new": {"str": "rome"}, "target_true": {"str": "paris"}}}]
    flat = [{"case_id": 5, "prompt": "the mother tongue of tolstoy is", "subject": "tolstoy", "target_new": "french",
             "ground_truth": "german", "rephrase_prompt": "x", "locality_prompt": "y", "locality_ground_truth": "z"}]
    (tmp_path / "rome.json").write_text(json.dumps(rome))
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    assert load_facts(tmp_path / "rome.json") == [Fact("eiffel tower is located in", "eiffel tower", "paris", "3")]
    assert load_facts(tmp_path / "flat.json") == [Fact("the mother tongue of tolstoy is", "tolstoy", "german", "5")]


# --------------------------------------------------------------------------- aggregation


def _synthetic(num_tokens, subject_range, num_layers=4, p_corrupted=0.1):
    """A trace whose restored probability at (t, l) is p_corrupted + t + l / 10 (so effects are t + l/10)."""
    t = torch.arange(num_tokens, dtype=torch.float32)[:, None]
    l = torch.arange(num_layers, dtype=torch.float32)[None]
    restored = p_corrupted + t + l / 10
    return FactTrace("p", "s", ["x"] * num_tokens, subject_range, "a", 0, 0.9, p_corrupted, {"mlp": restored})


def test_categories_follow_rome():
    assert category_tokens(8, (1, 4)) == {"first_subject": [1], "middle_subject": [2], "last_subject": [3],
                                          "first_subsequent": [4], "further": [5, 6], "last": [7]}
    single = category_tokens(3, (0, 1))
    assert single["first_subject"] == single["last_subject"] == [0] and single["middle_subject"] == []
    assert category_tokens(3, (1, 3))["first_subsequent"] == []  # subject ends the prompt


def test_summary_pools_token_rows_and_finds_the_peak():
    traces = [_synthetic(8, (1, 4)), _synthetic(5, (0, 1), p_corrupted=0.3)]
    summary = summarize(traces, "mlp")
    rows = dict(zip(CATEGORIES, summary.mean_effect[:, 0].tolist()))
    assert rows["first_subject"] == pytest.approx((1 + 0) / 2)
    assert rows["middle_subject"] == pytest.approx(2)  # only the first fact has a middle token
    assert rows["last_subject"] == pytest.approx((3 + 0) / 2)
    assert rows["further"] == pytest.approx((5 + 6 + 2 + 3) / 4)  # pooled per token, as in ROME
    assert rows["last"] == pytest.approx((7 + 4) / 2)
    assert summary.counts == {"first_subject": 2, "middle_subject": 1, "last_subject": 2, "first_subsequent": 2,
                              "further": 4, "last": 2}
    assert summary.mean_p_corrupted == pytest.approx(0.2)
    assert summary.peak("last_subject") == (3, pytest.approx(1.5 + 0.3))
    empty = summarize([_synthetic(5, (0, 1))], "mlp")
    assert math.isnan(empty.mean_effect[CATEGORIES.index("middle_subject"), 0].item())
    with pytest.raises(TracingError):
        empty.peak("middle_subject")


def test_suggested_layers_surround_the_mlp_peak():
    curve = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.9, 1.0, 0.95, 0.3, 0.1, 0.0, 0.0, 0.0])
    effect = torch.zeros(len(CATEGORIES), 12)
    effect[CATEGORIES.index("last_subject")] = curve
    summary = KindSummary("mlp", effect, effect, {c: 1 for c in CATEGORIES}, 1, 0.5, 0.1)
    assert suggest_edit_layers(summary) == (5, [3, 4, 5, 6, 7])
    edge = effect.clone()
    edge[CATEGORIES.index("last_subject")] = curve.flip(0)
    assert suggest_edit_layers(KindSummary("mlp", edge, edge, {}, 1, 0.5, 0.1), span=3) == (6, [5, 6, 7])


def test_trace_facts_reports_everything_and_round_trips(tiny_llama, word_tok):
    facts = [Fact(PROMPT, SUBJECT, "paris"), Fact("who wrote hamlet", "hamlet", "shakespeare")]
    report = trace_facts(tiny_llama, word_tok, facts, samples=2, window=2, noise_multiplier=3.0, show_progress=False)
    assert report.noise_std == pytest.approx(3 * embedding_std(tiny_llama, word_tok, ["eiffel tower", "hamlet"]))
    assert set(report.summaries) == {"hidden", "mlp", "attn"} and len(report.traces) == 2
    data = json.loads(json.dumps(report.to_dict()))
    assert data["suggestion"]["rome_layer"] == report.summaries["mlp"].peak("last_subject")[0]
    assert len(data["summary"]["mlp"]["mean_indirect_effect"]) == len(CATEGORIES)
    again = report_from_dict(data)
    for kind, summary in report.summaries.items():
        assert torch.allclose(torch.nan_to_num(again.summaries[kind].mean_effect),
                              torch.nan_to_num(summary.mean_effect), atol=1e-5)


def test_trace_facts_needs_facts(tiny_llama, word_tok):
    with pytest.raises(TracingError, match="no facts"):
        trace_facts(tiny_llama, word_tok, [], show_progress=False)


# --------------------------------------------------------------------------- plots


def test_heatmaps_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from lmedit.analysis.plots import plot_fact_heatmap, plot_summary_heatmap

    trace = _synthetic(6, (1, 3))
    paths = [plot_summary_heatmap(summarize([trace, _synthetic(4, (0, 1))], "mlp"), tmp_path / "avg.png"),
             plot_fact_heatmap(trace, "mlp", tmp_path / "fact.png")]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    import importlib.util

    from lmedit.analysis import plots

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(plots.PlotDependencyError, match=r"pip install"):
        plots.require_matplotlib()


# --------------------------------------------------------------------------- embedded model


@pytest.mark.embedded
def test_embedded_model_trace_locates_the_answer(embedded):
    model, tok = embedded
    prompt, subject = "The Eiffel Tower is located in the city of", "Eiffel Tower"
    trace = trace_fact(model, tok, prompt, subject, noise_std=0.35, samples=3, kinds=("hidden",))
    assert trace.answer.strip() == "Paris" and trace.p_clean > 0.3
    assert "".join(trace.tokens[slice(*trace.subject_range)]).strip() == subject
    assert trace.p_corrupted < trace.p_clean / 2
    hidden = trace.restored["hidden"]
    assert hidden[-1, -1].item() == pytest.approx(trace.p_clean, abs=1e-4)
    # restoring one subject token's early hidden state brings most of the answer back (for this model the
    # strongest token is "iffel", not the last subject token " Tower")
    b, e = trace.subject_range
    assert hidden[b:e, :10].max().item() > trace.p_corrupted + 0.5 * (trace.p_clean - trace.p_corrupted)
