"""SERAC (Mitchell et al., ICML 2022): an edit memory, a scope classifier and a counterfactual model.

SERAC changes no base weight. An edit is *stored*: its prompt, target and
the sentence embedding of ``prompt + " " + target``. At inference the scope
classifier scores every (memory entry, query) pair; a query whose best entry
has probability at least ``threshold`` is answered by the counterfactual
model, fed ``"<edit prompt> <edit target><separator><query>"`` (EasyEdit's
input for decoder models, with a separator between the edit and the query);
every other query goes to the untouched base model.

* **Scope classifier:** a trained head on frozen all-MiniLM-L6-v2
  embeddings (``lmedit.encoders``): an MLP over ``[e ⊙ q, |e − q|]`` plus a
  learned multiple of their cosine. Trained with binary cross-entropy on
  in-scope pairs (the edit with its own prompt and rephrasing) against
  out-of-scope pairs (its locality prompt, the other edits' prompts), as in
  the paper's supervised objective.
* **Counterfactual model:** the base model with its top ``trainable_layers``
  blocks replaced by fine-tuned copies; the lower blocks, embeddings, norm and
  head are *shared* with the base model (no second copy of the model in
  memory). Trained with the NLL of the edit target given
  ``edit + separator + prompt`` and ``edit + separator + rephrasing``.
* **Memory accumulates** across sequential ``apply`` calls (one router per
  model, found with :func:`lmedit.routing.router_of`); EasyEdit's SERAC
  returns a new wrapper per call and so holds only the latest edit (study
  §0.7). A handle's ``restore`` removes exactly its own entries, in any
  order, and the last one detaches the router, leaving nothing behind.
* Routing is decided on the probe *prompt* only (the evaluator's routing
  capability), so a teacher-forced answer never leaks into the scope decision.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from lmedit.adapters import SequenceLogits, frozen_model
from lmedit.encoders import DEFAULT_ENCODER, get_encoder
from lmedit.forward import pad_id_of
from lmedit.handles import EDIT_FORMAT_VERSION, EditHandle, EditHandleError
from lmedit.hparams import HyperParams, HyperParamsError
from lmedit.registry import Contract, TrainingEntry, register
from lmedit.requests import EditRequest
from lmedit.routing import Route, RoutingError, attach_router, detach_router, router_kind, router_of
from lmedit.spec import ModelSpec, get_module
from lmedit.training import CheckpointError, EditExample, EditorTrainingParams
from lmedit.training.checkpoint import write_json, write_tensors
from lmedit.training.paths import resolve_archive
from lmedit.training.shared import (
    CheckpointCache,
    check_signature,
    model_signature,
    scored_sequence,
    split_rows,
    target_tensor,
)

LOG = logging.getLogger(__name__)

METHOD = "SERAC"
TRAIN_COMMAND = "lmedit train serac"
MEMORY_FORMAT = "lmedit-serac-memory"


# --------------------------------------------------------------------------- hyperparameters


@dataclass
class SERACHyperParams(HyperParams):
    """Editing with trained SERAC networks; their own settings come from the checkpoint."""

    archive: str = "{lmedit_home}/checkpoints/SERAC/smollm2-135m"
    threshold: float = 0.5

    def validate(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise HyperParamsError("threshold must lie strictly between 0 and 1 (a classifier probability)")


@dataclass
class SERACTrainingParams(EditorTrainingParams):
    """What ``lmedit train serac`` trains: the classifier head, the counterfactual blocks, and the loop."""

    encoder: str = DEFAULT_ENCODER
    head_hidden: int = 256
    trainable_layers: int = 4
    separator: str = "\n"
    lr_classifier: float = 1e-3
    lr_counterfactual: float = 2e-5
    ccls: float = 1.0
    ccf: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.head_hidden < 1 or self.trainable_layers < 1:
            raise HyperParamsError("head_hidden and trainable_layers must be at least 1")
        if self.lr_classifier <= 0 or self.lr_counterfactual <= 0:
            raise HyperParamsError("learning rates must be positive")


# --------------------------------------------------------------------------- networks


class ScopeClassifier(nn.Module):
    """``P(query in scope of edit)`` from two unit-length sentence embeddings."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        # start as "cosine above 0.7 is in scope", which training then refines
        self.cos_weight = nn.Parameter(torch.tensor(10.0))
        self.cos_bias = nn.Parameter(torch.tensor(-7.0))

    def logits(self, edits: torch.Tensor, queries: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """(queries, edits) logits, computed in chunks of queries to bound memory."""
        out = []
        for start in range(0, queries.shape[0], chunk):
            q = queries[start : start + chunk, None, :]
            e = edits[None, :, :]
            features = torch.cat([q * e, (q - e).abs()], dim=-1)
            cos = (q * e).sum(-1)
            out.append(self.mlp(features).squeeze(-1) + self.cos_weight * cos + self.cos_bias)
        return torch.cat(out) if out else torch.zeros(0, edits.shape[0])


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing submodules and tensors, with its own child table and hook tables."""
    clone = copy.copy(module)
    for key, value in list(vars(clone).items()):
        if isinstance(value, dict) and key.startswith("_"):
            setattr(clone, key, type(value)(value))
    return clone


def counterfactual_model(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """``model`` with the blocks ``layers`` replaced by deep copies; everything else is shared, not copied."""
    spec = ModelSpec.from_model(model)
    parts = spec.layers_path.split(".")
    root = _shallow_module_copy(model)
    parent = root
    for name in parts[:-1]:
        child = _shallow_module_copy(parent._modules[name])
        parent._modules[name] = child
        parent = child
    blocks = parent._modules[parts[-1]]
    chosen = set(layers)
    parent._modules[parts[-1]] = nn.ModuleList(copy.deepcopy(b) if i in chosen else b for i, b in enumerate(blocks))
    return root


def trainable_blocks(cf_model: nn.Module, layers: Sequence[int]) -> nn.ModuleDict:
    spec = ModelSpec.from_model(cf_model)
    blocks = get_module(cf_model, spec.layers_path)
    return nn.ModuleDict({str(i): blocks[i] for i in layers})


def top_layers(model: nn.Module, count: int) -> list[int]:
    n = ModelSpec.from_model(model).num_layers
    if count > n:
        raise HyperParamsError(f"trainable_layers={count} but the model has {n} layers")
    return list(range(n - count, n))


def routed_prompt(edit_prompt: str, edit_target: str, query: str, separator: str) -> str:
    return f"{edit_prompt} {edit_target}{separator}{query}"


def edit_text(prompt: str, target: str) -> str:
    """What the classifier embeds for an edit: the paper's edit descriptor, prompt and target together."""
    return f"{prompt} {target}"


# --------------------------------------------------------------------------- the memory and its router


@dataclass
class MemoryEntry:
    entry_id: str
    prompt: str
    target: str
    embedding: torch.Tensor


@dataclass
class SeracNetworks:
    """What a checkpoint holds, rebuilt once per checkpoint file (never bound to one base model)."""

    classifier: ScopeClassifier
    blocks: dict[str, torch.Tensor]
    layers: list[int]
    encoder: str
    separator: str
    config: dict[str, Any]


_NETWORKS = CheckpointCache()


def load_networks(model: nn.Module, archive: str | Path) -> tuple[SeracNetworks, Path]:
    folder = resolve_archive(str(archive))

    def build(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> SeracNetworks:
        net = config["network"]
        classifier = ScopeClassifier(net["embedding_dim"], net["head_hidden"])
        try:
            classifier.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("cls.")})
        except RuntimeError as exc:
            raise CheckpointError(f"{folder}: the classifier weights do not fit its config ({exc})") from None
        classifier.eval().requires_grad_(False)
        blocks = {k[3:]: v for k, v in tensors.items() if k.startswith("cf.")}
        return SeracNetworks(classifier, blocks, list(net["layers"]), net["encoder"], net["separator"], config)

    networks = _NETWORKS.get(folder, METHOD, TRAIN_COMMAND, build)
    check_signature(model, networks.config.get("model", {}), folder, TRAIN_COMMAND)
    return networks, folder


class SeracRouter:
    """The edit memory of one base model, and the routing of its probes."""

    kind = METHOD

    def __init__(self, model: nn.Module, networks: SeracNetworks, archive: Path, threshold: float) -> None:
        self.networks = networks
        self.archive = archive
        self.threshold = threshold
        self.encoder = get_encoder(networks.encoder)
        self.counterfactual = counterfactual_model(model, networks.layers)
        blocks = trainable_blocks(self.counterfactual, networks.layers)
        try:
            blocks.load_state_dict(networks.blocks)
        except RuntimeError as exc:
            raise CheckpointError(
                f"the SERAC checkpoint at {archive} does not fit this model's blocks ({exc}); "
                f"train one for this model with `{TRAIN_COMMAND}`"
            ) from None
        blocks.eval().requires_grad_(False)
        self.entries: list[MemoryEntry] = []
        self._ids = itertools.count()

    # ---------------------------------------------------------------- memory

    def add(self, requests: Sequence[EditRequest], embeddings: torch.Tensor | None = None) -> list[str]:
        if embeddings is None:
            embeddings = self.encoder.encode([edit_text(r.prompt, r.target_new) for r in requests]).float()
        ids = []
        for request, embedding in zip(requests, embeddings):
            entry_id = self._new_id(request.case_id)
            self.entries.append(MemoryEntry(entry_id, request.prompt, request.target_new, embedding.detach().clone()))
            ids.append(entry_id)
        return ids

    def _new_id(self, case_id: str | None) -> str:
        taken = {e.entry_id for e in self.entries}
        if case_id is not None and case_id not in taken:
            return case_id
        while True:
            candidate = f"edit-{next(self._ids)}"
            if candidate not in taken:
                return candidate

    def remove(self, entry_ids: Sequence[str]) -> None:
        missing = set(entry_ids) - {e.entry_id for e in self.entries}
        if missing:
            raise EditHandleError(f"SERAC memory holds no entries {sorted(missing)}; they were removed already")
        drop = set(entry_ids)
        self.entries = [e for e in self.entries if e.entry_id not in drop]

    @property
    def entry_ids(self) -> list[str]:
        return [e.entry_id for e in self.entries]

    # ---------------------------------------------------------------- routing

    @torch.no_grad()
    def scope(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Best entry index and its in-scope probability for each prompt (reads the memory only)."""
        if not self.entries or not prompts:
            return torch.zeros(len(prompts), dtype=torch.long), torch.zeros(len(prompts))
        queries = self.encoder.encode(list(prompts)).float()
        edits = torch.stack([e.embedding for e in self.entries])
        probs = torch.sigmoid(self.networks.classifier.logits(edits, queries))
        best, index = probs.max(dim=-1)
        return index, best

    def route(self, model: nn.Module, tok: Any, prompts: Sequence[str]) -> list[Route]:
        index, prob = self.scope(prompts)
        routes = []
        for prompt, i, p in zip(prompts, index.tolist(), prob.tolist()):
            if self.entries and p >= self.threshold:
                entry = self.entries[i]
                text = routed_prompt(entry.prompt, entry.target, prompt, self.networks.separator)
                routes.append(Route(text, self.counterfactual, "counterfactual"))
            else:
                routes.append(Route(prompt, None, "base"))
        return routes


class SeracHandle(EditHandle):
    """Removes exactly its own memory entries; the last removal detaches the router."""

    def __init__(self, model: nn.Module, router: SeracRouter, entry_ids: list[str]) -> None:
        super().__init__(METHOD)
        self.model = model
        self.router = router
        self.entry_ids = list(entry_ids)

    def _restore(self) -> None:
        self.router.remove(self.entry_ids)
        if not self.router.entries:
            detach_router(self.model, self.router)

    def save(self, path: str | Path) -> Path:
        """Write the whole memory (as it is now) and the checkpoint it needs: ``edit.json`` + ``edit.safetensors``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        entries = self.router.entries
        write_tensors(path / "edit.safetensors", {f"entry.{k}": e.embedding for k, e in enumerate(entries)}
                      if entries else {"empty": torch.zeros(0)})
        write_json(path / "edit.json", {
            "format": MEMORY_FORMAT, "version": EDIT_FORMAT_VERSION, "method": METHOD,
            "archive": str(self.router.archive), "threshold": self.router.threshold,
            "entries": [{"id": e.entry_id, "prompt": e.prompt, "target": e.target} for e in entries],
            "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str))},
        })
        return path


def load_memory(model: nn.Module, path: Path, meta: dict[str, Any]) -> SeracHandle:
    """Re-create a saved SERAC memory on a model that carries no router yet."""
    if router_of(model) is not None:
        raise EditHandleError("the model already carries a router; restore its edits before loading a SERAC memory")
    networks, folder = load_networks(model, meta["archive"])
    router = SeracRouter(model, networks, folder, float(meta["threshold"]))
    tensors = load_file(str(path / "edit.safetensors"))
    entries = meta["entries"]
    embeddings = torch.stack([tensors[f"entry.{k}"] for k in range(len(entries))]) if entries else None
    requests = [EditRequest(e["prompt"], e["target"], case_id=e["id"]) for e in entries]
    ids = router.add(requests, embeddings) if requests else []
    handle = SeracHandle(model, router, ids)
    if ids:
        attach_router(model, router)
    return handle




def apply_serac(model: nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: SERACHyperParams) -> SeracHandle:
    """Store edits in a memory; a scope classifier sends in-scope queries to a counterfactual model (needs `lmedit train serac`)."""
    started = time.perf_counter()
    router = router_of(model)
    if router is None:
        networks, folder = load_networks(model, hparams.archive)
        router = SeracRouter(model, networks, folder, hparams.threshold)
        attach_router(model, router)
    elif not isinstance(router, SeracRouter):
        raise RoutingError(
            f"the model already carries a {router_kind(router)} router, so SERAC cannot attach its memory; "
            f"restore the {router_kind(router)} edits first (a model holds one router)"
        )
    elif router.archive != resolve_archive(hparams.archive) or router.threshold != hparams.threshold:
        raise HyperParamsError(
            "this model's SERAC memory was made with another archive or threshold; restore its edits first"
        )
    ids = router.add(requests)
    handle = SeracHandle(model, router, ids)
    handle.info = {"seconds": time.perf_counter() - started, "memory_size": len(router.entries)}
    return handle


# --------------------------------------------------------------------------- training


class SERACTask:
    """Trains the scope classifier and the counterfactual blocks together, on the same batches."""

    method = METHOD

    def __init__(self, model: nn.Module, tok: Any, params: SERACTrainingParams) -> None:
        self.model, self.tok, self.params = model, tok, params
        self.encoder = get_encoder(params.encoder)
        self.layers = top_layers(model, params.trainable_layers)
        self.counterfactual = counterfactual_model(model, self.layers)
        self.blocks = trainable_blocks(self.counterfactual, self.layers)
        self.blocks.requires_grad_(True)
        self.dim = int(self.encoder.encode(["probe"]).shape[-1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            self.classifier = ScopeClassifier(self.dim, params.head_hidden)
        self.networks = nn.ModuleDict({"cls": self.classifier, "cf": self.blocks})
        self.first_block = ModelSpec.from_model(self.counterfactual).mlp(self.layers[0])
        self.pad_id = pad_id_of(tok)
        self._embeddings: dict[str, torch.Tensor] = {}

    def module(self) -> nn.Module:
        return self.networks

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.classifier.parameters()), "lr": self.params.lr_classifier},
                {"params": list(self.blocks.parameters()), "lr": self.params.lr_counterfactual}]

    def checkpoint_config(self) -> dict[str, Any]:
        return {"network": {"encoder": self.params.encoder, "embedding_dim": self.dim, "head_hidden": self.params.head_hidden,
                            "layers": self.layers, "separator": self.params.separator},
                "model": model_signature(self.model)}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {f"cls.{k}": v for k, v in self.classifier.state_dict().items()} | {
            f"cf.{k}": v for k, v in self.blocks.state_dict().items()}

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._embeddings]
        if missing:
            for text, row in zip(missing, self.encoder.encode(missing).float()):
                self._embeddings[text] = row
        return torch.stack([self._embeddings[t] for t in texts])

    def train_step(self, batch: Sequence[EditExample], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        cls_loss, cls_metrics = self._classifier_loss(batch)
        cf_loss, cf_metrics = self._counterfactual_loss(batch)
        loss = self.params.ccls * cls_loss + self.params.ccf * cf_loss
        return loss, {**cls_metrics, **cf_metrics}

    def validate(self, examples: Sequence[EditExample]) -> dict[str, float]:
        totals: dict[str, float] = {}
        count = 0
        for start in range(0, len(examples), self.params.batch_size):
            chunk = examples[start : start + self.params.batch_size]
            with torch.no_grad():
                _, metrics = self.train_step(chunk, torch.Generator())
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value * len(chunk)
            count += len(chunk)
        means = {k: v / count for k, v in totals.items()}
        means["score"] = (means["classifier_acc"] + means["cf_acc"]) / 2
        return means

    def _classifier_loss(self, batch: Sequence[EditExample]) -> tuple[torch.Tensor, dict[str, float]]:
        """Balanced BCE: each edit with its prompt and rephrasing (in scope) against its locality prompt
        and every other edit's prompt and rephrasing in the batch (out of scope)."""
        b = len(batch)
        edits = self._embed([edit_text(e.prompt, e.target) for e in batch])
        queries = self._embed([e.prompt for e in batch] + [e.rephrase for e in batch] + [e.loc_prompt for e in batch])
        logits = self.classifier.logits(edits, queries)  # (3b, b)
        labels = torch.zeros_like(logits)
        own = torch.arange(b)
        labels[own, own] = 1.0
        labels[b + own, own] = 1.0
        positive = labels.bool()
        bce = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        loss = bce[positive].mean() + bce[~positive].mean()
        predicted = logits > 0
        recall = float(predicted[positive].float().mean())
        specificity = float((~predicted[~positive]).float().mean())
        loc_rows = (~predicted[2 * b :]).all(-1).float().mean()
        return loss, {"loss_cls": float(loss.detach()), "cls_recall": recall, "cls_specificity": specificity,
                      "cls_locality": float(loc_rows), "classifier_acc": (recall + specificity) / 2}

    def _counterfactual_loss(self, batch: Sequence[EditExample]) -> tuple[torch.Tensor, dict[str, float]]:
        sep = self.params.separator
        sequences = ([scored_sequence(self.tok, routed_prompt(e.prompt, e.target, e.prompt, sep), e.target) for e in batch]
                     + [scored_sequence(self.tok, routed_prompt(e.prompt, e.target, e.rephrase, sep), e.target) for e in batch])
        with frozen_model(self.model):
            self.blocks.requires_grad_(torch.is_grad_enabled())
            logits_fn = SequenceLogits(self.counterfactual, self.first_block, [s.ids for s in sequences],
                                       [s.columns for s in sequences], self.pad_id)
            rows = split_rows(logits_fn(), sequences)
        device = rows[0].device
        nll = torch.stack([nn.functional.cross_entropy(r, target_tensor(s, device)) for r, s in zip(rows, sequences)])
        accuracy = [float((r.argmax(-1) == target_tensor(s, device)).float().mean()) for r, s in zip(rows, sequences)]
        b = len(batch)
        return nll.mean(), {"loss_cf": float(nll.mean().detach()), "cf_rewrite_acc": sum(accuracy[:b]) / b,
                            "cf_acc": sum(accuracy[b:]) / b}


def train_serac(
    model: nn.Module, tok: Any, params: SERACTrainingParams, train: Sequence[EditExample], val: Sequence[EditExample],
    out_dir: str | Path, *, identity: dict[str, Any] | None = None, show_progress: bool = True,
) -> Any:
    """Train SERAC's classifier head and counterfactual blocks into ``out_dir``; resumes a run found there."""
    from lmedit.training import fit_method_task

    return fit_method_task(SERACTask(model, tok, params), params, train, val, out_dir, identity=identity,
                           show_progress=show_progress)


def tiny_setup(model: nn.Module, tok: Any, workdir: Path) -> dict[str, Any]:
    """SERAC on a tiny model: its networks trained for 20 steps on vocabulary-word edits (hashed-words encoder)."""
    from lmedit.smoke import edit_examples, use_smoke_encoder

    archive = Path(workdir) / "serac"
    params = SERACTrainingParams(encoder=use_smoke_encoder(), head_hidden=16, trainable_layers=1, max_steps=20,
                                 batch_size=8, val_every=10, val_examples=16, lr_counterfactual=1e-3)
    train_serac(model, tok, params, edit_examples(tok, 120), edit_examples(tok, 16, seed=1), archive, show_progress=False)
    return {"archive": str(archive)}


register(METHOD, hparams=SERACHyperParams, batch=True, load_edit=load_memory, tiny_setup=tiny_setup,
         trainer=TrainingEntry(SERACTrainingParams, train_serac,
                         "SERAC's scope classifier (a head on all-MiniLM-L6-v2) and counterfactual model (top blocks of a copy)"),
         contract=Contract(effect="output", why="the counterfactual model is trained; on an untrained tiny model it "
                           "answers in-scope queries, but not necessarily with the target"))(apply_serac)
