"""KN, knowledge neurons (Dai et al., 2022): attribute a fact to MLP neurons, then rewrite their value vectors.

1. **Attribution.** For each MLP neuron (an input of the down-projection: the activation ``act(gate)·up`` of a
   Llama MLP, ``gelu(h W₁)`` of GPT-2's) at the last prompt position, integrated gradients of the probability of
   the *old* answer token: the neuron's activation a is scaled by α = 0, 1/(m−1), …, 1 (``steps`` = m values)
   while the rest of the pass is unchanged, and the score is ``a · mean_α ∂p/∂(αa)``. An answer of several tokens
   is scored token by token with the answer's earlier tokens appended (teacher forcing) and the scores averaged.
2. **Selection.** Neurons scoring above ``adaptive_threshold`` × the prompt's highest score are its coarse
   neurons; over several prompts, those shared by more than ``p`` of them are kept (``refine``).
3. **Edit.** Each kept neuron's value vector (its column of the down-projection) moves from the old answer to
   the new one: the input embeddings of the new answer's tokens are added and those of the model's own greedy
   answer (as many tokens) subtracted; for one-token answers both are doubled (EasyEdit's KN edit).

Differences from EasyEdit's KN (``easyeditor/models/kn``), deliberate:

* the attributed neurons are the down-projection's inputs, the paper's neurons; EasyEdit hooks Llama's
  ``gate_proj`` output, a pre-activation, whose scaling is not the neuron's;
* the old answer is the request's ``ground_truth`` (the model's own greedy answer when there is none), scored
  with teacher forcing; EasyEdit appends the model's argmax tokens instead and encodes the target with its BOS
  token for Llama tokenizers, which adds the BOS embedding to every edited neuron.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from lmedit.adapters import frozen_model
from lmedit.forward import generate_greedy, tokenize_pair
from lmedit.handles import WeightSnapshotHandle
from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.registry import Contract, register
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec, _is_conv1d, get_module


@dataclass
class KNHyperParams(HyperParams):
    layers: list[int] = field(default_factory=list)
    """Layers whose neurons are attributed; empty: every layer (EasyEdit's KN)."""
    steps: int = 20
    batch_size: int = 32
    """Rows per forward pass, each one (layer, α) pair (speed only)."""
    adaptive_threshold: float = 0.2
    p: float = 0.4
    refine: bool = True
    max_neurons: int = 0
    """Keep at most this many neurons, the highest-scoring (0: no limit)."""
    edit_scale: float = 1.0
    """Multiplies the value-vector change (the paper's λ; EasyEdit's edit is 1)."""

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise HyperParamsError("steps and batch_size must be at least 1")
        if not 0 < self.adaptive_threshold <= 1:
            raise HyperParamsError("adaptive_threshold must be in (0, 1]")
        if not 0 <= self.p < 1:
            raise HyperParamsError("p must be in [0, 1)")
        if self.max_neurons < 0:
            raise HyperParamsError("max_neurons must be 0 (no limit) or positive")
        if self.edit_scale <= 0:
            raise HyperParamsError("edit_scale must be positive")


def _tiny_setup(model: torch.nn.Module, tok: Any, workdir: Any) -> dict[str, Any]:
    return {"steps": 4, "batch_size": 4}


@register("KN", hparams=KNHyperParams, batch=False, tiny_setup=_tiny_setup,
          contract=Contract(no_tiny_effect_on=("llama", "gpt2", "gemma3_text"),
                            why="KN writes input embeddings into value vectors; in a tiny random model with untied "
                                "embeddings they do not raise the target's logit"))
def apply_kn(model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: KNHyperParams) -> WeightSnapshotHandle:
    """Knowledge neurons: integrated-gradients attribution of the old answer, then the neurons' value vectors edited."""
    if len(requests) != 1:
        raise ValueError("KN edits one fact at a time; apply the requests one by one (batch size 1)")
    request = requests[0]
    started = time.perf_counter()
    spec = ModelSpec.from_model(model)
    layers = list(hparams.layers) or list(range(spec.num_layers))
    new_ids = list(tokenize_pair(tok, request.prompt, request.target_new).target_ids)
    greedy_ids = list(generate_greedy(model, tok, [request.prompt], [len(new_ids)])[0])  # the model's own answer
    old = request.ground_truth or tok.decode(greedy_ids, skip_special_tokens=True).strip()
    neurons, scores = knowledge_neurons(model, tok, spec, [request.prompt], old, layers, hparams)
    touched = sorted({layer for layer, _ in neurons})
    handle = WeightSnapshotHandle("KN", model, [f"{spec.mlp_out(layer)}.weight" for layer in touched])
    shift = value_shift(model, new_ids, greedy_ids) * hparams.edit_scale
    with torch.no_grad():
        for layer, index in neurons:
            module = get_module(model, spec.mlp_out(layer))
            column = module.weight[index, :] if _is_conv1d(module) else module.weight[:, index]
            column.add_(shift.to(column.device, column.dtype))
    handle.info = {"neurons": [list(n) for n in neurons], "old_answer": old, "layers": touched,
                   "top_score": scores, "seconds": time.perf_counter() - started}
    return handle


def value_shift(model: torch.nn.Module, new_ids: Sequence[int], old_ids: Sequence[int]) -> torch.Tensor:
    """Σ E[new answer tokens] − Σ E[the model's greedy answer tokens]; ×2 for one-token answers."""
    embeddings = model.get_input_embeddings().weight.detach().float()
    shift = embeddings[list(new_ids)].sum(0) - embeddings[list(old_ids)].sum(0)
    return shift * 2 if len(new_ids) == 1 else shift


def knowledge_neurons(model: torch.nn.Module, tok: Any, spec: ModelSpec, prompts: Sequence[str], answer: str,
                      layers: Sequence[int], hparams: KNHyperParams) -> tuple[list[tuple[int, int]], float]:
    """The refined neurons (layer, index) of ``answer`` after ``prompts``, and the highest attribution score."""
    counts: Counter[tuple[int, int]] = Counter()
    all_scores: dict[tuple[int, int], float] = {}
    top = 0.0
    for prompt in prompts:
        scores = attribution_scores(model, tok, spec, prompt, answer, layers, hparams.steps, hparams.batch_size)
        top = max(top, float(scores.max()))
        chosen = torch.nonzero(scores > hparams.adaptive_threshold * scores.max()).tolist()
        for row, index in chosen:
            key = (layers[row], index)
            counts[key] += 1
            all_scores[key] = max(all_scores.get(key, float("-inf")), float(scores[row, index]))
    needed = hparams.p * len(prompts) if hparams.refine else 0.0
    kept = [n for n, c in counts.items() if c > needed]
    kept.sort(key=lambda n: -all_scores[n])
    if hparams.max_neurons:
        kept = kept[: hparams.max_neurons]
    return sorted(kept), top


def attribution_scores(model: torch.nn.Module, tok: Any, spec: ModelSpec, prompt: str, answer: str,
                       layers: Sequence[int], steps: int, batch_size: int) -> torch.Tensor:
    """Integrated gradients of each neuron of ``layers`` for ``answer`` after ``prompt``: (len(layers), d_mlp)."""
    pair = tokenize_pair(tok, prompt, answer)
    modules = [get_module(model, spec.mlp_out(layer)) for layer in layers]
    per_token = [_integrated_gradients(model, modules, pair.ids[: pair.prompt_len + i], pair.target_ids[i], steps,
                                       batch_size)
                 for i in range(len(pair.target_ids))]
    return torch.stack(per_token).mean(0)


def _integrated_gradients(model: torch.nn.Module, modules: Sequence[torch.nn.Module], ids: Sequence[int], target: int,
                          steps: int, batch_size: int) -> torch.Tensor:
    """``a · mean_α ∂p(target)/∂(αa)`` for the inputs a of each module at the last position of ``ids``.

    Every (layer, α) pair is one row of a batch: in its row only that layer's neurons are scaled, so the rows of
    all layers share forward passes of ``batch_size`` rows.
    """
    device = next(model.parameters()).device
    activations = _last_inputs(model, modules, ids, device)
    alphas = torch.linspace(0, 1, steps, device=device)
    jobs = [(k, alpha) for k in range(len(modules)) for alpha in alphas]  # (module index, scale) per row
    totals = torch.zeros(len(modules), activations.shape[1], device=device)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        rows_of: dict[int, list[int]] = {}
        for row, (k, _) in enumerate(chunk):
            rows_of.setdefault(k, []).append(row)
        leaves = {k: (torch.stack([chunk[r][1] for r in rows])[:, None] * activations[k][None, :]).requires_grad_(True)
                  for k, rows in rows_of.items()}
        hooks = [modules[k].register_forward_pre_hook(_replacer(rows_of[k], leaves[k])) for k in rows_of]
        try:
            with frozen_model(model), torch.enable_grad():
                batch = torch.tensor([list(ids)] * len(chunk), device=device)
                logits = model(input_ids=batch, use_cache=False).logits[:, -1].float()
                probability = torch.softmax(logits, dim=-1)[:, target]
                grads = torch.autograd.grad(probability.sum(), [leaves[k] for k in rows_of])
        finally:
            for hook in hooks:
                hook.remove()
        for k, grad in zip(rows_of, grads):
            totals[k] += grad.sum(0)
    return activations * totals / steps


def _last_inputs(model: torch.nn.Module, modules: Sequence[torch.nn.Module], ids: Sequence[int],
                 device: torch.device) -> torch.Tensor:
    """Each module's input at the last position of ``ids``, from one pass: (len(modules), d_in)."""
    seen: dict[int, torch.Tensor] = {}

    def recorder(k: int) -> Any:
        def record(mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
            seen[k] = args[0][0, -1].detach().float()
        return record

    hooks = [module.register_forward_pre_hook(recorder(k)) for k, module in enumerate(modules)]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([seen[k] for k in range(len(modules))])


def _replacer(rows: list[int], scaled: torch.Tensor) -> Any:
    """A pre-hook that puts ``scaled`` in place of the module's input at the last position of ``rows``."""
    index = torch.tensor(rows)

    def replace(mod: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        inputs = args[0].clone()
        inputs[index.to(inputs.device), -1] = scaled.to(inputs.dtype)
        return (inputs, *args[1:])

    return replace
