"""Architecture map: where the blocks, MLPs and projections of a causal LM live.

Editing methods need to know which module is "the MLP down-projection of layer
i" or "the final norm". Hard-coding those paths per model family breaks on every
new checkpoint, so `ModelSpec.from_model` derives them from the module tree and
the config alone: the blocks are the ModuleList whose length is the configured
layer count, the MLP is the block child that maps hidden -> intermediate ->
hidden, and so on. Module names are consulted only to break a tie between
shape-equivalent candidates. When detection fails, the error says what was
missing; an explicit `ModelSpec(...)` (or `ModelSpec.from_dict`, e.g. from a
YAML preset) covers unusual models.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Iterator, Mapping

from torch import nn

__all__ = [
    "ModelSpec",
    "ModelSpecError",
    "get_module",
    "get_parameter",
    "in_out_features",
    "is_linear_like",
]


class ModelSpecError(ValueError):
    """The architecture map could not be built or does not fit the model."""


_EXPLICIT_HINT = (
    "Pass an explicit spec instead: ModelSpec(layers_path=..., mlp_out_template=..., ...) "
    "or ModelSpec.from_dict({...}) (e.g. loaded from YAML)."
)

# Config attribute names, in order of preference. These are config conventions,
# not model-name checks.
_NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
_INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim")

# Name fragments used ONLY to break ties between shape-equivalent candidates.
_MLP_NAME_HINTS = ("mlp", "ffn", "feed_forward", "feedforward")
_ATTN_NAME_HINTS = ("attn", "attention")
# Block children that normalise the MLP's output before it joins the residual stream (Gemma 2/3, OLMo 2). A norm
# has no shape to recognise it by among the block's other norms, so here the name is the only evidence.
_MLP_OUTPUT_NORM_NAMES = ("post_feedforward_layernorm",)


# --------------------------------------------------------------------------- helpers


@lru_cache(maxsize=1)
def _conv1d_class() -> type | None:
    """Import lazily so that importing lmedit.spec stays cheap and side-effect free."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _is_conv1d(module: nn.Module) -> bool:
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_linear_like(module: nn.Module) -> bool:
    """True for nn.Linear (and subclasses) and GPT-2 style Conv1D."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module.

    Conv1D stores its weight as [in, out] while nn.Linear uses [out, in]; this
    hides the difference so shape logic can treat both alike.
    """
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    if _is_conv1d(module):
        rows, cols = module.weight.shape
        return int(rows), int(cols)
    raise TypeError(f"{type(module).__name__} is not linear-like (nn.Linear or Conv1D)")


def get_module(model: nn.Module, path: str) -> nn.Module:
    """Submodule at a dotted path ("" is the model itself), with a readable error."""
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ModelSpecError(f"{type(model).__name__} has no submodule {path!r}: {exc}") from None


def wrapped_module(module: nn.Module) -> nn.Module | None:
    """The layer a wrapper (an adapter edit such as GRACE's) holds in its place, or None for a plain module."""
    inner = getattr(module, "wrapped_module", None)
    return inner if isinstance(inner, nn.Module) else None


@contextmanager
def layers_unwrapped(model: nn.Module) -> Iterator[None]:
    """Put every wrapped layer back in its wrapper's place for the duration, so the model's own layout shows.

    An adapter edit replaces one projection by a wrapper; reading the layout
    with it in place would find a block unlike the others.
    """
    wrappers = [(path, module) for path, module in model.named_modules() if path and wrapped_module(module) is not None]
    for path, wrapper in wrappers:
        set_module(model, path, wrapped_module(wrapper))
    try:
        yield
    finally:
        for path, wrapper in reversed(wrappers):
            set_module(model, path, wrapper)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at a dotted path, replacing what is there."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(model, parent_path), name, module)


def held_by_wrapper(model: nn.Module, param_path: str) -> bool:
    """True when the module that owns ``param_path`` has been replaced by a wrapper (an adapter edit)."""
    try:
        module = model.get_submodule(param_path.rpartition(".")[0])
    except AttributeError:
        return False
    return wrapped_module(module) is not None


def get_parameter(model: nn.Module, path: str) -> nn.Parameter:
    """Parameter at a dotted path such as "model.layers.3.mlp.down_proj.weight"."""
    module_path, _, name = path.rpartition(".")
    module = get_module(model, module_path)
    param = module._parameters.get(name) if name else None
    if param is None and held_by_wrapper(model, path):
        raise ModelSpecError(
            f"{module_path!r} is held by a {type(module).__name__} (an adapter edit is applied there); "
            "restore that edit first, or edit another layer"
        )
    if not isinstance(param, nn.Parameter):
        raise ModelSpecError(f"{type(model).__name__} has no parameter {path!r}")
    return param


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _config_int(config: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ModelSpecError(
            f"{type(model).__name__} has no .config, so the layer count and sizes are unknown. "
            + _EXPLICIT_HINT
        )
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter()
        except Exception:  # odd configs: fall back to the top-level one
            return config
    return config


def _linear_leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module, int, int]]:
    """(path, module, in, out) for every linear-like module under `module`, registration order."""
    out = []
    for name, sub in module.named_modules():
        if is_linear_like(sub):
            fin, fout = in_out_features(sub)
            out.append((_join(prefix, name), sub, fin, fout))
    return out


def _tie_break(candidates: list[str], hints: tuple[str, ...]) -> list[str]:
    """Keep the candidates whose name contains a hint, if that narrows the choice."""
    if len(candidates) <= 1:
        return candidates
    hinted = [c for c in candidates if any(h in c.lower() for h in hints)]
    return hinted if hinted else candidates


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ModelSpec:
    """Dotted module paths of one causal-LM architecture.

    Per-layer paths are stored as templates with "{}" where the layer index
    goes (e.g. "model.layers.{}.mlp.down_proj") so the spec stays a small,
    serialisable value that can be written to / read from YAML.
    """

    layers_path: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    mlp_template: str
    mlp_in_templates: tuple[str, ...]
    mlp_out_template: str
    attn_template: str
    attn_out_template: str
    embed_path: str
    lm_head_path: str
    final_norm_path: str
    tied_embeddings: bool = False
    conv1d_weights: bool = False
    # A norm the block applies to the MLP's output before adding it to the residual (Gemma 2/3, OLMo 2); None where
    # the MLP output is added as it is (Llama, GPT-2, GPT-J). Locate-then-edit carries residual changes back through it.
    mlp_output_norm_template: str | None = None

    def __post_init__(self) -> None:
        # Accept lists / a single string from YAML, store an immutable tuple.
        mlp_in = self.mlp_in_templates
        if isinstance(mlp_in, str):
            mlp_in = (mlp_in,)
        if not isinstance(mlp_in, (tuple, list)):
            raise ModelSpecError(f"mlp_in_templates must be a list of templates, got {mlp_in!r}")
        object.__setattr__(self, "mlp_in_templates", tuple(mlp_in))
        if not self.mlp_in_templates:
            raise ModelSpecError("mlp_in_templates must name at least one module")
        for name in ("num_layers", "hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelSpecError(f"{name} must be a positive integer, got {value!r}")
        for name in ("layers_path", "embed_path", "lm_head_path", "final_norm_path"):
            if not isinstance(getattr(self, name), str):
                raise ModelSpecError(f"{name} must be a string, got {getattr(self, name)!r}")
        templates = {
            "mlp_template": self.mlp_template,
            "mlp_out_template": self.mlp_out_template,
            "attn_template": self.attn_template,
            "attn_out_template": self.attn_out_template,
        }
        templates.update({f"mlp_in_templates[{k}]": t for k, t in enumerate(self.mlp_in_templates)})
        if self.mlp_output_norm_template is not None:
            templates["mlp_output_norm_template"] = self.mlp_output_norm_template
        for name, template in templates.items():
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ModelSpecError(
                    f"{name} must be a string with exactly one '{{}}' for the layer index, "
                    f"got {template!r}"
                )
        for name in ("tied_embeddings", "conv1d_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ModelSpecError(f"{name} must be a bool, got {getattr(self, name)!r}")

    # ----------------------------------------------------------------- per-layer paths

    @property
    def block_template(self) -> str:
        """Template of one transformer block, e.g. "model.layers.{}"."""
        return f"{self.layers_path}.{{}}" if self.layers_path else "{}"

    def _index(self, i: int) -> int:
        """Normalise a layer index; negative counts from the end like a list."""
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layer index must be an int, got {type(i).__name__}")
        if not -self.num_layers <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range for a model with {self.num_layers} layers")
        return i % self.num_layers

    def block(self, i: int) -> str:
        return self.block_template.format(self._index(i))

    def mlp(self, i: int) -> str:
        return self.mlp_template.format(self._index(i))

    def mlp_in(self, i: int) -> tuple[str, ...]:
        """Projections hidden -> intermediate (gate and up, or a single fc)."""
        idx = self._index(i)
        return tuple(t.format(idx) for t in self.mlp_in_templates)

    def mlp_out(self, i: int) -> str:
        """Down-projection intermediate -> hidden: the usual target of MLP edits."""
        return self.mlp_out_template.format(self._index(i))

    def attn(self, i: int) -> str:
        return self.attn_template.format(self._index(i))

    def attn_out(self, i: int) -> str:
        """Attention output projection (out dim == hidden)."""
        return self.attn_out_template.format(self._index(i))

    def mlp_output_norm(self, i: int) -> str | None:
        """The norm applied to the MLP's output before the residual add, or None where there is none."""
        template = self.mlp_output_norm_template
        return None if template is None else template.format(self._index(i))

    def mlp_out_weight(self, model: nn.Module, i: int) -> nn.Parameter:
        """Weight of `mlp_out(i)`; shape [hidden, inter] for Linear, [inter, hidden] for Conv1D."""
        return get_parameter(model, f"{self.mlp_out(i)}.weight")

    # Convenience aliases so callers holding only a spec need no extra import.
    get_module = staticmethod(get_module)
    get_parameter = staticmethod(get_parameter)
    in_out_features = staticmethod(in_out_features)

    # ----------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples) so it can be dumped to YAML/JSON."""
        data = asdict(self)
        data["mlp_in_templates"] = list(self.mlp_in_templates)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """Build from a mapping such as a YAML override; unknown or missing keys are errors."""
        if not isinstance(data, Mapping):
            raise ModelSpecError(f"a model spec must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelSpecError(f"unknown model spec keys {unknown}; expected some of {sorted(known)}")
        missing = sorted(required - set(data))
        if missing:
            raise ModelSpecError(f"model spec is missing required keys {missing}")
        return cls(**dict(data))

    # ----------------------------------------------------------------- validation

    def validate(self, model: nn.Module) -> None:
        """Check that every path exists on `model` and the projections have the stated shapes."""
        cls_name = type(model).__name__
        layers = get_module(model, self.layers_path)
        if not isinstance(layers, nn.ModuleList) or len(layers) != self.num_layers:
            raise ModelSpecError(
                f"{cls_name}: {self.layers_path!r} is not a ModuleList of {self.num_layers} blocks. "
                + _EXPLICIT_HINT
            )
        h, inter = self.hidden_size, self.intermediate_size
        for i in range(self.num_layers):
            for path in (self.block(i), self.mlp(i), self.attn(i)):
                get_module(model, path)
            if self.mlp_output_norm_template is not None:
                norm = get_module(model, self.mlp_output_norm(i))
                if any(is_linear_like(m) for m in norm.modules()):
                    raise ModelSpecError(f"{cls_name}: {self.mlp_output_norm(i)!r} holds a linear layer; "
                                         "mlp_output_norm_template must name a norm")
            down = get_module(model, self.mlp_out(i))
            _check_linear(cls_name, self.mlp_out(i), down, inter, h)
            for path in self.mlp_in(i):
                module = get_module(model, path)
                if not is_linear_like(module):
                    raise ModelSpecError(f"{cls_name}: {path!r} is not linear-like")
                fin, fout = in_out_features(module)
                if fin != h or fout % inter != 0:  # fused gate_up gives k * intermediate
                    raise ModelSpecError(
                        f"{cls_name}: {path!r} maps {fin} -> {fout}, expected {h} -> {inter} "
                        f"(or a multiple of {inter} when fused)"
                    )
            attn_out = get_module(model, self.attn_out(i))
            if not is_linear_like(attn_out) or in_out_features(attn_out)[1] != h:
                raise ModelSpecError(
                    f"{cls_name}: {self.attn_out(i)!r} is not a linear-like module with out dim {h}"
                )
        for path in (self.embed_path, self.lm_head_path, self.final_norm_path):
            get_module(model, path)

    # ----------------------------------------------------------------- detection

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelSpec":
        """Derive the map from the module tree and config (no model-name checks); adapter edits do not hide it."""
        with layers_unwrapped(model):
            return cls._from_plain_model(model)

    @classmethod
    def _from_plain_model(cls, model: nn.Module) -> "ModelSpec":
        cls_name = type(model).__name__
        config = _text_config(model)
        num_layers = _config_int(config, _NUM_LAYERS_KEYS)
        hidden = _config_int(config, _HIDDEN_KEYS)
        missing = [
            f"{what} ({'/'.join(keys)})"
            for what, keys, value in (
                ("layer count", _NUM_LAYERS_KEYS, num_layers),
                ("hidden size", _HIDDEN_KEYS, hidden),
            )
            if value is None
        ]
        if missing:
            raise ModelSpecError(f"{cls_name}: config has no {' and no '.join(missing)}. " + _EXPLICIT_HINT)
        inter = _config_int(config, _INTERMEDIATE_KEYS) or 4 * hidden

        layers_path, layers = _find_layers(model, num_layers, hidden, inter)
        block_tpl = f"{layers_path}.{{}}" if layers_path else "{}"
        block0 = layers[0]
        found = _detect_block(block0, hidden, inter, cls_name)
        mlp_rel, mlp_in_rel, mlp_out_rel, attn_rel, attn_out_rel = found

        def tpl(rel: str) -> str:
            return _join(block_tpl, rel)

        embed_path, lm_head_path, tied = _find_embeddings(model)
        final_norm = _find_final_norm(model, layers_path, hidden, cls_name)

        down0 = get_module(block0, mlp_out_rel)
        spec = cls(
            layers_path=layers_path,
            num_layers=num_layers,
            hidden_size=hidden,
            intermediate_size=inter,
            mlp_template=tpl(mlp_rel),
            mlp_in_templates=tuple(tpl(r) for r in mlp_in_rel),
            mlp_out_template=tpl(mlp_out_rel),
            attn_template=tpl(attn_rel),
            attn_out_template=tpl(attn_out_rel),
            embed_path=embed_path,
            lm_head_path=lm_head_path,
            final_norm_path=final_norm,
            tied_embeddings=tied,
            conv1d_weights=_is_conv1d(down0),
            mlp_output_norm_template=_mlp_output_norm(block0, block_tpl),
        )
        try:
            spec.validate(model)  # found on block 0, must hold on every block
        except ModelSpecError as exc:
            raise ModelSpecError(f"{exc} (detected on block 0 but not valid for all blocks)") from None
        return spec


# --------------------------------------------------------------------------- detection internals


def _check_linear(cls_name: str, path: str, module: nn.Module, fin: int, fout: int) -> None:
    if not is_linear_like(module):
        raise ModelSpecError(f"{cls_name}: {path!r} is {type(module).__name__}, not linear-like")
    got = in_out_features(module)
    if got != (fin, fout):
        raise ModelSpecError(f"{cls_name}: {path!r} maps {got[0]} -> {got[1]}, expected {fin} -> {fout}")


def _looks_like_blocks(mlist: nn.ModuleList) -> bool:
    """Every child is a container (not a leaf) with at least one linear-like module inside."""
    return len(mlist) > 0 and all(
        any(True for _ in child.children()) and any(is_linear_like(m) for m in child.modules())
        for child in mlist
    )


def _find_layers(model: nn.Module, num_layers: int, hidden: int, inter: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList of `num_layers` blocks; ties go to one whose blocks parse, then the shallowest."""
    cls_name = type(model).__name__
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    candidates = [(n, m) for n, m in lists if len(m) == num_layers and _looks_like_blocks(m)]
    if not candidates:
        seen = ", ".join(f"{n or '<root>'} (len {len(m)})" for n, m in lists) or "none"
        raise ModelSpecError(
            f"{cls_name}: no nn.ModuleList of {num_layers} transformer blocks found "
            f"(config layer count {num_layers}; ModuleLists present: {seen}). " + _EXPLICIT_HINT
        )
    if len(candidates) > 1:
        parsable = []
        for name, mlist in candidates:
            try:
                _detect_block(mlist[0], hidden, inter, cls_name)
            except ModelSpecError:
                continue
            parsable.append((name, mlist))
        candidates = parsable or candidates
        candidates.sort(key=lambda nm: nm[0].count("."))
    return candidates[0]


def _detect_block(
    block: nn.Module, hidden: int, inter: int, cls_name: str
) -> tuple[str, tuple[str, ...], str, str, str]:
    """Relative paths (mlp, mlp_in, mlp_out, attn, attn_out) inside one block, by shapes."""
    children = list(block.named_children())
    # Linear leaves sitting directly on the block (no MLP sub-module) are parsed as an
    # MLP whose container is the block itself; they are never an attention child.
    direct = [(n, m) for n, m in children if is_linear_like(m)]
    containers = [(n, m) for n, m in children if not is_linear_like(m)]

    def mlp_parts(leaves: list[tuple[str, nn.Module, int, int]]) -> tuple[tuple[str, ...], str] | None:
        downs = [p for p, _, i, o in leaves if i == inter and o == hidden]
        ups = [p for p, _, i, o in leaves if i == hidden and o == inter and p not in downs]
        if not ups:  # fused gate_up: hidden -> k * intermediate
            ups = [p for p, _, i, o in leaves if i == hidden and o != hidden and o % inter == 0]
        if hidden == inter and len(downs) >= 2:  # down and up look alike: down is the last one
            ups, downs = downs[:-1], downs[-1:]
        if not downs or not ups:
            return None
        return tuple(ups), downs[-1]

    mlp_found: dict[str, tuple[tuple[str, ...], str]] = {}
    for name, child in containers:
        parts = mlp_parts(_linear_leaves(child, name))
        if parts is not None:
            mlp_found[name] = parts
    if not mlp_found and direct:
        parts = mlp_parts([(n, m, *in_out_features(m)) for n, m in direct])
        if parts is not None:
            mlp_found[""] = parts

    summary = _block_summary(block)
    if not mlp_found:
        raise ModelSpecError(
            f"{cls_name}: no MLP found in block {type(block).__name__}: no child holds both a "
            f"{hidden} -> {inter} and a {inter} -> {hidden} linear layer "
            f"(hidden_size={hidden}, intermediate_size={inter} from the config; linear layers "
            f"in the block: {summary}). " + _EXPLICIT_HINT
        )
    mlp_names = _tie_break(list(mlp_found), _MLP_NAME_HINTS)
    if len(mlp_names) > 1:
        raise ModelSpecError(
            f"{cls_name}: ambiguous MLP in block {type(block).__name__}: candidates {mlp_names}. "
            + _EXPLICIT_HINT
        )
    mlp_name = mlp_names[0]
    mlp_in, mlp_out = mlp_found[mlp_name]

    attn_found: dict[str, str] = {}
    for name, child in containers:
        if name == mlp_name:
            continue
        outs = [p for p, _, _, o in _linear_leaves(child, name) if o == hidden]
        if outs:
            attn_found[name] = outs[-1]  # output projection: the last one registered
    if not attn_found:
        raise ModelSpecError(
            f"{cls_name}: no attention found in block {type(block).__name__}: no child other "
            f"than the MLP {mlp_name or '<block>'!r} holds a linear layer with out dim {hidden} "
            f"(linear layers in the block: {summary}). " + _EXPLICIT_HINT
        )
    attn_names = _tie_break(list(attn_found), _ATTN_NAME_HINTS)
    if len(attn_names) > 1:
        raise ModelSpecError(
            f"{cls_name}: ambiguous attention in block {type(block).__name__}: candidates "
            f"{attn_names}. " + _EXPLICIT_HINT
        )
    attn_name = attn_names[0]
    return mlp_name, mlp_in, mlp_out, attn_name, attn_found[attn_name]


def _mlp_output_norm(block: nn.Module, block_tpl: str) -> str | None:
    """Template of the block's post-MLP norm, where it has one of the known names."""
    for name in _MLP_OUTPUT_NORM_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return _join(block_tpl, name)
    return None


def _block_summary(block: nn.Module) -> str:
    leaves = _linear_leaves(block)
    return ", ".join(f"{p} {i}->{o}" for p, _, i, o in leaves) or "none"


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules(remove_duplicate=False):
        if module is target:
            return name
    return None


def _find_embeddings(model: nn.Module) -> tuple[str, str, bool]:
    cls_name = type(model).__name__
    try:
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError) as exc:
        raise ModelSpecError(
            f"{cls_name}: cannot query input/output embeddings ({exc}). " + _EXPLICIT_HINT
        ) from None
    embed_path = _path_of(model, embed) if embed is not None else None
    head_path = _path_of(model, head) if head is not None else None
    if embed_path is None:
        raise ModelSpecError(f"{cls_name}: input embeddings not found among its modules. " + _EXPLICIT_HINT)
    if head_path is None:
        raise ModelSpecError(f"{cls_name}: output embeddings (lm head) not found. " + _EXPLICIT_HINT)
    embed_w = getattr(embed, "weight", None)
    tied = embed_w is not None and getattr(head, "weight", None) is embed_w
    return embed_path, head_path, tied


def _find_final_norm(model: nn.Module, layers_path: str, hidden: int, cls_name: str) -> str:
    """A parameterised leaf next to the blocks; prefer a [hidden] weight registered after them."""
    base_path, _, layers_name = layers_path.rpartition(".")
    base = get_module(model, base_path)
    names = [n for n, _ in base.named_children()]
    after = names.index(layers_name) if layers_name in names else -1

    def is_norm_like(m: nn.Module) -> bool:
        return (
            not any(True for _ in m.children())
            and any(True for _ in m.parameters(recurse=False))
            and not isinstance(m, nn.Embedding)
            and not is_linear_like(m)
        )

    cands = [(k, n) for k, (n, m) in enumerate(base.named_children()) if is_norm_like(m)]
    if not cands:
        raise ModelSpecError(
            f"{cls_name}: no final norm found next to {layers_path!r} (looked for a parameterised "
            f"leaf module that is not an embedding or linear layer). " + _EXPLICIT_HINT
        )

    def score(item: tuple[int, str]) -> tuple[bool, bool, int]:
        k, n = item
        w = getattr(base.get_submodule(n), "weight", None)
        hidden_shaped = w is not None and tuple(w.shape) == (hidden,)
        return hidden_shaped, k > after, k

    return _join(base_path, max(cands, key=score)[1])

