"""WISE (Wang et al., NeurIPS 2024): a side memory for edits, routed by activation deviation.

One MLP down-projection W (EasyEdit: ``model.layers[27].mlp.down_proj``) is
wrapped. Edits never touch W; they train a *side memory* W', a copy of W:

* **Edit loss.** For each edit, the rows are the edit ``prompt + " " + target``
  under ``'{}'`` and ten short context templates (the model's own greedy
  continuations of "I", "You", "Because", "Yes", "Q: " of 5 and 10 tokens,
  as in EasyEdit), plus one *irrelevant* row. While editing the layer
  outputs ``W' x``; the loss is the target NLL of the edit rows plus the
  activation-margin terms on ``Δ(x) = mean_t ||act(W' x_t) - act(W x_t)||``
  (``act`` = the model's hidden activation, as in the reference code):
  ``mean+[Δ_irr - Δ_edit + γ] + mean+[Δ_irr - α] + mean+[β - Δ_edit]``, where
  ``mean+`` averages the positive entries (EasyEdit's reduction) and
  ``act_margin = [α, β, γ]``.
* **Knowledge sharding.** Each shard of ``save_freq`` edits updates only a
  random subspace: a Bernoulli mask with P(1) = ``mask_ratio`` over W's
  entries, drawn when the shard starts, multiplies the gradient. SGD at
  ``edit_lr`` (weight decay 1e-5 inside the mask), W' clamped to
  ``W ± norm_constraint`` after each step; stop early once the loss is
  below 0.02 and moved less than 1e-4 (EasyEdit's rule).
* **Routing.** After an edit the mean in-scope Δ is recorded; the running
  minimum times ``act_ratio`` is the threshold. At inference a sequence
  whose Δ stays below it goes through W, otherwise through the memory
  with the largest Δ (WISE-Retrieve) or the larger of merged main memory
  and side memory (WISE-Merge). Δ is averaged over the sequence's real tokens
  (the top-1 token when a sequence has more than 100).
* **Merging.** Every ``save_freq`` edits W' is saved as a shard and reset
  to W; every ``merge_freq`` edits the shards' task vectors ``W_i - W`` are
  merged (``ties``, ``dare_ties``, ``dare_linear``, ``linear``, ...):
  WISE-Retrieve merges the last ``merge_freq/save_freq`` shards into one
  retrievable memory; WISE-Merge merges everything into the main memory.

Deliberate differences from EasyEdit (docs/lifelong.md): nothing happens on
a forward pass outside an edit (EasyEdit merges during evaluation), the
adapter is never rebuilt between sequential edits, padding is excluded
from Δ and from the loss, template prompts are masked by their own length,
and WISE-Merge's "final merge" is computed at the end of each edit instead
of on the next evaluation call.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lmedit.adapters import (
    AdapterSite,
    load_adapter_edit,
    AdapterEditHandle,
    AdapterError,
    AdapterLayer,
    SequenceLogits,
    ensure_adapter,
    frozen_model,
    register_adapter_kind,
    remove_adapter,
    site_sizes,
)
from lmedit.forward import build_inputs, generate_greedy, pad_id_of, tokenize_pair
from lmedit.hparams import HyperParamsError
from lmedit.limits import size
from lmedit.registry import Contract, register
from lmedit.smoke import write_edit_file
from lmedit.requests import EditRequest

MergeAlgorithm = Literal["ties", "dare_ties", "dare_linear", "linear", "magnitude", "magnitude_norm", "sign"]
TEMPLATE_PREFIXES = ("I", "You", "Because", "Yes", "Q: ")
TOP1_ABOVE_TOKENS = 100  # the reference scores sequences longer than this by their largest token deviation
EARLY_STOP_LOSS, EARLY_STOP_DELTA = 0.02, 1e-4


@dataclass
class WiseHyperParams(AdapterSite):
    """EasyEdit's WISE fields (llama-7b values as defaults) plus where the irrelevant prompts come from."""

    edit_lr: float = 1.0
    n_iter: int = 70
    mask_ratio: float = 0.2
    norm_constraint: float | None = 1.0
    act_margin: list[float] = field(default_factory=lambda: [5.0, 20.0, 10.0])
    act_ratio: float = 0.88
    save_freq: int = 500
    merge_freq: int = 1000
    merge_alg: MergeAlgorithm = "ties"
    densities: float = 0.53
    weights: float = 1.0
    retrieve: bool = True
    replay: bool = False
    objective_optimization: Literal["only_label"] = "only_label"
    weight_decay: float = 1e-5
    template_lengths: list[int] = field(default_factory=lambda: [5, 10])
    irrelevant_file: str | None = None
    exclude_first_token: bool = False

    def validate(self) -> None:
        super().validate()
        if len(self.act_margin) != 3:
            raise HyperParamsError(f"act_margin must be [alpha, beta, gamma], got {self.act_margin}")
        if not 0 < self.mask_ratio <= 1:
            raise HyperParamsError("mask_ratio must lie in (0, 1]")
        if self.save_freq < 1 or self.merge_freq < 1 or self.merge_freq % self.save_freq:
            raise HyperParamsError(
                f"merge_freq ({self.merge_freq}) must be a positive multiple of save_freq ({self.save_freq})"
            )
        if self.n_iter < 1 or self.edit_lr <= 0 or self.act_ratio <= 0:
            raise HyperParamsError("n_iter must be at least 1; edit_lr and act_ratio must be positive")
        if self.replay:
            raise HyperParamsError("replay (WISE appendix B.3) is not implemented; set replay: false")

    def structure(self) -> dict[str, Any]:
        """The settings the adapter's memories depend on; they cannot change between sequential edits."""
        keys = ("retrieve", "act_ratio", "save_freq", "merge_freq", "merge_alg", "densities", "weights", "mask_ratio",
                "exclude_first_token")
        return {k: getattr(self, k) for k in keys}


@dataclass
class WiseUndo:
    """The adapter's whole memory state before one edit (tensors are replaced, never changed in place)."""

    edit_id: str
    state: dict[str, Any]


@dataclass(frozen=True)
class SideUndo:
    """The side memory before an edit, kept as its entries under the gradient mask.

    Edits change the side memory only where the shard's mask is set, so
    outside it the side memory equals W; keeping the masked entries alone
    costs ``mask_ratio`` of a full copy (a fifth at 0.2) per undo record.
    ``mask`` None means ``values`` is the whole side memory; ``values`` None
    means the side memory was W itself (a fresh shard).
    """

    values: torch.Tensor | None
    mask: torch.Tensor | None = None

    @classmethod
    def of(cls, side: torch.Tensor, mask: torch.Tensor, base: torch.Tensor) -> "SideUndo":
        if torch.equal(side, base):
            return cls(None)  # a fresh shard (every edit at save_freq 1): W itself, nothing to keep
        if mask.all() or not torch.equal(torch.where(mask, base, side), base):
            return cls(side.clone())  # the whole tensor: nothing to save, or it differs from W off the mask
        return cls(side[mask].clone(), mask)

    def rebuild(self, base: torch.Tensor) -> torch.Tensor:
        """The side memory as it was, bit for bit."""
        if self.values is None:
            return base.clone()
        if self.mask is None:
            return self.values
        side = base.clone()
        side[self.mask] = self.values
        return side


@register_adapter_kind
class WiseAdapter(AdapterLayer):
    """Main memory (the original layer, or a merged copy), side memory, saved shards and routing records."""

    kind = "WISE"

    def __init__(self, original: nn.Module, path: str, config: dict[str, Any] | None = None,
                 hidden_act: str = "silu", templates: Sequence[str] = ("{}",)) -> None:
        super().__init__(original, path)
        self.config = dict(config or WiseHyperParams().structure())
        self.hidden_act = hidden_act
        self.templates = list(templates)
        base = original.weight.detach()
        self.register_buffer("side", base.clone())
        self.register_buffer("mask", torch.ones_like(base, dtype=torch.bool))
        self.main: torch.Tensor | None = None  # a merged main memory (WISE-Merge); None: the original weight
        self.final_main: torch.Tensor | None = None  # WISE-Merge: what the paper's final merge gives now
        self.memories: list[torch.Tensor] = []
        self.memory_min_act: list[float] = []
        self.side_min_act = math.inf
        self.edit_count = 0
        self.merge_count = 0
        self._editing: _EditContext | None = None
        self._input_mask: torch.Tensor | None = None
        self._hooks: list[Any] = []

    # ---------------------------------------------------------------- watching the model's padding

    def on_insert(self, model: nn.Module) -> None:
        self._hooks = [model.register_forward_pre_hook(self._see_mask, with_kwargs=True),
                       model.register_forward_hook(self._forget_mask)]

    def on_remove(self, model: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _see_mask(self, _model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._input_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _forget_mask(self, *_args: Any) -> None:
        self._input_mask = None

    def _scored(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length) bool of the tokens Δ is averaged over: the real tokens of this call (the last
        ``length`` columns of the model's attention mask), less each sequence's first token when
        ``exclude_first_token`` is set and that token is in this call (not in a generation cache)."""
        batch, length = x.shape[:2]
        mask = self._input_mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            mask = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        return scored_tokens(mask.bool().to(x.device), length, bool(self.config.get("exclude_first_token", False)))

    # ---------------------------------------------------------------- forward

    def with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's computation with another weight (nn.Linear or GPT-2 Conv1D layout)."""
        weight = weight.to(x.dtype)  # the float32 side memory being trained, in a half-precision model
        bias = getattr(self.original, "bias", None)
        if isinstance(self.original, nn.Linear):
            return F.linear(x, weight, bias)
        out = x.reshape(-1, x.shape[-1]) @ weight
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.shape[-1])

    def deviation(self, out: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, top1: bool) -> torch.Tensor:
        """Per sequence: mean over real tokens (or the largest) of ||act(out) - act(base)||."""
        act = _activation(self.hidden_act)
        per_token = torch.linalg.vector_norm(act(out.float()) - act(base.float()), dim=-1)
        counts = valid.sum(dim=1)
        mean = (per_token * valid).sum(dim=1) / counts.clamp(min=1)
        if not top1:
            return mean
        largest = per_token.masked_fill(~valid, -math.inf).max(dim=1).values
        return torch.where(counts > TOP1_ABOVE_TOKENS, largest, mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 2
        if squeeze:
            x = x[None]
        if self._editing is not None:
            out = self._edit_forward(x)
        elif not self.edit_log:
            out = self.original(x)
        else:
            out = self._route(x)
        return out[0] if squeeze else out

    def _edit_forward(self, x: torch.Tensor) -> torch.Tensor:
        """While editing, every row goes through the side memory; Δ per row is kept for the loss."""
        context = self._editing
        side = context.weight
        out = self.with_weight(x, side)
        with torch.no_grad():
            base = self.original(x)
        context.deviations = self.deviation(out, base, context.scored.to(x.device), top1=False)
        return out

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        base = self.original(x)
        valid = self._scored(x)
        threshold = self.side_min_act * self.config["act_ratio"]
        side_out = self.with_weight(x, self.side)
        side_dev = self.deviation(side_out, base, valid, top1=True)
        if self.config["retrieve"]:
            out = torch.where((side_dev < threshold)[:, None, None], base, side_out)
            best = side_dev
            for memory_out, dev, threshold in self._stored_memories(x, base, valid):
                take = (dev > best) & (dev > threshold)
                out = torch.where(take[:, None, None], memory_out, out)
                best = torch.where(take, dev, best)
            return out
        main = self.final_main if self.final_main is not None else self.main
        main_out = base if main is None else self.with_weight(x, main)
        main_dev = self.deviation(main_out, base, valid, top1=True)
        out = torch.where((main_dev > side_dev)[:, None, None], main_out, side_out)
        keep = (main_dev < threshold) & (side_dev < threshold)
        return torch.where(keep[:, None, None], base, out)

    def _stored_memories(
        self, x: torch.Tensor, base: torch.Tensor, valid: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """Each stored memory's output, its per-sequence Δ and its routing threshold (WISE-Retrieve)."""
        for weight, min_act in zip(self.memories, self.memory_min_act):
            out = self.with_weight(x, weight)
            yield out, self.deviation(out, base, valid, top1=True), min_act * self.config["act_ratio"]

    def memory_deviations(self, x: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
        """Per stored memory, the Δ routing would compute for input ``x`` and that memory's threshold (diagnostics)."""
        with torch.no_grad():
            base = self.original(x)
            return [(dev, threshold) for _, dev, threshold in self._stored_memories(x, base, self._scored(x))]

    # ---------------------------------------------------------------- memory bookkeeping

    def snapshot(self) -> dict[str, Any]:
        return {
            "side": SideUndo.of(self.side, self.mask, self.original.weight.detach()), "mask": self.mask,
            "main": self.main, "final_main": self.final_main,
            "memories": list(self.memories), "memory_min_act": list(self.memory_min_act),
            "side_min_act": self.side_min_act, "edit_count": self.edit_count, "merge_count": self.merge_count,
        }

    def restore_snapshot(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value.rebuild(self.original.weight.detach()) if isinstance(value, SideUndo) else value)

    def undo(self, record: WiseUndo) -> None:
        if record.edit_id not in self.edit_log:
            return
        self.restore_snapshot(record.state)
        self.edit_log.remove(record.edit_id)

    def start_shard_if_due(self, generator: torch.Generator | None = None) -> None:
        """A new random gradient subspace when a shard starts (EasyEdit: editing_total_cnt % save_freq == 0)."""
        if self.edit_count % self.config["save_freq"] == 0:
            probabilities = torch.full(self.side.shape, float(self.config["mask_ratio"]), device=self.side.device)
            self.mask = torch.bernoulli(probabilities, generator=generator).bool()

    def finish_edit(self, in_scope_deviation: float) -> None:
        """Record the edit's activation, count it, save a shard and merge when due."""
        self.side_min_act = min(self.side_min_act, in_scope_deviation)
        self.edit_count += 1
        if self.edit_count % self.config["save_freq"] == 0:
            self.memories = self.memories + [self.side]  # the side memory is replaced below, never changed in place
            self.side = self.original.weight.detach().clone()
            if self.config["retrieve"]:
                self.memory_min_act = self.memory_min_act + [self.side_min_act]
                self.side_min_act = math.inf
        if self.edit_count % self.config["merge_freq"] == 0:
            self._merge()
        if not self.config["retrieve"]:
            self._refresh_final_main()

    def _merge(self) -> None:
        base = self.original.weight.detach()
        weights = float(self.config["weights"])
        if self.config["retrieve"]:
            count = self.config["merge_freq"] // self.config["save_freq"]
            shards = self.memories[-count:]
            merged = merge_task_vectors(self.config["merge_alg"], [weights / count] * count, base, shards,
                                        self.config["densities"])
            self.memories = self.memories[:-count] + [merged]
            self.memory_min_act = self.memory_min_act[:-count] + [min(self.memory_min_act[-count:])]
            self.merge_count += 1
            return
        self.main = self._merged_main(self.memories)
        self.memories = []
        self.merge_count += 1

    def _merged_main(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """WISE-Merge: shards into the main memory, 0.4/0.6 against an already merged main (as EasyEdit)."""
        base = self.original.weight.detach()
        n, weights = len(shards), float(self.config["weights"])
        if self.main is None:
            return merge_task_vectors(self.config["merge_alg"], [weights / n] * n, base, shards, self.config["densities"])
        return merge_task_vectors(self.config["merge_alg"], [0.4 / n] * n + [0.6], base, shards + [self.main],
                                  self.config["densities"])

    def _refresh_final_main(self) -> None:
        """What the paper evaluates for WISE-Merge once ``save_freq`` edits exist: every shard merged into main.

        EasyEdit performs this merge on the next evaluation call (changing state
        while evaluating); here it is computed at the end of the edit instead.
        """
        pending = list(self.memories)
        if not torch.equal(self.side, self.original.weight):
            pending.append(self.side)
        if self.edit_count < self.config["save_freq"] or not pending:
            self.final_main = None
            return
        self.final_main = self._merged_main(pending)

    # ---------------------------------------------------------------- save / load

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"side": self.side, "mask": self.mask.to(torch.uint8)}
        if self.main is not None:
            tensors["main"] = self.main
        if self.final_main is not None:
            tensors["final_main"] = self.final_main
        tensors.update({f"memory.{i}": m for i, m in enumerate(self.memories)})
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {
            "config": self.config, "hidden_act": self.hidden_act, "templates": self.templates,
            "memory_min_act": self.memory_min_act, "side_min_act": _finite_or_none(self.side_min_act),
            "edit_count": self.edit_count, "merge_count": self.merge_count, "memories": len(self.memories),
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        device, dtype = self.weight_device, self.weight_dtype
        self.config = dict(meta["config"])
        self.hidden_act = meta["hidden_act"]
        self.templates = list(meta["templates"])
        self.side = tensors["side"].to(device, dtype)
        self.mask = tensors["mask"].to(device).bool()
        self.main = tensors["main"].to(device, dtype) if "main" in tensors else None
        self.final_main = tensors["final_main"].to(device, dtype) if "final_main" in tensors else None
        self.memories = [tensors[f"memory.{i}"].to(device, dtype) for i in range(int(meta["memories"]))]
        self.memory_min_act = [float(a) for a in meta["memory_min_act"]]
        side = meta["side_min_act"]
        self.side_min_act = math.inf if side is None else float(side)
        self.edit_count = int(meta["edit_count"])
        self.merge_count = int(meta["merge_count"])


@dataclass
class _EditContext:
    weight: torch.Tensor
    scored: torch.Tensor
    deviations: torch.Tensor | None = None


def scored_tokens(mask: torch.Tensor, length: int, exclude_first: bool) -> torch.Tensor:
    """The last ``length`` columns of a (batch, total) attention mask, optionally without each row's first real token.

    A causal model's first position sees only itself, so its activation says nothing about the rest of the input;
    on SmolLM2 it is also an attention sink whose MLP output dwarfs every other token's (docs/lifelong.md). A row
    left with no token keeps all of its real tokens.
    """
    valid = mask[:, -length:].bool()
    if not exclude_first:
        return valid
    total = mask.shape[1]
    first = mask.bool().int().argmax(dim=1)
    columns = torch.arange(total - length, total, device=mask.device)
    scored = valid & (columns[None, :] != first[:, None])
    empty = ~scored.any(dim=1)
    return torch.where(empty[:, None], valid, scored)


def _finite_or_none(value: float) -> float | None:
    return None if math.isinf(value) else value


def _activation(name: str) -> Any:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


# --------------------------------------------------------------------------- merging (TIES / DARE / linear)


def merge_task_vectors(
    algorithm: str, weights: Sequence[float], base: torch.Tensor, tensors: Sequence[torch.Tensor], density: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge ``tensors`` into ``base`` through their task vectors ``tensor - base`` (mergekit's GTA family).

    * ``ties``: keep each task vector's top ``density`` fraction by magnitude, elect the sign per entry
      by the sign of the weighted sum, add the weighted entries that agree, divided by their weight.
    * ``dare_ties``: random keep with probability ``density`` rescaled by 1/density, then the sign election.
    * ``dare_linear``: random keep without rescaling, then the weighted sum (EasyEdit's definition).
    * ``linear``: the weighted mean of the task vectors (EasyEdit's ``linear`` used only the first one).
    * ``magnitude`` / ``magnitude_norm`` / ``sign``: the remaining rows of EasyEdit's table.
    """
    sparsify, consensus, normalize = {
        "ties": ("magnitude", True, True), "magnitude_norm": ("magnitude", False, True),
        "magnitude": ("magnitude", False, False), "sign": (None, True, True),
        "dare_ties": ("rescaled_random", True, False), "dare_linear": ("random", False, False),
        "linear": (None, False, True),
    }[algorithm]
    deltas = [(t.float() - base.float()) for t in tensors]
    if sparsify == "magnitude":
        deltas = [_keep_largest(d, density) for d in deltas]
    elif sparsify in ("rescaled_random", "random"):
        deltas = [_keep_random(d, density, rescale=sparsify == "rescaled_random", generator=generator) for d in deltas]
    stacked = torch.stack(deltas)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if consensus:
        majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        agree = (weighted.sign() == majority).to(weighted.dtype)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return (base.float() + mixed).to(base.dtype)


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    threshold = delta.abs().reshape(-1).topk(k).values[-1]
    return delta * (delta.abs() >= threshold)


def _keep_random(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return delta
    kept = delta * torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return kept / density if rescale else kept


# --------------------------------------------------------------------------- the method


def wise_kept_state(model: nn.Module, hparams: WiseHyperParams, edits: int) -> tuple[int, str, str]:
    """Each shard keeps a copy of the layer and its gradient mask, each merge one more copy; each edit's undo
    record keeps the side memory's masked entries (``mask_ratio`` of the layer), none when every edit starts
    a shard (``save_freq`` 1: the side memory before it is W itself)."""
    path, d_in, d_out, value_bytes = site_sizes(model, hparams)
    numel = d_in * d_out
    weight = numel * value_bytes
    per_edit = 0 if hparams.save_freq == 1 else math.ceil(hparams.mask_ratio * numel) * value_bytes
    shards, merges = -(-edits // hparams.save_freq), -(-edits // hparams.merge_freq)
    needed = edits * per_edit + shards * (weight + numel) + merges * weight
    what = f"a copy of {path}.weight and its mask ({size(weight + numel)}) per shard of save_freq={hparams.save_freq} edits"
    if per_edit:
        what += f", and its masked entries (mask_ratio={hparams.mask_ratio}: {size(per_edit)}) per edit for the undo record"
    return needed, what, "run on a machine with more memory"


@register("WISE", hparams=WiseHyperParams, batch=True, packed_evaluation=False, cached_generation=False,
          generation_scored=True, load_edit=load_adapter_edit, kept_state=wise_kept_state,
          contract=Contract(no_tiny_effect_on=("gemma3_text",), why=(
              "on a random 3-layer Gemma 3, which normalises every MLP output again, 15 steps lower the target's NLL "
              "by only 0.3 nats and the scored probe's activation deviation stays under the routing threshold, "
              "so the main memory still answers")),
          tiny_setup=lambda model, tok, workdir: {
              "layer": -1, "n_iter": 15, "edit_lr": 30.0, "template_lengths": [2], "act_margin": [0.01, 0.02, 0.01],
              "norm_constraint": None, "irrelevant_file": str(write_edit_file(tok, workdir, "irrelevant.json", 8, seed=2))})
def apply_wise(model: nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: WiseHyperParams) -> AdapterEditHandle:
    """WISE: a routed side memory of one MLP layer, trained with activation margins, sharded and merged."""
    path = hparams.site_path(model)
    pool = _irrelevant_pool(hparams.irrelevant_file)

    def build(original: nn.Module) -> WiseAdapter:
        return WiseAdapter(original, path, hparams.structure(), _hidden_act(model),
                           context_templates(model, tok, hparams.template_lengths))

    adapter = ensure_adapter(model, path, WiseAdapter, build)
    if adapter.config != hparams.structure():
        raise AdapterError(
            f"the WISE adapter at {path!r} was built with {adapter.config}; a later edit cannot change "
            f"{sorted(k for k, v in hparams.structure().items() if adapter.config.get(k) != v)} (restore the earlier edits first)"
        )
    edit_ids, records, details = [], [], []
    started = time.perf_counter()
    try:
        for request in requests:
            record = WiseUndo(adapter.new_edit_id(request.case_id), adapter.snapshot())
            adapter.edit_log.append(record.edit_id)
            records.append(record)
            edit_ids.append(record.edit_id)
            details.append(_edit_one(model, tok, adapter, request, hparams, pool))
    except BaseException:
        for record in reversed(records):
            adapter.undo(record)
        if not adapter.edit_log:
            remove_adapter(model, adapter)
        raise
    handle = AdapterEditHandle("WISE", model, adapter, edit_ids, records)
    handle.info = {
        "seconds": time.perf_counter() - started, "losses": details[-1]["losses"], "steps": details[-1]["steps"],
        "in_scope_deviation": details[-1]["in_scope"], "irrelevant_deviation": details[-1]["irrelevant"],
        "threshold": adapter.side_min_act * adapter.config["act_ratio"], "edit_ids": edit_ids,
        "memories": len(adapter.memories),
    }
    return handle


def _edit_one(
    model: nn.Module, tok: Any, adapter: WiseAdapter, request: EditRequest, hparams: WiseHyperParams,
    pool: list[str] | None,
) -> dict[str, Any]:
    pairs = [tokenize_pair(tok, template.format(request.prompt), request.target_new) for template in adapter.templates]
    irrelevant = _irrelevant_text(request, pool, adapter.edits_made)
    adapter.start_shard_if_due()
    alpha, beta, gamma = hparams.act_margin
    # trained as float32 (a half-precision copy would round small SGD steps away), stored back in the layer's dtype
    side = nn.Parameter(adapter.side.detach().float().clone())
    original = adapter.original.weight.detach().float()
    mask = adapter.mask.to(side.dtype)
    losses: list[float] = []
    context = _EditContext(side, torch.zeros(0, 0, dtype=torch.bool))
    with frozen_model(model):
        adapter._editing = context  # before the first pass, so the training shortcut is checked in editing mode
        try:
            training_pass = _TrainingPass(model, adapter.path, context, pairs, tok(irrelevant).input_ids,
                                          pad_id_of(tok), hparams.exclude_first_token)
            for _ in range(hparams.n_iter):
                edit_loss, deviations = training_pass()
                loss = edit_loss + _margin_loss(deviations, len(pairs), alpha, beta, gamma)
                side.grad = None
                loss.backward()
                with torch.no_grad():
                    step = (side.grad + hparams.weight_decay * side) * mask
                    side -= hparams.edit_lr * step
                    if hparams.norm_constraint is not None:
                        side.copy_(torch.clamp(side, original - hparams.norm_constraint, original + hparams.norm_constraint))
                losses.append(loss.item())
                if len(losses) > 1 and losses[-1] <= EARLY_STOP_LOSS and abs(losses[-1] - losses[-2]) <= EARLY_STOP_DELTA:
                    break
            with torch.no_grad():
                _, deviations = training_pass()
        finally:
            adapter._editing = None
    adapter.side = side.detach().to(adapter.side.dtype)
    in_scope = float(deviations[: len(pairs)].mean())
    adapter.finish_edit(in_scope)
    return {"losses": losses, "steps": len(losses), "in_scope": in_scope, "irrelevant": float(deviations[len(pairs):].mean())}


class _TrainingPass:
    """One forward pass of an edit's rows: the edit loss of the template rows and every row's Δ.

    The template rows and the irrelevant row are separately padded batches:
    the irrelevant row (a passage of 60-100 tokens from WISE's train file) is
    several times longer than the template rows, and in one left-padded batch
    every template row would run at its length, about 2.5x the tokens. Each
    batch has its own scored-token mask; Δ comes back in row order, and the
    loss is the same as for one batch. No logit of the irrelevant row is read,
    so it runs only through the adapter's block, where its Δ is taken.
    """

    def __init__(self, model: nn.Module, adapter_path: str, context: _EditContext, pairs: Sequence[Any],
                 irrelevant: list[int], pad_id: int, exclude_first: bool) -> None:
        self.context = context
        targets = [t for pair in pairs for t in pair.target_ids]
        # only_label: each row's mean target NLL, then the mean over rows
        weights = [1.0 / (len(pair.target_ids) * len(pairs)) for pair in pairs for _ in pair.target_ids]
        self.targets = torch.tensor(targets, dtype=torch.long)
        self.weights = torch.tensor(weights)
        self.edit = self._part(model, adapter_path, [list(p.ids) for p in pairs],
                               [range(p.prompt_len - 1, len(p.ids) - 1) for p in pairs], pad_id, exclude_first)
        self.irrelevant = self._part(model, adapter_path, [irrelevant], [[]], pad_id, exclude_first)

    def _part(self, model: nn.Module, adapter_path: str, sequences: list[list[int]], columns: list[Any], pad_id: int,
              exclude_first: bool) -> tuple[torch.Tensor, SequenceLogits]:
        attention = build_inputs([[i] for i in range(len(sequences))], sequences, pad_id, torch.float32).attention_mask
        device = next(model.parameters()).device
        scored = scored_tokens(attention.bool().to(device), attention.shape[1], exclude_first)
        self.context.scored = scored  # the shortcut's check pass runs the adapter on these rows
        return scored, SequenceLogits(model, adapter_path, sequences, columns, pad_id)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(edit loss, Δ of every row: the template rows, then the irrelevant row)."""
        scored, logits_of = self.edit
        self.context.scored = scored
        loss = logits_of.weighted_nll(self.targets, self.weights)
        edit_deviations = self.context.deviations
        scored, logits_of = self.irrelevant
        self.context.scored = scored
        logits_of.run_adapter_block()  # no column read: Δ is all it gives, and the blocks above cannot change it
        return loss, torch.cat([edit_deviations, self.context.deviations])


def _margin_loss(deviations: torch.Tensor, n_edit: int, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """WISE's activation margins on Δ: irrelevant below α, edits above β, edits γ above irrelevant."""
    edit, irrelevant = deviations[:n_edit], deviations[n_edit:]
    gap = irrelevant[:, None] - edit[None, :] + gamma
    return _mean_positive(gap) + _mean_positive(irrelevant - alpha) + _mean_positive(beta - edit)


def _mean_positive(values: torch.Tensor) -> torch.Tensor:
    positive = values[values > 0]
    return positive.mean() if positive.numel() else values.new_zeros(())


def _hidden_act(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    # Llama-style configs say hidden_act, GPT-2 activation_function, Gemma hidden_activation
    names = ("hidden_act", "activation_function", "hidden_activation")
    name = next((getattr(text_config, key) for key in names if isinstance(getattr(text_config, key, None), str)), None)
    if name is None:
        raise AdapterError(f"WISE needs the model's MLP activation; its config has none of {', '.join(names)}")
    return name


def context_templates(model: nn.Module, tok: Any, lengths: Sequence[int]) -> list[str]:
    """``'{}'`` plus the model's greedy continuations of five short prefixes, per length (EasyEdit's templates)."""
    templates = ["{}"]
    for length in lengths:
        generated = generate_greedy(model, tok, list(TEMPLATE_PREFIXES), [length] * len(TEMPLATE_PREFIXES))
        for prefix, tokens in zip(TEMPLATE_PREFIXES, generated):
            text = tok.decode(list(tok(prefix).input_ids) + list(tokens), skip_special_tokens=True)
            templates.append(text.replace("{", "{{").replace("}", "}}") + " {}")
    return templates


def _irrelevant_pool(path: str | None) -> list[str] | None:
    """Irrelevant texts from a file: WISE's ``*-train.json`` (``loc``/``loc_ans`` or ``locality_prompt``/
    ``locality_ground_truth``), a JSON list of strings, or JSON lines of either."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise HyperParamsError(f"irrelevant_file {path} does not exist")
    text = file.read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    pool = [_irrelevant_of(record) for record in records]
    pool = [p for p in pool if p]
    if not pool:
        raise HyperParamsError(f"irrelevant_file {path} holds no usable prompts (expected loc/loc_ans or locality_prompt)")
    return pool


def _irrelevant_of(record: Any) -> str:
    if isinstance(record, str):
        return record
    for prompt_key, answer_key in (("loc", "loc_ans"), ("locality_prompt", "locality_ground_truth")):
        if prompt_key in record:
            return f"{record[prompt_key]} {record.get(answer_key, '')}".strip()
    return ""


def _irrelevant_text(request: EditRequest, pool: list[str] | None, index: int) -> str:
    """The i-th edit uses the pool's i-th text (as EasyEdit's run script), else the request's own locality probe."""
    if pool is not None:
        return pool[(index - 1) % len(pool)]
    for group in request.locality.values():
        for probe in group:
            return f"{probe.prompt} {probe.answer}"
    raise AdapterError(
        f"WISE needs an irrelevant prompt for request {request.case_id or request.prompt!r}: give the request a "
        "locality probe or set irrelevant_file to a file of unrelated prompts (e.g. WISE's *-train.json)"
    )
