"""Optimisation that holds when the model is in bfloat16 or float16.

Two things go wrong when Adam steps half-precision weights directly:

* float16 cannot hold Adam's ``eps`` (1e-8 rounds to 0) or a small squared
  gradient, so the first step divides 0 by 0 and the weights become NaN;
* bfloat16 keeps 8 significant bits: a step smaller than 1/256 of a weight
  rounds away, so a small learning rate changes nothing.

:class:`MasterAdam` keeps a float32 master copy of every half-precision
tensor it trains, steps the copy, and writes the copy back in the model's
dtype after each step (mixed-precision training as usually done). In float16
the loss is also scaled before the backward pass so that small gradients do
not flush to zero; a step whose gradients overflow is skipped and the scale
halved. Float32 tensors are trained in place exactly as ``torch.optim.Adam``
would, so float32 results do not change by a bit.
"""

from __future__ import annotations

from typing import Iterable

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT16_LOSS_SCALE = 2.0**12


def is_half(dtype: torch.dtype) -> bool:
    return dtype in HALF_DTYPES


class MasterAdam:
    """Adam over float32 masters of the given tensors; the tensors themselves are what the model reads."""

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.masters = [self._master(p) for p in self.params]
        self.mixed = any(m is not p for m, p in zip(self.masters, self.params))
        self.loss_scale = FLOAT16_LOSS_SCALE if any(p.dtype == torch.float16 for p in self.params) else 1.0
        self.skipped = 0
        self.optimizer = torch.optim.Adam(self.masters, lr=lr, weight_decay=weight_decay)

    @staticmethod
    def _master(param: torch.Tensor) -> torch.Tensor:
        if not is_half(param.dtype):
            return param
        return torch.nn.Parameter(param.detach().float().clone())

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()

    def step(self) -> bool:
        """One Adam step on the masters, copied back into the trained tensors; False when skipped (fp16 overflow)."""
        if not self.mixed and self.loss_scale == 1.0:
            self.optimizer.step()
            return True
        grads_finite = self._masters_take_grads()
        if not grads_finite:
            self.zero_grad()
            self.skipped += 1
            self.loss_scale /= 2.0
            return False
        self.optimizer.step()
        self.push()
        return True

    def push(self) -> None:
        """Write the masters into the trained tensors in their own dtype (after a step or a clamp of the masters)."""
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if m is not p:
                    p.copy_(m)

    def _masters_take_grads(self) -> bool:
        finite = True
        for p, m in zip(self.params, self.masters):
            if p.grad is None:
                continue
            grad = p.grad.float() / self.loss_scale if (m is not p or self.loss_scale != 1.0) else p.grad
            finite = finite and bool(torch.isfinite(grad).all())
            if m is not p:
                m.grad = grad
                p.grad = None
            else:
                p.grad = grad.to(p.dtype)
        return finite

