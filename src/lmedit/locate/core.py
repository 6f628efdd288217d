"""Shared math of the locate-then-edit family: keys, target values and closed-form updates.

ROME, MEMIT and AlphaEdit all (1) read *keys* k, the input of an MLP
down-projection at the subject's last token, averaged over short prefixes
the model writes itself; (2) optimise a *target value* that makes the model
produce the new object (negative log-likelihood of the target, a KL term on
"{subject} is a" that keeps the subject's other properties, and a weight
decay on the change, as the ROME paper defines it); and (3) solve a least
squares problem for the weight change. Everything here is written once; the
method modules only choose which pieces to combine.

Conventions: weight changes are returned as ``(out, in)`` matrices (the
``nn.Linear`` layout) and applied with :func:`add_to_weight`, which
transposes for GPT-2's Conv1D. Linear algebra runs in float64.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lmedit.adapters import frozen_model
from lmedit.forward import (SuffixForward, UpperForward, block_of, forward_reading, generate_greedy, pad_id_of,
                            tokenize_pair)
from lmedit import model_state
from lmedit.checkpoint import register_session_codec
from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec, get_module

log = logging.getLogger(__name__)

PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")
"""Words the model continues to make context prefixes (the ROME/MEMIT choice)."""


# --------------------------------------------------------------------------- hyperparameters


@dataclass
class LocateHyperParams(HyperParams):
    """Fields shared by ROME, MEMIT and AlphaEdit (names follow the original code where it exists)."""

    layers: list[int] = field(default_factory=lambda: [5])
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    v_stop_loss: float = 5e-2
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    context_template_seed: int = 0
    mom2_adjustment: bool = True
    mom2_dataset: str = "enwiki2015"
    mom2_n_samples: int = 1000
    mom2_sample_length: int = 256
    mom2_dtype: str = "float64"
    # opt-in same-subject protection (neighbour-assisted editing, Baghel et al. 2025, for the subject's other facts):
    # prompts with "{}" for the subject whose next-token distributions v* must keep (off: an empty list)
    neighbour_prompts: list[str] = field(default_factory=list)
    neighbour_tokens: int = 3  # the unedited model's greedy answer this long is teacher-forced after each prompt
    neighbour_factor: float = 1.0  # weight of their KL term beside the edit's NLL

    def validate(self) -> None:
        if self.neighbour_prompts and (self.neighbour_tokens < 1 or self.neighbour_factor < 0
                                       or any("{}" not in p for p in self.neighbour_prompts)):
            raise HyperParamsError("neighbour_prompts need '{}' where the subject goes, neighbour_tokens >= 1 and "
                                   f"neighbour_factor >= 0; got {self.neighbour_prompts!r}, {self.neighbour_tokens}, "
                                   f"{self.neighbour_factor}")
        if not self.layers:
            raise HyperParamsError("layers must name at least one layer")
        if self.fact_token not in ("subject_last", "last"):
            raise HyperParamsError(f"fact_token must be 'subject_last' or 'last', got {self.fact_token!r}")
        if self.v_num_grad_steps < 1 or self.v_lr <= 0:
            raise HyperParamsError("v_num_grad_steps must be at least 1 and v_lr positive")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or min(pair) < 1:
                raise HyperParamsError(
                    "context_template_length_params is a list of [length, count] pairs, "
                    f"e.g. [[5, 10], [10, 10]]; got {self.context_template_length_params!r}"
                )

    def stats_config(self) -> Any:
        from lmedit.locate.stats import StatsConfig

        return StatsConfig(
            corpus=self.mom2_dataset, n_samples=self.mom2_n_samples,
            sample_length=self.mom2_sample_length, dtype=self.mom2_dtype,
        )


def tiny_setup(model: nn.Module, tok: Any, workdir: Path) -> dict[str, Any]:
    """ROME/MEMIT/AlphaEdit on a tiny random model: the second-to-last layer, statistics from a word corpus.

    The norm clamp is opened up because a tiny model's residual stream is far smaller than the
    change an edit needs; the short context templates keep the v* optimisation cheap.
    """
    from lmedit.smoke import write_corpus

    layer = max(ModelSpec.from_model(model).num_layers - 2, 0)
    return dict(layers=[layer], v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-6, clamp_norm_factor=1000.0,
                context_template_length_params=[[3, 5]], mom2_dataset=str(write_corpus(tok, workdir)),
                mom2_n_samples=30, mom2_sample_length=40)


# --------------------------------------------------------------------------- per-model state


_OWNER = "locate"  # this module's slot in lmedit.model_state


def session_state(model: nn.Module) -> dict[str, Any]:
    """State that belongs to the editing session of this model object (caches, accumulated keys).

    It lives as long as the model object and is never shared with another
    model; :func:`reset_session_state` clears it explicitly.
    """
    return model_state.slot(model, _OWNER, dict)


def reset_session_state(model: nn.Module) -> None:
    model_state.drop(model, _OWNER)


# a chunk checkpoint carries the unedited model's prefixes: a resumed process must not sample them from edited weights
register_session_codec("context_templates", lambda templates: ({}, list(templates)), lambda tensors, data: list(data))


# --------------------------------------------------------------------------- context templates


def context_templates(
    model: nn.Module, tok: Any, length_params: Sequence[Sequence[int]], seed: int = 0
) -> list[str]:
    """``"{}"`` plus prefixes the model writes itself, each ending in ``". {}"``.

    For each ``[length, count]`` pair, ``count`` continuations of ``length``
    tokens (seed word included) are sampled with top-5 sampling from the
    words in :data:`PREFIX_SEEDS`, ``count // 5`` per word, as ROME does.
    Generated once per model object and cached with the session, so
    sequential edits reuse the prefixes of the unedited model.
    """
    key = ("context_templates", tuple(tuple(p) for p in length_params), seed)
    cache = session_state(model)
    if key not in cache:
        generator = torch.Generator().manual_seed(seed)
        templates = ["{}"]
        for length, count in length_params:
            for word in PREFIX_SEEDS:
                for text in _sample_top_k(model, tok, word, max(count // len(PREFIX_SEEDS), 1), length, generator):
                    templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
        cache[key] = templates
        log.info("generated %d context templates", len(templates) - 1)
    return list(cache[key])


@torch.no_grad()
def _sample_top_k(
    model: nn.Module, tok: Any, start: str, n: int, length: int, generator: torch.Generator, top_k: int = 5
) -> list[str]:
    device = next(model.parameters()).device
    prompt = tok(start).input_ids
    ids = torch.tensor([prompt] * n, device=device)
    while ids.shape[1] < max(length, len(prompt) + 1):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        top = logits.topk(top_k, dim=-1)
        choice = torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=generator).to(device)
        ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
    return [tok.decode(row, skip_special_tokens=True) for row in ids.tolist()]


# --------------------------------------------------------------------------- token positions


def subject_last_index(tok: Any, text: str, subject_start: int, subject_end: int) -> int:
    """Index in ``tok(text).input_ids`` of the last token overlapping ``text[subject_start:subject_end]``."""
    try:
        encoded = tok(text, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets:
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < subject_end and b > subject_start]
        if hits:
            return hits[-1]
    return len(tok(text[:subject_end]).input_ids) - 1


@dataclass(frozen=True)
class Lookup:
    """A text, its token ids and the position whose key/value is read or edited."""

    ids: tuple[int, ...]
    index: int


def lookup(tok: Any, template: str, prompt: str, subject: str, fact_token: str = "subject_last") -> Lookup:
    """Tokenise ``template.format(prompt)`` and find the fact token (the subject's last token, or the last token)."""
    text = template.format(prompt)
    ids = tuple(tok(text).input_ids)
    if fact_token == "last":
        return Lookup(ids, len(ids) - 1)
    at = prompt.find(subject)
    if at < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    start = template.index("{}") + at
    return Lookup(ids, subject_last_index(tok, text, start, start + len(subject)))


# --------------------------------------------------------------------------- reading activations


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
        mask[i, : len(row)] = 1
    return ids, mask


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def read_at(
    model: nn.Module, tok: Any, lookups: Sequence[Lookup], modules: Sequence[str], *, inputs: bool
) -> dict[str, torch.Tensor]:
    """The input (``inputs=True``) or output of each module at each lookup position, shape (n, d).

    One right-padded forward pass for all lookups (right padding keeps the
    positions of every sequence unchanged).
    """
    device = next(model.parameters()).device
    ids, mask = _right_pad([lk.ids for lk in lookups], pad_id_of(tok), device)
    rows = torch.arange(len(lookups), device=device)
    cols = torch.tensor([lk.index for lk in lookups], device=device)
    found: dict[str, torch.Tensor] = {}

    wanted = set(modules)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            value = args[0] if inputs else _first_tensor(output)
            found[name] = value[rows, cols].detach().float()
            if wanted <= found.keys():
                raise _ReadDone  # the blocks above the last module read cannot change what was read

        return hook

    handles = [get_module(model, name).register_forward_hook(hook_for(name)) for name in modules]
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _ReadDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found


class _ReadDone(Exception):
    """Raised inside a forward pass once every requested activation has been read."""


def average_keys(
    model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest], layers: Sequence[int],
    templates: Sequence[str], fact_token: str,
) -> dict[int, torch.Tensor]:
    """Keys (down-projection inputs at the fact token) averaged over the templates: layer -> (d_in, n)."""
    lookups = [lookup(tok, t, r.prompt, r.subject or "", fact_token) for r in requests for t in templates]
    names = [spec.mlp_out(layer) for layer in layers]
    read = read_at(model, tok, lookups, names, inputs=True)
    n, m = len(requests), len(templates)
    return {layer: read[name].reshape(n, m, -1).mean(1).T.contiguous() for layer, name in zip(layers, names)}


# --------------------------------------------------------------------------- target values


@dataclass
class TargetResult:
    """The optimised value at the edited site and what the optimisation did."""

    target: torch.Tensor
    init: torch.Tensor
    nll: list[float]
    delta_norm: float


def optimize_target(
    model: nn.Module,
    tok: Any,
    request: EditRequest,
    *,
    site: str,
    templates: Sequence[str],
    hparams: LocateHyperParams,
    kl_prompts: Sequence[str] = ("{} is a",),
) -> TargetResult:
    """Find the value at ``site`` (a module's output, at the fact token) that makes the model say the target.

    A vector delta is added to the output of ``site`` at the fact token of
    every rewriting prompt (each context template followed by the prompt and
    the target, teacher-forced) and of the KL prompts. The loss is the mean
    NLL of the target tokens, plus ``kl_factor`` times KL(current || initial)
    of the next-token distribution at the subject in the KL prompts, plus
    ``v_weight_decay * |delta| / |init|^2``; delta is projected into the ball
    of radius ``clamp_norm_factor * |init|`` after every step, and the loop
    stops once the loss is below ``v_stop_loss``. ``init`` is the unedited
    value for the bare prompt.
    """
    return optimize_targets(model, tok, [request], site=site, templates=templates, hparams=hparams,
                            kl_prompts=kl_prompts)[0]


@dataclass
class _TargetBatch:
    """Rows of one joint optimisation: which request each row, loss position and KL position belongs to."""

    ids: torch.Tensor
    mask: torch.Tensor
    edit_rows: torch.Tensor
    edit_cols: torch.Tensor
    edit_owner: torch.Tensor
    read: torch.Tensor
    loss_targets: torch.Tensor
    loss_owner: torch.Tensor
    loss_weight: torch.Tensor
    kl_owner: torch.Tensor
    bare: list[Lookup]
    neighbour_owner: torch.Tensor  # per neighbour read position (they come after the KL positions)


def _target_batch(tok: Any, requests: Sequence[EditRequest], templates: Sequence[str], kl_prompts: Sequence[str],
                  fact_token: str, device: torch.device,
                  neighbours: Sequence[Sequence[tuple[str, tuple[int, ...]]]] = ()) -> _TargetBatch:
    rows: list[tuple[int, ...]] = []
    edit_cols, edit_owner, loss_at, loss_targets, loss_owner, loss_weight, kl_at, kl_owner = ([] for _ in range(8))
    neighbour_at: list[tuple[int, int]] = []
    neighbour_owner: list[int] = []
    bare = []
    for owner, request in enumerate(requests):
        subject = request.subject or ""
        target_ids = tokenize_pair(tok, request.prompt, request.target_new).target_ids
        rewrites = [lookup(tok, t, request.prompt, subject, fact_token) for t in templates]
        bare.append(rewrites[0])
        for lk in rewrites:
            # teacher forcing: token j of the target is predicted at position len(prompt) + j - 1
            for j, token in enumerate(target_ids):
                loss_at.append((len(rows), len(lk.ids) + j - 1))
                loss_targets.append(token)
                loss_owner.append(owner)
                loss_weight.append(1.0 / (len(target_ids) * len(rewrites)))
            edit_cols.append(lk.index)
            edit_owner.append(owner)
            rows.append(lk.ids + target_ids[:-1])
        for prompt in kl_prompts:
            lk = lookup(tok, prompt, subject, subject, "subject_last")
            kl_at.append((len(rows), lk.index))
            kl_owner.append(owner)
            edit_cols.append(lk.index)
            edit_owner.append(owner)
            rows.append(lk.ids)
        for prompt, answer in (neighbours[owner] if neighbours else ()):
            # the subject's other facts: delta at its last token, the distributions over the answer read after it
            lk = lookup(tok, "{}", prompt, subject, fact_token)
            neighbour_at.extend((len(rows), len(lk.ids) + j - 1) for j in range(len(answer)))
            neighbour_owner.extend([owner] * len(answer))
            edit_cols.append(lk.index)
            edit_owner.append(owner)
            rows.append(lk.ids + answer[:-1])
    ids, mask = _right_pad(rows, pad_id_of(tok), device)
    width = ids.shape[1]
    read = [r * width + c for r, c in loss_at + kl_at + neighbour_at]

    def tensor(values: list[Any], dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return _TargetBatch(
        ids=ids, mask=mask, edit_rows=torch.arange(len(rows), device=device), edit_cols=tensor(edit_cols),
        edit_owner=tensor(edit_owner), read=tensor(read), loss_targets=tensor(loss_targets),
        loss_owner=tensor(loss_owner), loss_weight=tensor(loss_weight, torch.float32), kl_owner=tensor(kl_owner),
        bare=bare, neighbour_owner=tensor(neighbour_owner),
    )


def neighbour_rows(model: nn.Module, tok: Any, requests: Sequence[EditRequest],
                   hparams: LocateHyperParams) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Per request, each ``neighbour_prompts`` entry filled with its subject and the model's own greedy answer to it
    (the current model's: in a sequence of edits, what the earlier edits left)."""
    if not hparams.neighbour_prompts:
        return []
    prompts = [p.format(r.subject or "") for r in requests for p in hparams.neighbour_prompts]
    answers = generate_greedy(model, tok, prompts, [hparams.neighbour_tokens] * len(prompts))
    per = len(hparams.neighbour_prompts)
    filled = list(zip(prompts, (tuple(a) for a in answers)))
    return [[(p, a) for p, a in filled[i * per : (i + 1) * per] if a] for i in range(len(requests))]


def optimize_targets(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest],
    *,
    site: str,
    templates: Sequence[str],
    hparams: LocateHyperParams,
    kl_prompts: Sequence[str] = ("{} is a",),
) -> list[TargetResult]:
    """:func:`optimize_target` for several requests in one batch, each with its own delta.

    The losses are summed, so every delta gets exactly the gradient it would
    get alone (Adam is elementwise); a request whose loss falls below
    ``v_stop_loss`` is frozen while the others go on. Batching only makes
    the forward passes larger, which a CPU runs far more efficiently.
    """
    joint = optimize_joint_targets(model, tok, requests, sites=[site], templates=templates, hparams=hparams,
                                   kl_prompts=kl_prompts)
    return [results[site] for results in joint]


def optimize_joint_targets(
    model: nn.Module,
    tok: Any,
    requests: Sequence[EditRequest],
    *,
    sites: Sequence[str],
    templates: Sequence[str],
    hparams: LocateHyperParams,
    kl_prompts: Sequence[str] = ("{} is a",),
) -> list[dict[str, TargetResult]]:
    """Target values at several sites at once: one delta per (site, request), optimised together.

    With one site this is ROME's v* optimisation. PMET adds deltas to the
    attention and the MLP outputs of one block together, so that the MLP's
    target is only the part of the change the attention does not carry.
    Each site's delta has its own weight decay (``|delta| / |init|^2``, summed)
    and its own norm ball (``clamp_norm_factor * |init|``). Returns, per
    request, each site's result.
    """
    if not sites:
        raise ValueError("optimize_joint_targets needs at least one site")
    device = next(model.parameters()).device
    n = len(requests)
    batch = _target_batch(tok, requests, templates, kl_prompts, hparams.fact_token, device,
                          neighbours=neighbour_rows(model, tok, requests, hparams))
    read = read_at(model, tok, batch.bare, list(sites), inputs=False)
    init = torch.stack([read[site].to(device) for site in sites])  # (sites, n, hidden)
    delta = torch.zeros_like(init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    max_norm = hparams.clamp_norm_factor * init.norm(dim=2)  # (sites, n)
    active = torch.ones(n, dtype=torch.bool, device=device)
    frozen = torch.zeros_like(init)
    n_loss = len(batch.loss_targets)

    logits_of, edit_cols = _logits_reader(model, sites, batch)

    def add_delta(which: int) -> Callable[..., Any]:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            value = _first_tensor(output)
            patched = value.clone()
            patched[batch.edit_rows, edit_cols] += delta[which, batch.edit_owner].to(value.dtype)
            return (patched, *output[1:]) if isinstance(output, tuple) else patched

        return hook

    kl_init: torch.Tensor | None = None
    history: list[list[float]] = [[] for _ in range(n)]
    handles = [get_module(model, site).register_forward_hook(add_delta(i)) for i, site in enumerate(sites)]
    try:
        with torch.enable_grad(), frozen_model(model):
            for step in range(hparams.v_num_grad_steps):
                optimizer.zero_grad()
                logits = logits_of()
                token_nll = -logits[:n_loss].log_softmax(-1).gather(1, batch.loss_targets[:, None]).squeeze(1)
                nll = torch.zeros(n, device=device).index_add(0, batch.loss_owner, token_nll * batch.loss_weight)
                kl_log_probs = logits[n_loss:].log_softmax(-1)
                if kl_init is None:
                    kl_init = kl_log_probs.detach().clone()
                kl_rows = (kl_log_probs.exp() * (kl_log_probs - kl_init)).sum(-1)
                n_kl = len(batch.kl_owner)
                kl = _mean_per_owner(kl_rows[:n_kl], batch.kl_owner, n)
                decay = hparams.v_weight_decay * (delta.norm(dim=2) / init.norm(dim=2) ** 2).sum(0)
                loss = nll + hparams.kl_factor * kl + decay
                if len(batch.neighbour_owner):
                    loss = loss + hparams.neighbour_factor * _mean_per_owner(kl_rows[n_kl:], batch.neighbour_owner, n)
                for i in range(n):
                    if active[i]:
                        history[i].append(float(nll[i].detach()))
                with torch.no_grad():
                    done = active & (loss.detach() < hparams.v_stop_loss)
                    frozen[:, done] = delta[:, done]
                    active &= ~done
                if step == hparams.v_num_grad_steps - 1 or not bool(active.any()):
                    break
                loss[active].sum().backward()
                optimizer.step()
                with torch.no_grad():
                    norms = delta.norm(dim=2)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                    delta.mul_(scale[..., None])
                    delta[:, ~active] = frozen[:, ~active]
    finally:
        for handle in handles:
            handle.remove()
    final = delta.detach()
    return [
        {
            site: TargetResult(target=(init[s, i] + final[s, i]).detach(), init=init[s, i], nll=history[i],
                               delta_norm=float(final[s, i].norm()))
            for s, site in enumerate(sites)
        }
        for i in range(n)
    ]


def _mean_per_owner(values: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """The mean of ``values`` per request (0 for a request with none)."""
    counts = torch.zeros(n, device=values.device).index_add(0, owner, torch.ones_like(values))
    return torch.zeros(n, device=values.device).index_add(0, owner, values) / counts.clamp_min(1)


def _logits_reader(model: nn.Module, sites: Sequence[str],
                   batch: _TargetBatch) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """Logits at the positions the v* loss reads, recomputing as little as delta can change.

    Delta sits at the fact token of each row, so the columns before it never
    see delta. (1) The rows are re-laid left-padded so that every fact token
    falls in one column; everything before that column is computed once and
    cached, and each step feeds only the rest
    (:class:`~lmedit.forward.partial.SuffixForward`). Failing that, (2) the
    blocks below the lowest of ``sites`` are computed once
    (:class:`~lmedit.forward.partial.UpperForward`). Each shortcut is checked
    against the full forward pass before use. Returns the reader and, per
    row, the column of its fact token in the reader's inputs.
    """
    spec = ModelSpec.from_model(model)
    blocks = [block_of(spec, site) for site in sites]
    block = None if None in blocks else min(blocks)  # the lowest: every site's delta enters above it
    aligned = _align_fact_tokens(batch)
    if aligned is not None:
        ids, mask, read, split = aligned
        suffix = SuffixForward.prepare(model, spec, read, split, ids, mask, first_block=block)
        if suffix is not None:
            return suffix, torch.zeros_like(batch.edit_cols)
    inputs = {"input_ids": batch.ids, "attention_mask": batch.mask}
    upper = UpperForward.prepare(model, spec, block, batch.read, **inputs) if block is not None else None
    if upper is not None:
        return upper, batch.edit_cols

    def full() -> torch.Tensor:
        return forward_reading(model, batch.read, use_cache=False, **inputs)[0]

    return full, batch.edit_cols


def _align_fact_tokens(batch: _TargetBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
    """The batch left-padded so that every row's fact token sits in the same column ``split``.

    Returns ids, mask, the read positions in the new layout, and ``split``;
    ``None`` when some read position lies before its row's fact token (then
    caching the columns before it would be wrong).
    """
    rows, width = batch.ids.shape
    lengths = batch.mask.sum(1)
    split = int(batch.edit_cols.max())
    shift = split - batch.edit_cols  # per row
    read_rows, read_cols = batch.read // width, batch.read % width
    if bool((read_cols < batch.edit_cols[read_rows]).any()):
        return None
    new_width = int((shift + lengths).max())
    ids = torch.zeros((rows, new_width), dtype=batch.ids.dtype, device=batch.ids.device)  # padding: any id, masked
    mask = torch.zeros((rows, new_width), dtype=batch.mask.dtype, device=batch.mask.device)
    for r in range(rows):
        start, length = int(shift[r]), int(lengths[r])
        ids[r, start : start + length] = batch.ids[r, :length]
        mask[r, start : start + length] = 1
    read = read_rows * new_width + read_cols + shift[read_rows]
    return ids, mask, read, split


# --------------------------------------------------------------------------- closed-form updates


def rank_one_update(
    left: torch.Tensor, key: torch.Tensor, target: torch.Tensor, current: torch.Tensor
) -> torch.Tensor:
    """ROME: ``(target - current) leftᵀ / (left · key)``, so the edited layer maps ``key`` to ``target``."""
    right = (target.double() - current.double()) / torch.dot(key.double(), left.double())
    return torch.outer(right, left.double())


def memit_update(
    keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor | None, cov_weight: float
) -> torch.Tensor:
    """MEMIT: ``R Kᵀ (λ C + K Kᵀ)⁻¹``; keys (d_in, n), residuals (d_out, n) -> (d_out, d_in)."""
    K = keys.double()
    A = K @ K.T
    if cov is not None:
        A = A + cov_weight * cov.to(K.device).double()  # statistics are cached on the CPU
    adjusted = torch.linalg.solve(A, K)
    return residuals.double() @ adjusted.T


def emmet_update(
    keys: torch.Tensor, residuals: torch.Tensor, cov: torch.Tensor, cov_weight: float, ridge: float,
    norm_ridge: float = 0.0,
) -> torch.Tensor:
    """EMMET: ``Δ = R (Kᵀ C'⁻¹ K + ρ I)⁻¹ Kᵀ C'⁻¹`` with ``C' = w C + ν I``, as (d_out, d_in).

    Without ρ this is the equality-constrained solution: the edited layer maps
    every key exactly to its target while moving the preserved keys (C) as
    little as possible; for one key it is ROME's update. ρ (``emmet_lambda``)
    relaxes the equalities when a batch's keys are nearly dependent; it acts
    against ``w`` times its value, because scaling C scales ``Kᵀ C'⁻¹ K``.
    """
    K = keys.double()
    C = cov_weight * cov.to(K.device).double()  # statistics are cached on the CPU
    if norm_ridge:
        C = C + norm_ridge * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    whitened = torch.linalg.solve(C, K)  # C'⁻¹ K, (d_in, n)
    gram = K.T @ whitened
    if ridge:
        gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return residuals.double() @ torch.linalg.solve(gram, whitened.T)


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's P: projection onto the eigenvectors of C whose eigenvalue is below ``threshold``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
    basis = eigenvectors[:, eigenvalues < threshold]
    return basis @ basis.T


def principal_direction_suppressor(weight_out_in: torch.Tensor, energy_ratio: float, strength: float) -> torch.Tensor:
    """SPHERE's ``P = I − α U Uᵀ`` on the input space of a (d_out, d_in) weight.

    Each row of the weight (one output neuron) is scaled to unit length, a point on the hypersphere; U holds the
    leading eigenvectors of those points' second moment, as many as it takes for their eigenvalues to pass
    ``energy_ratio`` of the total (the first one that passes included). ``update @ P`` takes ``strength`` (α) of every
    update row's component along those principal directions away.
    """
    W = weight_out_in.double()
    unit = W / (W.norm(dim=1, keepdim=True) + 1e-8)
    moment = unit.T @ unit / unit.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)  # ascending
    shares = torch.cumsum(eigenvalues.flip(0), 0) / eigenvalues.sum()
    rank = min(int((shares <= energy_ratio).sum()) + 1, eigenvalues.numel())
    U = eigenvectors[:, -rank:]
    return torch.eye(W.shape[1], dtype=W.dtype, device=W.device) - strength * (U @ U.T)


def alphaedit_update(
    keys: torch.Tensor, residuals: torch.Tensor, projector: torch.Tensor, previous: torch.Tensor | None, l2: float
) -> torch.Tensor:
    """AlphaEdit: ``Δ = R Kᵀ P (K Kᵀ P + K_p K_pᵀ P + α I)⁻¹`` (the paper's Eq. 14), as (d_out, d_in).

    Solved as its transpose, ``(P (K Kᵀ + C_p) + α I) X = P K Rᵀ`` with
    ``Δ = Xᵀ``, which is how the authors' code computes it.
    """
    K = keys.double()
    P = projector.to(K.device).double()  # computed from the CPU-cached statistics
    A = K @ K.T
    if previous is not None:
        A = A + previous.to(K.device).double()
    system = P @ A + l2 * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    solution = torch.linalg.solve(system, P @ K @ residuals.double().T)
    return solution.T


def add_to_weight(model: nn.Module, module_name: str, delta_out_in: torch.Tensor, conv1d: bool) -> None:
    """Add a (d_out, d_in) change to a Linear (or, transposed, a Conv1D) weight in place."""
    weight = get_module(model, module_name).weight
    change = delta_out_in.T if conv1d else delta_out_in
    if tuple(change.shape) != tuple(weight.shape):
        raise ValueError(f"update of shape {tuple(change.shape)} does not fit {module_name}.weight {tuple(weight.shape)}")
    with torch.no_grad():
        weight.add_(change.to(weight.device, weight.dtype))  # solved in float64 wherever the keys were


def iter_layers(spec: ModelSpec, layers: Sequence[int]) -> Iterator[tuple[int, int, str]]:
    """(position in the list, layer index, down-projection name) for each edited layer."""
    for position, layer in enumerate(layers):
        yield position, layer, spec.mlp_out(layer)


def outputs_at(model: nn.Module, tok: Any, site: str, requests: Sequence[EditRequest], fact_token: str) -> torch.Tensor:
    """The output of ``site`` at each bare prompt's fact token, (d_hidden, n)."""
    return outputs_at_sites(model, tok, [site], requests, fact_token)[site]


def outputs_at_sites(model: nn.Module, tok: Any, sites: Sequence[str], requests: Sequence[EditRequest],
                     fact_token: str) -> dict[str, torch.Tensor]:
    """:func:`outputs_at` for several sites, read in one forward pass."""
    lookups = [lookup(tok, "{}", r.prompt, r.subject or "", fact_token) for r in requests]
    return {site: value.T for site, value in read_at(model, tok, lookups, list(sites), inputs=False).items()}


LayerSolve = Callable[[int, str, torch.Tensor, torch.Tensor], torch.Tensor]
"""(layer, down-projection name, keys (d_in, n), residuals (d_out, n)) -> that layer's update, (d_out, d_in)."""


def spread_over_layers(model: nn.Module, tok: Any, spec: ModelSpec, requests: Sequence[EditRequest],
                       layers: Sequence[int], templates: Sequence[str], fact_token: str, targets: torch.Tensor,
                       read_site: str, solve: LayerSolve,
                       share: Callable[[int], float] = float) -> dict[int, float]:
    """MEMIT's layer loop: each layer, lowest first, absorbs its share of what is still missing at ``read_site``.

    At every layer the keys are read, the residual ``targets − output of read_site`` is read on the model as
    edited so far and divided by ``share(layers still to edit)`` (their number for MEMIT, EMMET and AlphaEdit;
    its square root for PMET), ``solve`` turns keys and residuals into the layer's update, and the update is
    added. Where ``read_site`` is a block's output (the residual stream) and the block normalises its MLP output
    before adding it there (Gemma 2/3), the residual is first carried back through that norm
    (:func:`change_before_norm`); PMET reads an MLP output, before the norm, and is left as it is. Returns each
    layer's update norm.
    """
    norms: dict[int, float] = {}
    in_residual_stream = read_site in {spec.block(index) for index in range(spec.num_layers)}
    for position, layer, module in iter_layers(spec, layers):
        keys = average_keys(model, tok, spec, requests, [layer], templates, fact_token)[layer]
        post_norm = mlp_output_norm(model, spec, layer) if in_residual_stream else None
        read = outputs_at_sites(model, tok, [read_site] + ([module] if post_norm is not None else []), requests,
                                fact_token)  # one pass for both sites
        residual = (targets - read[read_site]) / share(len(layers) - position)
        if post_norm is not None:
            residual = change_before_norm(post_norm, read[module], residual)
        update = solve(layer, module, keys, residual)
        add_to_weight(model, module, update, spec.conv1d_weights)
        norms[layer] = float(update.norm())
    return norms


def mlp_output_norm(model: nn.Module, spec: ModelSpec, layer: int) -> nn.Module | None:
    """The norm a block applies to its MLP output before adding it to the residual stream, if any.

    Gemma 2/3 and OLMo 2 have one (``ModelSpec.mlp_output_norm_template``); Llama, GPT-2, GPT-J add the MLP output
    as it is.
    """
    path = spec.mlp_output_norm(layer)
    return None if path is None else get_module(model, path)


def change_before_norm(norm: nn.Module, outputs: torch.Tensor, wanted: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """The change of the MLP outputs ``outputs`` (d, n) that moves ``norm(outputs)`` by ``wanted`` (d, n), as near as
    the norm allows.

    MEMIT's layer loop assumes an MLP's output reaches the residual stream unchanged, so that a change of the
    residual is a change of the MLP output. Behind a norm it is not: an RMS norm's output has a fixed size
    whatever its input, so the same change asked of the input is partly undone. The change is found by least
    squares through the norm itself (L-BFGS on a float32 copy; the norm is tiny), which needs no knowledge of
    how the norm is parameterised; where the wanted output is not reachable exactly, the nearest reachable one.
    """
    x0 = outputs.T.float().contiguous()
    norm = copy.deepcopy(norm).to(device=x0.device, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():
        goal = norm(x0) + wanted.T.to(device=x0.device, dtype=torch.float32)
    change = torch.zeros(x0.shape, device=x0.device, requires_grad=True)
    solver = torch.optim.LBFGS([change], lr=1.0, max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-14,
                               history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = (norm(x0 + change) - goal).pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        solver.step(closure)
    return change.detach().T.to(device=wanted.device, dtype=wanted.dtype)
