"""GRACE (Hartvigsen et al., NeurIPS 2023): a discrete key-value codebook wrapped around one layer.

Each codebook entry holds a key (the wrapped layer's input at the last
prompt token of an edit), a value (a replacement for the layer's output,
trained with ``n_iter`` Adam steps at ``edit_lr`` so that the model produces
the target) and a deferral radius. An input whose layer input lies within
an entry's radius gets that entry's value instead of the layer's output.

Codebook maintenance for a new edit with query q and label y (its target
tokens), against the nearest entry j at distance d, as in the paper and the
reference code:

* no entry, or ``d > eps + radius_j``: add an entry (q, radius ``eps``);
* otherwise, a different label: add an entry and *split* the two balls,
  ``radius_j = d/2 - 1e-5`` and ``radius_new = d/2``;
* otherwise, the same label: *expand* entry j to cover q (``coverage``:
  ``radius_j = d``; ``moving_avg``: also move its key halfway to q), and
  retrain its value.

Where this implementation deliberately differs (see docs/lifelong.md):

* keys, labels, radii and owning edit ids are kept in one aligned table
  (EasyEdit prepends labels but appends keys), so ``rollback(edit_id)``
  can remove any edit, not only the last one;
* inference compares *every position's* layer input with the keys instead of
  one remembered "key token". For a causal model the layer input at the last
  prompt token is the same whether the model sees the prompt alone,
  the prompt plus a teacher-forced answer, or a cached generation prefix, so
  ``replace_last`` gives the same edit under teacher forcing, generation
  and any padding or batch layout, with no state kept between calls;
* ``replace_prompt`` includes the key token itself (the reference replaces
  only the tokens before it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import nn

from lmedit.adapters import (
    AdapterSite,
    load_adapter_edit,
    AdapterEditHandle,
    AdapterError,
    AdapterLayer,
    SequenceLogits,
    adapters_of,
    ensure_adapter,
    find_adapter,
    frozen_model,
    register_adapter_kind,
    remove_adapter,
    site_sizes,
    target_nll,
)
from lmedit.forward import tokenize_pair
from lmedit.hparams import HyperParamsError
from lmedit.limits import size
from lmedit.registry import register
from lmedit.requests import EditRequest

Replacement = Literal["replace_last", "replace_all", "replace_prompt"]
SPLIT_MARGIN = 1e-5  # the reference's gap between two split balls


@dataclass
class GraceHyperParams(AdapterSite):
    """EasyEdit's GRACE fields that the algorithm reads (``dist_fn`` accepts only ``euc``, as there)."""

    edit_lr: float = 1.0
    n_iter: int = 50
    eps: float = 1.0
    dist_fn: Literal["euc"] = "euc"
    val_init: Literal["cold", "warm"] = "cold"
    replacement: Replacement = "replace_last"
    eps_expand: Literal["coverage", "moving_avg", "moving_average"] = "coverage"

    def validate(self) -> None:
        super().validate()
        if self.n_iter < 1:
            raise HyperParamsError("n_iter must be at least 1")
        if self.edit_lr <= 0 or self.eps <= 0:
            raise HyperParamsError("edit_lr and eps must be positive")


@dataclass
class GraceUndo:
    """What one edit changed: entries it created, and the prior contents of entries it modified."""

    edit_id: str
    created: list[int]
    modified: dict[int, tuple[torch.Tensor, torch.Tensor, float, list[str]]]


@register_adapter_kind
class GraceAdapter(AdapterLayer):
    """The codebook: rows of ``keys``/``values``/``radii`` aligned with ``entry_ids``, ``labels``, ``owners``."""

    kind = "GRACE"

    def __init__(self, original: nn.Module, path: str, replacement: Replacement = "replace_last") -> None:
        super().__init__(original, path)
        self.replacement: Replacement = replacement
        self.register_buffer("keys", torch.zeros(0, self.in_features, device=self.weight_device))
        self.register_buffer("values", torch.zeros(0, self.out_features, device=self.weight_device, dtype=self.weight_dtype))
        self.register_buffer("radii", torch.zeros(0, device=self.weight_device))
        self.entry_ids: list[int] = []
        self.labels: list[tuple[int, ...]] = []
        self.owners: list[list[str]] = []
        self.targets: dict[str, str] = {}
        self.next_entry_id = 0
        self._training: tuple[int, int, torch.Tensor] | None = None  # (key position, entry row, trainable value)

    def __len__(self) -> int:
        return len(self.entry_ids)

    # ---------------------------------------------------------------- inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original(x)
        if not self.entry_ids and self._training is None:
            return out
        squeeze = x.dim() == 2
        if squeeze:
            x, out = x[None], out[None]
        hit, row = self.route(x)
        table = self.values.to(out.dtype)
        if self._training is not None:
            position, entry, value = self._training
            hit, row = hit.clone(), row.clone()
            if self.replacement != "replace_last":
                hit[:, position + 1 :] = False  # the key token anchors the replaced span while training
            hit[:, position] = True
            row[:, position] = len(table)
            table = torch.cat([table, value[None].to(out.dtype)])
        out = _replace(out, hit, row, table, self.replacement)
        return out[0] if squeeze else out

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position: whether its input lies in an entry's ball, and which (the nearest) entry."""
        batch, length = x.shape[:2]
        if not self.entry_ids:
            empty = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
            return empty, torch.zeros(batch, length, dtype=torch.long, device=x.device)
        distances = torch.cdist(x.reshape(-1, x.shape[-1]).float(), self.keys.float())
        nearest, row = distances.min(dim=1)
        hit = nearest <= self.radii[row]
        return hit.reshape(batch, length), row.reshape(batch, length)

    # ---------------------------------------------------------------- codebook maintenance

    def _row(self, entry_id: int) -> int | None:
        try:
            return self.entry_ids.index(entry_id)
        except ValueError:
            return None

    def _add(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: tuple[int, ...], owner: str) -> int:
        self.keys = torch.cat([self.keys, key.detach().float()[None].to(self.keys.device)])
        self.values = torch.cat([self.values, value.detach()[None].to(self.values)])
        self.radii = torch.cat([self.radii, torch.tensor([radius], device=self.radii.device)])
        self.entry_ids.append(self.next_entry_id)
        self.labels.append(label)
        self.owners.append([owner])
        self.next_entry_id += 1
        return len(self.entry_ids) - 1

    def _delete_rows(self, rows: Sequence[int]) -> None:
        keep = [i for i in range(len(self.entry_ids)) if i not in set(rows)]
        index = torch.tensor(keep, dtype=torch.long, device=self.keys.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self.radii = self.radii.index_select(0, index)
        self.entry_ids = [self.entry_ids[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self.owners = [self.owners[i] for i in keep]

    def _remember(self, undo: GraceUndo, row: int) -> None:
        entry = self.entry_ids[row]
        if entry not in undo.modified and entry not in undo.created:
            undo.modified[entry] = (
                self.keys[row].clone(), self.values[row].clone(), float(self.radii[row]), list(self.owners[row])
            )

    def place(
        self, query: torch.Tensor, label: tuple[int, ...], edit_id: str, eps: float, eps_expand: str,
        new_value: torch.Tensor, undo: GraceUndo,
    ) -> tuple[int, str]:
        """Add, split or expand for a new edit; returns the row whose value is trained and what was done."""
        if not self.entry_ids:
            row = self._add(query, new_value, eps, label, edit_id)
            undo.created.append(self.entry_ids[row])
            return row, "added"
        distances = torch.cdist(query.float()[None], self.keys.float())[0]
        distance, nearest = (float(v) for v in distances.min(dim=0))
        nearest = int(nearest)
        if distance > eps + float(self.radii[nearest]):
            row = self._add(query, new_value, eps, label, edit_id)
            undo.created.append(self.entry_ids[row])
            return row, "added"
        if self.labels[nearest] != label:
            self._remember(undo, nearest)
            row = self._add(query, new_value, distance / 2, label, edit_id)
            undo.created.append(self.entry_ids[row])
            self.radii[nearest] = distance / 2 - SPLIT_MARGIN
            return row, "split"
        self._remember(undo, nearest)
        self.owners[nearest].append(edit_id)
        if distance > float(self.radii[nearest]):
            if eps_expand in ("moving_avg", "moving_average"):
                self.keys[nearest] = 0.5 * self.keys[nearest] + 0.5 * query.float().to(self.keys.device)
            self.radii[nearest] = distance
            return nearest, "expanded"
        return nearest, "reused"

    # ---------------------------------------------------------------- undo and rollback

    def undo(self, record: GraceUndo) -> None:
        if record.edit_id not in self.edit_log:
            return  # rolled back already
        created = [r for r, e in enumerate(self.entry_ids) if e in record.created]
        if created:
            self._delete_rows(created)
        for entry, (key, value, radius, owners) in record.modified.items():
            row = self._row(entry)
            if row is None:
                continue
            self.keys[row] = key
            self.values[row] = value
            self.radii[row] = radius
            self.owners[row] = list(owners)
        self.edit_log.remove(record.edit_id)
        self.targets.pop(record.edit_id, None)

    def rollback(self, edit_id: str) -> None:
        """Remove one edit, wherever it is in the sequence; the other edits keep working.

        Entries the edit owns alone are deleted. An entry that later edits
        with the same target expanded into stays, for those edits. Radii that
        were split against the removed entry stay split (never larger than
        before, so no other edit changes behaviour).
        """
        if edit_id not in self.edit_log:
            raise AdapterError(f"GRACE holds no edit {edit_id!r}; its edits are {self.edit_log}")
        orphaned = []
        for row, owners in enumerate(self.owners):
            if edit_id in owners:
                owners.remove(edit_id)
                if not owners:
                    orphaned.append(row)
        if orphaned:
            self._delete_rows(orphaned)
        self.edit_log.remove(edit_id)
        self.targets.pop(edit_id, None)

    # ---------------------------------------------------------------- training context

    def train_value(self, position: int, row: int, value: torch.Tensor) -> "_TrainingValue":
        return _TrainingValue(self, position, row, value)

    # ---------------------------------------------------------------- save / load

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "radii": self.radii}

    def state_meta(self) -> dict[str, Any]:
        return {
            "replacement": self.replacement,
            "entry_ids": list(self.entry_ids),
            "labels": [list(label) for label in self.labels],
            "owners": [list(o) for o in self.owners],
            "targets": dict(self.targets),
            "next_entry_id": self.next_entry_id,
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.replacement = meta["replacement"]
        self.keys = tensors["keys"].to(self.weight_device)
        self.values = tensors["values"].to(self.weight_device, self.weight_dtype)
        self.radii = tensors["radii"].to(self.weight_device)
        self.entry_ids = [int(e) for e in meta["entry_ids"]]
        self.labels = [tuple(int(t) for t in label) for label in meta["labels"]]
        self.owners = [list(o) for o in meta["owners"]]
        self.targets = dict(meta.get("targets", {}))
        self.next_entry_id = int(meta["next_entry_id"])
        if not (len(self.keys) == len(self.values) == len(self.radii) == len(self.entry_ids) == len(self.labels)):
            raise AdapterError("saved GRACE codebook is inconsistent: keys, values, radii and labels differ in length")


class _TrainingValue:
    """Context: the adapter replaces the key position with ``value`` (being trained) for its forwards."""

    def __init__(self, adapter: GraceAdapter, position: int, row: int, value: torch.Tensor) -> None:
        self.adapter, self.state = adapter, (position, row, value)

    def __enter__(self) -> None:
        self.adapter._training = self.state

    def __exit__(self, *exc: Any) -> None:
        self.adapter._training = None


def _replace(out: torch.Tensor, hit: torch.Tensor, row: torch.Tensor, table: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply the replacement rule per sequence (row of the batch); pure, so evaluation cannot change state."""
    if not bool(hit.any()):
        return out
    if mode == "replace_last":
        return torch.where(hit[..., None], table[row], out)
    positions = torch.arange(hit.shape[1], device=hit.device)
    last = torch.where(hit, positions, -1).max(dim=1).values  # the last matching token of each sequence
    matched = last >= 0
    anchor = row.gather(1, last.clamp(min=0)[:, None]).squeeze(1)
    if mode == "replace_prompt":
        span = (positions[None] <= last[:, None]) & matched[:, None]
    else:
        span = matched[:, None].expand_as(hit)
    return torch.where(span[..., None], table[anchor][:, None, :], out)


# --------------------------------------------------------------------------- the method


def grace_kept_state(model: nn.Module, hparams: GraceHyperParams, edits: int) -> tuple[int, str, str]:
    """A codebook row per edit at most (a float32 key of the layer's input, a value of its output, a radius),
    and its undo record, which may hold a copy of one earlier row."""
    path, d_in, d_out, value_bytes = site_sizes(model, hparams)
    per_edit = 2 * (4 * d_in + value_bytes * d_out + 64)
    return edits * per_edit, f"a codebook row at {path} per edit ({size(per_edit)})", "run on a machine with more memory"


@register("GRACE", hparams=GraceHyperParams, batch=True, packed_evaluation=False, generation_scored=True,
          load_edit=load_adapter_edit, kept_state=grace_kept_state,
          tiny_setup=lambda model, tok, workdir: {"layer": -1, "n_iter": 25, "edit_lr": 1.0, "eps": 1.0})
def apply_grace(model: nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: GraceHyperParams) -> AdapterEditHandle:
    """GRACE: a codebook of keys, trained values and deferral radii around one layer (lifelong editing)."""
    path = hparams.site_path(model)
    adapter = ensure_adapter(model, path, GraceAdapter, lambda original: GraceAdapter(original, path, hparams.replacement))
    if adapter.replacement != hparams.replacement:
        raise AdapterError(
            f"the GRACE adapter at {path!r} replaces with {adapter.replacement!r}; "
            f"a later edit cannot switch to {hparams.replacement!r} (restore the earlier edits first)"
        )
    edit_ids, records, details = [], [], []
    started = time.perf_counter()
    try:
        for request in requests:
            edit_id, record, detail = _edit_one(model, tok, adapter, request, hparams)
            edit_ids.append(edit_id)
            records.append(record)
            details.append(detail)
    except BaseException:
        for record in reversed(records):
            adapter.undo(record)
        if not adapter.edit_log:
            remove_adapter(model, adapter)
        raise
    handle = AdapterEditHandle("GRACE", model, adapter, edit_ids, records)
    handle.info = {
        "seconds": time.perf_counter() - started,
        "losses": details[-1]["losses"],
        "action": ",".join(d["action"] for d in details),
        "n_keys": len(adapter),
        "edit_ids": edit_ids,
    }
    return handle


def _edit_one(
    model: nn.Module, tok: Any, adapter: GraceAdapter, request: EditRequest, hparams: GraceHyperParams
) -> tuple[str, GraceUndo, dict[str, Any]]:
    pair = tokenize_pair(tok, request.prompt, request.target_new)
    position = pair.prompt_len - 1
    query = _layer_input(model, adapter, pair.ids, position)
    if hparams.val_init == "warm":
        with torch.no_grad():
            initial = adapter.original(query[None].to(adapter.weight_dtype))[0]
    else:
        initial = torch.rand(adapter.out_features, device=adapter.weight_device)
    edit_id = adapter.new_edit_id(request.case_id)
    undo = GraceUndo(edit_id, [], {})
    row, action = adapter.place(query, pair.target_ids, edit_id, hparams.eps, hparams.eps_expand, initial, undo)
    adapter.edit_log.append(edit_id)
    adapter.targets[edit_id] = request.target_new
    try:
        losses = _train_value(model, adapter, pair.ids, pair.target_ids, position, row, hparams)
    except BaseException:
        adapter.undo(undo)
        raise
    return edit_id, undo, {"losses": losses, "action": action}


def _train_value(
    model: nn.Module, adapter: GraceAdapter, ids: Sequence[int], target_ids: Sequence[int], position: int, row: int,
    hparams: GraceHyperParams,
) -> list[float]:
    """``n_iter`` Adam steps on the chosen entry's value only, then store it in the codebook."""
    value = nn.Parameter(adapter.values[row].detach().float().clone())
    losses: list[float] = []
    with frozen_model(model), adapter.train_value(position, row, value):
        logits_of = SequenceLogits(model, adapter.path, [ids], [range(position, len(ids) - 1)])
        optimizer = torch.optim.Adam([value], lr=hparams.edit_lr)
        for _ in range(hparams.n_iter):
            loss = target_nll(logits_of(), target_ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    with torch.no_grad():
        adapter.values[row] = value.detach().to(adapter.values.dtype)
    return losses


def _layer_input(model: nn.Module, adapter: GraceAdapter, ids: Sequence[int], position: int) -> torch.Tensor:
    """The wrapped layer's input at ``position`` of ``ids`` (the edit's key), from one forward pass."""
    seen: list[torch.Tensor] = []
    hook = adapter.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([list(ids)], device=next(model.parameters()).device), use_cache=False)
    finally:
        hook.remove()
    if not seen:
        raise AdapterError(f"the model never called the GRACE layer at {adapter.path!r}; check inner_params")
    return seen[0].reshape(-1, seen[0].shape[-1])[position].float().clone()


def rollback(model: nn.Module, edit_id: str) -> None:
    """Remove one GRACE edit by id (``handle.edit_ids``) from the model; the other edits keep working.

    When it was the adapter's last edit, the original layer is put back. The
    edit's handle then has nothing left to undo and its ``restore()`` is a no-op.
    """
    holders = [a for a in adapters_of(model, GraceAdapter) if edit_id in a.edit_log]
    if not holders:
        known = [e for a in adapters_of(model, GraceAdapter) for e in a.edit_log]
        raise AdapterError(f"no GRACE edit {edit_id!r} in this model; its GRACE edits are {known}")
    for adapter in holders:
        adapter.rollback(edit_id)
        if not adapter.edit_log and find_adapter(model, adapter.path) is adapter:
            remove_adapter(model, adapter)
