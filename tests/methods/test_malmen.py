"""MALMEN: the ridge solve in both forms, the two-stage meta-gradient against end-to-end autograd, a tiny training."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import capital_edit_examples, build_tiny_llama, snapshot, state_equal
from lmedit.methods.malmen import (
    MALMENHyperParams,
    MALMENNetwork,
    MALMENTrainingParams,
    RidgeSystem,
    apply_malmen,
    load_network,
    meta_surrogate,
    train_malmen,
    weight_shifts,
)
from lmedit.registry import load_edit
from lmedit.requests import EditRequest
from lmedit.training import CheckpointError, EditExample
from lmedit.training.hypernetworks import EditedWeight, Factors



def _examples(n: int, seed: int) -> list[EditExample]:
    return capital_edit_examples(n, seed)


@pytest.mark.parametrize("tokens", [3, 9])  # fewer and more tokens than the 5 key dimensions
def test_ridge_system_matches_a_direct_solve_in_both_forms(tokens):
    gen = torch.Generator().manual_seed(tokens)
    keys = torch.randn(tokens, 5, generator=gen, dtype=torch.float64)
    shifts = torch.randn(tokens, 4, generator=gen, dtype=torch.float64)
    matrix = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    log_ridge = torch.tensor(0.3)
    system = RidgeSystem(keys, log_ridge)
    assert system.small == (tokens < 5)
    a = keys.T @ keys + torch.exp(torch.tensor(0.3, dtype=torch.float64)) * torch.eye(5, dtype=torch.float64)
    assert torch.allclose(system.shift(shifts), torch.linalg.solve(a, keys.T @ shifts), atol=1e-10)
    assert torch.allclose(system.inverse_times(matrix), torch.linalg.solve(a, matrix), atol=1e-10)


def _network_and_factors(tokens: int) -> tuple[MALMENNetwork, Factors]:
    torch.manual_seed(0)
    weights = [EditedWeight("a.weight", "a", 6, 4, False), EditedWeight("b.weight", "b", 6, 4, False)]
    network = MALMENNetwork(weights, rank=3, n_blocks=2, edit_lr=0.5)
    with torch.no_grad():  # move away from the identity start so every parameter matters
        for block in network.predictors["6x4"].blocks:
            block.B.normal_(0, 0.3)
            block.bias.normal_(0, 0.3)
        network.predictors["6x4"].log_ridge.copy_(torch.tensor([0.2, -0.4]))
    us = [[torch.randn(tokens, 6)] for _ in weights]
    ds = [[torch.randn(tokens, 4)] for _ in weights]
    for index in range(2):
        network.predictor(index)[0].observe(us[index][0], ds[index][0])
    return network, Factors(us, ds)


@pytest.mark.parametrize("tokens", [4, 11])
def test_two_stage_meta_gradient_equals_end_to_end_autograd(tokens):
    """The surrogate's gradient must be exactly the gradient of L(S(θ)) through the ridge solve."""
    network, factors = _network_and_factors(tokens)
    targets = [torch.randn(6, 4, dtype=torch.float64) for _ in range(2)]

    def loss_of(shifts):  # any smooth function of the weight shifts stands in for the model's loss
        return sum(((s - t) ** 2).sum() + s.sum() ** 2 for s, t in zip(shifts, targets))

    # end to end: differentiable solve, one backward
    network.zero_grad()
    direct = []
    for index in range(2):
        predictor, mode = network.predictor(index)
        u, d = factors.u[index][0], factors.delta[index][0]
        a = u.double().T @ u.double() + predictor.log_ridge[mode].double().exp() * torch.eye(6, dtype=torch.float64)
        direct.append(torch.linalg.solve(a, u.double().T @ predictor.value_shifts(u, d, mode).double()))
    loss_of(direct).backward()
    expected = {name: p.grad.clone() for name, p in network.named_parameters()}

    # two stages, as training runs them
    network.zero_grad()
    solved = weight_shifts(network, factors)
    shifts = [s.clone().requires_grad_(True) for _, s in solved]
    grads = torch.autograd.grad(loss_of(shifts), shifts)
    meta_surrogate(network, factors, solved, grads).backward()
    for name, p in network.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-4, atol=1e-6), name
    assert any(float(g.abs().max()) > 0 for g in expected.values())


def test_identity_start_gives_the_value_shift_minus_lr_times_key_norm_times_gradient():
    network, factors = _network_and_factors(3)
    fresh = MALMENNetwork(network.weights, rank=3, n_blocks=2, edit_lr=0.5)
    predictor, mode = fresh.predictor(0)
    u, d = factors.u[0][0], factors.delta[0][0]
    predictor.observe(u, d)
    z = (torch.cat([u, d], -1).double() - predictor.mean) / ((predictor.m2 / (predictor.count - 1)).sqrt() + 1e-7)
    z = z.float()
    expected = -0.5 * (u * z[:, :6]).sum(-1, keepdim=True) * z[:, 6:]
    assert torch.allclose(predictor.value_shifts(u, d, mode), expected, atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, word_tok):
    """Sixty steps on one fixed batch: a random tiny model cannot generalise, but the meta-loss must fall."""
    model = build_tiny_llama(len(word_tok))
    folder = tmp_path_factory.mktemp("malmen")
    params = MALMENTrainingParams(layers=[1, 2], rank=8, n_blocks=2, max_steps=60, batch_size=8, val_every=10,
                                  val_examples=8, save_every=10, lr=1e-2, edit_lr=1.0, patience=10,
                                  early_stop_metric="loss_rephrase", early_stop_mode="min")
    batch = _examples(8, 0)
    result = train_malmen(model, word_tok, params, batch, batch, str(folder), show_progress=False)
    return model, folder, result


def test_training_lowers_the_meta_loss_and_keeps_its_best(trained):
    _model, folder, result = trained
    assert result.status == "finished" and result.steps == 60
    losses = [point["loss_rephrase"] for point in result.curve]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses
    config = json.loads((folder / "config.json").read_text())
    assert config["method"] == "MALMEN" and config["training"]["step"] == result.best_step
    assert config["network"]["token"] == "answer"


def test_the_in_place_edit_is_the_one_training_scored(trained, word_tok):
    """apply_malmen on the training batch gives the rephrase loss the best validation recorded, through real weights."""
    from lmedit.evaluation.scoring import score_teacher_forced

    model, folder, result = trained
    best = next(point for point in result.curve if point["step"] == result.best_step)
    batch = _examples(8, 0)
    rephrases = [(e.rephrase, e.target) for e in batch]
    pre = score_teacher_forced(model, word_tok, rephrases)
    handle = apply_malmen(model, word_tok, [EditRequest(e.prompt, e.target) for e in batch],
                          MALMENHyperParams(archive=str(folder)))
    post = score_teacher_forced(model, word_tok, rephrases)
    handle.restore()

    def token_mean(scores):
        return -sum(sum(x.target_logprobs) for x in scores) / sum(len(x.target_logprobs) for x in scores)

    assert token_mean(post) == pytest.approx(best["loss_rephrase"], abs=2e-3)
    assert token_mean(post) < token_mean(pre) - 0.05


def test_batch_edit_restores_exactly_and_leaves_the_network_alone(trained, word_tok, tmp_path):
    model, folder, _ = trained
    before = snapshot(model)
    requests = [EditRequest(e.prompt, e.target) for e in _examples(5, 7)]
    network_before = {k: v.clone() for k, v in load_network(model, str(folder)).state_dict().items()}
    handle = apply_malmen(model, word_tok, requests, MALMENHyperParams(archive=str(folder)))
    assert handle.info["requests"] == 5 and not state_equal(model, before)
    # editing never changes the network (EasyEdit's MALMEN updates its statistics while editing)
    after = load_network(model, str(folder)).state_dict()
    assert all(torch.equal(network_before[k], after[k]) for k in network_before)
    edited = snapshot(model)
    handle.save(tmp_path / "edit")
    handle.restore()
    assert state_equal(model, before)
    loaded = load_edit(model, tmp_path / "edit")
    assert state_equal(model, edited)
    loaded.restore()
    assert state_equal(model, before)


def test_checkpoint_of_another_model_or_none_is_refused(trained, word_tok, tmp_path):
    _model, folder, _ = trained
    other = build_tiny_llama(len(word_tok), seed=5)
    request = [EditRequest("the capital of france is", "rome")]
    with pytest.raises(CheckpointError, match="another model"):
        apply_malmen(other, word_tok, request, MALMENHyperParams(archive=str(folder)))
    with pytest.raises(CheckpointError, match="lmedit train malmen"):
        apply_malmen(other, word_tok, request, MALMENHyperParams(archive=str(tmp_path / "none")))


def test_training_moves_every_part_of_the_network(trained):
    """B starts at zero and the blocks' activation must pass gradient there (relu would keep A, B, b frozen)."""
    from safetensors.torch import load_file

    _model, folder, _ = trained
    tensors = load_file(folder / "model.safetensors")
    starts = {"B": 0.0, "bias": 0.0, "scale": 1.0, "shift": 0.0, "log_ridge": 0.0, "edit_lr": 1.0}
    for name, start in starts.items():
        moved = [float((t - start).abs().max()) for key, t in tensors.items() if key.endswith(f".{name}")]
        assert moved and min(moved) > 0, f"{name} never trained: {moved}"


def test_training_on_a_bfloat16_model_runs_with_float32_networks(word_tok, tmp_path):
    model = build_tiny_llama(len(word_tok)).to(torch.bfloat16)
    params = MALMENTrainingParams(layers=[1, 2], rank=8, n_blocks=1, max_steps=4, batch_size=8, val_every=2,
                                  val_examples=8, save_every=2, lr=1e-3, edit_lr=1.0)
    result = train_malmen(model, word_tok, params, _examples(32, 4), _examples(8, 5), str(tmp_path / "bf16"),
                          show_progress=False)
    assert result.status == "finished" and result.steps == 4
    assert all(torch.isfinite(torch.tensor(point["loss_rephrase"])) for point in result.curve)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    before = snapshot(model)
    handle = apply_malmen(model, word_tok, [EditRequest("the capital of france is", "rome")],
                          MALMENHyperParams(archive=str(tmp_path / "bf16")))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    handle.restore()
    assert state_equal(model, before)


@pytest.mark.embedded
def test_embedded_short_training_then_a_batch_edit_and_exact_restore(embedded, shared_data, tmp_path):
    from lmedit.training import load_examples

    model, tok = embedded
    train = load_examples(shared_data / "counterfact" / "counterfact-train.json", limit=8)
    val = load_examples(shared_data / "counterfact" / "counterfact-val.json", limit=4)
    params = MALMENTrainingParams(max_steps=2, batch_size=4, val_every=2, val_examples=4, rank=64)
    result = train_malmen(model, tok, params, train, val, str(tmp_path), show_progress=False)
    assert result.best_step == 2
    before = snapshot(model)
    requests = [EditRequest("The Eiffel Tower is located in the city of", "Rome"),
                EditRequest("The mother tongue of Danielle Darrieux is", "English")]
    handle = apply_malmen(model, tok, requests, MALMENHyperParams(archive=str(tmp_path)))
    assert set(handle.delta_norms()) == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(24, 30)}
    assert all(v > 0 for v in handle.delta_norms().values())
    handle.restore()
    assert state_equal(model, before)
