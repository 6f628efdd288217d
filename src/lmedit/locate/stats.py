"""Second moments E[k kᵀ] of MLP keys, computed once per model and cached on disk.

ROME, MEMIT and AlphaEdit treat the MLP down-projection W as a linear
associative memory from keys k (its input, the MLP hidden activation) to
values. Their updates need C = E[k kᵀ] over general text: ROME's
``layer_stats`` "mom2", i.e. the *uncentred* mean of k kᵀ over every non-padding
token of a corpus sample. This module computes C for several layers in a single
pass over the corpus, accumulating in float64, and caches each layer's C under
``$LMEDIT_HOME/stats/`` keyed by everything that determines it.

Original weights: editing methods change weights in place, but the published
algorithms use the statistics of the *unedited* model. `model_fingerprint`
therefore remembers the fingerprint of each model object from its first call
on; later calls on the same (since edited) object return the remembered value,
so cache look-ups keep finding the original statistics. `forget_fingerprint`
drops the memory (e.g. after loading new weights into the same object), and the
``fingerprint=`` argument of `second_moments` overrides it. If statistics are
missing from the cache and the model no longer matches its remembered
fingerprint, `second_moments` refuses to compute them from the edited weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from lmedit import model_state
from lmedit.forward.tokens import context_length
from lmedit.limits import fitted_batch_tokens
from lmedit.locate.corpus import Corpus, CorpusError, batch_samples, resolve_corpus, tokenize_samples
from lmedit.progress import progress_bar
from lmedit.safe_files import file_sha256
from lmedit.spec import ModelSpec, get_module, in_out_features

LOG = logging.getLogger(__name__)

__all__ = [
    "LayerStats",
    "StatsConfig",
    "StatsError",
    "clear_memory_cache",
    "default_stats_dir",
    "forget_fingerprint",
    "layer_stats",
    "model_fingerprint",
    "second_moments",
    "stats_cache_entries",
    "tokenizer_fingerprint",
]

STATS_FORMAT = 1  # bump when the meaning of a cache entry changes
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_PARTIAL_PREFIX = "partial."
_DEFAULT_CHECKPOINT_SECONDS = 60.0
CHECKPOINT_SECONDS_ENV = "LMEDIT_STATS_CHECKPOINT_SECONDS"

# Filled lazily, one entry per model object seen by model_fingerprint.
_OWNER = "stats-fingerprint"  # this module's slot in lmedit.model_state (models and tokenizers)
# Cache key -> already loaded statistics of this process.
_MEMORY: dict[str, "LayerStats"] = {}


class StatsError(RuntimeError):
    """Statistics could not be computed or loaded; the message says why and what to do."""


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer: the layers above it are not needed."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class StatsConfig:
    """What to average over. Every field except `batch_tokens` is part of the cache key."""

    corpus: str = "enwiki2015"  # path, bare name, or "wikipedia"
    n_samples: int = 1000  # documents
    sample_length: int = 256  # tokens per document
    dtype: str = "float64"  # accumulation dtype
    batch_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"StatsConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for name in ("n_samples", "sample_length", "batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StatsConfig.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LayerStats:
    """One layer's E[k kᵀ] with where it came from and what it averages over."""

    layer: int
    module: str
    mom2: torch.Tensor = field(repr=False)
    tokens: int
    n_samples: int
    source: str  # "computed", "disk" or "memory"
    seconds: float  # time this call spent obtaining it (when computed: the shared pass, without earlier partial runs)
    path: Path
    meta: dict[str, Any] = field(repr=False)


# --------------------------------------------------------------------------- fingerprints


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the model's weights *as first seen* by this function.

    Memoised per model object, so that after in-place edits the same object
    still maps to the statistics of its original weights (see module docstring).
    """
    return model_state.slot(model, _OWNER, lambda: model_state.weights_digest(model))


def forget_fingerprint(model: nn.Module) -> None:
    """Drop the remembered fingerprint; the next call hashes the current weights."""
    model_state.drop(model, _OWNER)


def tokenizer_fingerprint(tok: Any) -> str:
    """Vocabulary plus the ids of a probe text: the same text must give the same tokens (memoised per object)."""
    try:
        return model_state.slot(tok, _OWNER, lambda: _hash_tokenizer(tok))
    except TypeError:  # not weak-referenceable: just recompute
        return _hash_tokenizer(tok)


def _hash_tokenizer(tok: Any) -> str:
    digest = hashlib.sha256()
    vocab = sorted(tok.get_vocab().items())
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    probe = tok("The quick brown fox, 1984: naïve café.", add_special_tokens=True)["input_ids"]
    digest.update(json.dumps(list(probe)).encode())
    return digest.hexdigest()[:16]


def clear_memory_cache() -> None:
    """Forget statistics loaded in this process (the disk cache is untouched)."""
    _MEMORY.clear()


model_state.register_process_cache("layer-stats", clear_memory_cache)


def default_stats_dir() -> Path:
    """``$LMEDIT_HOME/stats`` (default ``~/.cache/lmedit/stats``)."""
    from lmedit.models import lmedit_home

    return lmedit_home() / "stats"


# --------------------------------------------------------------------------- cache layout


def _key_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


@dataclass(frozen=True)
class _Plan:
    """Everything fixed for one call: identities, paths, the layers to look up."""

    model_fp: str
    tok_fp: str
    corpus: Corpus
    config: StatsConfig
    folder: Path
    modules: dict[int, str]  # requested (normalised) layer -> module name

    def key_fields(self, module: str) -> dict[str, Any]:
        return {
            "format": STATS_FORMAT,
            "model": self.model_fp,
            "tokenizer": self.tok_fp,
            "module": module,
            "corpus": self.corpus.identity,
            "n_samples": self.config.n_samples,
            "sample_length": self.config.sample_length,
            "dtype": self.config.dtype,
        }

    def key(self, module: str) -> str:
        return _key_hash(self.key_fields(module))

    def entry_path(self, module: str) -> Path:
        cfg = self.config
        stem = f"{_safe(module)}.{_safe(self.corpus.name)}.n{cfg.n_samples}.len{cfg.sample_length}.{cfg.dtype}"
        return self.folder / f"{stem}.{self.key(module)[:12]}.safetensors"

    def group_fields(self, modules: Sequence[str]) -> dict[str, Any]:
        fields = self.key_fields("")
        fields["module"] = sorted(modules)
        return fields

    def partial_path(self, modules: Sequence[str]) -> Path:
        return self.folder / f"{_PARTIAL_PREFIX}{_key_hash(self.group_fields(modules))[:16]}.safetensors"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename: a kill leaves the old entry or the new one, never a torn one."""
    from lmedit.safe_files import atomic_write_bytes

    atomic_write_bytes(path, data)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write_bytes(path, save(data, metadata=metadata))



def _load_entry(plan: _Plan, layer: int, module: str) -> LayerStats | None:
    """The cached statistics of one layer, or None when absent, not for this key, changed or unreadable.

    An entry is untrusted input: its bytes must still hash to the sha256 its
    sidecar recorded when it was written (entries from before that record are
    only checked for a readable, square, finite matrix); a failed check is
    logged and the statistics are computed again, never used.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = plan.entry_path(module)
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return None
    start = time.perf_counter()
    try:
        meta = json.loads(side.read_text())
        if meta.get("key") != plan.key_fields(module):
            LOG.warning("ignoring %s: its sidecar describes different statistics", path)
            return None
        recorded = meta.get("sha256")
        if recorded is not None and recorded != file_sha256(path):
            LOG.warning("ignoring statistics cache entry %s: its bytes changed since they were written (sha256 "
                        "differs from its sidecar); the statistics are computed again", path)
            return None
        mom2 = load_file(str(path))["mom2"]
        if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or not bool(torch.isfinite(mom2).all()):
            raise ValueError(f"mom2 has shape {tuple(mom2.shape)} or non-finite values")
    except (OSError, ValueError, KeyError, AttributeError, SafetensorError) as exc:
        LOG.warning("ignoring unreadable statistics cache entry %s: %s", path, exc)
        return None
    return LayerStats(layer, module, mom2, int(meta["tokens"]), int(meta["n_samples_used"]), "disk",
                      time.perf_counter() - start, path, meta)


# --------------------------------------------------------------------------- public entry points


def second_moments(
    model: nn.Module,
    tok: Any,
    layers: Sequence[int],
    config: StatsConfig = StatsConfig(),
    *,
    fingerprint: str | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
    **options: Any,
) -> dict[int, torch.Tensor]:
    """E[k kᵀ] (float64, shape (d_in, d_in)) of the down-projection input of each layer.

    Keys of the result are the layers as given. Cached statistics are returned
    without running the model; missing layers are computed together in one pass.
    The returned tensors are shared with the in-process cache: do not modify them
    in place. `options` are passed to `layer_stats`.
    """
    found = layer_stats(model, tok, layers, config, fingerprint=fingerprint, progress=progress,
                        cache_dir=cache_dir, **options)
    return {layer: stats.mom2 for layer, stats in found.items()}


def layer_stats(
    model: nn.Module,
    tok: Any,
    layers: Sequence[int],
    config: StatsConfig = StatsConfig(),
    *,
    fingerprint: str | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
    spec: ModelSpec | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[int, LayerStats]:
    """Like `second_moments`, with provenance (source, token count, timing, cache file) per layer.

    A partial checkpoint is written every `checkpoint_every` batches when given,
    else every `checkpoint_seconds` (None: ``$LMEDIT_STATS_CHECKPOINT_SECONDS``,
    default 60), and when the pass is interrupted by an exception; the next call
    with the same inputs continues from it. A kill (SIGKILL, power loss) loses
    at most the batches since the last checkpoint; the resumed pass adds the
    same batches in the same order, so its statistics are bit-identical.
    `on_batch(batches_done, samples_done)` is called after each batch
    (a progress hook; raising from it interrupts the pass).
    """
    if not layers:
        raise ValueError("no layers requested; pass e.g. layers=[5]")
    checkpoint_seconds = _checkpoint_seconds() if checkpoint_seconds is None else checkpoint_seconds
    spec = spec or ModelSpec.from_model(model)
    modules = {layer: spec.mlp_out(layer) for layer in layers}
    explicit = fingerprint is not None
    remembered = model_state.slot(model, _OWNER) is not None
    model_fp = fingerprint if explicit else model_fingerprint(model)
    folder = (Path(cache_dir) if cache_dir is not None else default_stats_dir()) / model_fp[:16]
    tok_fp = tokenizer_fingerprint(tok)
    try:
        corpus = resolve_corpus(config.corpus, packaged_fallback=False)
    except CorpusError:
        cached = _cached_from_absent_corpus(folder, model_fp, tok_fp, config, modules)
        if cached is not None:
            return cached
        corpus = resolve_corpus(config.corpus)  # the packaged sample, or the same error
    plan = _Plan(model_fp, tok_fp, corpus, config, folder, modules)

    results: dict[int, LayerStats] = {}
    for layer, module in modules.items():
        hit = _from_memory(plan, layer, module) or _load_entry(plan, layer, module)
        if hit is not None:
            _MEMORY.setdefault(plan.key(module), hit)
            results[layer] = hit
    missing = {layer: module for layer, module in modules.items() if layer not in results}
    if not missing:
        _drop_finished_partial(plan, modules)
        return results
    if not explicit and remembered and model_state.weights_digest(model) != model_fp:
        raise StatsError(
            f"statistics for {sorted(set(missing.values()))} are not cached for this model's original weights, "
            "and the model has been modified since its fingerprint was first taken, so they cannot be computed "
            "from it. Compute them before editing (call second_moments first, or run `lmedit stats`), restore "
            "the weights, or pass fingerprint= explicitly (forget_fingerprint(model) to start over)."
        )
    with _cache_lock(plan.folder):
        for layer, module in list(missing.items()):  # another process may have finished them meanwhile
            hit = _load_entry(plan, layer, module)
            if hit is not None:
                _MEMORY.setdefault(plan.key(module), hit)
                results[layer] = hit
                del missing[layer]
        if missing:
            computed = _compute(model, tok, spec, plan, missing, progress=progress,
                                checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
                                on_batch=on_batch)
            for layer, stats in computed.items():
                _MEMORY[plan.key(stats.module)] = stats
                results[layer] = stats
    return {layer: results[layer] for layer in modules}


@contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """Hold a model's cache folder while computing: a second process computing the same statistics waits,
    then finds the entries the first one wrote. The OS drops the lock of a killed process; the temp files
    such a process left are removed here (only a lock holder writes in the folder)."""
    from filelock import FileLock, Timeout

    from lmedit.safe_files import remove_stale_temp_files

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        LOG.warning("another process is computing statistics in %s; waiting for it to finish", folder)
        lock.acquire()
    try:
        for stale in remove_stale_temp_files(folder):
            LOG.info("removed %s, left by an interrupted write", stale)
        yield
    finally:
        lock.release()


def _drop_finished_partial(plan: _Plan, modules: dict[int, str]) -> None:
    """A kill between writing the last entry and deleting the checkpoint leaves a partial nobody needs."""
    partial = plan.partial_path(sorted(set(modules.values())))
    if partial.is_file():
        with _cache_lock(plan.folder):
            partial.unlink(missing_ok=True)


def _cached_from_absent_corpus(folder: Path, model_fp: str, tok_fp: str, config: StatsConfig,
                               modules: dict[int, str]) -> dict[int, LayerStats] | None:
    """Every requested layer from cache entries of a corpus that is not on this machine, or None.

    A corpus's identity (its content hash) needs its files, so a machine without
    them cannot rebuild the cache key. Entries whose key matches in everything
    else (model, tokenizer, module, sample count and length, dtype) and whose
    corpus has the requested name are the statistics asked for; several
    candidates for one module (two different corpora of that name) are refused.
    """
    if not folder.is_dir() or len(Path(config.corpus).parts) != 1:
        return None
    identities: set[str] = set()
    for side in folder.glob("*.json"):
        try:
            key = json.loads(side.read_text()).get("key", {})
        except (OSError, ValueError, AttributeError):
            continue
        corpus = str(key.get("corpus", ""))
        if corpus.split(":")[0] == config.corpus and key.get("module") in modules.values():
            identities.add(corpus)
    if len(identities) != 1:
        return None
    identity = identities.pop()
    stand_in = Corpus(config.corpus, identity.split(":")[1] if ":" in identity else "", identity,
                      f"(not on this machine; cached statistics of {identity})", _absent_documents)
    plan = _Plan(model_fp, tok_fp, stand_in, config, folder, modules)
    found = {}
    for layer, module in modules.items():
        hit = _from_memory(plan, layer, module) or _load_entry(plan, layer, module)
        if hit is None:
            return None
        _MEMORY.setdefault(plan.key(module), hit)
        found[layer] = hit
    LOG.info("corpus %r is not on this machine; using its cached statistics (%s) for %s",
             config.corpus, identity, ", ".join(sorted(modules.values())))
    return found


def _absent_documents() -> Iterator[str]:
    raise StatsError("internal: a corpus known only from cached statistics cannot be read")


def _from_memory(plan: _Plan, layer: int, module: str) -> LayerStats | None:
    hit = _MEMORY.get(plan.key(module))
    if hit is None:
        return None
    return LayerStats(layer, module, hit.mom2, hit.tokens, hit.n_samples, "memory", 0.0, hit.path, hit.meta)


def stats_cache_entries(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every cache entry (complete or partial) under `cache_dir`, with its sidecar fields."""
    root = Path(cache_dir) if cache_dir is not None else default_stats_dir()
    entries = []
    for path in sorted(root.glob("*/*.safetensors")):
        row: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size}
        if path.name.startswith(_PARTIAL_PREFIX):
            row.update(state="partial", **_partial_summary(path))
        elif _sidecar(path).is_file():
            try:
                meta = json.loads(_sidecar(path).read_text())
            except (OSError, ValueError):
                meta = {}
            row["state"] = "complete"
            row.update(meta.get("key", {}))
            row.update({k: v for k, v in meta.items() if k != "key"})
        else:
            row.update(state="incomplete (no sidecar)")
        entries.append(row)
    return entries


def _partial_summary(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            state = json.loads(handle.metadata()["state"])
    except Exception as exc:  # a damaged partial is reported, not fatal
        return {"error": str(exc)}
    group = state["group"]
    return {"samples_done": state["samples_done"], "modules": group["module"], "model": group["model"],
            "corpus": group["corpus"], "n_samples": group["n_samples"], "sample_length": group["sample_length"]}


# --------------------------------------------------------------------------- the pass


@dataclass
class _Accumulator:
    """Running sums of k kᵀ and token counts, consistent at batch boundaries."""

    sums: dict[str, torch.Tensor]
    tokens: dict[str, int]
    samples_done: int = 0
    batches_done: int = 0
    seconds: float = 0.0  # compute time spent before this process resumed

    def state(self, group: dict[str, Any], batch_tokens: int, seconds: float) -> dict[str, str]:
        return {"state": json.dumps({"group": group, "samples_done": self.samples_done,
                                     "batches_done": self.batches_done, "tokens": self.tokens,
                                     "seconds": seconds, "batch_tokens": batch_tokens})}


def _fresh_accumulator(model: nn.Module, modules: dict[int, str], dtype: torch.dtype) -> _Accumulator:
    sums = {}
    for module_name in modules.values():
        module = get_module(model, module_name)
        weight = module.weight
        d_in = weight.shape[0] if _is_conv1d(module) else weight.shape[1]
        sums[module_name] = torch.zeros((d_in, d_in), dtype=dtype, device=weight.device)
    return _Accumulator(sums, {name: 0 for name in sums})


def _is_conv1d(module: nn.Module) -> bool:
    from lmedit.spec import _is_conv1d as is_conv1d

    return is_conv1d(module)


def _load_partial(path: Path, group: dict[str, Any], fresh: _Accumulator) -> _Accumulator | None:
    """The checkpoint for exactly this group of statistics, or None."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            state = json.loads(handle.metadata()["state"])
        if state["group"] != group:
            return None
        tensors = load_file(str(path))
        sums = {name: tensors[f"sum.{name}"].to(device=ref.device, dtype=ref.dtype) for name, ref in fresh.sums.items()}
    except Exception as exc:
        LOG.warning("ignoring unreadable partial statistics %s (%s); starting over", path, exc)
        return None
    return _Accumulator(sums, {k: int(v) for k, v in state["tokens"].items()}, int(state["samples_done"]),
                        int(state["batches_done"]), float(state["seconds"]))


def _save_partial(path: Path, acc: _Accumulator, group: dict[str, Any], batch_tokens: int, seconds: float) -> None:
    _atomic_save_tensors(path, {f"sum.{k}": v for k, v in acc.sums.items()}, acc.state(group, batch_tokens, seconds))


def _compute(
    model: nn.Module,
    tok: Any,
    spec: ModelSpec,
    plan: _Plan,
    missing: dict[int, str],
    *,
    progress: bool,
    checkpoint_every: int | None,
    checkpoint_seconds: float,
    on_batch: Callable[[int, int], None] | None,
) -> dict[int, LayerStats]:
    config = plan.config
    limit = context_length(model)
    if limit is not None and config.sample_length > limit:
        raise StatsError(f"sample_length {config.sample_length} exceeds the model's {limit} positions; "
                         f"use StatsConfig(sample_length<={limit})")
    dtype = _DTYPES[config.dtype]
    names = sorted(set(missing.values()))
    fitted = fitted_batch_tokens(model, [in_out_features(get_module(model, n))[0] for n in names],
                                 config.batch_tokens, config.sample_length)  # a --max-memory budget may shrink it
    if fitted != config.batch_tokens:  # not part of the cache key: the statistics are the same
        config = dataclasses.replace(config, batch_tokens=fitted)
        plan = dataclasses.replace(plan, config=config)
    group = plan.group_fields(names)
    partial = plan.partial_path(names)
    fresh = _fresh_accumulator(model, {i: n for i, n in enumerate(names)}, dtype)
    acc = _load_partial(partial, group, fresh) or fresh
    if acc.samples_done:
        LOG.info("resuming statistics from %s after %d samples", partial, acc.samples_done)
    depth = {name: _layer_depth(spec, name) for name in names}
    deepest = max(names, key=lambda n: depth[n])

    start = time.perf_counter()
    _run_pass(model, tok, plan, acc, names, deepest, dtype, partial, group, progress=progress,
              checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds, on_batch=on_batch)
    elapsed = acc.seconds + (time.perf_counter() - start)

    if acc.samples_done < config.n_samples:
        LOG.warning("corpus %s has only %d documents; the statistics use all of them instead of %d",
                    plan.corpus.name, acc.samples_done, config.n_samples)
    results = {}
    for layer, module in missing.items():
        results[layer] = _finish_layer(plan, layer, module, acc, elapsed, elapsed - acc.seconds)
    partial.unlink(missing_ok=True)
    return results


def _layer_depth(spec: ModelSpec, module: str) -> int:
    for i in range(spec.num_layers):
        if spec.mlp_out(i) == module:
            return i
    raise StatsError(f"{module!r} is not the down-projection of any layer")  # pragma: no cover


def _finish_layer(plan: _Plan, layer: int, module: str, acc: _Accumulator, compute_seconds: float,
                  seconds: float) -> LayerStats:
    tokens = acc.tokens[module]
    if tokens == 0:
        raise StatsError(f"no tokens reached {module}; the corpus {plan.corpus.location} gave no samples")
    mom2 = (acc.sums[module].to(torch.float64) / tokens).cpu()
    path = plan.entry_path(module)
    meta = {
        "key": plan.key_fields(module),
        "layer": layer,
        "tokens": tokens,
        "n_samples_requested": plan.config.n_samples,
        "n_samples_used": acc.samples_done,
        "batch_tokens": plan.config.batch_tokens,
        "corpus_location": plan.corpus.location,
        "compute_seconds": round(compute_seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "statistic": "uncentred second moment E[k k^T] of the down-projection input, padding excluded",
    }
    _atomic_save_tensors(path, {"mom2": mom2}, {"tokens": str(tokens), "module": module})
    meta["sha256"] = file_sha256(path)  # checked on every load: changed bytes are never used
    _atomic_write_bytes(_sidecar(path), json.dumps(meta, indent=2).encode())  # written last: marks completion
    return LayerStats(layer, module, mom2, tokens, acc.samples_done, "computed", seconds, path, meta)


def _run_pass(model: nn.Module, tok: Any, plan: _Plan, acc: _Accumulator, names: list[str], deepest: str,
              dtype: torch.dtype, partial: Path, group: dict[str, Any], *, progress: bool,
              checkpoint_every: int | None, checkpoint_seconds: float,
              on_batch: Callable[[int, int], None] | None) -> None:
    """Stream the remaining batches through the model, adding each batch's k kᵀ to `acc`."""
    config = plan.config
    captured: dict[str, torch.Tensor] = {}
    current_mask: list[torch.Tensor] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = args[0] if args else next(iter(kwargs.values()))
            captured[name] = _masked_keys(inputs, current_mask[0]).to(dtype)
            if name == deepest:
                raise _StopForward

        return hook

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    samples = tokenize_samples(tok, _limited(plan.corpus.documents(), config.n_samples), config.sample_length,
                               start=acc.samples_done)
    handles = [get_module(model, n).register_forward_pre_hook(make_hook(n), with_kwargs=True) for n in names]
    modes = {module: module.training for module in model.modules()}  # restored exactly, even if mixed
    model.eval()
    consistent = True
    run_start = last_save = time.perf_counter()
    since_save = 0
    try:
        with progress_bar(f"second moments ({plan.corpus.name})", config.n_samples, enabled=progress) as advance:
            advance(acc.samples_done)
            for batch in batch_samples(samples, config.batch_tokens, pad_id):
                _forward(model, batch, current_mask, captured)
                consistent = False
                for name in names:
                    keys = captured.pop(name)
                    acc.sums[name].addmm_(keys.T, keys)
                    acc.tokens[name] += int(keys.shape[0])
                acc.samples_done += batch.size
                acc.batches_done += 1
                consistent = True
                advance(batch.size)
                since_save += 1
                due = since_save >= checkpoint_every if checkpoint_every else \
                    time.perf_counter() - last_save >= checkpoint_seconds
                if due:
                    _save_partial(partial, acc, group, config.batch_tokens, acc.seconds + time.perf_counter() - run_start)
                    last_save, since_save = time.perf_counter(), 0
                if on_batch is not None:
                    on_batch(acc.batches_done, acc.samples_done)
    except BaseException:
        if consistent and since_save:
            _save_partial(partial, acc, group, config.batch_tokens, acc.seconds + time.perf_counter() - run_start)
            LOG.warning("statistics interrupted after %d samples; saved %s, the next call resumes from it",
                        acc.samples_done, partial)
        raise
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


def _checkpoint_seconds() -> float:
    """Seconds between partial checkpoints: ``$LMEDIT_STATS_CHECKPOINT_SECONDS`` (0: after every batch), default 60."""
    text = os.environ.get(CHECKPOINT_SECONDS_ENV, "").strip()
    if not text:
        return _DEFAULT_CHECKPOINT_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise StatsError(f"{CHECKPOINT_SECONDS_ENV}={text!r} is not a number of seconds >= 0; "
                         "unset it or set e.g. 30 (0 saves after every batch)")
    return value


def _limited(documents: Iterator[str], n: int) -> Iterator[str]:
    for count, text in enumerate(documents):
        if count >= n:
            return
        yield text


def _masked_keys(inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of the down-projection input at real (non-padding) token positions: [tokens, d_in]."""
    flat_mask = mask.reshape(-1).to(device=inputs.device, dtype=torch.bool)
    flat = inputs.reshape(-1, inputs.shape[-1])
    if flat.shape[0] != flat_mask.shape[0]:
        raise StatsError(f"down-projection input of shape {tuple(inputs.shape)} does not match the batch "
                         f"of {tuple(mask.shape)} tokens")
    return flat[flat_mask]


def _forward(model: nn.Module, batch: Any, current_mask: list[torch.Tensor], captured: dict[str, torch.Tensor]) -> None:
    device = next(model.parameters()).device
    current_mask[:] = [batch.attention_mask]
    captured.clear()
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    except _StopForward:
        pass
