"""EMMET's closed form against its defining properties, and its hyperparameter checks."""

from __future__ import annotations

import pytest
import torch

from lmedit.hparams import HyperParamsError
from lmedit.locate.core import emmet_update, memit_update, rank_one_update
from lmedit.methods.emmet import EMMETHyperParams


def _problem(d_in: int = 12, d_out: int = 7, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, 3 * d_in, generator=g, dtype=torch.float64)
    C = A @ A.T / A.shape[1]
    return K, R, C


def test_every_key_reaches_its_target_exactly_without_the_ridge():
    K, R, C = _problem()
    delta = emmet_update(K, R, C, 1.0, 0.0)
    assert torch.allclose(delta @ K, R, atol=1e-9)


def test_it_is_the_smallest_such_change_in_the_preserved_keys_norm():
    K, R, C = _problem()
    delta = emmet_update(K, R, C, 1.0, 0.0)
    cost = torch.trace(delta @ C @ delta.T)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        # any other exact solution: add a change that is zero on the keys
        other = torch.randn(delta.shape, generator=g, dtype=torch.float64)
        other = other - other @ K @ torch.linalg.pinv(K)
        assert torch.allclose(other @ K, torch.zeros_like(R), atol=1e-9)
        alternative = delta + other
        assert torch.trace(alternative @ C @ alternative.T) > cost


def test_one_key_is_rome_s_rank_one_update():
    K, R, C = _problem(n=1)
    key = K[:, 0]
    left = torch.linalg.solve(C, key)
    rome = rank_one_update(left, key, R[:, 0], torch.zeros_like(R[:, 0]))
    assert torch.allclose(emmet_update(K, R, C, 1.0, 0.0), rome, atol=1e-10)
    assert torch.allclose(emmet_update(K, R, C, 250.0, 0.0), rome, atol=1e-10)  # w cancels without a ridge


def test_the_ridge_acts_against_w_times_its_value():
    K, R, C = _problem()
    assert torch.allclose(emmet_update(K, R, C, 100.0, 0.1), emmet_update(K, R, C, 1.0, 10.0), atol=1e-10)
    # a large ridge shrinks the change towards zero; a tiny one keeps the equalities
    assert emmet_update(K, R, C, 1.0, 1e6).norm() < 1e-2 * emmet_update(K, R, C, 1.0, 0.0).norm()
    assert torch.allclose(emmet_update(K, R, C, 1.0, 1e-9) @ K, R, atol=1e-6)


def test_memit_only_approaches_the_targets_where_emmet_meets_them():
    K, R, C = _problem()
    memit = memit_update(K, R, C, 1.0)
    assert (memit @ K - R).norm() > 1e-3
    assert (emmet_update(K, R, C, 1.0, 0.0) @ K - R).norm() < 1e-9


def test_norm_ridge_is_added_to_the_scaled_statistics():
    K, R, C = _problem()
    eye = torch.eye(C.shape[0], dtype=torch.float64)
    assert torch.allclose(emmet_update(K, R, C, 2.0, 0.1, 0.5), emmet_update(K, R, 2.0 * C + 0.5 * eye, 1.0, 0.1), atol=1e-10)


@pytest.mark.parametrize("change, message", [
    ({"mom2_adjustment": False}, "mom2_adjustment"),
    ({"mom2_update_weight": 0.0}, "mom2_update_weight"),
    ({"emmet_lambda": -1.0}, "emmet_lambda"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(HyperParamsError, match=message):
        EMMETHyperParams(**change).validate()
