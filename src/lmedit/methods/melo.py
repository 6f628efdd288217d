"""MELO (Yu et al., AAAI 2024): neuron-indexed dynamic LoRA, routed by a vector database of edit keys.

One LoRA of total rank ``num_block * num_rank_per_block`` sits on the chosen
linear modules (``lora_layers`` x ``lora_modules``, e.g. the MLP input
projections of two blocks), split into ``num_block`` blocks of
``num_rank_per_block`` rows of A and columns of B. Every edit call (one
request, or a batch) gets the next free block and trains only that block:
``n_iter`` Adam steps at ``edit_lr`` (halved every ``lr_step_size`` steps, the
reference's StepLR) on the target tokens of ``prompt + " " + target``, prompt
masked. A block is scaled by ``num_block`` (EasyEdit scales A and B by
``sqrt(num_block)`` each, with ``lora_alpha`` = rank) and starts as EasyEdit's
peft initialisation: A uniform in +-1/sqrt(rank), B zero.

Which block a forward pass uses is decided by a router wrapped around one
more module below the LoRA layers (``layer``/``module``, or ``inner_params``:
EasyEdit's ``grace_layer``). Its key is that module's output (``key_from:
output``, as EasyEdit) or input at the edit prompt's last token. The keys
live in a vector database of clusters (centre, radius, target label, points;
each point is one edit's key and names its block), maintained as GRACE
maintains its codebook (``lmedit.methods.grace``) with MELO's cluster rules:

* no cluster, or the nearest centre farther than its radius + ``init_radius``:
  a new cluster (centre = key, radius ``init_radius``);
* the nearest cluster has the same target: the key joins it as a new point,
  the centre becomes the mean of its points and the radius the largest
  distance of a point from it (at least ``init_radius``);
* a different target: a new cluster, and the two radii are split at half
  the distance (``d/2 - 1e-5`` for the old, ``d/2 + 1e-5`` for the new); the
  old cluster's points now outside its radius are forgotten (a cluster left
  without points keeps its centre as a point with no block).

At inference a position whose key lies within the radius of its nearest
cluster is routed to the block of the nearest (live) point of that cluster,
or to no block; elsewhere the model is the unedited one, bit for bit (the
LoRA output is only added where a block is routed).

Where lmedit differs from EasyEdit (``easyeditor/models/melo``), and why:

* **Which key, which positions.** EasyEdit keys on the routing layer's output
  at the *last token of whatever is fed* (``key_id: -1``: under teacher forcing
  the last answer token) and applies that row's block to every token. That is
  not causal: generation would route on each new token. Here the key is the
  last *prompt* token, and routing is causal: each position uses the block of
  the latest position at or before it whose key falls in a cluster (so a
  prompt routes its answer tokens, under teacher forcing and in generation
  alike, and padding never routes). A cached generation step feeds only its
  new position, which carries the block its row routed to at the end of the
  previous call, so decoding with the key/value cache gives the tokens that
  feeding the whole sequence again gives. The method needs one sequence per
  row (``packed_evaluation=False``), like WISE and DEFER.
* **Training sees what inference will do.** EasyEdit trains with every row
  forced onto the new block; here the new block is forced from each key
  position on, and the earlier positions route as they would after the edit.
* **Labels** match when the target token sequences are equal (EasyEdit compares
  the *sums* of the label ids, so two different targets can collide).
* **Batches.** A batch edit gets one block, as in EasyEdit; its keys are
  placed one after another (EasyEdit adds all keys of the very first batch as
  separate clusters without comparing them with each other).
* **Blocks are allocated as edits need them** (the database never holds more
  than ``num_block``; an edit beyond that is refused with the fix) instead of
  a full-rank LoRA up front; the maths and initialisation are the same.
* **Undo.** Every edit is restored exactly, newest first (the database only
  grows; forgotten points are marked, not deleted). EasyEdit keeps MELO edits
  for good (``KEEP_EDITED_MODEL_ALGS``).
* Not read by EasyEdit's MELO and so not here: ``dist_fn`` (always Euclidean),
  ``val_init``, ``expand_mode``, ``replacement``, ``num_edit_per_block``,
  ``lora_r``/``lora_alpha`` (the rank is num_block x num_rank_per_block, alpha = rank).
  ``lora_dropout`` is fixed at 0 (EasyEdit's file), and the model stays in eval mode.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import nn

from lmedit.adapters import (
    AdapterEditHandle,
    AdapterError,
    AdapterLayer,
    AdapterSite,
    SequenceLogits,
    ensure_adapter,
    frozen_model,
    load_adapter_edit,
    module_path,
    register_adapter_kind,
    remove_adapter,
    site_sizes,
    target_nll,
)
from lmedit.forward import block_of, pad_id_of, tokenize_pair
from lmedit.hparams import HyperParamsError
from lmedit.limits import size
from lmedit.methods.grace import SPLIT_MARGIN
from lmedit.registry import register
from lmedit.requests import EditRequest
from lmedit.spec import (
    ModelSpec, ModelSpecError, get_module, in_out_features, is_linear_like, set_module, wrapped_module,
)

NO_BLOCK = -1  # a point (or a position) routed to no block: the unedited model
LORA_ROLES = ("mlp_in", "mlp_out", "attn_out")


@dataclass
class MeloHyperParams(AdapterSite):
    """EasyEdit's MELO settings (hparams/MELO/gpt2-xl.yaml values as defaults).

    ``layer``/``module`` (or ``inner_params``, EasyEdit's ``grace_layer``): the routing module, whose
    output (``key_from: output``, EasyEdit) or input is the key. ``lora_layers`` x ``lora_modules``
    (roles ``mlp_in``, ``mlp_out``, ``attn_out``), or ``lora_inner_params`` (module paths, EasyEdit's
    ``target_modules``): the modules that carry the LoRA blocks, all in blocks above the router.
    """

    key_from: Literal["output", "input"] = "output"
    lora_layers: list[int] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=lambda: ["mlp_in"])
    lora_inner_params: list[str] = field(default_factory=list)
    num_block: int = 350
    num_rank_per_block: int = 2
    init_radius: float = 0.5
    n_iter: int = 50
    edit_lr: float = 1e-3
    lr_step_size: int = 20
    lr_gamma: float = 0.5

    def validate(self) -> None:
        super().validate()
        if self.num_block < 1 or self.num_rank_per_block < 1:
            raise HyperParamsError("num_block and num_rank_per_block must be at least 1")
        if self.n_iter < 1 or self.lr_step_size < 1:
            raise HyperParamsError("n_iter and lr_step_size must be at least 1")
        if self.edit_lr <= 0 or self.init_radius <= 0:
            raise HyperParamsError("edit_lr and init_radius must be positive")
        if not 0 < self.lr_gamma <= 1:
            raise HyperParamsError("lr_gamma must lie in (0, 1] (EasyEdit halves the rate: 0.5)")
        bad = [m for m in self.lora_modules if m not in LORA_ROLES]
        if bad:
            raise HyperParamsError(f"lora_modules must be roles among {', '.join(LORA_ROLES)}, got {bad}")
        if not self.lora_inner_params and not (self.lora_layers and self.lora_modules):
            raise HyperParamsError(
                "say which modules carry the LoRA blocks: lora_layers: [23, 24] with lora_modules: [mlp_in], "
                "or EasyEdit's target_modules as lora_inner_params: [model.layers.23.mlp.up_proj]"
            )

    def edit_calls_limit(self) -> tuple[int, str]:
        return self.num_block, (f"num_block is {self.num_block} and each edit call takes one block: raise num_block "
                                "(it also sets each block's scale), edit in batches, or lower T")

    def structure(self) -> dict[str, Any]:
        """The settings the adapter's database and blocks depend on; sequential edits must agree on them."""
        return {"key_from": self.key_from, "num_block": self.num_block, "num_rank_per_block": self.num_rank_per_block,
                "init_radius": self.init_radius}


def lora_paths(model: nn.Module, hparams: MeloHyperParams) -> list[str]:
    """The module paths that carry LoRA blocks, in order (resolved through :class:`ModelSpec`)."""
    if hparams.lora_inner_params:
        paths = [module_path(p) for p in hparams.lora_inner_params]
    else:
        spec = ModelSpec.from_model(model)
        roles = {"mlp_in": spec.mlp_in, "mlp_out": lambda i: (spec.mlp_out(i),),
                 "attn_out": lambda i: (spec.attn_out(i),)}
        paths = []
        for layer in hparams.lora_layers:
            for role in hparams.lora_modules:
                try:
                    paths.extend(roles[role](int(layer)))
                except IndexError as exc:
                    raise AdapterError(f"lora_layers: {exc}; choose layers in 0..{spec.num_layers - 1}") from None
    return list(dict.fromkeys(paths))


# --------------------------------------------------------------------------- the LoRA-carrying modules


class MeloLoRALinear(nn.Module):
    """A linear module plus the router's LoRA blocks for it; the blocks and the routing live in the router."""

    def __init__(self, original: nn.Module, path: str, router: "MeloAdapter", index: int) -> None:
        super().__init__()
        self.original = original
        self.path = path
        self.index = index
        object.__setattr__(self, "router", router)  # not a submodule: the router sits elsewhere in the model

    @property
    def wrapped_module(self) -> nn.Module:
        return self.original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original(x)
        route = self.router._route
        if route is None:
            return out
        if x.dim() == 2:
            return self.router.add_blocks(self.index, x[None], out[None], route)[0]
        return self.router.add_blocks(self.index, x, out, route)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, lora={self.index}"


# --------------------------------------------------------------------------- the router and its database


@dataclass
class MeloUndo:
    """What one apply call changed: the database only grows, so sizes, overwritten rows and forgotten points."""

    edit_ids: list[str]
    n_clusters: int
    n_points: int
    n_blocks: int
    modified: dict[int, tuple[torch.Tensor, float]] = field(default_factory=dict)  # cluster row -> centre, radius
    forgotten: list[int] = field(default_factory=list)  # point rows marked forgotten


@dataclass
class _Training:
    """The block being trained: its parameters, the rows' key columns and real tokens in the training batch."""

    params: list[tuple[torch.Tensor, torch.Tensor]]
    key_columns: torch.Tensor
    valid: torch.Tensor


@register_adapter_kind
class MeloAdapter(AdapterLayer):
    """The routing module (its output unchanged), the vector database and the LoRA blocks of every target."""

    kind = "MELO"

    def __init__(self, original: nn.Module, path: str, targets: Sequence[str] = (),
                 config: dict[str, Any] | None = None, target_shapes: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__(original, path)
        self.config = dict(config or MeloHyperParams().structure())
        device = self.weight_device
        d_key = self.out_features if self.config["key_from"] == "output" else self.in_features
        self.register_buffer("centers", torch.zeros(0, d_key, device=device))
        self.register_buffer("radii", torch.zeros(0, device=device))
        self.register_buffer("point_keys", torch.zeros(0, d_key, device=device))
        self.register_buffer("point_cluster", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("point_block", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("point_alive", torch.zeros(0, dtype=torch.bool, device=device))
        self.labels: list[tuple[int, ...]] = []  # per cluster
        self.point_owners: list[str] = []  # per point: the edit id ("" for a centre kept without a block)
        self.block_owners: list[list[str]] = []  # per block: the edit ids trained into it
        self.targets: list[str] = []
        self._set_targets(targets, target_shapes)
        self._route: torch.Tensor | None = None  # (batch, length) block per position, during one forward only
        self._valid: torch.Tensor | None = None  # the model's 2D attention mask, during one forward only
        # per row, the block routed at the last position of the previous call: a cached generation step feeds only
        # its new positions, which route to the latest routed position before them (kept across calls)
        self._carry: torch.Tensor | None = None
        self._continues = False  # this call extends the previous one's sequences (its mask is wider than its input)
        self._training: _Training | None = None
        self._hooks: list[Any] = []
        self._wrappers: list[MeloLoRALinear] = []

    def _set_targets(self, targets: Sequence[str], shapes: Sequence[tuple[int, int]]) -> None:
        self.targets = list(targets)
        for index, (d_in, d_out) in enumerate(shapes):
            self.register_buffer(f"lora_A_{index}", torch.zeros(0, d_in, device=self.weight_device))
            self.register_buffer(f"lora_B_{index}", torch.zeros(d_out, 0, device=self.weight_device))

    @property
    def rank(self) -> int:
        return int(self.config["num_rank_per_block"])

    @property
    def scale(self) -> float:
        return float(self.config["num_block"])  # EasyEdit: sqrt(num_block) on A and on B, lora_alpha / r = 1

    @property
    def n_blocks(self) -> int:
        return len(self.block_owners)

    def lora(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"lora_A_{index}"), getattr(self, f"lora_B_{index}")

    # ---------------------------------------------------------------- the model around it

    def on_insert(self, model: nn.Module) -> None:
        """Wrap every LoRA target, and watch the model's attention mask (padding never routes)."""
        try:
            for index, path in enumerate(self.targets):
                module = get_module(model, path)
                if wrapped_module(module) is not None or not is_linear_like(module):
                    raise AdapterError(f"MELO puts LoRA blocks on linear layers; {path!r} is a {type(module).__name__}"
                                       + (" (another edit's wrapper: restore that edit first)"
                                          if wrapped_module(module) is not None else ""))
                wrapper = MeloLoRALinear(module, path, self, index)
                set_module(model, path, wrapper)
                self._wrappers.append(wrapper)
        except (AdapterError, ModelSpecError):
            self.on_remove(model)
            set_module(model, self.path, self.original)
            raise
        self._hooks = [model.register_forward_pre_hook(self._see_mask, with_kwargs=True),
                       model.register_forward_hook(self._forget)]

    def on_remove(self, model: nn.Module) -> None:
        for wrapper in reversed(self._wrappers):
            if get_module(model, wrapper.path) is wrapper:
                set_module(model, wrapper.path, wrapper.original)
        self._wrappers = []
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._route = self._valid = None

    def _see_mask(self, _model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._valid = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._route = None
        ids = kwargs.get("input_ids", args[0] if args else None)
        fed = ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        # a call whose mask covers more positions than it feeds continues a cached sequence; anything else starts anew
        self._continues = self._valid is not None and fed is not None and self._valid.shape[1] > fed

    def _forget(self, *_args: Any) -> None:
        self._route = self._valid = None
        self._continues = False  # a later call that bypasses the model's pre-hook never reads a stale carry

    # ---------------------------------------------------------------- routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original(x)
        if not len(self.labels) and self._training is None:
            self._route = self._carry = None
            return out
        squeeze = x.dim() == 2
        keys = (out if self.config["key_from"] == "output" else x).detach()
        route = self.route(keys[None] if squeeze else keys)
        self._route = route
        return out

    def route(self, keys: torch.Tensor) -> torch.Tensor:
        """(batch, length) block per position: the block of the latest routed position at or before it, or -1."""
        batch, length = keys.shape[:2]
        valid = self._valid_positions(batch, length, keys.device)
        flat = keys.reshape(-1, keys.shape[-1]).float()
        hit = torch.zeros(batch * length, dtype=torch.bool, device=keys.device)
        block = torch.full((batch * length,), NO_BLOCK, dtype=torch.long, device=keys.device)
        if len(self.labels):
            nearest, cluster = torch.cdist(flat, self.centers).min(dim=1)
            hit = (nearest <= self.radii[cluster]) & valid.reshape(-1)
            if bool(hit.any()):
                block[hit] = self._nearest_point_block(flat[hit], cluster[hit])
        hit, block = hit.reshape(batch, length), block.reshape(batch, length)
        if self._training is not None and tuple(self._training.valid.shape) == (batch, length):
            rows = torch.arange(batch, device=keys.device)
            columns = self._training.key_columns.to(keys.device)
            hit[rows, columns] = True
            block[rows, columns] = self.n_blocks  # the block being trained
        positions = torch.arange(length, device=keys.device).expand(batch, length)
        latest = torch.where(hit, positions, -1).cummax(dim=1).values
        carry = self._carried(batch, keys.device)
        route = torch.where(latest >= 0, block.gather(1, latest.clamp(min=0)), carry[:, None])
        self._carry = route[:, -1].clone()
        return route

    def _carried(self, batch: int, device: torch.device) -> torch.Tensor:
        """The block each row carries in from the previous call of a cached generation, or no block."""
        carry = self._carry
        if self._continues and self._training is None and carry is not None and carry.shape[0] == batch:
            return carry.to(device)
        return torch.full((batch,), NO_BLOCK, dtype=torch.long, device=device)

    def _valid_positions(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        mask = self._training.valid if self._training is not None else self._valid
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        return mask[:, -length:].to(device)  # a cached generation step: the last columns are this call's

    def _nearest_point_block(self, queries: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(queries, self.point_keys)
        member = (self.point_cluster[None, :] == clusters[:, None]) & self.point_alive[None, :]
        return self.point_block[distances.masked_fill(~member, math.inf).argmin(dim=1)]

    def add_blocks(self, index: int, x: torch.Tensor, out: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """``out`` plus each routed position's block of LoRA ``index``; unrouted positions are returned untouched."""
        if route.shape != x.shape[:2]:
            raise AdapterError(f"MELO's routing ({tuple(route.shape)}) does not fit the input of "
                               f"{self.targets[index]!r} ({tuple(x.shape[:2])}); the router at {self.path!r} must run "
                               "in the same forward pass")
        blocks = [block for block in route.unique().tolist() if block != NO_BLOCK]
        if not blocks:
            return out
        lora_a, lora_b = self.lora(index)
        r = self.rank
        out = out.clone()
        for block in blocks:
            if self._training is not None and block == self.n_blocks:
                a, b = self._training.params[index]
            else:
                a, b = lora_a[block * r : (block + 1) * r], lora_b[:, block * r : (block + 1) * r]
            hit = route == block
            rows = torch.nonzero(hit.any(dim=1)).flatten()  # only the sequences routed to this block are computed
            delta = (x[rows] @ a.to(x.dtype).T) @ b.to(x.dtype).T * self.scale
            kept = out[rows]
            out[rows] = torch.where(hit[rows][..., None], kept + delta, kept)
        return out

    # ---------------------------------------------------------------- database maintenance

    def place(self, key: torch.Tensor, label: tuple[int, ...], block: int, owner: str, radius: float,
              undo: MeloUndo) -> str:
        """Add the key to the database as a point of ``block`` (add, expand or split); says which."""
        key = key.float().to(self.centers.device)
        if not len(self.labels):
            self._add_cluster(key, radius, label)
            self._add_point(key, len(self.labels) - 1, block, owner)
            return "added"
        distances = torch.cdist(key[None], self.centers)[0]
        distance, nearest = (float(v) for v in distances.min(dim=0))
        nearest = int(nearest)
        if distance > float(self.radii[nearest]) + radius:
            self._add_cluster(key, radius, label)
            self._add_point(key, len(self.labels) - 1, block, owner)
            return "added"
        self._remember(undo, nearest)
        if self.labels[nearest] == label:
            self._add_point(key, nearest, block, owner)
            members = self._members(nearest)
            center = self.point_keys[members].mean(dim=0)
            spread = float(torch.cdist(self.point_keys[members], center[None]).max())
            self.centers[nearest] = center
            self.radii[nearest] = max(spread, radius)
            return "expanded"
        self._add_cluster(key, distance / 2 + SPLIT_MARGIN, label)
        self._add_point(key, len(self.labels) - 1, block, owner)
        self.radii[nearest] = distance / 2 - SPLIT_MARGIN
        members = self._members(nearest)
        spread = torch.cdist(self.point_keys[members], self.centers[nearest][None])[:, 0]
        outside = members[spread > self.radii[nearest]]
        for row in outside.tolist():
            self.point_alive[row] = False
            undo.forgotten.append(row)
        if len(outside) == len(members):
            self._add_point(self.centers[nearest].clone(), nearest, NO_BLOCK, "")
        return "split"

    def _members(self, cluster: int) -> torch.Tensor:
        return torch.nonzero((self.point_cluster == cluster) & self.point_alive).flatten()

    def _remember(self, undo: MeloUndo, cluster: int) -> None:
        if cluster < undo.n_clusters and cluster not in undo.modified:
            undo.modified[cluster] = (self.centers[cluster].clone(), float(self.radii[cluster]))

    def _add_cluster(self, center: torch.Tensor, radius: float, label: tuple[int, ...]) -> None:
        self.centers = torch.cat([self.centers, center[None]])
        self.radii = torch.cat([self.radii, torch.tensor([radius], device=self.radii.device)])
        self.labels.append(label)

    def _add_point(self, key: torch.Tensor, cluster: int, block: int, owner: str) -> None:
        device = self.point_keys.device
        self.point_keys = torch.cat([self.point_keys, key[None]])
        self.point_cluster = torch.cat([self.point_cluster, torch.tensor([cluster], device=device)])
        self.point_block = torch.cat([self.point_block, torch.tensor([block], device=device)])
        self.point_alive = torch.cat([self.point_alive, torch.tensor([True], device=device)])
        self.point_owners.append(owner)

    def add_block(self, params: Sequence[tuple[torch.Tensor, torch.Tensor]], owners: Sequence[str]) -> None:
        for index, (a, b) in enumerate(params):
            lora_a, lora_b = self.lora(index)
            setattr(self, f"lora_A_{index}", torch.cat([lora_a, a.detach().to(lora_a)]))
            setattr(self, f"lora_B_{index}", torch.cat([lora_b, b.detach().to(lora_b)], dim=1))
        self.block_owners.append(list(owners))

    # ---------------------------------------------------------------- undo

    def undo(self, record: MeloUndo) -> None:
        """Put the database and blocks back as they were before ``record``'s edit (newest first)."""
        if not any(e in self.edit_log for e in record.edit_ids):
            return
        for index in range(len(self.targets)):
            lora_a, lora_b = self.lora(index)
            setattr(self, f"lora_A_{index}", lora_a[: record.n_blocks * self.rank].clone())
            setattr(self, f"lora_B_{index}", lora_b[:, : record.n_blocks * self.rank].clone())
        del self.block_owners[record.n_blocks:]
        for name in ("point_keys", "point_cluster", "point_block", "point_alive"):
            setattr(self, name, getattr(self, name)[: record.n_points].clone())
        del self.point_owners[record.n_points:]
        for row in record.forgotten:
            if row < record.n_points:
                self.point_alive[row] = True
        for row, (center, radius) in record.modified.items():
            self.centers[row] = center
            self.radii[row] = radius
        self.centers = self.centers[: record.n_clusters].clone()
        self.radii = self.radii[: record.n_clusters].clone()
        del self.labels[record.n_clusters:]
        self.edit_log = [e for e in self.edit_log if e not in record.edit_ids]

    # ---------------------------------------------------------------- save / load

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {name: getattr(self, name) for name in
                   ("centers", "radii", "point_keys", "point_cluster", "point_block", "point_alive")}
        for index in range(len(self.targets)):
            tensors[f"lora_A_{index}"], tensors[f"lora_B_{index}"] = self.lora(index)
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return {"config": dict(self.config), "targets": list(self.targets), "labels": [list(l) for l in self.labels],
                "point_owners": list(self.point_owners), "block_owners": [list(o) for o in self.block_owners]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.config = dict(meta["config"])
        targets = list(meta["targets"])
        expected = {"centers", "radii", "point_keys", "point_cluster", "point_block", "point_alive"}
        expected |= {f"lora_{m}_{i}" for i in range(len(targets)) for m in "AB"}
        if set(tensors) != expected:
            raise AdapterError(f"saved MELO state holds {sorted(tensors)}, expected {sorted(expected)}")
        shapes = [(int(tensors[f"lora_A_{i}"].shape[1]), int(tensors[f"lora_B_{i}"].shape[0]))
                  for i in range(len(targets))]
        self._set_targets(targets, shapes)
        device = self.weight_device
        for name, tensor in tensors.items():
            setattr(self, name, tensor.to(device))
        self.labels = [tuple(int(t) for t in label) for label in meta["labels"]]
        self.point_owners = [str(o) for o in meta["point_owners"]]
        self.block_owners = [list(o) for o in meta["block_owners"]]
        points = {len(self.point_keys), len(self.point_cluster), len(self.point_block), len(self.point_alive),
                  len(self.point_owners)}
        blocks = {self.lora(i)[0].shape[0] for i in range(len(targets))} | {len(self.block_owners) * self.rank}
        if len(points) != 1 or len(blocks) != 1 or not len(self.centers) == len(self.radii) == len(self.labels):
            raise AdapterError("saved MELO database is inconsistent: its tables differ in length")

    def extra_repr(self) -> str:
        return f"path={self.path!r}, edits={len(self.edit_log)}, clusters={len(self.labels)}, blocks={self.n_blocks}"


class _TrainingBlock:
    """Context: the router routes each training row onto the block being trained from its key column on."""

    def __init__(self, adapter: MeloAdapter, state: _Training) -> None:
        self.adapter, self.state = adapter, state

    def __enter__(self) -> None:
        self.adapter._training = self.state

    def __exit__(self, *exc: Any) -> None:
        self.adapter._training = None
        self.adapter._route = None


# --------------------------------------------------------------------------- the method


def melo_kept_state(model: nn.Module, hparams: MeloHyperParams, edits: int) -> tuple[int, str, str]:
    """Per edit: a LoRA block (float32 rows of A and columns of B on every target), its key as a point and
    possibly a cluster centre, and an undo record that may copy one centre."""
    path, d_in, d_out, _ = site_sizes(model, hparams)
    d_key = d_out if hparams.key_from == "output" else d_in
    block = 0
    for target in lora_paths(model, hparams):
        module = get_module(model, target)
        t_in, t_out = in_out_features(getattr(module, "original", module))
        block += 4 * hparams.num_rank_per_block * (t_in + t_out)
    per_edit = block + 3 * 4 * d_key + 128
    return (edits * per_edit, f"a LoRA block and database rows at {path} per edit ({size(per_edit)})",
            "run on a machine with more memory")


def _tiny_setup(model: nn.Module, tok: Any, workdir: Any) -> dict[str, Any]:
    """The router at the lowest block's MLP output, LoRA blocks on the MLP input projections of the two above."""
    top = ModelSpec.from_model(model).num_layers - 1
    return {"layer": top - 2, "module": "mlp_out", "key_from": "input", "lora_layers": [top - 1, top],
            "lora_modules": ["mlp_in"], "num_block": 8, "num_rank_per_block": 2, "init_radius": 0.005,
            "n_iter": 30, "edit_lr": 2e-2}


# Routing is causal: teacher-forced scores are what generation gives, so tables need not add generation scores; the
# carried block makes cached decoding route as uncached decoding does.
@register("MELO", hparams=MeloHyperParams, batch=True, packed_evaluation=False, cached_generation=True,
          load_edit=load_adapter_edit, kept_state=melo_kept_state, tiny_setup=_tiny_setup)
def apply_melo(
    model: nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: MeloHyperParams
) -> AdapterEditHandle:
    """MELO: a LoRA block per edit on chosen modules, switched on by a vector database of edit keys (lifelong)."""
    path = hparams.site_path(model)
    targets = lora_paths(model, hparams)
    _check_targets(model, path, targets)
    started = time.perf_counter()
    pairs = [tokenize_pair(tok, r.prompt, r.target_new) for r in requests]
    adapter = ensure_adapter(model, path, MeloAdapter, lambda original: MeloAdapter(
        original, path, targets, hparams.structure(), [_io(model, t) for t in targets]))
    record: MeloUndo | None = None
    try:
        if adapter.config != hparams.structure() or adapter.targets != targets:
            raise AdapterError(
                f"the MELO adapter at {path!r} holds blocks for {adapter.targets} with {adapter.config}; this edit "
                f"asks for {targets} with {hparams.structure()} (restore the earlier MELO edits first)"
            )
        if adapter.n_blocks >= hparams.num_block:
            raise AdapterError(f"MELO has used all {hparams.num_block} blocks (one per edit call); raise num_block, "
                               "edit in batches, or restore earlier edits")
        keys = _keys(model, adapter, pairs)
        edit_ids = [adapter.new_edit_id(r.case_id) for r in requests]
        record = MeloUndo(list(edit_ids), len(adapter.labels), len(adapter.point_keys), adapter.n_blocks)
        adapter.edit_log.extend(edit_ids)
        actions = [adapter.place(key, pair.target_ids, adapter.n_blocks, edit_id, hparams.init_radius, record)
                   for key, pair, edit_id in zip(keys, pairs, edit_ids)]
        params, losses = _train_block(model, tok, adapter, pairs, hparams)
        adapter.add_block(params, edit_ids)
    except BaseException:
        if record is not None:
            adapter.undo(record)
        if not adapter.edit_log:
            remove_adapter(model, adapter)  # a first edit that failed leaves no adapter behind
        raise
    handle = AdapterEditHandle("MELO", model, adapter, edit_ids, [record])
    handle.info = {"seconds": time.perf_counter() - started, "losses": losses, "action": ",".join(actions),
                   "block": adapter.n_blocks - 1, "n_clusters": len(adapter.labels),
                   "forgotten": len(record.forgotten), "edit_ids": edit_ids}
    return handle


def _io(model: nn.Module, path: str) -> tuple[int, int]:
    module = get_module(model, path)
    return in_out_features(wrapped_module(module) or module)


def _check_targets(model: nn.Module, router: str, targets: Sequence[str]) -> None:
    """Every LoRA target is a linear layer in a block above the router's (its routing must come first)."""
    spec = ModelSpec.from_model(model)
    router_block = block_of(spec, router)
    for target in targets:
        try:
            module = get_module(model, target)
        except ModelSpecError as exc:
            raise AdapterError(f"MELO: no LoRA target {target!r} in this model ({exc})") from None
        module = module.original if isinstance(module, MeloLoRALinear) else module
        if not is_linear_like(module):
            raise AdapterError(f"MELO: LoRA target {target!r} is a {type(module).__name__}, not a linear layer")
        block = block_of(spec, target)
        if router_block is None or block is None or block <= router_block:
            raise AdapterError(
                f"MELO: LoRA target {target!r} (block {block}) must sit in a block above the router {router!r} "
                f"(block {router_block}), which decides the block before the LoRA layers run; "
                "choose lora_layers above layer"
            )


def _keys(model: nn.Module, adapter: MeloAdapter, pairs: Sequence[Any]) -> list[torch.Tensor]:
    """Each edit's key: the router's output (or input) at the prompt's last token, one forward per prompt."""
    seen: list[torch.Tensor] = []
    use_output = adapter.config["key_from"] == "output"
    hook = adapter.register_forward_hook(
        lambda _m, args, out: seen.append((out if use_output else args[0]).detach()))
    device = next(model.parameters()).device
    keys = []
    try:
        with torch.no_grad():
            for pair in pairs:
                seen.clear()
                model(input_ids=torch.tensor([list(pair.ids[: pair.prompt_len])], device=device), use_cache=False)
                if not seen:
                    raise AdapterError(f"the model never called the MELO router at {adapter.path!r}; "
                                       "check layer/module")
                keys.append(seen[0].reshape(-1, seen[0].shape[-1])[pair.prompt_len - 1].float().clone())
    finally:
        hook.remove()
    return keys


def _train_block(
    model: nn.Module, tok: Any, adapter: MeloAdapter, pairs: Sequence[Any], hparams: MeloHyperParams
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """``n_iter`` Adam steps (StepLR) of the new block only, on every pair's target tokens (prompt masked)."""
    device, rank = adapter.weight_device, hparams.num_rank_per_block
    bound = 1.0 / math.sqrt(hparams.num_block * rank)  # peft's kaiming init on the full-rank A
    params = []
    for index in range(len(adapter.targets)):
        lora_a, lora_b = adapter.lora(index)
        a = torch.empty(rank, lora_a.shape[1], device=device).uniform_(-bound, bound)
        params.append((nn.Parameter(a), nn.Parameter(torch.zeros(lora_b.shape[0], rank, device=device))))
    sequences = [list(p.ids) for p in pairs]
    width = max(len(s) for s in sequences)
    key_columns = torch.tensor([width - len(p.ids) + p.prompt_len - 1 for p in pairs], device=device)
    valid = torch.zeros(len(pairs), width, dtype=torch.bool, device=device)
    for row, p in enumerate(pairs):
        valid[row, width - len(p.ids):] = True
    targets = [t for p in pairs for t in p.target_ids]
    flat = [t for pair in params for t in pair]
    losses: list[float] = []
    with frozen_model(model), _TrainingBlock(adapter, _Training(params, key_columns, valid)):
        logits_of = SequenceLogits(model, adapter.path, sequences,
                                   [range(p.prompt_len - 1, len(p.ids) - 1) for p in pairs], pad_id_of(tok))
        optimizer = torch.optim.Adam(flat, lr=hparams.edit_lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hparams.lr_step_size, gamma=hparams.lr_gamma)
        for _ in range(hparams.n_iter):
            loss = target_nll(logits_of(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    return [(a.detach(), b.detach()) for a, b in params], losses

