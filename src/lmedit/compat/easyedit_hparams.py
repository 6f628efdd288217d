"""EasyEdit's hyperparameter files, read as they are, for the methods lmedit also has.

An EasyEdit YAML names its method with ``alg_name``, its model with ``model_name``, the
GPU with ``device``, and the modules to edit with path templates
(``rewrite_module_tmp: model.layers.{}.mlp.down_proj``) or parameter paths
(``inner_params``). lmedit names modules by layer index and role (``mlp_out``,
``attn_out``, ... resolved by :class:`lmedit.spec.ModelSpec`) and rejects keys it does
not know. :func:`read_easyedit_hparams` translates one file into lmedit's
hyperparameter dataclass, and records, key by key, what each EasyEdit key became
(:class:`KeyMapping`) so nothing is dropped silently: keys that change nothing in lmedit
are listed in :attr:`EasyEditConfig.ignored` and logged once. :func:`to_lmedit_preset`
writes the same settings as an lmedit preset with a comment on every line.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from lmedit.hparams import HyperParams, HyperParamsError

LOG = logging.getLogger(__name__)

__all__ = [
    "EasyEditConfig", "EasyEditHparamsError", "KeyMapping", "EASYEDIT_METHODS", "is_easyedit_hparams",
    "read_easyedit_hparams", "check_against_model", "to_lmedit_preset",
]


class EasyEditHparamsError(HyperParamsError):
    """An EasyEdit hyperparameter file cannot be used as asked; the message says which key and how to fix it."""


@dataclass(frozen=True)
class KeyMapping:
    """What one EasyEdit key became in lmedit.

    ``lmedit_key``: the lmedit hyperparameter it sets, or a run setting written as its option
    (``--model``, ``--device``, ``--dtype``, ``--batch-size``), or ``method``; None when the key
    has no effect in lmedit (then it is also in :attr:`EasyEditConfig.ignored`).
    """

    easyedit_key: str
    value: Any
    lmedit_key: str | None
    note: str = ""

    def describe(self) -> str:
        target = self.lmedit_key or "ignored"
        return f"{self.easyedit_key}: {self.value!r} -> {target}" + (f" ({self.note})" if self.note else "")


@dataclass
class EasyEditConfig:
    """An EasyEdit file translated for lmedit: the method, its hyperparameters, the run settings and the mapping."""

    method: str
    hparams: HyperParams
    model_name: str | None
    device: str | None
    dtype: str | None
    mappings: list[KeyMapping]
    ignored: list[str]
    source: str
    stats_dir: str | None = None
    batch_size: int | None = None

    def mapping_of(self, easyedit_key: str) -> KeyMapping:
        for mapping in self.mappings:
            if mapping.easyedit_key == easyedit_key:
                return mapping
        raise KeyError(easyedit_key)

    def runtime_warnings(self, available_device: str = "cpu", available_dtype: str = "float32") -> list[str]:
        """What the file asks for that this run cannot give (a GPU, float16), as sentences for a warning."""
        notes = []
        if self.device and self.device != available_device:
            notes.append(f"the EasyEdit file asks for device {self.device}; this run uses {available_device}")
        if self.dtype and self.dtype != available_dtype:
            notes.append(f"the EasyEdit file asks for {self.dtype} weights (fp16: true); this run uses {available_dtype}")
        return notes


# --------------------------------------------------------------------------- recognising a file

# Keys an lmedit file never holds: EasyEdit's run settings and module templates.
EASYEDIT_ONLY_KEYS = frozenset({
    "device", "model_parallel", "fp16", "half", "max_length", "stats_dir", "results_dir",
    "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module",
    "v_loss_layer", "layer_selection", "P_loc", "sentence_model_name", "use_icl_examples", "model_class",
    "tokenizer_class", "tokenizer_name", "small_name", "cls_name", "cls_class", "val_train", "val_reg", "reg",
    "num_pert", "save_path", "load_path", "alpha", "beta", "gamma",
})


def is_easyedit_hparams(values: Mapping[str, Any]) -> bool:
    """True for an EasyEdit hyperparameter mapping: it names ``alg_name`` (not lmedit's ``method``) and
    holds at least one key only EasyEdit writes (``device``, a module template, ``stats_dir``, ...)."""
    if not isinstance(values, Mapping) or "alg_name" not in values or "method" in values:
        return False
    return any(key in EASYEDIT_ONLY_KEYS for key in values)


# --------------------------------------------------------------------------- the key tables

Translate = Callable[["_Translation", str, Any], None]

TEMPLATE_KEYS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp")
FIXED_PATH_KEYS = ("ln_f_module", "lm_head_module")
LOCATE_DIRECT = (
    "layers", "fact_token", "v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor",
    "mom2_adjustment", "context_template_length_params", "mom2_dataset", "mom2_n_samples", "mom2_dtype",
)
# Settings of EasyEdit's MALMEN trainer beyond the MEND/SERAC ones below.
MALMEN_TRAINING_KEYS = ("n_blocks", "meta_lr", "loc_coef", "max_grad_norm", "token", "editor_batch_size")
# Settings of EasyEdit's MEND and SERAC trainers; editing with a trained network reads none of them.
TRAINING_KEYS = frozenset({
    "lr", "edit_lr", "seed", "lr_lr", "cedit", "cloc", "cbase", "dropout", "final_eval", "supervised", "train_base",
    "no_grad_layers", "soft_weighting", "checkpoint_grad", "cross_attend", "cos", "freeze", "square", "bound_embeds",
    "use_all_negatives", "freeze_cntr", "dist_heads", "lora", "one_sided", "n_hidden", "hidden_dim", "init", "norm",
    "combine", "x_only", "delta_only", "act", "rank", "mlp_class", "shared", "model_save_pt", "edit_bs", "silent",
    "max_epochs", "max_iters", "log_interval", "eval_log_interval", "val_interval", "early_stop_patience",
    "early_stop_key", "eval_only", "save", "debug", "log_errors", "unlikelihood", "verbose", "val_batch_size",
    "accumulate_bs", "val_steps", "opt", "grad_clip", "model_class", "tokenizer_class", "tokenizer_name",
    "small_name", "cls_name", "cls_class", "half", "results_dir",
})


@dataclass(frozen=True)
class MethodTable:
    """How one EasyEdit method's keys translate: same-name keys, keys with their own rule, keys without effect."""

    direct: tuple[str, ...] = ()
    special: Mapping[str, Translate] = field(default_factory=dict)
    no_effect: Mapping[str, str] = field(default_factory=dict)  # key -> why it changes nothing in lmedit
    edit_batch: bool = False  # batch_size is EasyEdit's batch_edit chunk (a run setting), not a training batch


# --------------------------------------------------------------------------- reading a file


@dataclass
class _Translation:
    """The state of one translation: the lmedit values so far and the mapping of each EasyEdit key."""

    raw: dict[str, Any]
    source: str
    spec: Any  # lmedit.spec.ModelSpec of the model to check against, or None
    module_names: frozenset[str] | None
    method: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    mappings: list[KeyMapping] = field(default_factory=list)
    model_name: str | None = None
    device: str | None = None
    dtype: str | None = None
    stats_dir: str | None = None
    batch_size: int | None = None

    def map(self, key: str, lmedit_key: str | None, note: str = "", value: Any = None) -> None:
        self.mappings.append(KeyMapping(key, self.raw[key] if value is None else value, lmedit_key, note))

    def set(self, key: str, lmedit_key: str, value: Any, note: str = "") -> None:
        self.values[lmedit_key] = value
        self.map(key, lmedit_key, note, value=self.raw[key])

    def fail(self, message: str) -> "EasyEditHparamsError":
        return EasyEditHparamsError(f"{self.source}: {message}")


def read_easyedit_hparams(
    path_or_mapping: str | Path | Mapping[str, Any],
    model: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> EasyEditConfig:
    """Translate an EasyEdit hyperparameter file (or its mapping) into lmedit's method and hyperparameters.

    ``model``: when given, every module template and parameter path is checked against it (and
    module roles are read from its :class:`~lmedit.spec.ModelSpec` instead of from the names).
    ``overrides``: lmedit hyperparameters set on top (as ``--set`` does). Keys without effect are
    logged once, by name, and listed in ``ignored``.
    """
    raw, source = _load(path_or_mapping)
    spec, names = _model_layout(model)
    state = _Translation(raw=raw, source=source, spec=spec, module_names=names)
    state.method = _method_of(state)
    if names is not None:
        _check_paths(raw, source, spec, names, mend_like=state.method in ("MEND", "MALMEN", "SERAC"))
    table = METHOD_TABLES[_family(state.method)]
    for key, value in raw.items():
        _translate_key(state, table, key, value)
    _fill_defaults(state)
    hparams_class = _hparams_class(state.method)
    values = {**state.values, **dict(overrides or {})}
    hparams = hparams_class.from_dict(values, source=f"{source} (as lmedit {state.method})")
    ignored = [m.easyedit_key for m in state.mappings if m.lmedit_key is None]
    config = EasyEditConfig(
        method=state.method, hparams=hparams, model_name=state.model_name, device=state.device, dtype=state.dtype,
        mappings=state.mappings, ignored=ignored, source=source, stats_dir=state.stats_dir, batch_size=state.batch_size,
    )
    if ignored:
        _warn_once(f"{source}: EasyEdit keys with no effect in lmedit: {', '.join(ignored)} "
                   "(see `lmedit hparams convert` for why each)")
    return config


def _load(path_or_mapping: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(path_or_mapping, Mapping):
        return _as_easyedit_values(dict(path_or_mapping)), "EasyEdit hyperparameters"
    path = Path(path_or_mapping)
    if not path.is_file():
        raise EasyEditHparamsError(f"hyperparameter file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EasyEditHparamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise EasyEditHparamsError(f"{path} must hold a mapping of key: value")
    return _as_easyedit_values(loaded), str(path)


def _as_easyedit_values(values: dict[str, Any]) -> dict[str, Any]:
    """EasyEdit turns every string that parses as a number into a float ("5e-4" is a string to PyYAML); so do we."""
    converted = {}
    for key, value in values.items():
        if isinstance(value, str) and key not in ("alg_name", "model_name"):
            try:
                value = float(value)
            except ValueError:
                pass
        converted[str(key)] = value
    return converted


# EasyEdit's alg_name -> lmedit's method (FT splits by objective_optimization).
EASYEDIT_METHODS = {
    "FT": "FT", "LoRA": "LoRA", "ROME": "ROME", "MEMIT": "MEMIT", "AlphaEdit": "AlphaEdit", "EMMET": "EMMET",
    "PMET": "PMET", "SPHERE": "SPHERE", "KN": "KN",
    "GRACE": "GRACE", "DEFER": "DEFER", "WISE": "WISE", "IKE": "IKE", "SERAC": "SERAC", "MEND": "MEND",
    "MALMEN": "MALMEN",
    "MELO": "MELO", "ULTRAEDIT": "UltraEdit",
    "FT-L": "FT-L", "FT-M": "FT-M",
}
FT_OBJECTIVES = {"prompt_last": "FT-L", "target_new": "FT-M"}


def _method_of(state: _Translation) -> str:
    """The lmedit method an EasyEdit ``alg_name`` (and, for FT, ``objective_optimization``) names."""
    from lmedit.registry import list_methods

    name = state.raw.get("alg_name")
    if not name:
        raise state.fail("no alg_name: an EasyEdit hyperparameter file names its method, e.g. alg_name: ROME")
    folded = {k.lower(): v for k, v in EASYEDIT_METHODS.items()}
    method = folded.get(str(name).lower())
    if method is None:
        have = ", ".join(info.name for info in list_methods())
        raise state.fail(f"alg_name {name!r}: lmedit has no {name} method. lmedit's methods: {have}")
    if method == "FT":
        objective = state.raw.get("objective_optimization")
        if objective not in FT_OBJECTIVES:
            raise state.fail(
                f"alg_name FT needs objective_optimization: prompt_last (FT-L) or target_new (FT-M), got {objective!r}"
            )
        method = FT_OBJECTIVES[str(objective)]
    return method


def _family(method: str) -> str:
    return "FT" if method in ("FT-L", "FT-M") else method


def _hparams_class(method: str) -> type[HyperParams]:
    from lmedit.registry import get_method

    return get_method(method).hparams_class


def _translate_key(state: _Translation, table: MethodTable, key: str, value: Any) -> None:
    if key in COMMON_SPECIAL:
        COMMON_SPECIAL[key](state, key, value)
    elif key == "batch_size" and table.edit_batch:
        state.batch_size = int(value)
        state.map(key, None, "EasyEdit's batch_edit chunk size; lmedit's is a run setting: "
                             "lmedit run --protocol batch --batch-size N")
    elif key in table.direct:
        state.set(key, key, value)
    elif key in table.special:
        table.special[key](state, key, value)
    elif key in table.no_effect:
        state.map(key, None, table.no_effect[key])
    elif key in COMMON_NO_EFFECT:
        state.map(key, None, COMMON_NO_EFFECT[key])
    else:
        known = sorted({*table.direct, *table.special, *table.no_effect, *COMMON_SPECIAL, *COMMON_NO_EFFECT})
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise state.fail(f"unknown key {key!r} for EasyEdit's {state.raw.get('alg_name')}{hint} "
                         f"Keys this reader knows for it: {', '.join(known)}")


def _fill_defaults(state: _Translation) -> None:
    """Values lmedit needs that an EasyEdit file does not carry (it gets them from the script)."""
    if state.method == "IKE" and state.values.get("k", 16) > 0 and "train_file" not in state.values:
        from lmedit.registry import preset_path

        preset = yaml.safe_load(preset_path("IKE", "smollm2-135m").read_text())
        state.values["train_file"] = preset["train_file"]


@lru_cache(maxsize=256)
def _warn_once(message: str) -> None:
    """Log a message once per process: the same file read twice (without, then with the model) warns once."""
    LOG.warning(message)


# --------------------------------------------------------------------------- common keys


def _alg_name(state: _Translation, key: str, value: Any) -> None:
    state.map(key, "method", f"lmedit's {state.method}")


def _model_name(state: _Translation, key: str, value: Any) -> None:
    state.model_name = None if value is None else str(value)
    state.map(key, "--model", "the model to load (hub id, folder or lmedit preset); --model given explicitly wins")


def _device(state: _Translation, key: str, value: Any) -> None:
    if value is None:
        state.device = None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        state.device = f"cuda:{int(value)}"
    else:
        state.device = str(value)
    state.map(key, "--device", f"EasyEdit's GPU index, read as {state.device}; a device this run lacks is warned about")


def _fp16(state: _Translation, key: str, value: Any) -> None:
    state.dtype = "float16" if value is True else "float32"
    state.map(key, "--dtype", f"EasyEdit loads the model in {state.dtype}; a dtype this run lacks is warned about")


def _stats_dir(state: _Translation, key: str, value: Any) -> None:
    state.stats_dir = None if value is None else str(value)
    state.map(key, None, "EasyEdit's cache of key statistics (.npz files); lmedit keeps its own cache under "
                         "$LMEDIT_HOME/stats, keyed by the model's weights, and does not read EasyEdit's files")


def _objective(state: _Translation, key: str, value: Any) -> None:
    state.set(key, "objective", str(value), f"{value} is EasyEdit's {state.method}")


COMMON_SPECIAL: dict[str, Translate] = {
    "alg_name": _alg_name, "model_name": _model_name, "device": _device, "fp16": _fp16, "stats_dir": _stats_dir,
}
COMMON_NO_EFFECT = {
    "model_parallel": "EasyEdit spreads the model over GPUs (device_map=auto); lmedit loads it on one device",
    "max_length": "EasyEdit truncates evaluation inputs to max(max_length, longest probe) tokens, which cuts nothing; "
                  "lmedit never truncates",
    "results_dir": "EasyEdit's output and cache folder; lmedit writes a run folder (lmedit run --out)",
    "use_chat_template": "EasyEdit wraps WISE's prompts in the chat template; in lmedit that is the run option "
                         "--chat-template",
    "batch_size": "EasyEdit's batch size for this method; lmedit's method has no such setting",
}


# --------------------------------------------------------------------------- module templates


def _model_layout(model: Any) -> tuple[Any, frozenset[str] | None]:
    """The model's ModelSpec (None if it cannot be built) and the names of all its modules."""
    if model is None:
        return None, None
    from lmedit.spec import ModelSpec

    names = frozenset(name for name, _ in model.named_modules())
    try:
        spec = ModelSpec.from_model(model)
    except ValueError:
        spec = None
    return spec, names


def module_of(path: str) -> str:
    """A template or parameter path as a module path: ``model.layers[27].mlp.down_proj.weight`` ->
    ``model.layers.27.mlp.down_proj``."""
    path = re.sub(r"\[(\d+|\{\})\]", r".\1", str(path).strip())
    for suffix in (".weight", ".bias"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return path.strip(".")


# Name endings of the common layouts, used to read a role from a path when no model is at hand.
_ROLE_BY_NAME = (
    ("attn_out", re.compile(r"(attn|attention)\.(o_proj|out_proj|c_proj|dense)$")),
    ("mlp_out", re.compile(r"(down_proj|fc_out|dense_4h_to_h|fc2|w2|mlp\.c_proj)$")),
    ("mlp_in", re.compile(r"(up_proj|gate_proj|c_fc|fc_in|dense_h_to_4h|fc1|w1|w3)$")),
)


def _role_of_template(state: _Translation, template: str) -> str | None:
    """The lmedit module role a per-layer template names: from the model's spec if there is one, else by name."""
    template = module_of(template)
    if state.spec is not None:
        spec = state.spec
        if template == spec.mlp_out_template:
            return "mlp_out"
        if template == spec.attn_out_template:
            return "attn_out"
        return "mlp_in" if template in spec.mlp_in_templates else None
    for role, pattern in _ROLE_BY_NAME:
        if pattern.search(template):
            return role
    return None


def _split_layer(path: str) -> tuple[str, int] | None:
    """``model.layers.27.mlp.down_proj`` -> (``model.layers.{}.mlp.down_proj``, 27): the last index in the path."""
    matches = list(re.finditer(r"\.(\d+)(?=\.|$)", path))
    if not matches:
        return None
    last = matches[-1]
    return path[: last.start()] + ".{}" + path[last.end():], int(last.group(1))


def _ft_rewrite_module(state: _Translation, key: str, value: Any) -> None:
    role = _role_of_template(state, str(value))
    if role is None:
        if state.spec is not None:
            raise state.fail(f"{key} {value!r} is not a module lmedit's FT trains: it trains the MLP down-projection "
                             f"(mlp_out: {state.spec.mlp_out_template}), its input projections (mlp_in: "
                             f"{', '.join(state.spec.mlp_in_templates)}) or the attention output "
                             f"(attn_out: {state.spec.attn_out_template})")
        state.map(key, "modules", "role not recognisable from the name; lmedit's default (mlp_out) is kept and the "
                                  "template is checked when the model is loaded")
        return
    state.set(key, "modules", [role], f"the module role {role} (ModelSpec)")


def _locate_rewrite_module(state: _Translation, key: str, value: Any) -> None:
    role = _role_of_template(state, str(value))
    if role != "mlp_out" and (state.spec is not None or role is not None):
        where = f" (here {state.spec.mlp_out_template})" if state.spec is not None else ""
        raise state.fail(f"{key} {value!r}: lmedit's {state.method} edits the MLP down-projection{where}; "
                         "other modules are not supported")
    state.map(key, "ModelSpec mlp_out", "the MLP down-projection, found by ModelSpec and checked against the model")


def _checked_template(role: str) -> Translate:
    def translate(state: _Translation, key: str, value: Any) -> None:
        state.map(key, f"ModelSpec {role}", "found by ModelSpec from the model's shapes; the path is checked against "
                                            "the model when one is given")

    return translate


TEMPLATE_RULES: dict[str, Translate] = {
    "layer_module_tmp": _checked_template("block"),
    "mlp_module_tmp": _checked_template("mlp"),
    "attn_module_tmp": _checked_template("attn"),
    "ln_f_module": _checked_template("final_norm"),
    "lm_head_module": _checked_template("lm_head"),
}


def _adapter_site(state: _Translation, key: str, value: Any) -> None:
    """``inner_params`` (one parameter path) -> ``layer`` + ``module`` when the path is a role lmedit knows."""
    from lmedit.adapters import ADAPTER_ROLES

    paths = value if isinstance(value, list) else [value]
    if len(paths) != 1:
        raise state.fail(f"{key} must name exactly one parameter for {state.method}, got {paths}")
    path = module_of(paths[0])
    split = _split_layer(path)
    role = _role_of_template(state, split[0]) if split else None
    if split and role in ADAPTER_ROLES:
        state.values["layer"], state.values["module"] = split[1], role
        state.map(key, "layer, module", f"layer {split[1]}, module {role} (ModelSpec)")
        return
    state.set(key, "inner_params", [paths[0]], "kept as lmedit's inner_params alias: the module is not one of the "
                                               f"adapter roles ({', '.join(ADAPTER_ROLES)})")


def _checkpoint_inner_params(state: _Translation, key: str, value: Any) -> None:
    state.map(key, None, f"the weights {state.method} edits are fixed by the trained network "
                         f"(lmedit train {state.method.lower()}), which stores them")


# --------------------------------------------------------------------------- method-specific keys


def _norm_constraint(state: _Translation, key: str, value: Any) -> None:
    if isinstance(value, float):
        state.set(key, "norm_constraint", value, "weights clamped to within this of the originals")
    else:
        state.set(key, "norm_constraint", None, f"EasyEdit clamps only when the value is a float; {value!r} means "
                                                "no clamp there, so none here")


def _lora_type(state: _Translation, key: str, value: Any) -> None:
    if value == "lora":
        state.set(key, "lora_type", "lora")
        return
    if value == "adalora":
        state.set(key, "lora_type", "lora", "AdaLoRA is not in lmedit: plain LoRA at the same rank is trained "
                                            "instead (AdaLoRA also re-allocates rank while training), so results "
                                            "can differ")
        _warn_once(f"{state.source}: lora_type adalora is trained as plain LoRA (lmedit has no AdaLoRA)")
        return
    raise state.fail(f"lora_type {value!r}: lmedit's LoRA trains lora (EasyEdit's adalora is read as lora)")


def _v_loss_layer(state: _Translation, key: str, value: Any) -> None:
    last = state.spec.num_layers - 1 if state.spec is not None else None
    if last is not None and int(value) == last:
        state.map(key, "(the model's output)", "the last layer: EasyEdit reads the target loss through the final "
                                               "norm and head there, which is the model's output, as lmedit does")
        return
    note = ("lmedit reads the target loss at the model's output (the last layer); EasyEdit reads it at "
            f"layer {value} through the final norm and head")
    if last is not None:
        note += f" (this model's last layer is {last}): behaviour differs" if int(value) < last else \
            f", which this model (layers 0..{last}) does not have"
        _warn_once(f"{state.source}: v_loss_layer {value} is not this model's last layer ({last}); {note}")
    else:
        note += "; the same when it is the last layer (checked when the model is loaded)"
    state.map(key, "(the model's output)", note)


def _mom2_dataset(state: _Translation, key: str, value: Any) -> None:
    state.set(key, "mom2_dataset", str(value), "the corpus of the key statistics; EasyEdit cuts its documents to the "
                                               "model's context length, lmedit to mom2_sample_length (default 256)")


def _wise_margin_part(index: int) -> Translate:
    def translate(state: _Translation, key: str, value: Any) -> None:
        margin = list(state.values.get("act_margin", [5.0, 20.0, 10.0]))
        margin[index] = float(value)
        state.values["act_margin"] = margin
        state.map(key, f"act_margin[{index}]", "EasyEdit's dataclass field for act_margin's entry")

    return translate


def _ike_encoder(state: _Translation, key: str, value: Any) -> None:
    from lmedit.encoders import DEFAULT_ENCODER

    name = str(value)
    chosen = DEFAULT_ENCODER if name.rstrip("/").rsplit("/", 1)[-1] == DEFAULT_ENCODER else name
    state.set(key, "encoder", chosen, "the sentence model that retrieves demonstrations"
              + ("; lmedit's packaged copy" if chosen == DEFAULT_ENCODER else ""))


def _ike_use_examples(state: _Translation, key: str, value: Any) -> None:
    if value is False:
        state.set(key, "k", 0, "no demonstrations: the new fact alone")
    else:
        state.map(key, "k", "demonstrations on (k of them)")


def _archive(state: _Translation, key: str, value: Any) -> None:
    from lmedit.training.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    folder = Path(str(value))
    if (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file():
        state.set(key, "archive", str(folder), "an lmedit checkpoint")
        return
    state.map(key, None, f"EasyEdit's checkpoint (a torch pickle) is not read; lmedit uses its own checkpoint from "
                         f"`lmedit train {state.method.lower()}` (set archive: with --set to choose another)")


def _training(method: str) -> dict[str, str]:
    note = (f"a setting of EasyEdit's {method} trainer; editing with a trained network does not read it "
            f"(lmedit train {method.lower()} --set ... sets lmedit's)")
    return {key: note for key in TRAINING_KEYS}


def _unread(method: str, keys: tuple[str, ...]) -> dict[str, str]:
    return {key: f"declared by EasyEdit's {method} but never read by it" for key in keys}


def _pmet_rewrite_modules(state: _Translation, key: str, value: Any) -> None:
    """PMET optimises attention and MLP targets together but writes only the MLP (the authors' and EasyEdit's files)."""
    for template in value if isinstance(value, list) else [value]:
        _locate_rewrite_module(state, key, template)


def _pmet_nll_loss_factor(state: _Translation, key: str, value: Any) -> None:
    if float(value) != 1.0:
        raise state.fail(f"{key} {value}: lmedit's PMET weights the target NLL by 1 (EasyEdit's only value)")
    state.map(key, None, "EasyEdit's PMET lowers this factor to 0.1 while the most likely token already equals the "
                         "target probability, a stopping heuristic lmedit does not copy (docs/locate-then-edit.md)")


def _renamed(lmedit_key: str, note: str, kind: Callable[[Any], Any] = float) -> Translate:
    def translate(state: _Translation, key: str, value: Any) -> None:
        state.set(key, lmedit_key, kind(value), note)

    return translate


# MELO's file nests its settings in three sections (grace, model, lora); each section is one key of the file.
_MELO_GRACE = {"num_iter": "n_iter", "edit_lr": "edit_lr", "init_radius": "init_radius", "num_block": "num_block",
               "num_rank_per_block": "num_rank_per_block"}
_MELO_GRACE_UNREAD = ("name", "dist_fn", "val_init", "val_train", "val_reg", "reg", "replacement", "expand_mode",
                      "num_pert", "num_edit_per_block", "metric_period")
_MELO_MODEL_UNREAD = ("name", "class_name", "tokenizer_class", "tokenizer_name", "pt")


def _melo_section(state: _Translation, key: str, value: Any, known: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise state.fail(f"{key} must be a mapping of MELO's {key} settings, got {value!r}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise state.fail(f"unknown key {key}.{unknown[0]} for EasyEdit's MELO; keys this reader knows in {key}: "
                         f"{', '.join(known)}")
    return value


def _melo_grace(state: _Translation, key: str, value: Any) -> None:
    section = _melo_section(state, key, value, (*_MELO_GRACE, "key_id", *_MELO_GRACE_UNREAD))
    key_id = section.get("key_id", -1)
    if key_id != -1:
        raise state.fail(f"{key}.key_id {key_id}: lmedit's MELO keys on the prompt's last token (EasyEdit's -1, the "
                         "last token fed); another fixed position is not supported")
    for easyedit, lmedit_key in _MELO_GRACE.items():
        if easyedit in section:
            state.values[lmedit_key] = section[easyedit]
    notes = [f"{e} -> {m}" for e, m in _MELO_GRACE.items() if e in section]
    notes.append("key_id -1 -> the key is read at the prompt's last token, routing every later position")
    unread = [k for k in _MELO_GRACE_UNREAD if k in section]
    if unread:
        notes.append(f"{', '.join(unread)}: declared, never read by EasyEdit's MELO")
    targets = ", ".join(m for e, m in _MELO_GRACE.items() if e in section)
    read = {k: v for k, v in section.items() if k in _MELO_GRACE or k == "key_id"}
    state.mappings.append(KeyMapping(key, read, targets or None, "; ".join(notes)))


def _melo_model(state: _Translation, key: str, value: Any) -> None:
    section = _melo_section(state, key, value, ("grace_layer", "target_modules", "fan_in_fan_out", *_MELO_MODEL_UNREAD))
    if "grace_layer" not in section or not section.get("target_modules"):
        raise state.fail(f"{key} must name grace_layer (the routing module) and target_modules (the LoRA modules)")
    router = module_of(str(section["grace_layer"]))
    targets = [module_of(str(t)) for t in section["target_modules"]]
    if state.module_names is not None:
        for name, path in [("grace_layer", router), *(("target_modules", t) for t in targets)]:
            if path not in state.module_names:
                _no_module(f"{key}.{name}", path, [path], state.module_names, state.spec, state.source)
    from lmedit.adapters import ADAPTER_ROLES

    split = _split_layer(router)
    role = _role_of_template(state, split[0]) if split else None
    if split and role in ADAPTER_ROLES:
        state.values["layer"], state.values["module"] = split[1], role
        site, fields = f"layer {split[1]}, module {role} (ModelSpec)", "layer, module"
    else:
        state.values["inner_params"] = [router]
        site, fields = f"inner_params [{router}] (not an adapter role, kept as a path)", "inner_params"
    state.values["key_from"] = "output"
    state.values["lora_inner_params"] = targets
    notes = [f"grace_layer -> {site}, key_from output (EasyEdit keys on its output)",
             "target_modules -> lora_inner_params (the paths, which EasyEdit matches by name ending)",
             "fan_in_fan_out: lmedit reads GPT-2's Conv1D layout from the module itself"]
    unread = [k for k in _MELO_MODEL_UNREAD if k in section]
    if unread:
        notes.append(f"{', '.join(unread)}: the model and tokenizer to load (--model) or unread")
    read = {k: v for k, v in section.items() if k not in _MELO_MODEL_UNREAD}
    state.mappings.append(KeyMapping(key, read, f"{fields}, key_from, lora_inner_params", "; ".join(notes)))


def _melo_lora(state: _Translation, key: str, value: Any) -> None:
    section = _melo_section(state, key, value, (
        "cls_name", "cls_class", "supervised", "cos", "freeze", "square", "bound_embeds", "use_all_negatives",
        "freeze_lora", "dist_heads", "cross_attend", "soft_weighting", "checkpoint_grad", "lora_r", "lora_alpha",
        "lora_dropout"))
    if float(section.get("lora_dropout", 0.0) or 0.0) != 0.0:
        raise state.fail(f"{key}.lora_dropout {section['lora_dropout']}: lmedit's MELO has no LoRA dropout "
                         "(EasyEdit's file uses 0.0)")
    state.mappings.append(KeyMapping(key, value, None, (
        "lora_dropout 0.0 is lmedit's (no dropout); lora_r and lora_alpha are not read by EasyEdit's MELO (its rank "
        "is num_block x num_rank_per_block, alpha = rank); the rest configures a classifier EasyEdit's MELO loads "
        "but never uses")))


def _melo_task(state: _Translation, key: str, value: Any) -> None:
    note = "EasyEdit tokenises prompt + ' ' + target with the prompt masked for task hall, as lmedit always does"
    if value != "hall":
        note += f"; task {value!r} selects EasyEdit's seq2seq tokeniser, which lmedit does not have"
        _warn_once(f"{state.source}: MELO task {value!r} is read as task hall (decoder-only tokenisation)")
    state.map(key, None, note)


def _ultraedit_inner_params(state: _Translation, key: str, value: Any) -> None:
    paths = value if isinstance(value, list) else [value]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise state.fail(f"{key} must list the edited linear modules, e.g. model.layers.11.mlp.gate_proj")
    state.set(key, "inner_params", [str(p) for p in paths], "the edited linear modules, by path")


def _ultraedit_token(state: _Translation, key: str, value: Any) -> None:
    if value == "ans":
        state.set(key, "token", "answer", "rows at the answer positions. EasyEdit's 'ans' masks the positions of its "
                                          "labels, which are the answer's own token ids there, not the sentence's")
    else:
        state.set(key, "token", "all", f"EasyEdit's {value!r} keeps every attended position of prompt + answer")


_LOCATE_SPECIAL: dict[str, Translate] = {
    "rewrite_module_tmp": _locate_rewrite_module, "v_loss_layer": _v_loss_layer, "mom2_dataset": _mom2_dataset,
    **TEMPLATE_RULES,
}

METHOD_TABLES: dict[str, MethodTable] = {
    "FT": MethodTable(
        direct=("layers", "num_steps", "lr", "weight_decay", "batch_size"),
        special={"objective_optimization": _objective, "norm_constraint": _norm_constraint,
                 "rewrite_module_tmp": _ft_rewrite_module, **TEMPLATE_RULES},
        no_effect=_unread("FT", ("kl_factor",)),
    ),
    "LoRA": MethodTable(
        direct=("layers", "num_steps", "lr", "weight_decay", "target_modules", "rank", "lora_alpha", "lora_dropout",
                "batch_size"),
        special={"lora_type": _lora_type},
        no_effect=_unread("LoRA", ("kl_factor", "norm_constraint")),
    ),
    "ROME": MethodTable(direct=LOCATE_DIRECT, special=_LOCATE_SPECIAL, edit_batch=True),
    "MEMIT": MethodTable(
        direct=(*LOCATE_DIRECT, "mom2_update_weight"), special=_LOCATE_SPECIAL, edit_batch=True,
        no_effect=_unread("MEMIT", ("layer_selection",)),
    ),
    "AlphaEdit": MethodTable(
        direct=(*LOCATE_DIRECT, "mom2_update_weight", "nullspace_threshold", "L2"), special=_LOCATE_SPECIAL,
        edit_batch=True,
        no_effect={**_unread("AlphaEdit", ("layer_selection",)),
                   "P_loc": "EasyEdit's saved null-space projection; lmedit computes it from its cached key statistics"},
    ),
    "EMMET": MethodTable(
        direct=(*LOCATE_DIRECT, "mom2_update_weight", "emmet_lambda", "update_norm_lambda"), special=_LOCATE_SPECIAL,
        edit_batch=True, no_effect=_unread("EMMET", ("layer_selection",)),
    ),
    "PMET": MethodTable(
        direct=(*LOCATE_DIRECT, "mom2_update_weight"),
        special={**_LOCATE_SPECIAL, "rewrite_module_tmps": _pmet_rewrite_modules,
                 "mlp_module_tmp": _checked_template("mlp_out"), "attn_module_tmp": _checked_template("attn_out"),
                 "nll_loss_factor": _pmet_nll_loss_factor},
        edit_batch=True, no_effect=_unread("PMET", ("layer_selection",)),
    ),
    "SPHERE": MethodTable(
        direct=(*LOCATE_DIRECT, "mom2_update_weight", "nullspace_threshold", "L2"),
        special={**_LOCATE_SPECIAL,
                 "cumulative_ratio": _renamed("beta_hse", "the share of the neurons' energy whose principal directions "
                                                          "are protected (the SPHERE authors' --beta_hse)"),
                 "suppression strength": _renamed("alpha", "the share of the update removed along them (the SPHERE "
                                                            "authors' --alpha)"),
                 "suppression_strength": _renamed("alpha", "the share of the update removed along them (the SPHERE "
                                                           "authors' --alpha)")},
        edit_batch=True,
        no_effect={**_unread("SPHERE", ("layer_selection",)),
                   "P_loc": "EasyEdit's saved null-space projection; lmedit computes it from its cached key statistics"},
    ),
    "KN": MethodTable(
        direct=("steps", "batch_size", "adaptive_threshold", "p", "refine"),
        no_effect=_unread("KN", ("lr_scale", "n_toks")),
    ),
    "GRACE": MethodTable(
        direct=("edit_lr", "n_iter", "eps", "dist_fn", "val_init", "replacement", "eps_expand"),
        special={"inner_params": _adapter_site}, edit_batch=True,
        no_effect=_unread("GRACE", ("val_train", "val_reg", "reg", "num_pert", "dropout")),
    ),
    "MELO": MethodTable(
        special={"grace": _melo_grace, "model": _melo_model, "lora": _melo_lora, "task": _melo_task},
        edit_batch=True,
        no_effect={"lora_task_type": "peft's task type; lmedit's MELO edits causal language models",
                   "check_dir": "EasyEdit would load a MELO checkpoint from there (its loader only prints the path); "
                                "in lmedit re-apply a saved edit with lmedit.registry.load_edit"},
    ),
    "UltraEdit": MethodTable(
        direct=("lr",),
        special={"inner_params": _ultraedit_inner_params, "token": _ultraedit_token, "half": _fp16,
                 "batch_size_once": _renamed("grad_batch_size", "requests per forward/backward pass; EasyEdit drops "
                                                                "the requests past the last whole sub-batch, lmedit "
                                                                "edits them all", int)},
        edit_batch=True,
        no_effect={**_unread("UltraEdit", ("dropout", "no_grad_layers", "silent", "max_length")),
                   "editor_batch_size": "EasyEdit normalises the rows in zero-padded slices of this many and drops "
                                        "the padding before the solve; the update does not depend on it",
                   **{k: "the model and tokenizer to load (--model)"
                      for k in ("model_class", "tokenizer_class", "tokenizer_name")}},
    ),
    "DEFER": MethodTable(direct=("edit_lr", "n_iter", "threshold"), special={"inner_params": _adapter_site},
                         edit_batch=True),
    "WISE": MethodTable(
        direct=("mask_ratio", "edit_lr", "n_iter", "norm_constraint", "act_margin", "act_ratio", "save_freq",
                "merge_freq", "merge_alg", "objective_optimization", "densities", "weights", "retrieve", "replay"),
        special={"inner_params": _adapter_site, "alpha": _wise_margin_part(0), "beta": _wise_margin_part(1),
                 "gamma": _wise_margin_part(2)},
        edit_batch=True,
        no_effect={"save_path": "EasyEdit saves the WISE adapter there after sequential editing; in lmedit save an edit "
                                "with handle.save(folder) or lmedit edit --save",
                   "load_path": "EasyEdit loads a saved WISE adapter from there; in lmedit re-apply a saved edit with "
                                "lmedit.registry.load_edit"},
    ),
    "IKE": MethodTable(
        direct=("k",), special={"sentence_model_name": _ike_encoder, "use_icl_examples": _ike_use_examples},
        edit_batch=True,
    ),
    "SERAC": MethodTable(special={"archive": _archive, "inner_params": _checkpoint_inner_params},
                         no_effect=_training("SERAC"), edit_batch=True),
    "MEND": MethodTable(direct=("lr_scale",), special={"archive": _archive, "inner_params": _checkpoint_inner_params},
                        no_effect={k: v for k, v in _training("MEND").items() if k != "lr_scale"}, edit_batch=True),
    "MALMEN": MethodTable(
        special={"archive": _archive, "inner_params": _checkpoint_inner_params},
        no_effect={**_training("MALMEN"), **{k: _training("MALMEN")["lr"] for k in MALMEN_TRAINING_KEYS},
                   "n_edits": "EasyEdit's MALMEN edits only the first n_edits requests of a call and drops the rest; "
                              "lmedit joins every request of a call in one solve"},
        edit_batch=True),
}


# --------------------------------------------------------------------------- checking against a model


def check_against_model(config: EasyEditConfig, model: Any) -> None:
    """Every module template and path of the file must name modules of ``model``; a path that names none is an
    error naming the key, the template and the modules that exist."""
    spec, names = _model_layout(model)
    assert names is not None
    raw = {m.easyedit_key: m.value for m in config.mappings}
    _check_paths(raw, config.source, spec, names, mend_like=config.method in ("MEND", "MALMEN", "SERAC"))


def _check_paths(raw: Mapping[str, Any], source: str, spec: Any, names: frozenset[str], *, mend_like: bool) -> None:
    layers = _layers_to_check(raw.get("layers"), spec)
    for key, value in raw.items():
        if key in TEMPLATE_KEYS and isinstance(value, str):
            template = module_of(value)
            missing = [template.format(i) for i in layers if template.format(i) not in names]
            if "{}" not in template or missing:
                _no_module(key, value, missing[:1] or [template], names, spec, source)
        elif key in FIXED_PATH_KEYS and isinstance(value, str) and module_of(value) not in names:
            _no_module(key, value, [module_of(value)], names, spec, source)
        elif key == "inner_params" and value:
            paths = value if isinstance(value, list) else [value]
            missing = [module_of(p) for p in paths if module_of(p) not in names]
            if missing and mend_like:  # MEND/SERAC: the trained network decides; say so, don't stop
                _warn_once(f"{source}: inner_params {missing} are not modules of this model; "
                           "the trained network names the weights it edits")
            elif missing:
                _no_module(key, value, missing, names, spec, source)


def _layers_to_check(layers: Any, spec: Any) -> list[int]:
    """The file's layers that exist in the model (a layer out of range is the method's own error), else layer 0."""
    chosen = layers if isinstance(layers, list) else []
    valid = [int(i) for i in chosen if isinstance(i, (int, float)) and (spec is None or 0 <= int(i) < spec.num_layers)]
    return valid or [0]


def _no_module(key: str, value: Any, paths: list[str], names: frozenset[str], spec: Any, source: str) -> None:
    raise EasyEditHparamsError(
        f"{source}: {key} {value!r} matches no module of this model ({paths[0]} does not exist). "
        f"Its modules are: {', '.join(_module_listing(names, spec))}"
    )


def _module_listing(names: frozenset[str], spec: Any, most: int = 40) -> list[str]:
    """The model's modules, one block written as a template (``model.layers.{}.mlp.down_proj``), the rest as is."""
    if spec is None:
        return sorted(n for n in names if n)[:most]
    prefix = f"{spec.layers_path}."
    shown: list[str] = []
    for name in sorted(n for n in names if n):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            index, _, tail = rest.partition(".")
            if index != "0":
                continue
            name = f"{prefix}{{}}" + (f".{tail}" if tail else "")
        shown.append(name)
    return shown[:most] + ([f"... ({len(shown) - most} more)"] if len(shown) > most else [])


# --------------------------------------------------------------------------- writing an lmedit preset


def to_lmedit_preset(config: EasyEditConfig) -> str:
    """The configuration as an lmedit preset (YAML), every value commented with the EasyEdit key it came from,
    and the EasyEdit keys with no effect listed, each with why."""
    from_key = _lmedit_sources(config)
    lines = [
        f"# lmedit {config.method} preset converted from the EasyEdit file {config.source}",
        f"# (lmedit run --method {config.method} --hparams THIS_FILE). Every field of lmedit's "
        f"{type(config.hparams).__name__} is written;",
        "# a field the EasyEdit file does not set keeps lmedit's default.",
    ]
    if config.model_name:
        lines.append(f"# model: EasyEdit's model_name {config.model_name!r} (pass it with --model)")
    for name in ("device", "dtype"):
        if getattr(config, name):
            lines.append(f"# {name}: {getattr(config, name)} in the EasyEdit file (run setting, not a hyperparameter)")
    if config.batch_size is not None:
        lines.append(f"# batch_size: {config.batch_size} in the EasyEdit file (lmedit run --batch-size)")
    lines.append(f"method: {config.method}  # EasyEdit alg_name: {config.mapping_of('alg_name').value}")
    for name, value in config.hparams.to_dict().items():
        comment = from_key.get(name, "lmedit default (not in the EasyEdit file)")
        lines.append(f"{_yaml_line(name, value)}  # {comment}")
    others = [m for m in config.mappings if m.lmedit_key is not None and not _is_field(config, m.lmedit_key)
              and m.easyedit_key not in ("alg_name",)]
    if others:
        lines.append("# EasyEdit keys mapped elsewhere:")
        lines.extend(f"#   {m.easyedit_key}: {_flow(m.value)} -> {m.lmedit_key}: {m.note}" for m in others)
    ignored = [m for m in config.mappings if m.lmedit_key is None]
    if ignored:
        lines.append("# EasyEdit keys with no effect in lmedit:")
        lines.extend(f"#   {m.easyedit_key}: {_flow(m.value)}: {m.note}" for m in ignored)
    return "\n".join(lines) + "\n"


def _lmedit_sources(config: EasyEditConfig) -> dict[str, str]:
    """lmedit field -> the comment naming the EasyEdit key (and note) it came from."""
    sources: dict[str, str] = {}
    for mapping in config.mappings:
        for target in (t.strip() for t in (mapping.lmedit_key or "").split(",")):
            target = target.split("[")[0]
            if target and _is_field(config, target):
                text = f"EasyEdit {mapping.easyedit_key}: {_flow(mapping.value)}"
                sources[target] = text + (f" ({mapping.note})" if mapping.note else "")
    return sources


def _is_field(config: EasyEditConfig, name: str) -> bool:
    return name.split("[")[0].split(",")[0].strip() in {f.name for f in dataclasses.fields(config.hparams)}


def _yaml_line(name: str, value: Any) -> str:
    return f"{name}: {_flow(value)}"


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


# --------------------------------------------------------------------------- loading a --hparams file


def read_if_easyedit(
    path: str | Path, model: Any = None, overrides: Mapping[str, Any] | None = None
) -> EasyEditConfig | None:
    """The translated file when ``path`` is an EasyEdit hyperparameter file (recognised by its keys), else None
    (an lmedit file, which lmedit's strict loader reads)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return None  # the strict loader names the YAML error
    if not isinstance(values, dict) or not is_easyedit_hparams(values):
        return None
    return read_easyedit_hparams(path, model=model, overrides=overrides)


def _lmedit_file_method(hparams_file: str | Path | None, method: str | None) -> str | None:
    """The method of a run with an lmedit ``--hparams`` file: ``--method``, else the file's ``method:`` key.

    A converted preset names its method; running it without ``--method`` must
    not fall back to FT-M, and a ``--method`` that disagrees with it is an error
    (the file's keys belong to the other method's dataclass).
    """
    from lmedit.registry import get_method

    named = None
    if hparams_file is not None:
        try:
            values = yaml.safe_load(Path(hparams_file).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            values = None  # the strict loader reports the file's problem later, with its own message
        if isinstance(values, dict) and isinstance(values.get("method"), str):
            named = get_method(values["method"]).name
    if method is not None and named is not None and get_method(method).name != named:
        raise EasyEditHparamsError(f"--method {method} disagrees with {hparams_file}, a file for {named} "
                                   f"(method: {named}); drop --method or use a file for {method}")
    return named or method


def run_settings(
    hparams_file: str | Path | None, method: str | None, model: str | None, *, default_method: str, default_model: str
) -> tuple[str, str]:
    """The method and model of a run: given explicitly, else named by an EasyEdit ``--hparams`` file, else the
    defaults. An explicit method that disagrees with the file's ``alg_name`` is an error; a device or dtype the
    file asks for and this run cannot give is a warning."""
    from lmedit.registry import get_method

    config = read_if_easyedit(hparams_file) if hparams_file is not None else None
    if config is None:
        return _lmedit_file_method(hparams_file, method) or default_method, model or default_model
    if method is not None and get_method(method).name != config.method:
        raise EasyEditHparamsError(
            f"--method {method} disagrees with {config.source}, an EasyEdit file for {config.method} "
            f"(alg_name {config.mapping_of('alg_name').value}); drop --method or use a file for {method}"
        )
    for note in config.runtime_warnings():
        _warn_once(f"{note} (lmedit takes these from --device and --dtype, default cpu and float32)")
    return config.method, model or config.model_name or default_model
