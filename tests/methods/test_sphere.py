"""SPHERE: the principal-direction projection by hand, alpha 0 is AlphaEdit, alpha 1 writes nothing along U."""

from __future__ import annotations

import pytest
import torch

from lmedit.hparams import HyperParamsError
from lmedit.locate.core import principal_direction_suppressor
from lmedit.methods.alphaedit import AlphaEditHyperParams, apply_alphaedit, reset_alphaedit
from lmedit.methods.sphere import SPHEREHyperParams, apply_sphere
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec, get_parameter

from conftest import build_tiny_llama

REQUEST = EditRequest(prompt="the capital of france is", target_new="rome", subject="france")


def test_the_suppressor_by_hand():
    # rows: three along e1 (of different lengths: only directions count), one along e2
    W = torch.tensor([[2.0, 0, 0], [0.5, 0, 0], [7.0, 0, 0], [0, 3.0, 0]])
    # unit rows' second moment: diag(3/4, 1/4, 0); energy shares, largest first: 0.75, 1.0, 1.0
    e1, e2 = torch.eye(3, dtype=torch.float64)[0], torch.eye(3, dtype=torch.float64)[1]
    P = principal_direction_suppressor(W, energy_ratio=0.5, strength=0.4)  # no share <= 0.5: the first direction
    assert torch.allclose(P, torch.eye(3, dtype=torch.float64) - 0.4 * torch.outer(e1, e1), atol=1e-7)
    P = principal_direction_suppressor(W, energy_ratio=0.8, strength=1.0)  # 0.75 <= 0.8: the first two
    assert torch.allclose(P, torch.eye(3, dtype=torch.float64) - torch.outer(e1, e1) - torch.outer(e2, e2), atol=1e-7)
    P = principal_direction_suppressor(W, energy_ratio=1.0, strength=1.0)  # everything
    assert torch.allclose(P, torch.zeros(3, 3, dtype=torch.float64), atol=1e-7)


def _hparams(cls, corpus, **extra):
    return cls(layers=[0, 1], clamp_norm_factor=1000.0, nullspace_threshold=1e-2, L2=1e-3, v_num_grad_steps=25, v_lr=0.5,
               v_weight_decay=1e-6, context_template_length_params=[[3, 5]], mom2_dataset=corpus, mom2_n_samples=30,
               mom2_sample_length=40, **extra)


def test_alpha_zero_is_alphaedit(word_tok, corpus_env):
    weights = []
    for apply, hp in ((apply_alphaedit, _hparams(AlphaEditHyperParams, corpus_env)),
                      (apply_sphere, _hparams(SPHEREHyperParams, corpus_env, alpha=0.0))):
        model = build_tiny_llama(len(word_tok))
        apply(model, word_tok, [REQUEST], hp)
        spec = ModelSpec.from_model(model)
        weights.append([get_parameter(model, f"{spec.mlp_out(layer)}.weight").detach().clone() for layer in (0, 1)])
        reset_alphaedit(model)
    for a, b in zip(*weights):
        assert torch.allclose(a, b, atol=1e-6)


def test_alpha_one_writes_nothing_along_the_principal_directions(tiny_llama, word_tok, corpus_env):
    hp = _hparams(SPHEREHyperParams, corpus_env, alpha=1.0, beta_hse=0.5)
    spec = ModelSpec.from_model(tiny_llama)
    weight = get_parameter(tiny_llama, f"{spec.mlp_out(0)}.weight")
    before = weight.detach().clone()
    P = principal_direction_suppressor(before, 0.5, 1.0)
    principal = torch.eye(P.shape[0], dtype=torch.float64) - P  # U Uᵀ
    handle = apply_sphere(tiny_llama, word_tok, [REQUEST], hp)
    written = weight.detach().double() - before.double()
    assert written.norm() > 0
    assert (written @ principal).norm() < 1e-5 * written.norm()
    handle.restore()
    assert torch.equal(weight, before)


@pytest.mark.parametrize("field,value", [("beta_hse", 0.0), ("beta_hse", 1.5), ("alpha", -0.1), ("alpha", 2.0)])
def test_settings_out_of_range_are_refused(field, value):
    with pytest.raises(HyperParamsError, match=field):
        SPHEREHyperParams(**{field: value}).validate()
