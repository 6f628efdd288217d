"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1).

Which hidden states carry a fact? Three runs answer it:

* clean: the prompt as is; the answer is the model's own greedy next token;
* corrupted: Gaussian noise is added to the embeddings of the subject tokens,
  so the model mostly loses the answer (``p_corrupted``);
* restored: the corrupted run again, but one state at (token t, layer l) is
  set back to its clean value. ``p_restored - p_corrupted`` is that state's
  *indirect effect*. Kinds of state: ``hidden`` (the residual stream after
  block l), ``mlp`` and ``attn`` (the module outputs; for those, as in ROME,
  a window of ``window`` layers centred on l is restored together).

Averaged over many facts and grouped into the token categories of ROME's
Figure 2, the MLP effect at the last subject token shows which layers to edit
(ROME: the peak layer; MEMIT: a range around it).

Speed (a 2-core CPU must trace dozens of facts in minutes). The result is the
same as running ROME's loop of one forward pass per (token, layer), only
computed with less work:

* many restorations x noise samples form the batch of one forward pass; forward
  hooks add the noise and patch the given (row, token, layer) entries;
* a restoration at token t cannot change positions before t (causal
  attention), so those positions are not recomputed: the corrupted run's
  keys/values for them are passed as a KV cache and only positions t.. run;
* blocks below the first restored layer compute exactly the corrupted run, so
  they are skipped: their forward temporarily returns the stored corrupted
  output (rows of a batch are ordered by first restored layer to make this pay);
* tokens before the subject are identical in all runs, so restoring them has
  no effect: their row is ``p_corrupted`` without computation;
* logits are computed for the last position only.

The same noise samples (one seeded ``torch.Generator`` per fact) are used for
the corrupted baseline and for every restoration, as in ROME, so differences
are not blurred by resampling. Hooks and temporary forwards are removed in
``finally`` blocks; the model's weights, mode and outputs are unchanged.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lmedit.compat import build_cache, cache_keyword, cache_tensors, output_cache, takes_cache
from lmedit.spec import ModelSpec, get_module

LOG = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES",
    "CATEGORY_LABELS",
    "KINDS",
    "Fact",
    "FactTrace",
    "KindSummary",
    "TraceReport",
    "TracingError",
    "answer_token_id",
    "category_tokens",
    "count_restorations",
    "embedding_std",
    "greedy_next_tokens",
    "load_facts",
    "report_from_dict",
    "select_known_facts",
    "subject_token_range",
    "suggest_edit_layers",
    "summarize",
    "trace_fact",
    "trace_facts",
    "window_layers",
]

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
"""What is restored: the residual stream after a block, the MLP output, the attention output."""

CATEGORIES: tuple[str, ...] = (
    "first_subject",
    "middle_subject",
    "last_subject",
    "first_subsequent",
    "further",
    "last",
)
"""Token categories of ROME's Figure 2, in its row order."""

CATEGORY_LABELS: dict[str, str] = {
    "first_subject": "First subject token",
    "middle_subject": "Middle subject tokens",
    "last_subject": "Last subject token",
    "first_subsequent": "First subsequent token",
    "further": "Further tokens",
    "last": "Last token",
}

DEFAULT_MAX_BATCH_TOKENS = 2048
DEFAULT_MAX_BATCH_ROWS = 512  # bounds the [rows, vocab] logits tensor


class TracingError(ValueError):
    """Tracing cannot run as asked; the message says what was wrong and how to fix it."""


# --------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Fact:
    """A prompt that contains ``subject``; ``target`` is the true answer, when known."""

    prompt: str
    subject: str
    target: str | None = None
    case_id: str | None = None


def load_facts(path: str | Path, *, limit: int | None = None, offset: int = 0) -> list[Fact]:
    """Facts from a benchmark file (CounterFact in ROME's or EasyEdit's layout, or any format with subjects).

    ROME-style records give ``requested_rewrite.prompt`` filled with the subject,
    and the true target ``target_true``; records without a subject are an error.
    """
    from lmedit.data import load_requests

    requests = load_requests(path, limit=limit, offset=offset)
    facts = []
    for index, request in enumerate(requests, start=offset):
        if not request.subject:
            raise TracingError(
                f"{path}: record {index} has no subject; causal tracing corrupts the subject's tokens, "
                "so every fact needs one (CounterFact records have it)"
            )
        facts.append(Fact(request.prompt, request.subject, request.ground_truth, request.case_id))
    return facts


# --------------------------------------------------------------------------- tokens


def subject_token_range(tok: Any, prompt: str, subject: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of ``prompt`` and the half-open range [b, e) of the tokens that overlap ``subject``.

    The first occurrence of the subject is used, as in ROME.
    """
    start = prompt.find(subject)
    if not subject or start < 0:
        raise TracingError(f"subject {subject!r} does not occur in prompt {prompt!r}; pass the exact substring")
    end = start + len(subject)
    try:
        enc = tok(prompt, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    except (NotImplementedError, TypeError, ValueError, KeyError):
        ids = list(tok(prompt)["input_ids"])
        offsets = _offsets_by_decoding(tok, ids)
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not inside:
        raise TracingError(f"no token of prompt {prompt!r} covers subject {subject!r}")
    return ids, (inside[0], inside[-1] + 1)


def _offsets_by_decoding(tok: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character spans from decoding prefixes, for tokenizers without offset mappings."""
    spans, previous = [], 0
    for i in range(len(ids)):
        length = len(tok.decode(list(ids[: i + 1])))
        spans.append((previous, length))
        previous = length
    return spans


def answer_token_id(tok: Any, prompt: str, answer: str) -> int:
    """The first token of ``answer`` as a continuation of ``prompt`` (with the separating space)."""
    base = list(tok(prompt)["input_ids"])
    full = list(tok(f"{prompt} {answer.strip()}")["input_ids"])
    if len(full) > len(base) and full[: len(base)] == base:
        return int(full[len(base)])
    ids = list(tok(" " + answer.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise TracingError(f"answer {answer!r} has no tokens")
    return int(ids[0])


def window_layers(layer: int, num_layers: int, window: int) -> range:
    """Layers restored together for the window centred on ``layer`` (ROME: [l - w//2, l + ceil(w/2)))."""
    return range(max(0, layer - window // 2), min(num_layers, layer + math.ceil(window / 2)))


# --------------------------------------------------------------------------- noise level


@torch.no_grad()
def embedding_std(model: nn.Module, tok: Any, subjects: Sequence[str], *, spec: ModelSpec | None = None) -> float:
    """Standard deviation of all embedding values of the subjects' tokens (ROME's noise scale).

    As in ROME, each subject is embedded on its own and the std runs over every
    element of every token's embedding.
    """
    spec = spec or ModelSpec.from_model(model)
    ids = [i for s in subjects for i in tok(s, add_special_tokens=False)["input_ids"]]
    if len(ids) < 2:
        raise TracingError("need subjects with at least two tokens in total to measure the embedding std")
    embed = get_module(model, spec.embed_path)
    device = next(model.parameters()).device
    values = embed(torch.tensor([ids], device=device))
    return float(values.float().std())


# --------------------------------------------------------------------------- known facts


@torch.no_grad()
def greedy_next_tokens(model: nn.Module, tok: Any, prompts: Sequence[str], *, batch_size: int = 16) -> list[int]:
    """The model's greedy next token after each prompt.

    Batches are left-padded with explicit position ids, so every prompt ends at
    the last column and only that column's logits are computed.
    """
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out: list[int] = []
    with _eval_mode(model):
        for begin in range(0, len(prompts), batch_size):
            encoded = [list(tok(p)["input_ids"]) for p in prompts[begin : begin + batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, e in enumerate(encoded):
                ids[row, width - len(e) :] = torch.tensor(e)
                mask[row, width - len(e) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=False, **keep_last,
            ).logits
            out.extend(logits[:, -1].argmax(-1).tolist())
    return out


def select_known_facts(
    model: nn.Module, tok: Any, facts: Sequence[Fact], *, limit: int | None = None, batch_size: int = 16
) -> list[Fact]:
    """Facts whose greedy first token is the first token of the true target (ROME's "known facts").

    Checks in batches and stops once ``limit`` known facts are found.
    """
    missing = [i for i, f in enumerate(facts) if not f.target]
    if missing:
        raise TracingError(
            f"{len(missing)} fact(s) have no true target (first: #{missing[0]}), so whether the model knows "
            "them cannot be checked; use data with ground-truth targets or trace all facts (--all)"
        )
    known: list[Fact] = []
    for begin in range(0, len(facts), batch_size):
        chunk = facts[begin : begin + batch_size]
        predicted = greedy_next_tokens(model, tok, [f.prompt for f in chunk], batch_size=batch_size)
        for fact, token in zip(chunk, predicted):
            if token == answer_token_id(tok, fact.prompt, fact.target or ""):
                known.append(fact)
                if limit is not None and len(known) >= limit:
                    return known
    return known


# --------------------------------------------------------------------------- results


@dataclass
class FactTrace:
    """Causal trace of one fact: probabilities of the answer token under each restoration."""

    prompt: str
    subject: str
    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    p_clean: float
    p_corrupted: float
    restored: dict[str, torch.Tensor]
    """kind -> [num_tokens, num_layers] mean p(answer) with that state restored."""
    window: int = 10
    case_id: str | None = None

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """[num_tokens, num_layers] p(restored) - p(corrupted)."""
        return self.restored[kind] - self.p_corrupted

    def to_dict(self, digits: int = 6) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "tokens": self.tokens,
            "subject_range": list(self.subject_range),
            "answer": self.answer,
            "answer_id": self.answer_id,
            "p_clean": round(self.p_clean, digits),
            "p_corrupted": round(self.p_corrupted, digits),
            "restored": {k: _rounded(v, digits) for k, v in self.restored.items()},
        }


@dataclass
class KindSummary:
    """Average over facts of one kind of restoration, by ROME's token categories."""

    kind: str
    mean_effect: torch.Tensor
    """[len(CATEGORIES), num_layers] average indirect effect (NaN for an empty category)."""
    mean_restored: torch.Tensor
    """[len(CATEGORIES), num_layers] average p(answer) with the state restored."""
    counts: dict[str, int]
    """How many token rows were pooled in each category."""
    num_facts: int
    mean_p_clean: float
    mean_p_corrupted: float

    @property
    def num_layers(self) -> int:
        return int(self.mean_effect.shape[1])

    def peak(self, category: str = "last_subject") -> tuple[int, float]:
        """(layer, average indirect effect) where the category's effect is largest."""
        row = self.mean_effect[CATEGORIES.index(category)]
        if torch.isnan(row).all():
            raise TracingError(f"no token of category {category!r} in the traced facts")
        layer = int(torch.nan_to_num(row, nan=-math.inf).argmax())
        return layer, float(row[layer])

    def to_dict(self, digits: int = 6) -> dict[str, Any]:
        peaks = {}
        for category in ("last_subject", "last"):
            if self.counts.get(category):
                layer, value = self.peak(category)
                peaks[category] = {"layer": layer, "effect": round(value, digits)}
        return {
            "kind": self.kind,
            "num_facts": self.num_facts,
            "categories": list(CATEGORIES),
            "counts": self.counts,
            "mean_p_clean": round(self.mean_p_clean, digits),
            "mean_p_corrupted": round(self.mean_p_corrupted, digits),
            "mean_indirect_effect": _rounded(self.mean_effect, digits),
            "mean_p_restored": _rounded(self.mean_restored, digits),
            "peaks": peaks,
        }


def _rounded(values: torch.Tensor, digits: int) -> list:
    """Nested lists for JSON, NaN as None."""
    if values.dim() == 0:
        v = float(values)
        return None if math.isnan(v) else round(v, digits)  # type: ignore[return-value]
    return [_rounded(v, digits) for v in values]


def category_tokens(num_tokens: int, subject_range: tuple[int, int]) -> dict[str, list[int]]:
    """Token indices in each of ROME's categories (single-token subjects count as first and last)."""
    b, e = subject_range
    last = num_tokens - 1
    return {
        "first_subject": [b],
        "middle_subject": list(range(b + 1, e - 1)),
        "last_subject": [e - 1],
        "first_subsequent": [e] if e <= last else [],
        "further": list(range(e + 1, last)),
        "last": [last],
    }


def summarize(traces: Sequence[FactTrace], kind: str) -> KindSummary:
    """Average indirect effect per category and layer, pooling token rows as ROME's figure does.

    Middle subject tokens and further tokens contribute one row per token (so a
    fact with a long subject weighs more there); the other categories one row per fact.
    """
    if not traces:
        raise TracingError("no traces to summarize")
    if any(kind not in t.restored for t in traces):
        raise TracingError(f"kind {kind!r} was not traced for every fact")
    num_layers = traces[0].restored[kind].shape[1]
    pooled_effect: dict[str, list[torch.Tensor]] = {c: [] for c in CATEGORIES}
    pooled_restored: dict[str, list[torch.Tensor]] = {c: [] for c in CATEGORIES}
    for trace in traces:
        effect, restored = trace.indirect_effect(kind), trace.restored[kind]
        for category, rows in category_tokens(len(trace.tokens), trace.subject_range).items():
            pooled_effect[category].extend(effect[r] for r in rows)
            pooled_restored[category].extend(restored[r] for r in rows)

    def mean_rows(rows: list[torch.Tensor]) -> torch.Tensor:
        if not rows:
            return torch.full((num_layers,), math.nan)
        return torch.stack(rows).double().mean(0).float()

    return KindSummary(
        kind=kind,
        mean_effect=torch.stack([mean_rows(pooled_effect[c]) for c in CATEGORIES]),
        mean_restored=torch.stack([mean_rows(pooled_restored[c]) for c in CATEGORIES]),
        counts={c: len(pooled_effect[c]) for c in CATEGORIES},
        num_facts=len(traces),
        mean_p_clean=sum(t.p_clean for t in traces) / len(traces),
        mean_p_corrupted=sum(t.p_corrupted for t in traces) / len(traces),
    )


def suggest_edit_layers(mlp: KindSummary, *, span: int = 5) -> tuple[int, list[int]]:
    """(ROME layer, MEMIT layers) from the MLP trace at the last subject token.

    ROME edits the layer with the largest average indirect effect; for MEMIT
    this returns the ``span`` consecutive layers containing that peak whose
    summed effect is largest (ROME/MEMIT chose their ranges by eye from the
    same curve; this makes the choice reproducible).
    """
    peak, _ = mlp.peak("last_subject")
    curve = torch.nan_to_num(mlp.mean_effect[CATEGORIES.index("last_subject")], nan=0.0)
    span = max(1, min(span, mlp.num_layers))
    starts = range(max(0, peak - span + 1), min(peak, mlp.num_layers - span) + 1)
    best = max(starts, key=lambda s: (float(curve[s : s + span].sum()), -abs(s + span // 2 - peak)))
    return peak, list(range(best, best + span))


@dataclass
class TraceReport:
    """Everything ``trace_facts`` measured, ready for JSON."""

    traces: list[FactTrace]
    summaries: dict[str, KindSummary]
    settings: dict[str, Any]
    embedding_std: float
    noise_std: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def suggestion(self) -> dict[str, Any] | None:
        if "mlp" not in self.summaries:
            return None
        rome, memit = suggest_edit_layers(self.summaries["mlp"])
        return {"rome_layer": rome, "memit_layers": memit,
                "rule": "ROME: argmax of the average MLP indirect effect at the last subject token; "
                        "MEMIT: the 5 consecutive layers containing it with the largest summed effect"}

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "settings": self.settings,
            "embedding_std": self.embedding_std,
            "noise_std": self.noise_std,
            "num_facts": len(self.traces),
            "seconds": round(self.seconds, 2),
            "seconds_per_fact": round(self.seconds / max(1, len(self.traces)), 2),
            "summary": {k: s.to_dict() for k, s in self.summaries.items()},
            "suggestion": self.suggestion(),
            "facts": [t.to_dict() for t in self.traces],
        }


# --------------------------------------------------------------------------- hooks


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, tensor: torch.Tensor) -> Any:
    return (tensor,) + tuple(output[1:]) if isinstance(output, tuple) else tensor


@contextmanager
def _forward_hook(module: nn.Module, fn: Callable[[nn.Module, Any, Any], Any]) -> Iterator[None]:
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _replaced_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Let ``module`` return ``forward(...)`` instead of computing; the original is always put back."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_own:
            module.forward = previous  # type: ignore[method-assign]
        else:
            del module.forward


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- one fact


@dataclass(frozen=True)
class _Restoration:
    kind: str
    token: int
    layer: int
    layers: tuple[int, ...]


@dataclass
class _FactRun:
    """Everything the batched restoration passes of one fact share."""

    model: nn.Module
    input_ids: torch.Tensor  # [T]
    answer_id: int
    samples: int
    noise: torch.Tensor  # [S, T, H], zero outside the subject
    subject_end: int
    embed: nn.Module
    blocks: list[nn.Module]
    modules: dict[str, list[nn.Module]]
    clean: dict[str, torch.Tensor]  # kind -> [L, T, H]
    corrupted_blocks: torch.Tensor  # [L, S, T, H]
    block_returns_tuple: list[bool]
    corrupted_kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    keep_last_logits: bool


def _modules_by_kind(model: nn.Module, spec: ModelSpec, kinds: Sequence[str]) -> dict[str, list[nn.Module]]:
    paths = {"hidden": spec.block, "mlp": spec.mlp, "attn": spec.attn}
    return {k: [get_module(model, paths[k](i)) for i in range(spec.num_layers)] for k in kinds}


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _prefix_cache(run: _FactRun, prefix: int, sample_idx: torch.Tensor) -> Any:
    if run.corrupted_kv is None:
        raise RuntimeError("prefix reuse needs the corrupted run's KV cache")
    return build_cache(run.model, [(k[sample_idx, :, :prefix], v[sample_idx, :, :prefix]) for k, v in run.corrupted_kv])


def _answer_probs(logits: torch.Tensor, answer_id: int) -> torch.Tensor:
    last = logits[:, -1].float()
    return torch.exp(last[:, answer_id] - torch.logsumexp(last, dim=-1))


@torch.no_grad()
def _clean_pass(model: nn.Module, ids: torch.Tensor, modules: dict[str, list[nn.Module]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Last-position logits of the clean prompt, and every traced state: kind -> [L, T, H]."""
    captured: dict[str, list[torch.Tensor | None]] = {k: [None] * len(m) for k, m in modules.items()}

    def recorder(kind: str, layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[kind][layer] = _first(output)[0].detach().clone()
        return hook

    with ExitStack() as stack:
        for kind, mods in modules.items():
            for layer, module in enumerate(mods):
                stack.enter_context(_forward_hook(module, recorder(kind, layer)))
        logits = model(input_ids=ids[None], use_cache=False).logits[0, -1]
    return logits, {k: torch.stack(v) for k, v in captured.items()}  # type: ignore[arg-type]


@torch.no_grad()
def _corrupted_pass(
    model: nn.Module, ids: torch.Tensor, noise: torch.Tensor, embed: nn.Module, blocks: list[nn.Module],
    want_cache: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[bool], Any]:
    """All noise samples at once: last-position logits, block outputs [L, S, T, H], their types, the KV cache."""
    outputs: list[torch.Tensor | None] = [None] * len(blocks)
    is_tuple = [False] * len(blocks)

    def recorder(layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            outputs[layer] = _first(output).detach().clone()
            is_tuple[layer] = isinstance(output, tuple)
        return hook

    with ExitStack() as stack:
        stack.enter_context(_forward_hook(embed, lambda _m, _i, out: out + noise.to(out.dtype)))
        for layer, block in enumerate(blocks):
            stack.enter_context(_forward_hook(block, recorder(layer)))
        result = model(input_ids=ids[None].expand(noise.shape[0], -1), use_cache=want_cache)
    return result.logits[:, -1], torch.stack(outputs), is_tuple, output_cache(result)  # type: ignore[arg-type]


@torch.no_grad()
def _restore_batch(run: _FactRun, restorations: Sequence[_Restoration], prefix: int) -> torch.Tensor:
    """Mean p(answer) over noise samples for each restoration, in one forward pass.

    Rows are restoration-major (row i*S + s is restoration i with noise sample s);
    only positions ``prefix..`` are computed, blocks below the lowest restored layer are skipped.
    """
    samples = run.samples
    sample_idx = torch.arange(samples).repeat(len(restorations))
    rows = len(restorations) * samples
    start = min(r.layers[0] for r in restorations)
    patches: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for i, r in enumerate(restorations):
        for layer in r.layers:
            row_list, token_list = patches.setdefault((r.kind, layer), ([], []))
            row_list.extend(range(i * samples, (i + 1) * samples))
            token_list.extend([r.token] * samples)

    def patcher(row_list: list[int], token_list: list[int], values: torch.Tensor) -> Callable[..., Any]:
        row_t, tok_t = torch.tensor(row_list), torch.tensor(token_list) - prefix

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            h = _first(output).clone()
            h[row_t.to(h.device), tok_t.to(h.device)] = values.to(h.dtype)
            return _with_first(output, h)
        return hook

    def skipped(layer: int) -> Callable[..., Any]:
        def forward(*_args: Any, **_kwargs: Any) -> Any:
            h = run.corrupted_blocks[layer][sample_idx, prefix:]
            return (h,) if run.block_returns_tuple[layer] else h
        return forward

    device = run.input_ids.device
    with ExitStack() as stack:
        if start == 0 and prefix < run.subject_end:
            noise = run.noise[sample_idx, prefix:]
            stack.enter_context(_forward_hook(run.embed, lambda _m, _i, out: out + noise.to(out.dtype)))
        for layer in range(start):
            stack.enter_context(_replaced_forward(run.blocks[layer], skipped(layer)))
        for (kind, layer), (row_list, token_list) in patches.items():
            values = run.clean[kind][layer][torch.tensor(token_list)]
            stack.enter_context(_forward_hook(run.modules[kind][layer], patcher(row_list, token_list, values)))
        kwargs: dict[str, Any] = {"input_ids": run.input_ids[prefix:][None].expand(rows, -1).to(device), "use_cache": False}
        if prefix:
            kwargs[cache_keyword(run.model)] = _prefix_cache(run, prefix, sample_idx)
        if run.keep_last_logits:
            kwargs["logits_to_keep"] = 1
        logits = run.model(**kwargs).logits
    return _answer_probs(logits, run.answer_id).view(len(restorations), samples).mean(1).cpu()


def _plan(
    restorations: list[_Restoration], num_tokens: int, samples: int, reuse_prefix: bool,
    max_batch_tokens: int, max_batch_rows: int,
) -> list[tuple[int, list[_Restoration]]]:
    """Batches of restorations sharing a prefix length, ordered by first restored layer."""
    groups: dict[int, list[_Restoration]] = {}
    for r in restorations:
        groups.setdefault(r.token if reuse_prefix else 0, []).append(r)
    batches = []
    for prefix, group in sorted(groups.items()):
        group.sort(key=lambda r: r.layers[0])
        per_row = num_tokens - prefix
        per_batch = max(1, min(max_batch_tokens // (per_row * samples), max_batch_rows // samples))
        batches.extend((prefix, group[i : i + per_batch]) for i in range(0, len(group), per_batch))
    return batches


def _check_settings(kinds: Sequence[str], samples: int, window: int) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise TracingError(f"unknown kind(s) {unknown or list(kinds)}; choose from {', '.join(KINDS)}")
    if samples < 1:
        raise TracingError(f"samples must be at least 1, got {samples}")
    if window < 1:
        raise TracingError(f"window must be at least 1 layer, got {window}")


def trace_fact(
    model: nn.Module,
    tok: Any,
    prompt: str,
    subject: str,
    *,
    noise_std: float,
    answer: str | int | None = None,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    window: int = 10,
    seed: int = 0,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
    reuse_prefix: bool = True,
    spec: ModelSpec | None = None,
    case_id: str | None = None,
    advance: Callable[[int], None] | None = None,
) -> FactTrace:
    """Trace one fact: p(answer) for every restored (token, layer) of each kind.

    ``answer`` defaults to the model's greedy next token (ROME's choice); a string
    means its first token as a continuation of the prompt. ``noise_std`` is the
    absolute noise scale (ROME: 3 x ``embedding_std`` of the fact set's subjects).
    ``advance(n)`` is called as restorations finish (for a progress bar).
    """
    _check_settings(kinds, samples, window)
    spec = spec or ModelSpec.from_model(model)
    ids_list, (b, e) = subject_token_range(tok, prompt, subject)
    device = next(model.parameters()).device
    ids = torch.tensor(ids_list, device=device)
    num_tokens, num_layers = len(ids_list), spec.num_layers
    embed = get_module(model, spec.embed_path)
    modules = _modules_by_kind(model, spec, kinds)
    blocks = [get_module(model, spec.block(i)) for i in range(num_layers)]
    reuse_prefix = reuse_prefix and takes_cache(model)

    with _eval_mode(model), torch.no_grad():
        clean_logits, clean_states = _clean_pass(model, ids, modules)
        if answer is None:
            answer_id = int(clean_logits.argmax())
        elif isinstance(answer, int):
            answer_id = answer
        else:
            answer_id = answer_token_id(tok, prompt, answer)
        p_clean = float(torch.softmax(clean_logits.float(), -1)[answer_id])

        generator = torch.Generator().manual_seed(seed)
        width = int(getattr(embed, "embedding_dim", spec.hidden_size))
        noise = torch.zeros(samples, num_tokens, width)
        noise[:, b:e] = noise_std * torch.randn(samples, e - b, width, generator=generator)
        noise = noise.to(device)
        corrupt_logits, corrupt_blocks, is_tuple, cache = _corrupted_pass(model, ids, noise, embed, blocks, reuse_prefix)
        p_corrupted = float(_answer_probs(corrupt_logits[:, None], answer_id).mean())
        corrupted_kv = cache_tensors(cache, num_layers, num_tokens) if reuse_prefix else None
        if reuse_prefix and corrupted_kv is None:
            LOG.info("the model's KV cache has an unexpected layout; recomputing full prompts instead")
        run = _FactRun(
            model=model, input_ids=ids, answer_id=answer_id, samples=samples, noise=noise, subject_end=e,
            embed=embed, blocks=blocks, modules=modules, clean=clean_states, corrupted_blocks=corrupt_blocks,
            block_returns_tuple=is_tuple, corrupted_kv=corrupted_kv,
            keep_last_logits=_accepts(model, "logits_to_keep"),
        )
        restored = {k: torch.full((num_tokens, num_layers), p_corrupted) for k in kinds}
        todo = [
            _Restoration(kind, t, layer, tuple(window_layers(layer, num_layers, window) if kind != "hidden" else (layer,)))
            for kind in kinds for t in range(b, num_tokens) for layer in range(num_layers)
        ]
        for prefix, batch in _plan(todo, num_tokens, samples, corrupted_kv is not None, max_batch_tokens, max_batch_rows):
            probs = _restore_batch(run, batch, prefix)
            for r, p in zip(batch, probs.tolist()):
                restored[r.kind][r.token, r.layer] = p
            if advance is not None:
                advance(len(batch))

    return FactTrace(
        prompt=prompt, subject=subject, tokens=[tok.decode([i]) for i in ids_list], subject_range=(b, e),
        answer=tok.decode([answer_id]), answer_id=answer_id, p_clean=p_clean, p_corrupted=p_corrupted,
        restored=restored, window=window, case_id=case_id,
    )


def count_restorations(tok: Any, facts: Sequence[Fact], num_layers: int, kinds: Sequence[str]) -> int:
    """How many (kind, token, layer) restorations ``trace_facts`` will compute (for a progress bar)."""
    total = 0
    for fact in facts:
        ids, (b, _e) = subject_token_range(tok, fact.prompt, fact.subject)
        total += (len(ids) - b) * num_layers * len(kinds)
    return total


def trace_facts(
    model: nn.Module,
    tok: Any,
    facts: Sequence[Fact],
    *,
    kinds: Sequence[str] = KINDS,
    samples: int = 10,
    noise_multiplier: float = 3.0,
    noise_std: float | None = None,
    window: int = 10,
    seed: int = 0,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    show_progress: bool = True,
) -> TraceReport:
    """Trace every fact and average by token category.

    The noise scale is ``noise_multiplier`` x the std of the embeddings of the
    facts' subjects (ROME), unless ``noise_std`` gives it directly.
    """
    from lmedit.progress import progress_bar

    _check_settings(kinds, samples, window)
    if not facts:
        raise TracingError("no facts to trace; check the data file, --limit and --known-only")
    if noise_multiplier < 0 or (noise_std is not None and noise_std < 0):
        raise TracingError("the noise level must be non-negative")
    spec = ModelSpec.from_model(model)
    emb_std = embedding_std(model, tok, [f.subject for f in facts], spec=spec)
    noise = noise_multiplier * emb_std if noise_std is None else float(noise_std)
    LOG.info("embedding std of the subjects: %.4f; noise std: %.4f", emb_std, noise)
    total = count_restorations(tok, facts, spec.num_layers, kinds)
    began = time.perf_counter()
    traces = []
    with progress_bar(f"causal tracing {len(facts)} facts", total, enabled=show_progress) as advance:
        for index, fact in enumerate(facts, start=1):
            fact_began = time.perf_counter()
            traces.append(trace_fact(
                model, tok, fact.prompt, fact.subject, noise_std=noise, kinds=kinds, samples=samples,
                window=window, seed=seed, max_batch_tokens=max_batch_tokens, spec=spec,
                case_id=fact.case_id, advance=advance,
            ))
            LOG.info("fact %d/%d (%d tokens) traced in %.1f s", index, len(facts), len(traces[-1].tokens),
                     time.perf_counter() - fact_began)
    seconds = time.perf_counter() - began
    settings = {
        "kinds": list(kinds), "samples": samples, "noise_multiplier": noise_multiplier,
        "noise_std_given": noise_std, "window": window, "seed": seed, "max_batch_tokens": max_batch_tokens,
    }
    return TraceReport(
        traces=traces, summaries={k: summarize(traces, k) for k in kinds}, settings=settings,
        embedding_std=emb_std, noise_std=noise, seconds=seconds,
    )


def report_from_dict(data: Mapping[str, Any]) -> TraceReport:
    """Rebuild a report from ``TraceReport.to_dict()`` output (e.g. to re-plot a saved trace.json)."""
    traces = [
        FactTrace(
            prompt=f["prompt"], subject=f["subject"], tokens=list(f["tokens"]),
            subject_range=(int(f["subject_range"][0]), int(f["subject_range"][1])), answer=f["answer"],
            answer_id=int(f["answer_id"]), p_clean=float(f["p_clean"]), p_corrupted=float(f["p_corrupted"]),
            restored={k: torch.tensor(v, dtype=torch.float32) for k, v in f["restored"].items()},
            window=int(data["settings"]["window"]), case_id=f.get("case_id"),
        )
        for f in data["facts"]
    ]
    kinds = list(data["settings"]["kinds"])
    extra = {k: v for k, v in data.items() if k not in {
        "settings", "embedding_std", "noise_std", "num_facts", "seconds", "seconds_per_fact", "summary",
        "suggestion", "facts"}}
    return TraceReport(
        traces=traces, summaries={k: summarize(traces, k) for k in kinds}, settings=dict(data["settings"]),
        embedding_std=float(data["embedding_std"]), noise_std=float(data["noise_std"]),
        seconds=float(data["seconds"]), extra=extra,
    )
