"""PMET: joint attention/MLP targets, the MLP-only write, and the square-root spreading of the residual."""

from __future__ import annotations

import torch

from lmedit.locate.core import context_templates, optimize_joint_targets, outputs_at
from lmedit.methods.pmet import PMETHyperParams, _optimise_targets, apply_pmet
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec, get_parameter

REQUEST = EditRequest(prompt="the capital of france is", target_new="rome", subject="france")


def _hparams(layers: list[int], **overrides) -> PMETHyperParams:
    settings = dict(layers=layers, v_num_grad_steps=15, v_lr=0.5, v_weight_decay=1e-6, clamp_norm_factor=1000.0,
                    context_template_length_params=[], mom2_adjustment=False, mom2_update_weight=1e-8)
    settings.update(overrides)
    return PMETHyperParams(**settings)


def test_each_site_gets_its_own_delta_whatever_the_order(tiny_llama, word_tok):
    """The deltas belong to their sites: listing the sites the other way round gives each site the same target."""
    spec = ModelSpec.from_model(tiny_llama)
    sites = [spec.attn_out(1), spec.mlp_out(1)]
    hp = _hparams([1])
    forward = optimize_joint_targets(tiny_llama, word_tok, [REQUEST], sites=sites, templates=["{}"], hparams=hp)[0]
    backward = optimize_joint_targets(tiny_llama, word_tok, [REQUEST], sites=sites[::-1], templates=["{}"], hparams=hp)[0]
    for site in sites:
        assert forward[site].delta_norm > 0
        assert torch.allclose(forward[site].target, backward[site].target, atol=1e-5, rtol=1e-5)


def test_each_site_has_its_own_norm_ball(tiny_llama, word_tok):
    spec = ModelSpec.from_model(tiny_llama)
    sites = [spec.attn_out(1), spec.mlp_out(1)]
    hp = _hparams([1], clamp_norm_factor=0.05, v_lr=5.0)
    result = optimize_joint_targets(tiny_llama, word_tok, [REQUEST], sites=sites, templates=["{}"], hparams=hp)[0]
    for site in sites:
        delta = result[site].target - result[site].init
        assert delta.norm() > 0
        assert delta.norm() <= 0.05 * result[site].init.norm() * (1 + 1e-5)


def test_one_layer_meets_the_mlp_target_and_leaves_attention_alone(tiny_llama, word_tok):
    spec = ModelSpec.from_model(tiny_llama)
    hp = _hparams([1])
    templates = context_templates(tiny_llama, word_tok, hp.context_template_length_params)
    wanted = _optimise_targets(tiny_llama, word_tok, spec, [REQUEST], hp, templates)
    attention = {name: get_parameter(tiny_llama, f"{spec.attn_out(layer)}.weight").detach().clone() for layer, name in
                 enumerate(["a0", "a1"])}
    handle = apply_pmet(tiny_llama, word_tok, [REQUEST], hp)
    assert handle.info["attention_delta_norm_mean"] > 0  # the attention delta took part in the optimisation
    reached = outputs_at(tiny_llama, word_tok, spec.mlp_out(1), [REQUEST], hp.fact_token)
    assert torch.allclose(reached.float(), wanted.mlp.float(), atol=1e-3 * float(wanted.mlp.norm()))
    for layer, name in enumerate(["a0", "a1"]):  # only MLP weights are written
        assert torch.equal(get_parameter(tiny_llama, f"{spec.attn_out(layer)}.weight"), attention[name])


def test_the_lower_layer_takes_the_residual_over_root_two(tiny_llama, word_tok):
    """With layers [0, 1] the first update carries (target − current) / √2 on its key (λ → 0, one key)."""
    from lmedit.locate.core import average_keys

    spec = ModelSpec.from_model(tiny_llama)
    hp = _hparams([0, 1])
    templates = context_templates(tiny_llama, word_tok, hp.context_template_length_params)
    wanted = _optimise_targets(tiny_llama, word_tok, spec, [REQUEST], hp, templates)
    residual = wanted.mlp - outputs_at(tiny_llama, word_tok, spec.mlp_out(1), [REQUEST], hp.fact_token)
    key = average_keys(tiny_llama, word_tok, spec, [REQUEST], [0], templates, hp.fact_token)[0]
    weight = get_parameter(tiny_llama, f"{spec.mlp_out(0)}.weight")
    original = weight.detach().clone()
    handle = apply_pmet(tiny_llama, word_tok, [REQUEST], hp)
    written = weight.detach().double() - original.double()
    moved = written @ key.double()
    expected = residual.double() / 2 ** 0.5
    assert torch.allclose(moved, expected, atol=1e-4 * float(expected.norm()))
    handle.restore()
    assert torch.equal(weight, original)
