"""MasterAdam: float32 steps for half-precision tensors, untouched behaviour in float32."""

from __future__ import annotations

import torch

from lmedit.precision import FLOAT16_LOSS_SCALE, MasterAdam


def _quadratic_steps(param: torch.Tensor, optimizer_step, steps: int = 5) -> None:
    """Steps on loss = sum((p - 1)^2) * 1e-3: small gradients, as an edit's are."""
    for _ in range(steps):
        optimizer_step(((param.float() - 1.0) ** 2).sum() * 1e-3)


def test_float32_is_exactly_torch_adam() -> None:
    torch.manual_seed(0)
    start = torch.randn(8, 4)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    master, plain = MasterAdam([ours], lr=1e-2, weight_decay=0.1), torch.optim.Adam([theirs], lr=1e-2, weight_decay=0.1)
    assert master.masters[0] is ours and master.loss_scale == 1.0

    def step_master(loss: torch.Tensor) -> None:
        master.zero_grad()
        master.backward(loss)
        assert master.step()

    def step_plain(loss: torch.Tensor) -> None:
        plain.zero_grad()
        loss.backward()
        plain.step()

    _quadratic_steps(ours, step_master)
    _quadratic_steps(theirs, step_plain)
    assert torch.equal(ours, theirs)


def test_bfloat16_small_steps_are_not_rounded_away() -> None:
    """A 1e-4 step on weights near 1 is below bfloat16's resolution (1/128 there): plain Adam does nothing."""
    start = torch.full((16,), 1.5, dtype=torch.bfloat16)
    plain_param = torch.nn.Parameter(start.clone())
    plain = torch.optim.Adam([plain_param], lr=1e-4)
    for _ in range(20):
        plain.zero_grad()
        ((plain_param.float() - 1.0) ** 2).sum().backward()
        plain.step()
    assert torch.equal(plain_param.detach(), start)  # the failure MasterAdam exists for

    param = torch.nn.Parameter(start.clone())
    master = MasterAdam([param], lr=1e-4)
    for _ in range(20):
        master.zero_grad()
        master.backward(((param.float() - 1.0) ** 2).sum())
        master.step()
    assert master.masters[0].dtype == torch.float32
    assert float(master.masters[0].detach().mean()) < 1.5 - 1.5e-3  # 20 steps of ~1e-4 accumulated in float32
    assert param.dtype == torch.bfloat16 and torch.equal(param.detach(), master.masters[0].detach().to(torch.bfloat16))


def test_float16_adam_does_not_turn_weights_into_nan() -> None:
    start = torch.full((16,), 0.02, dtype=torch.float16)
    plain_param = torch.nn.Parameter(start.clone())
    plain = torch.optim.Adam([plain_param], lr=1e-2)
    plain.zero_grad()
    (plain_param * 1e-6).sum().backward()  # the squared gradient underflows; eps=1e-8 is 0 in float16
    plain.step()
    assert not torch.isfinite(plain_param).all()

    param = torch.nn.Parameter(start.clone())
    master = MasterAdam([param], lr=1e-2)
    assert master.loss_scale == FLOAT16_LOSS_SCALE
    master.zero_grad()
    master.backward((param * 1e-6).sum())
    assert master.step()
    assert torch.isfinite(param).all() and float(param.detach().float().mean()) < 0.02


def test_float16_overflow_skips_the_step_and_halves_the_scale() -> None:
    param = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    master = MasterAdam([param], lr=1e-2)
    master.zero_grad()
    master.backward((param * 6e4).sum())  # 6e4 * 4096 overflows float16's gradient
    assert not master.step()
    assert master.skipped == 1 and master.loss_scale == FLOAT16_LOSS_SCALE / 2
    assert torch.equal(param.detach(), torch.ones(4, dtype=torch.float16)) and param.grad is None
