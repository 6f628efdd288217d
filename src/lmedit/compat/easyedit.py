"""EasyEdit's Python API over lmedit: change ``from easyeditor import ...`` to ``from lmedit.compat.easyedit import ...``.

What an EasyEdit script calls is here under the same names and signatures:
``BaseEditor.from_hparams(hparams)`` with ``edit``, ``batch_edit``, ``edit_requests`` and
``edit_dataset``; the ``<Method>HyperParams.from_hparams(path)`` classes; ``ZsreDataset``,
``CounterFactDataset`` and ``KnowEditDataset``; ``summary_metrics``. Inputs take EasyEdit's
shapes and the results come back as EasyEdit's ``(metrics, edited_model, weights_copy)``,
with ``metrics`` a list of per-request dicts (``case_id``, ``requested_rewrite``, ``time``,
``pre``, ``post``) whose keys and value types are EasyEdit's, so result files, summaries and
plots made from them keep working.

Everything underneath is lmedit's: the method comes from the registry, the pre-edit scores of
all requests are taken in one batched pass before any edit, edits are undone exactly through
their handles, and ``sequential_edit=True`` keeps every edit (WISE included). Where EasyEdit
does something wrong, this layer does it right and says so in ``docs/from-easyedit.md``
("What differs").
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch

from lmedit.evaluation.evaluator import EvalConfig, ProbeOutcome, ProbeRef, Snapshot, locality_agreement
from lmedit.handles import EditHandle, WeightSnapshotHandle, keep_first_copies, restore_all
from lmedit.requests import EditRequest

LOG = logging.getLogger(__name__)

__all__ = [
    "AlphaEditHyperParams", "BaseEditor", "CounterFactDataset", "DEFERHyperParams", "DeferHyperParams",
    "EasyEditHyperParams", "FTHyperParams", "GRACEHyperParams", "GraceHyperParams", "IKEHyperParams",
    "KnowEditDataset", "LoRAHyperParams", "MEMITHyperParams", "MENDHyperParams", "ROMEHyperParams",
    "SERACHparams", "SERACHyperParams", "WISEHyperParams", "WeightsCopy", "ZsreDataset", "encode_ike_facts",
    "summary_metrics",
]

# EasyEdit scores GRACE, and GRACE alone, by greedy generation ("vanilla_generation"); the rest by
# teacher forcing. This layer keeps that choice so numbers stay comparable with EasyEdit's own files.
GENERATION_SCORED_IN_EASYEDIT = frozenset({"GRACE"})
ICL_STYLE_METHODS = frozenset({"IKE"})
TOKEN_ACCURACY_METRICS = frozenset({"token_em", "token em", "exact match", "exact_match"})
FLUENCY_NEW_TOKENS = 100


# --------------------------------------------------------------------------- hyperparameters


class EasyEditHyperParams:
    """An EasyEdit hyperparameter file read for lmedit, as EasyEdit's ``<Method>HyperParams`` object.

    It carries the :class:`~lmedit.compat.easyedit_hparams.EasyEditConfig` (lmedit method name,
    lmedit hyperparameters, model, device, dtype), so :meth:`BaseEditor.from_hparams` knows all it
    needs. Attributes read like EasyEdit's dataclass: ``hparams.model_name``, ``hparams.device``,
    ``hparams.alg_name``, and every lmedit field of the method (``hparams.layers``); assigning one
    changes it (``hparams.model_name = (model, tok)`` is EasyEdit's way to pass a loaded model).
    """

    methods: ClassVar[tuple[str, ...]] = ()  # lmedit method names the class loads; empty: any

    def __init__(self, config: Any, *, raw: Mapping[str, Any] | None = None, source: Any = None) -> None:
        own = self.__dict__
        own["config"] = config
        own["raw"] = dict(raw or {})
        own["source"] = source
        own["model_name"] = config.model_name
        own["device"] = config.device
        own["dtype"] = config.dtype

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | Path | Mapping[str, Any]) -> "EasyEditHyperParams":
        """Read an EasyEdit YAML file (``.yaml`` appended when missing, as EasyEdit does) or mapping."""
        from lmedit.compat.easyedit_hparams import read_easyedit_hparams

        source: Any = hparams_name_or_path
        raw: dict[str, Any] = {}
        if isinstance(source, Mapping):
            raw = dict(source)
        else:
            path = Path(source)
            if path.suffix not in (".yaml", ".yml", ".json") and not path.exists():
                path = path.with_name(path.name + ".yaml")
            if not path.is_file():
                raise ValueError(f"EasyEdit hyperparameter file {str(path)!r} does not exist")
            source = path
            import yaml

            loaded = yaml.safe_load(path.read_text())
            raw = dict(loaded) if isinstance(loaded, Mapping) else {}
        config = read_easyedit_hparams(source)
        if cls.methods and config.method not in cls.methods:
            right = _class_for(config.method)
            raise ValueError(
                f"{_describe(source)} is an EasyEdit file for {config.method}, not for {cls.__name__} "
                f"({'/'.join(cls.methods)}); load it with {right}.from_hparams"
            )
        return cls(config, raw=raw, source=source)

    @property
    def method(self) -> str:
        """The lmedit registry name of the method (FT-L, FT-M, ROME, ...)."""
        return self.config.method

    @property
    def hparams(self) -> Any:
        """The lmedit hyperparameter dataclass."""
        return self.config.hparams

    @property
    def alg_name(self) -> str:
        return str(self.raw.get("alg_name", self.config.method))

    @property
    def batch_size(self) -> int | None:
        """EasyEdit's edit batch size (``batch_edit`` chunks); None when neither the file nor the method sets one."""
        value = self.__dict__.get("batch_size", getattr(self.config, "batch_size", None))
        if value is None:
            value = self.raw.get("batch_size", getattr(self.hparams, "batch_size", None))
        return int(value) if value is not None else None

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and hasattr(config.hparams, name):
            return getattr(config.hparams, name)
        raw = self.__dict__.get("raw", {})
        if name in raw:
            return raw[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        hparams = self.__dict__["config"].hparams
        if name == "batch_size" or name not in getattr(hparams, "__dataclass_fields__", {}):
            self.__dict__[name] = value
        if name in getattr(hparams, "__dataclass_fields__", {}):
            setattr(hparams, name, value)
            hparams.validate()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method!r}, model_name={self.model_name!r}, hparams={self.hparams!r})"


def _describe(source: Any) -> str:
    return "the given mapping" if isinstance(source, Mapping) else repr(str(source))


class FTHyperParams(EasyEditHyperParams):
    methods = ("FT-L", "FT-M")


class LoRAHyperParams(EasyEditHyperParams):
    methods = ("LoRA",)


class ROMEHyperParams(EasyEditHyperParams):
    methods = ("ROME",)


class MEMITHyperParams(EasyEditHyperParams):
    methods = ("MEMIT",)


class AlphaEditHyperParams(EasyEditHyperParams):
    methods = ("AlphaEdit",)


class GraceHyperParams(EasyEditHyperParams):
    methods = ("GRACE",)


class DeferHyperParams(EasyEditHyperParams):
    methods = ("DEFER",)


class WISEHyperParams(EasyEditHyperParams):
    methods = ("WISE",)


class IKEHyperParams(EasyEditHyperParams):
    methods = ("IKE",)


class SERACHparams(EasyEditHyperParams):
    methods = ("SERAC",)


class MENDHyperParams(EasyEditHyperParams):
    methods = ("MEND",)


GRACEHyperParams = GraceHyperParams
DEFERHyperParams = DeferHyperParams
SERACHyperParams = SERACHparams

_CLASSES: tuple[type[EasyEditHyperParams], ...] = (
    FTHyperParams, LoRAHyperParams, ROMEHyperParams, MEMITHyperParams, AlphaEditHyperParams, GraceHyperParams,
    DeferHyperParams, WISEHyperParams, IKEHyperParams, SERACHparams, MENDHyperParams,
)


def _class_for(method: str) -> str:
    return next((c.__name__ for c in _CLASSES if method in c.methods), "EasyEditHyperParams")


# --------------------------------------------------------------------------- datasets


class _EditDataset:
    """A benchmark file read by lmedit's loader, served as EasyEdit's dataset items (plain dicts).

    ``path`` and ``size`` are kept so IKE can use the file as its demonstration pool.
    """

    data_format: ClassVar[str] = ""

    def __init__(self, data_dir: str | Path, size: int | None = None, config: Any = None, *args: Any, **kwargs: Any) -> None:
        from lmedit.data import load_requests

        self.path = Path(data_dir)
        self.size = size
        self.config = config
        self.requests: list[EditRequest] = load_requests(self.path, limit=size, format=self.data_format)
        self._data = [self._item(request) for request in self.requests]

    def _item(self, request: EditRequest) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._data[index]

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._data)


def _first_probe(request: EditRequest, kind: str, group: str) -> tuple[str | None, str | None]:
    probes = getattr(request, kind).get(group, ())
    return (probes[0].prompt, probes[0].answer) if probes else (None, None)


class ZsreDataset(_EditDataset):
    """zsRE in MEND's layout (``zsre_mend_eval.json`` and the portability files); records without ``alt`` skipped."""

    data_format = "zsre"

    def _item(self, request: EditRequest) -> dict[str, Any]:
        loc, loc_ans = _first_probe(request, "locality", "neighborhood")
        item: dict[str, Any] = {
            "case_id": int(request.case_id) if request.case_id is not None and request.case_id.isdigit() else request.case_id,
            "prompt": request.prompt,
            "target_new": request.target_new,
            "ground_truth": request.ground_truth,
            "rephrase_prompt": request.rephrase[0] if request.rephrase else None,
            "locality_prompt": loc,
            "locality_ground_truth": loc_ans,
            "cond": f"{request.ground_truth} >> {request.target_new} || {request.prompt}",
        }
        if request.subject is not None:
            item["subject"] = request.subject
        return item


class CounterFactDataset(_EditDataset):
    """CounterFact in EasyEdit's flat layout (``counterfact-train/val/edit.json``)."""

    data_format = "counterfact"

    def _item(self, request: EditRequest) -> dict[str, Any]:
        loc, loc_ans = _first_probe(request, "locality", "neighborhood")
        return {
            "case_id": int(request.case_id) if request.case_id is not None and request.case_id.isdigit() else request.case_id,
            "prompt": request.prompt,
            "target_new": request.target_new,
            "ground_truth": request.ground_truth,
            "subject": request.subject,
            "rephrase_prompt": request.rephrase[0] if request.rephrase else None,
            "locality_prompt": loc,
            "locality_ground_truth": loc_ans,
        }


class KnowEditDataset(_EditDataset):
    """KnowEdit records (ZsRE, WikiBio, WikiData_recent, WikiData_counterfact), as EasyEdit's items."""

    data_format = "knowedit"

    _GROUP_KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "portability_r": ("portability", "Reasoning"),
        "portability_s": ("portability", "Subject_Aliasing"),
        "portability_l": ("portability", "Logical_Generalization"),
        "locality_rs": ("locality", "Relation_Specificity"),
        "locality_f": ("locality", "Forgetfulness"),
    }

    def _item(self, request: EditRequest) -> dict[str, Any]:
        item: dict[str, Any] = {
            "subject": request.subject,
            "prompt": request.prompt,
            "target_new": request.target_new,
            "ground_truth": request.ground_truth,
        }
        for key, (kind, group) in self._GROUP_KEYS.items():
            probes = getattr(request, kind).get(group)
            item[key] = [{"prompt": p.prompt, "ground_truth": [p.answer]} for p in probes] if probes else None
        return item


def encode_ike_facts(sentence_model: Any, ds: Any, hparams: Any) -> None:
    """Accepted for EasyEdit scripts; lmedit's IKE encodes (and caches) its demonstration pool itself."""
    LOG.info("encode_ike_facts: nothing to do, lmedit's IKE builds and caches its pool from train_ds on first use")


# --------------------------------------------------------------------------- requests in EasyEdit's shape


def _as_list(value: Any, n: int, name: str) -> list[Any]:
    if value is None:
        return [None] * n
    items = [value] if isinstance(value, str) else list(value)
    if len(items) != n:
        raise ValueError(f"{name} has {len(items)} item(s) but there are {n} prompt(s); give one per edit")
    return items


def _probe_inputs(inputs: Mapping[str, Any] | None, n: int, name: str) -> list[dict[str, dict[str, Any]]]:
    """``{key: {'prompt': [...], 'ground_truth': [...]}}`` (one entry per edit) -> one dict per edit."""
    per_edit: list[dict[str, dict[str, Any]]] = [{} for _ in range(n)]
    for key, section in (inputs or {}).items():
        if not isinstance(section, Mapping) or "prompt" not in section or "ground_truth" not in section:
            raise ValueError(f"{name}[{key!r}] must be {{'prompt': [...], 'ground_truth': [...]}} with one entry per edit")
        single = isinstance(section["prompt"], str)
        prompts = [section["prompt"]] if single else list(section["prompt"])
        answers = [section["ground_truth"]] if single else list(section["ground_truth"])
        if not (len(prompts) == len(answers) == n):
            raise ValueError(
                f"{name}[{key!r}] has {len(prompts)} prompt(s) and {len(answers)} ground_truth(s) for {n} edit(s); "
                "one edit needs one entry (an entry may itself be a list)"
            )
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            if prompt is not None:
                per_edit[i][key] = {"prompt": prompt, "ground_truth": answer}
    return per_edit


def prepare_requests(
    prompts: str | Sequence[str],
    target_new: str | Sequence[str],
    ground_truth: str | Sequence[str] | None = None,
    rephrase_prompts: str | Sequence[str] | None = None,
    locality_inputs: Mapping[str, Any] | None = None,
    portability_inputs: Mapping[str, Any] | None = None,
    subject: str | Sequence[str] | None = None,
    target_neg: str | Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """EasyEdit's request dicts (``requested_rewrite``) from ``edit``'s arguments; the inputs are not modified."""
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompt_list)
    targets = _as_list(target_new, n, "target_new")
    truths = _as_list(ground_truth, n, "ground_truth")
    rephrases = _as_list(rephrase_prompts, n, "rephrase_prompts") if rephrase_prompts is not None else None
    subjects = _as_list(subject, n, "subject") if subject is not None else None
    negatives = _as_list(target_neg, n, "target_neg") if target_neg is not None else None
    locality = _probe_inputs(locality_inputs, n, "locality_inputs")
    portability = _probe_inputs(portability_inputs, n, "portability_inputs")
    requests = []
    for i, prompt in enumerate(prompt_list):
        request: dict[str, Any] = {
            "prompt": prompt, "target_new": targets[i], "ground_truth": truths[i],
            "portability": portability[i], "locality": locality[i],
        }
        if negatives is not None:
            request["target_neg"] = negatives[i]
        if subjects is not None:
            if subjects[i] not in prompt:
                raise ValueError(f"subject {subjects[i]!r} does not occur in prompt {prompt!r}; it must be a verbatim part of it")
            request["subject"] = subjects[i]
        if rephrases is not None:
            request["rephrase_prompt"] = rephrases[i]
        requests.append(request)
    return requests


def _first_string(value: Any) -> str | None:
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, str) else None


def _pairs(section: Mapping[str, Any]) -> list[tuple[str, str]]:
    """One probe section -> (prompt, answer) pairs; a list of prompts takes its answers in order (KnowEdit)."""
    prompt, answer = section.get("prompt"), section.get("ground_truth")
    if isinstance(prompt, str):
        pairs = [(prompt, _first_string(answer))]
    elif isinstance(answer, (list, tuple)) and len(answer) == len(prompt):
        pairs = [(p, _first_string(a)) for p, a in zip(prompt, answer)]
    else:
        pairs = [(p, _first_string(answer)) for p in prompt]
    return [(p, a) for p, a in pairs if isinstance(p, str) and isinstance(a, str)]


def to_edit_request(request: Mapping[str, Any], case_id: Any) -> EditRequest:
    """An EasyEdit request dict as lmedit's :class:`EditRequest`."""
    return EditRequest(
        prompt=request["prompt"],
        target_new=request["target_new"],
        subject=request.get("subject"),
        ground_truth=_first_string(request.get("ground_truth")),
        rephrase=request.get("rephrase_prompt"),
        locality={k: _pairs(v) for k, v in (request.get("locality") or {}).items()},
        portability={k: _pairs(v) for k, v in (request.get("portability") or {}).items()},
        case_id=str(case_id),
    )


def _from_dataset_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """An EasyEdit dataset item (zsRE/CounterFact/KnowEdit) as a request dict, as EasyEdit's run scripts build it."""
    request: dict[str, Any] = {
        "prompt": item["prompt"], "target_new": item["target_new"], "ground_truth": item.get("ground_truth"),
        "portability": {}, "locality": {},
    }
    if item.get("subject") is not None:
        request["subject"] = item["subject"]
    if item.get("rephrase_prompt") is not None:
        request["rephrase_prompt"] = item["rephrase_prompt"]
    if item.get("locality_prompt") is not None:
        request["locality"]["neighborhood"] = {"prompt": item["locality_prompt"], "ground_truth": item.get("locality_ground_truth")}
    for key, (kind, group) in KnowEditDataset._GROUP_KEYS.items():
        for probe in item.get(key) or ():
            section = request[kind].setdefault(group, {"prompt": [], "ground_truth": []})
            section["prompt"].append(probe["prompt"])
            section["ground_truth"].append(probe["ground_truth"])
    for kind in ("locality", "portability"):  # EasyEdit's probe dicts come inside the item already
        if isinstance(item.get(kind), Mapping):
            request[kind].update(item[kind])
    return request


# --------------------------------------------------------------------------- results in EasyEdit's shape


def macro_f1(target: Sequence[int], predicted: Sequence[int]) -> float:
    """Macro-averaged F1 over token ids compared position by position (what EasyEdit's GRACE ``*_F1`` is)."""
    n = min(len(target), len(predicted))
    if n == 0:
        return 0.0
    pairs = list(zip(target[:n], predicted[:n]))
    hits = Counter(t for t, p in pairs if t == p)
    truth, guesses = Counter(t for t, _ in pairs), Counter(p for _, p in pairs)
    scores = []
    for label in set(truth) | set(guesses):
        precision = hits[label] / guesses[label] if guesses[label] else 0.0
        recall = hits[label] / truth[label] if truth[label] else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


def _meta(result_key: str, protocol: str, scorer: str, group: str) -> dict[str, str]:
    return {"result_key": result_key, "protocol": protocol, "scorer": scorer, "comparable_group": group}


def _section_meta(section: str, style: str, eval_metric: str) -> dict[str, str]:
    if style == "icl":
        return _meta(f"{section}_acc", "icl_decoder_only_teacher_forcing", "token_accuracy",
                     "lm.icl_decoder_only_teacher_forcing.token_accuracy")
    if eval_metric == "ppl":
        return _meta(f"{section}_ppl", "teacher_forcing_ppl", "perplexity", "lm.teacher_forcing.perplexity")
    if style == "generate":
        return _meta(f"{section}_acc", "vanilla_generation", "token_match", "lm.vanilla_generation.token_match")
    return _meta(f"{section}_acc", "decoder_only_teacher_forcing", "token_accuracy",
                 "lm.decoder_only_teacher_forcing.token_accuracy")


def _locality_meta(name: str, style: str) -> dict[str, str]:
    kind = {"icl": ("icl_pre_post_argmax_token_match", "locality.lm.icl_pre_post_argmax_token_match"),
            "generate": ("pre_post_generated_token_match", "locality.lm.pre_post_generated_token_match")}.get(
        style, ("pre_post_argmax_token_match", "locality.lm.pre_post_argmax_token_match"))
    return _meta(f"locality.{name}_acc", kind[0], "token_match", kind[1])


@dataclass
class _Scoring:
    """How this editor turns probe outcomes into EasyEdit's numbers."""

    style: str  # "teacher", "generate" (GRACE) or "icl" (IKE)
    eval_metric: str
    answer_ids: Callable[[str, str], tuple[int, ...]]

    def tokens(self, outcome: ProbeOutcome) -> list[int]:
        return list(outcome.generated if self.style == "generate" else outcome.teacher_predicted)

    def accuracy(self, outcome: ProbeOutcome) -> float:
        value = outcome.generate_accuracy if self.style == "generate" else outcome.teacher_accuracy
        return float(value if value is not None else 0.0)

    def phase(
        self, probes: Sequence[ProbeRef], outcomes: Sequence[ProbeOutcome], reference: Sequence[ProbeOutcome] | None
    ) -> dict[str, Any]:
        """``pre`` (reference None) or ``post`` metrics of one request, in EasyEdit's layout."""
        by_kind: dict[tuple[str, str], list[tuple[ProbeRef, ProbeOutcome, ProbeOutcome | None]]] = {}
        for i, (probe, outcome) in enumerate(zip(probes, outcomes)):
            ref = reference[i] if reference is not None else None
            by_kind.setdefault((probe.kind, probe.group), []).append((probe, outcome, ref))
        result: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for kind in ("rewrite", "rephrase"):
            items = by_kind.get((kind, ""))
            if items:
                result.update(self._edit_scores(kind, items))
                meta[kind] = _section_meta(kind, self.style, self.eval_metric)
        result["locality"], result["portability"] = {}, {}
        for (kind, group), items in by_kind.items():
            if kind == "portability":
                values = [self.accuracy(o) for _, o, _ in items]
                result["portability"][f"{group}_acc"] = self._shape(values)
            elif kind == "locality":
                result["locality"].update(self._locality(group, items, reference is not None))
                if reference is not None or self.style == "icl":
                    meta[f"locality.{group}"] = _locality_meta(group, self.style)
        result["metric_meta"] = meta
        return result

    def _edit_scores(self, kind: str, items: list[tuple[ProbeRef, ProbeOutcome, Any]]) -> dict[str, Any]:
        if self.eval_metric == "ppl":
            return {f"{kind}_ppl": [math.exp(o.teacher_nll) for _, o, _ in items if o.teacher_nll is not None]}
        values = [self.accuracy(o) for _, o, _ in items]
        # EasyEdit's IKE gives rewrite_acc as a one-item list but rephrase_acc as a bare number
        scores: dict[str, Any] = {f"{kind}_acc": values if kind == "rewrite" else self._shape(values)}
        if self.style == "generate":
            f1 = [macro_f1(self.answer_ids(p.prompt, p.answer), o.generated) for p, o, _ in items]
            scores[f"{kind}_F1"] = sum(f1) / len(f1)
        return scores

    def _locality(self, group: str, items: list[tuple[ProbeRef, ProbeOutcome, ProbeOutcome | None]], post: bool) -> dict[str, Any]:
        if self.style == "icl":  # EasyEdit's IKE stores only the agreement, in pre and post
            agreement = [locality_agreement(self.tokens(r), self.tokens(o)) if r is not None else 1.0 for _, o, r in items]
            return {f"{group}_acc": self._shape(agreement)}
        values: dict[str, Any] = {f"{group}_output": [self.tokens(o) for _, o, _ in items]}
        if post:
            values[f"{group}_acc"] = [locality_agreement(self.tokens(r), self.tokens(o)) for _, o, r in items if r is not None]
        return values

    def _shape(self, values: list[float]) -> Any:
        """A list, as EasyEdit gives it; IKE gives one probe's score as a bare number."""
        if self.style == "icl" and len(values) == 1:
            return values[0]
        return values


def summary_metrics(all_metrics: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """EasyEdit's summary: per phase the mean of each score over requests (a request's list averaged first).

    Logged as ``Metrics Summary: ...`` and returned; unlike EasyEdit nothing is written to ``./logs``.
    """
    metrics = [all_metrics] if isinstance(all_metrics, Mapping) else list(all_metrics)
    summary: dict[str, Any] = {}
    for phase in ("pre", "post"):
        summary[phase] = {}
        for key in ("rewrite_acc", "rephrase_acc", "rewrite_ppl", "ood_acc"):
            values = [_mean(m[phase][key]) for m in metrics if key in m.get(phase, {})]
            if values:
                summary[phase][key] = _mean(values)
        for section in ("locality", "portability"):
            keys = sorted({k for m in metrics for k in (m.get(phase, {}).get(section) or {}) if k.endswith("acc")})
            if keys:
                summary[phase][section] = {
                    key: _mean([_mean(m[phase][section][key]) for m in metrics if key in (m.get(phase, {}).get(section) or {})])
                    for key in keys
                }
    protocols: dict[str, set[str]] = {}
    for m in metrics:
        for phase in ("pre", "post"):
            for section, meta in (m.get(phase, {}).get("metric_meta") or {}).items():
                protocols.setdefault(f"{phase}.{section}", set()).add(meta.get("comparable_group", "unknown"))
    if protocols:
        summary["metric_protocols"] = {k: sorted(v) for k, v in sorted(protocols.items())}
    LOG.info("Metrics Summary: %s", summary)
    return summary


def _mean(value: Any) -> float:
    if isinstance(value, (list, tuple)):
        flat = [_mean(v) for v in value]
        return sum(flat) / len(flat) if flat else float("nan")
    return float(value)


# --------------------------------------------------------------------------- weights_copy


class WeightsCopy(Mapping[str, torch.Tensor]):
    """EasyEdit's ``weights_copy``, both ways it is used: a mapping and a restore callable.

    As a mapping: parameter name -> its exact value before the call (the first original when
    several edits touched it), for methods that change weights in place. Called: undoes every
    edit of the call still in the model, newest first, bit for bit (what EasyEdit's GRACE/WISE
    ``reset_layer`` callables do). After a non-sequential call the model is already restored and
    calling it does nothing.
    """

    def __init__(self, handles: Sequence[EditHandle]) -> None:
        self._handles = list(handles)
        originals: dict[str, torch.Tensor] = {}
        for handle in self._handles:
            if isinstance(handle, WeightSnapshotHandle):
                for name, tensor in handle.originals().items():
                    originals.setdefault(name, tensor)
        self._originals = originals

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._originals[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._originals)

    def __len__(self) -> int:
        return len(self._originals)

    def __call__(self) -> None:
        restore_all(self._handles)


# --------------------------------------------------------------------------- the editor


@dataclass
class _Plan:
    """One call of edit/batch_edit/edit_dataset: the requests, their edit steps and how to run them."""

    dicts: list[dict[str, Any]]
    case_ids: list[Any]
    steps: list[list[int]]
    sequential: bool
    eval_each: bool = False
    test_generation: bool = False
    loc_prompts: list[str] | None = None


class BaseEditor:
    """EasyEdit's ``BaseEditor`` on lmedit's :class:`~lmedit.editor.Editor`."""

    @classmethod
    def from_hparams(cls, hparams: EasyEditHyperParams) -> "BaseEditor":
        return cls(hparams)

    def __init__(self, hparams: EasyEditHyperParams) -> None:
        if hparams is None or not isinstance(hparams, EasyEditHyperParams):
            raise ValueError(
                "BaseEditor needs hyperparameters read with a <Method>HyperParams.from_hparams(path) class of "
                f"lmedit.compat.easyedit, got {type(hparams).__name__}"
            )
        from lmedit.editor import Editor
        from lmedit.registry import get_method

        self.hparams = hparams
        self.alg_name = hparams.alg_name
        self.model, self.tok, self.model_name = self._load_model(hparams)
        self._check_templates(hparams)
        info = get_method(hparams.method)
        style = "icl" if info.name in ICL_STYLE_METHODS else "generate" if info.name in GENERATION_SCORED_IN_EASYEDIT else "teacher"
        self._style = style
        self.editor = Editor(self.model, self.tok, info.name, hparams=hparams.hparams,
                             eval_config=EvalConfig(mode="generate" if style == "generate" else "teacher"),
                             model_name=self.model_name)

    @staticmethod
    def _load_model(hparams: EasyEditHyperParams) -> tuple[torch.nn.Module, Any, str]:
        name = hparams.model_name
        if isinstance(name, (tuple, list)) and len(name) == 2:  # EasyEdit's escape hatch: (model, tokenizer)
            model, tok = name
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            return model, tok, getattr(getattr(model, "config", None), "_name_or_path", "") or "custom"
        if not name:
            raise ValueError("the hyperparameters name no model: set model_name in the file (a hub id, a folder or smollm2-135m)")
        from lmedit.models import load_model

        device = _usable_device(hparams.device)
        dtype = hparams.dtype or "float32"
        if device == "cpu" and dtype == "float16":
            LOG.warning("fp16 asks for float16 weights, which are slow and imprecise on the CPU; loading float32")
            dtype = "float32"
        model, tok = load_model(str(name), dtype=dtype, device=device)
        return model, tok, str(name)

    def _check_templates(self, hparams: EasyEditHyperParams) -> None:
        """Check the file's module templates against the loaded model (the reader names any that match nothing)."""
        if hparams.source is None:
            return
        from lmedit.compat.easyedit_hparams import read_easyedit_hparams

        read_easyedit_hparams(hparams.source, model=self.model)

    # ----------------------------------------------------------------- EasyEdit's entry points

    def edit(
        self,
        prompts: str | Sequence[str],
        target_new: str | Sequence[str],
        ground_truth: str | Sequence[str] | None = None,
        target_neg: str | Sequence[str] | None = None,
        rephrase_prompts: str | Sequence[str] | None = None,
        locality_inputs: Mapping[str, Any] | None = None,
        portability_inputs: Mapping[str, Any] | None = None,
        sequential_edit: bool = False,
        verbose: bool = True,
        *,
        subject: str | Sequence[str] | None = None,
        keep_original_weight: bool | None = None,
        train_ds: Any = None,
        test_generation: bool = False,
        **kwargs: Any,
    ) -> tuple[list[dict[str, Any]], torch.nn.Module, WeightsCopy]:
        """Edit each request on its own (or one after another with ``sequential_edit``) and score it.

        The positional order is EasyEdit's. Options beyond EasyEdit's: ``eval_each=True`` scores each
        request of a sequential call right after its own edit instead of after the last one.
        """
        if "requests" in kwargs:
            requests = list(kwargs.pop("requests"))
        else:
            requests = prepare_requests(prompts, target_new, ground_truth, rephrase_prompts, locality_inputs,
                                        portability_inputs, subject, target_neg)
        return self.edit_requests(requests, sequential_edit, verbose, test_generation=test_generation,
                                  keep_original_weight=keep_original_weight, train_ds=train_ds, **kwargs)

    def edit_requests(
        self,
        requests: Sequence[Mapping[str, Any]],
        sequential_edit: bool = False,
        verbose: bool = True,
        test_generation: bool = False,
        **kwargs: Any,
    ) -> tuple[list[dict[str, Any]], torch.nn.Module, WeightsCopy]:
        """Edit EasyEdit request dicts one at a time."""
        dicts = [dict(r) for r in requests]
        plan = _Plan(dicts, list(range(len(dicts))), [[i] for i in range(len(dicts))], sequential_edit,
                     test_generation=test_generation)
        return self._execute(plan, verbose, kwargs)

    def batch_edit(
        self,
        prompts: Sequence[str],
        target_new: Sequence[str],
        ground_truth: Sequence[str] | None = None,
        target_neg: Sequence[str] | None = None,
        rephrase_prompts: Sequence[str] | None = None,
        locality_inputs: Mapping[str, Any] | None = None,
        portability_inputs: Mapping[str, Any] | None = None,
        sequential_edit: bool = False,
        verbose: bool = True,
        **kwargs: Any,
    ) -> tuple[list[dict[str, Any]], torch.nn.Module, WeightsCopy]:
        """Edit ``hparams.batch_size`` requests per call (all at once when the file sets no batch size)."""
        self._require_batch()
        requests = prepare_requests(prompts, target_new, ground_truth, rephrase_prompts, locality_inputs,
                                    portability_inputs, kwargs.pop("subject", None), target_neg)
        size = self.hparams.batch_size or len(requests)
        steps = [list(range(s, min(s + size, len(requests)))) for s in range(0, len(requests), size)]
        plan = _Plan(requests, list(range(len(requests))), steps, sequential_edit,
                     test_generation=bool(kwargs.pop("test_generation", False)))
        return self._execute(plan, verbose, kwargs)

    def edit_dataset(
        self,
        ds: Sequence[Mapping[str, Any]],
        sequential_edit: bool = False,
        verbose: bool = True,
        test_generation: bool = False,
        **kwargs: Any,
    ) -> tuple[list[dict[str, Any]], torch.nn.Module, WeightsCopy]:
        """Edit every item of an EasyEdit dataset, ``batch_size`` per call for methods that batch."""
        dicts = [_from_dataset_item(item) for item in ds]
        case_ids = [item.get("case_id", i) for i, item in enumerate(ds)]
        size = (self.hparams.batch_size or 1) if self.editor.method.supports_batch else 1
        steps = [list(range(s, min(s + size, len(dicts)))) for s in range(0, len(dicts), size)]
        plan = _Plan(dicts, case_ids, steps, sequential_edit, test_generation=test_generation)
        return self._execute(plan, verbose, kwargs)

    # ----------------------------------------------------------------- the run

    def _require_batch(self) -> None:
        if not self.editor.method.supports_batch:
            from lmedit.registry import list_methods

            batchable = ", ".join(m.name for m in list_methods() if m.supports_batch)
            raise ValueError(f"{self.editor.method.name} cannot batch edit; use edit() or one of: {batchable}")

    def _execute(self, plan: _Plan, verbose: bool, kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], torch.nn.Module, WeightsCopy]:
        self._take_options(plan, kwargs)
        eval_metric = str(kwargs.pop("eval_metric", "token_em"))
        if eval_metric not in TOKEN_ACCURACY_METRICS and eval_metric != "ppl":
            raise ValueError(f"eval_metric {eval_metric!r} is not supported here; use 'token_em' (default) or 'ppl'")
        scoring = _Scoring("teacher" if eval_metric == "ppl" else self._style, eval_metric, self._answer_ids)
        requests = [to_edit_request(d, case_id) for d, case_id in zip(plan.dicts, plan.case_ids)]
        pre = self.editor.capture(requests)
        pre_fluency = self._fluency(requests) if plan.test_generation else None
        pre_file = kwargs.pop("pre_file", None)
        _warn_unused(kwargs)
        metrics = [{"pre": self._pre_phase(scoring, pre, i, pre_fluency)} for i in range(len(requests))]
        if pre_file:
            Path(pre_file).write_text(json.dumps(metrics, indent=4))
        handles, times = self._edit_and_score(plan, requests, pre, scoring, metrics)
        for i, d in enumerate(plan.dicts):
            metrics[i] = {"pre": metrics[i]["pre"], "case_id": plan.case_ids[i], "requested_rewrite": d,
                          "time": times[i], "post": metrics[i]["post"]}
            _log_request(i, d, metrics[i], verbose)
        summary_metrics(metrics)
        return metrics, self.model, WeightsCopy(handles)

    def _take_options(self, plan: _Plan, kwargs: dict[str, Any]) -> None:
        """EasyEdit's keyword options that change how the call runs."""
        keep = kwargs.pop("keep_original_weight", None)
        if keep is not None:
            LOG.warning(
                "keep_original_weight=%s is EasyEdit's pre-2024 switch; EasyEdit ignores it since sequential_edit replaced "
                "it, and so does lmedit: edits are %s (pass sequential_edit=True to keep them)", keep,
                "kept" if plan.sequential else "undone after each request")
        plan.eval_each = bool(kwargs.pop("eval_each", False))
        loc_prompts = kwargs.pop("loc_prompts", None)
        if loc_prompts is not None:
            plan.loc_prompts = [loc_prompts] if isinstance(loc_prompts, str) else list(loc_prompts)
        train_ds = kwargs.pop("train_ds", None)
        if self.editor.method.name == "IKE" and train_ds is not None:
            self._use_demonstrations(train_ds)

    def _use_demonstrations(self, train_ds: Any) -> None:
        """IKE: EasyEdit's ``train_ds`` becomes the file of lmedit's demonstration pool."""
        path = getattr(train_ds, "path", None)
        if path is None:
            raise ValueError(
                "IKE's train_ds must be a dataset read from a file (ZsreDataset, CounterFactDataset or KnowEditDataset "
                f"of lmedit.compat.easyedit), got {type(train_ds).__name__}"
            )
        hparams = self.editor.hparams
        hparams.train_file = str(path)
        hparams.train_format = getattr(train_ds, "data_format", None) or None
        hparams.pool_size = getattr(train_ds, "size", None)
        hparams.validate()

    def _edit_and_score(
        self, plan: _Plan, requests: list[EditRequest], pre: Snapshot, scoring: _Scoring, metrics: list[dict[str, Any]]
    ) -> tuple[list[EditHandle], list[float]]:
        times = [0.0] * len(requests)
        handles: list[EditHandle] = []
        try:
            for step in plan.steps:
                started = time.perf_counter()
                handle = self._apply(plan, requests, step)
                if plan.sequential:
                    keep_first_copies(handles, handle)  # one copy per weight for the whole sequence
                handles.append(handle)
                elapsed = time.perf_counter() - started  # EasyEdit gives each request its edit call's time
                for i in step:
                    times[i] = elapsed
                if not plan.sequential or plan.eval_each:
                    self._score(plan, requests, step, pre, scoring, metrics)
                if not plan.sequential:
                    handle.restore()
            if plan.sequential and not plan.eval_each:
                self._score(plan, requests, [i for step in plan.steps for i in step], pre, scoring, metrics)
        except BaseException:
            restore_all(handles)
            raise
        return handles, times

    def _apply(self, plan: _Plan, requests: list[EditRequest], step: list[int]) -> EditHandle:
        batch = [requests[i] for i in step]
        if plan.loc_prompts is None or self.editor.method.name != "WISE":
            return self.editor.apply(batch)
        # WISE: EasyEdit's loc_prompts are its irrelevant prompts, the i-th for the i-th request
        hparams = self.editor.hparams
        previous = hparams.irrelevant_file
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "loc_prompts.json"
            text = plan.loc_prompts[step[0] % len(plan.loc_prompts)]
            path.write_text(json.dumps([{"locality_prompt": text, "locality_ground_truth": ""}]))
            hparams.irrelevant_file = str(path)
            try:
                return self.editor.apply(batch)
            finally:
                hparams.irrelevant_file = previous

    def _score(self, plan: _Plan, requests: list[EditRequest], indices: list[int], pre: Snapshot,
               scoring: _Scoring, metrics: list[dict[str, Any]]) -> None:
        """Post-edit scores of ``indices`` on the model as it is now (one batched pass)."""
        sub = pre.subset(indices)
        outcomes = self.editor.evaluator.run_probes(self.model, sub.probes)
        fluency = self._fluency([requests[i] for i in indices]) if plan.test_generation else None
        for local, i in enumerate(indices):
            mine = [k for k, p in enumerate(sub.probes) if p.request == local]
            metrics[i]["post"] = scoring.phase([sub.probes[k] for k in mine], [outcomes[k] for k in mine],
                                               [sub.outcomes[k] for k in mine])
            if fluency is not None:
                metrics[i]["post"]["fluency"] = {"ngram_entropy": fluency[local]}

    def _pre_phase(self, scoring: _Scoring, pre: Snapshot, index: int, fluency: list[float] | None) -> dict[str, Any]:
        mine = [k for k, p in enumerate(pre.probes) if p.request == index]
        result = scoring.phase([pre.probes[k] for k in mine], [pre.outcomes[k] for k in mine], None)
        if fluency is not None:
            result["fluency"] = {"ngram_entropy": fluency[index]}
        return result

    def _fluency(self, requests: Sequence[EditRequest]) -> list[float] | None:
        """EasyEdit's ``test_generation``: n-gram entropy of a 100-token greedy continuation of the edit prompt."""
        from lmedit.evaluation.suites.fluency import generate_texts, text_ngram_entropy
        from lmedit.routing import router_of

        if router_of(self.model) is not None:
            LOG.warning("test_generation: %s answers through a probe router; fluency is not measured", self.editor.method.name)
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            texts = generate_texts(self.model, self.tok, [r.prompt for r in requests], FLUENCY_NEW_TOKENS, batch_size=32)
        finally:
            self.model.train(was_training)
        return [text_ngram_entropy(t.text) for t in texts]

    def _answer_ids(self, prompt: str, answer: str) -> tuple[int, ...]:
        full = self.tok(f"{prompt} {answer}").input_ids
        return tuple(full[len(self.tok(prompt).input_ids):])


def _usable_device(device: str | None) -> str:
    if device is None:
        return "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        LOG.warning("the hyperparameters ask for device %s but no GPU is available here; using the CPU", device)
        return "cpu"
    return str(device)


def _warn_unused(kwargs: Mapping[str, Any]) -> None:
    """Name every option this layer does not act on, once, instead of swallowing it as EasyEdit does."""
    for name in kwargs:
        note = "computed by lmedit in one batched pass instead" if name == "pre_edit" else "not supported by lmedit.compat.easyedit"
        LOG.warning("option %s=... ignored: %s", name, note)


def _log_request(index: int, request: Mapping[str, Any], metrics: Mapping[str, Any], verbose: bool) -> None:
    level = logging.INFO if verbose else logging.DEBUG
    LOG.log(level, "%d editing: %s -> %s  %s", index, request["prompt"], request["target_new"], metrics["post"])
