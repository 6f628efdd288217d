"""The shared locate-then-edit math, checked on hand-made matrices and tiny models."""

from __future__ import annotations

import torch

from lmedit.locate.core import (
    alphaedit_update,
    context_templates,
    lookup,
    memit_update,
    null_space_projector,
    rank_one_update,
    reset_session_state,
    session_state,
)


def test_rank_one_update_maps_the_key_to_the_target():
    torch.manual_seed(0)
    W = torch.randn(4, 6, dtype=torch.float64)
    key, left, target = torch.randn(6), torch.randn(6), torch.randn(4)
    current = W @ key.double()
    W2 = W + rank_one_update(left, key, target, current)
    assert torch.allclose(W2 @ key.double(), target.double(), atol=1e-10)
    # the change is rank one along `left`: directions orthogonal to it are untouched
    orth = torch.randn(6, dtype=torch.float64)
    orth -= (orth @ left.double()) / (left.double() @ left.double()) * left.double()
    assert torch.allclose(W2 @ orth, W @ orth, atol=1e-10)


def test_memit_update_is_the_regularised_least_squares_solution():
    torch.manual_seed(1)
    K, R, C = torch.randn(6, 3), torch.randn(4, 3), torch.eye(6)
    delta = memit_update(K, R, C, cov_weight=0.5)
    # normal equations of min ||Δ K - R||² + λ tr(Δ C Δᵀ): Δ (K Kᵀ + λ C) = R Kᵀ
    lhs = delta @ (K.double() @ K.double().T + 0.5 * C.double())
    assert torch.allclose(lhs, R.double() @ K.double().T, atol=1e-10)
    # a vanishing regulariser reproduces the residuals exactly (K has full column rank)
    assert torch.allclose(memit_update(K, R, C, cov_weight=1e-9) @ K.double(), R.double(), atol=1e-6)


def test_null_space_projector_keeps_only_small_eigen_directions():
    basis = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    C = basis @ torch.diag(torch.tensor([10.0, 5.0, 1.0, 1e-3, 1e-4], dtype=torch.float64)) @ basis.T
    P = null_space_projector(C, threshold=1e-2)
    assert torch.allclose(P @ P, P, atol=1e-10)
    assert round(float(P.trace())) == 2
    assert torch.allclose(P @ basis[:, 0], torch.zeros(5, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(P @ basis[:, 4], basis[:, 4], atol=1e-10)


def test_alphaedit_update_leaves_preserved_keys_alone_and_fits_new_ones():
    torch.manual_seed(2)
    d = 8
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    preserved = basis[:, :4]  # large-eigenvalue directions of C
    C = preserved @ torch.diag(torch.tensor([9.0, 7.0, 5.0, 3.0], dtype=torch.float64)) @ preserved.T
    P = null_space_projector(C, threshold=1e-3)
    K = basis[:, 4:6] + 0.5 * basis[:, :2]  # new keys, partly inside the preserved space
    R = torch.randn(3, 2, dtype=torch.float64)
    delta = alphaedit_update(K, R, P, previous=None, l2=1e-6)
    assert torch.allclose(delta @ preserved, torch.zeros(3, 4, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(delta @ K, R, atol=1e-4)
    # keys of earlier edits are protected too: the update barely moves their outputs
    earlier = basis[:, 6:7]
    protected = alphaedit_update(K, R, P, previous=earlier @ earlier.T * 100, l2=1e-6)
    assert (protected @ earlier).abs().max() < 1e-2 * (delta @ earlier).abs().max()


def test_lookup_finds_the_subjects_last_token(word_tok):
    found = lookup(word_tok, "the sky . {}", "the capital of france is", "capital of france")
    tokens = word_tok.convert_ids_to_tokens(list(found.ids))
    assert tokens[found.index] == "france"
    assert lookup(word_tok, "{}", "who wrote hamlet", "hamlet", "last").index == 2


def test_context_templates_are_cached_per_model_and_seeded(tiny_llama, word_tok):
    first = context_templates(tiny_llama, word_tok, [[4, 5]], seed=3)
    assert first[0] == "{}" and len(first) == 6 and all(t.endswith(". {}") for t in first[1:])
    assert context_templates(tiny_llama, word_tok, [[4, 5]], seed=3) == first
    reset_session_state(tiny_llama)
    assert context_templates(tiny_llama, word_tok, [[4, 5]], seed=3) == first  # same seed, same prefixes
    assert session_state(tiny_llama)
