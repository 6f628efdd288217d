"""ROME, MEMIT and AlphaEdit invariants on tiny random models (statistics from a tiny corpus)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_llama, snapshot, state_equal
from lmedit.evaluation.scoring import score_teacher_forced
from lmedit.forward import SuffixForward, UpperForward
from lmedit.handles import restore_all
from lmedit.registry import load_edit
from lmedit.locate.core import reset_session_state
from lmedit.methods.alphaedit import AlphaEditHyperParams, alphaedit_state, apply_alphaedit
from lmedit.methods.memit import MEMITHyperParams, apply_memit
from lmedit.methods.rome import ROMEHyperParams, apply_rome
from lmedit.requests import EditRequest

# The subject ends each prompt: in a tiny random model, attention carries almost nothing from
# one position to the next, so only an edit at the last position can change the prediction.
FACTS = [
    ("the capital of france", "france", "rome"),
    ("the mother tongue of tolstoy", "tolstoy", "italian"),
    ("who wrote hamlet", "hamlet", "madrid"),
]


def _requests(n: int = 3) -> list[EditRequest]:
    return [EditRequest(prompt=p, target_new=t, subject=s) for p, s, t in FACTS[:n]]


def _common(corpus: str) -> dict:
    return dict(
        v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-6, context_template_length_params=[[3, 5]],
        mom2_dataset=corpus, mom2_n_samples=30, mom2_sample_length=40,
    )


def _rewrite_acc(model, tok, requests) -> list[float]:
    return [s.token_accuracy for s in score_teacher_forced(model, tok, [(r.prompt, r.target_new) for r in requests])]


@pytest.mark.parametrize("key_mode", ["original", "prefix", "prompt"])
def test_rome_edit_takes_effect_and_restores_exactly(tiny_model, word_tok, corpus_env, key_mode):
    before = snapshot(tiny_model)
    request = _requests(1)
    assert _rewrite_acc(tiny_model, word_tok, request) == [0.0]
    hp = ROMEHyperParams(layers=[1], key_mode=key_mode, clamp_norm_factor=1000.0, **_common(corpus_env))
    handle = apply_rome(tiny_model, word_tok, request, hp)
    assert _rewrite_acc(tiny_model, word_tok, request) == [1.0]
    assert handle.param_names == ["model.layers.1.mlp.down_proj.weight"] or "c_proj" in handle.param_names[0]
    handle.restore()
    assert state_equal(tiny_model, before)


def test_rome_without_covariance_is_easyedit_default_and_differs(tiny_llama, word_tok, corpus_env):
    request = _requests(1)
    deltas = {}
    for adjust in (True, False):
        hp = ROMEHyperParams(layers=[1], mom2_adjustment=adjust, clamp_norm_factor=1000.0, **_common(corpus_env))
        handle = apply_rome(tiny_llama, word_tok, request, hp)
        assert _rewrite_acc(tiny_llama, word_tok, request) == [1.0]
        deltas[adjust] = handle.delta_norms()
        handle.restore()
    assert deltas[True] != deltas[False]


def test_rome_save_and_load_round_trip(tiny_llama, word_tok, corpus_env, tmp_path):
    before = snapshot(tiny_llama)
    hp = ROMEHyperParams(layers=[1], clamp_norm_factor=1000.0, **_common(corpus_env))
    handle = apply_rome(tiny_llama, word_tok, _requests(1), hp)
    edited = snapshot(tiny_llama)
    handle.save(tmp_path / "edit")
    handle.restore()
    loaded = load_edit(tiny_llama, tmp_path / "edit")
    assert state_equal(tiny_llama, edited)
    loaded.restore()
    assert state_equal(tiny_llama, before)


def test_memit_batch_holds_every_edit_and_restores(tiny_model, word_tok, corpus_env):
    before = snapshot(tiny_model)
    requests = _requests(3)
    hp = MEMITHyperParams(layers=[0, 1], clamp_norm_factor=1000.0, mom2_update_weight=1.0, **_common(corpus_env))
    handle = apply_memit(tiny_model, word_tok, requests, hp)
    assert _rewrite_acc(tiny_model, word_tok, requests) == [1.0, 1.0, 1.0]
    assert len(handle.param_names) == 2
    handle.restore()
    assert state_equal(tiny_model, before)


def test_alphaedit_accumulates_keys_in_the_session_and_restore_removes_them(word_tok, corpus_env):
    model = build_tiny_llama(len(word_tok), seed=1)
    other = build_tiny_llama(len(word_tok), seed=2)
    before = snapshot(model)
    hp = AlphaEditHyperParams(layers=[0, 1], clamp_norm_factor=1000.0, nullspace_threshold=1e-2, L2=1e-3,
                              **_common(corpus_env))
    handles = [apply_alphaedit(model, word_tok, [r], hp) for r in _requests(2)]
    assert _rewrite_acc(model, word_tok, _requests(2)) == [1.0, 1.0]  # the second edit kept the first
    state = alphaedit_state(model)
    assert len(state.keys) == 2 and all(set(k) == {0, 1} for k in state.keys.values())
    assert not alphaedit_state(other).keys  # never shared across models
    restore_all(handles)
    assert state_equal(model, before)
    assert not alphaedit_state(model).keys
    reset_session_state(model)
    assert not alphaedit_state(model).projectors


def test_requests_without_subject_are_rejected_before_any_work():
    from lmedit.registry import get_method

    with pytest.raises(ValueError, match="subject"):
        get_method("ROME").check_requests([EditRequest(prompt="the sky is", target_new="red")])


def test_joint_target_optimisation_equals_one_request_at_a_time(tiny_llama, word_tok, corpus_env):
    from lmedit.locate.core import context_templates, optimize_target, optimize_targets

    hp = MEMITHyperParams(layers=[0, 1], clamp_norm_factor=1000.0, **_common(corpus_env))
    templates = context_templates(tiny_llama, word_tok, hp.context_template_length_params)
    requests = _requests(3)
    joint = optimize_targets(tiny_llama, word_tok, requests, site="model.layers.1", templates=templates, hparams=hp)
    for request, together in zip(requests, joint):
        alone = optimize_target(tiny_llama, word_tok, request, site="model.layers.1", templates=templates, hparams=hp)
        assert len(together.nll) == len(alone.nll)
        assert torch.allclose(together.target, alone.target, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shortcut", ["suffix_from_block", "suffix", "upper"])
def test_target_optimisation_shortcuts_equal_full_forward_passes(tiny_model, word_tok, corpus_env, monkeypatch, shortcut):
    """v* computed with the cached-prefix shortcut (skipping the blocks below the edited one, or not), or with the
    upper-blocks shortcut, equals v* from full forward passes."""
    from lmedit.forward import partial
    from lmedit.locate import core

    readers = []
    original_reader = core._logits_reader

    def reader_spy(*args, **kwargs):
        result = original_reader(*args, **kwargs)
        readers.append(type(result[0]).__name__)
        return result

    monkeypatch.setattr(core, "_logits_reader", reader_spy)
    if shortcut == "suffix":
        monkeypatch.setattr(partial._SuffixFromBlock, "prepare", classmethod(lambda klass, *a, **k: None))

    hp = MEMITHyperParams(layers=[0, 1], clamp_norm_factor=1000.0, **_common(corpus_env))
    templates = core.context_templates(tiny_model, word_tok, hp.context_template_length_params)
    requests = [EditRequest("the capital of france is", "rome", subject="france"),
                EditRequest("who wrote hamlet", "madrid berlin", subject="hamlet")]
    used = []
    for cls in (SuffixForward, UpperForward):
        original = cls.prepare.__func__

        def spy(klass, *args, _original=original, **kwargs):
            result = _original(klass, *args, **kwargs)
            used.append((klass.__name__, result is not None))
            return result

        monkeypatch.setattr(cls, "prepare", classmethod(spy))
    fast = core.optimize_targets(tiny_model, word_tok, requests, site=_block(tiny_model, 1), templates=templates, hparams=hp)
    assert ("SuffixForward", True) in used or shortcut == "upper"
    if shortcut != "upper":
        assert readers[-1] == {"suffix_from_block": "_SuffixFromBlock", "suffix": "SuffixForward"}[shortcut]
    if shortcut == "upper":  # force the second shortcut
        monkeypatch.setattr(SuffixForward, "prepare", classmethod(lambda klass, *a, **k: None))
        fast = core.optimize_targets(tiny_model, word_tok, requests, site=_block(tiny_model, 1), templates=templates, hparams=hp)
        assert ("UpperForward", True) in used
    monkeypatch.setattr(SuffixForward, "prepare", classmethod(lambda klass, *a, **k: None))
    monkeypatch.setattr(UpperForward, "prepare", classmethod(lambda klass, *a, **k: None))
    slow = core.optimize_targets(tiny_model, word_tok, requests, site=_block(tiny_model, 1), templates=templates, hparams=hp)
    for a, b in zip(fast, slow):
        assert len(a.nll) == len(b.nll)
        assert torch.allclose(a.target, b.target, atol=1e-4, rtol=1e-4)


def _block(model, index: int) -> str:
    from lmedit.spec import ModelSpec

    return ModelSpec.from_model(model).block(index)


def test_change_before_norm_moves_the_normalised_output_by_the_wanted_change():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from lmedit.locate.core import change_before_norm

    torch.manual_seed(0)
    norm = Gemma3RMSNorm(16)
    norm.weight.data.normal_(0, 0.3)
    x0, x1 = torch.randn(16, 3) * 4, torch.randn(16, 3) * 4
    with torch.no_grad():
        wanted = (norm(x1.T) - norm(x0.T)).T.double()  # reachable: the norm's output at x1
        change = change_before_norm(norm, x0, wanted)
        assert change.dtype == torch.float64
        assert torch.allclose(norm((x0 + change.float()).T), norm(x1.T), atol=1e-4)
        # asking the input for the output's change (MEMIT's assumption) misses it by far
        assert (norm((x0 + wanted.float()).T) - norm(x1.T)).abs().max() > 0.1


def test_memit_reaches_its_target_through_gemmas_post_mlp_norm(word_tok, corpus_env):
    """Gemma 2/3 normalise each MLP output before adding it to the residual stream: MEMIT's layer loop carries its
    residual back through that norm, so the block output at the fact token ends close to v* (on Gemma-3-270M,
    without this, rewrite fell from 0.21 to 0.09)."""
    from test_contract import build_tiny_gemma3

    from lmedit.locate.core import outputs_at
    from lmedit.methods.memit import plan_edit, spread_plan, memit_solve

    model = build_tiny_gemma3(len(word_tok), layers=4)
    # with identity statistics and almost no weight on them, the closed form is all but exact: what is missed is
    # what the norm cannot reach (its output has a fixed size), 0.17 here against 0.45 without carrying it back
    hp = MEMITHyperParams(layers=[1, 2], mom2_adjustment=False, mom2_update_weight=1e-6, **_common(corpus_env))
    requests = _requests(1)
    plan = plan_edit(model, word_tok, requests, hp, covariances=False)
    site = plan.spec.block(hp.layers[-1])
    before = outputs_at(model, word_tok, site, requests, hp.fact_token)
    spread_plan(model, word_tok, plan, requests, hp, memit_solve(plan.covariances, hp.mom2_update_weight))
    after = outputs_at(model, word_tok, site, requests, hp.fact_token)
    missed = float((plan.targets - after).norm() / (plan.targets - before).norm())
    assert missed < 0.25, missed


def test_neighbour_prompts_keep_the_subjects_other_facts_closer_to_the_unedited_model(tiny_llama, word_tok, corpus_env):
    """Opt-in same-subject protection: v* also keeps the next-token distributions of other prompts about the subject."""
    request = _requests(1)
    neighbour = "the mother tongue of france"

    def next_token_log_probs() -> torch.Tensor:
        ids = torch.tensor([word_tok(neighbour).input_ids])
        with torch.no_grad():
            return tiny_llama(input_ids=ids).logits[0, -1].log_softmax(-1)

    before = next_token_log_probs()
    drift = {}
    for prompts in ([], ["the mother tongue of {}"]):
        hp = ROMEHyperParams(layers=[1], clamp_norm_factor=1000.0, neighbour_prompts=prompts, neighbour_factor=100.0,
                             neighbour_tokens=1, **_common(corpus_env))
        handle = apply_rome(tiny_llama, word_tok, request, hp)
        after = next_token_log_probs()
        drift[bool(prompts)] = float((before.exp() * (before - after)).sum())  # KL(unedited || edited)
        handle.restore()
    assert drift[True] < 0.5 * drift[False], drift


def test_neighbour_prompts_must_name_the_subject():
    from lmedit.hparams import HyperParamsError

    with pytest.raises(HyperParamsError, match="neighbour_prompts need"):
        ROMEHyperParams(neighbour_prompts=["the mother tongue of"]).validate()
