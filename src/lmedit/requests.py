"""Edit requests: what to change, and the probes that measure the change.

A request carries the prompt/target pair to install plus named groups of
probe pairs (locality, portability), mirroring the request format that
EasyEdit users already know, but validated up front so that a malformed
record fails before any model time is spent on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


class RequestError(ValueError):
    """A request is malformed; the message says which field and how to fix it."""


@dataclass(frozen=True)
class Probe:
    """One (prompt, answer) pair used to probe the model.

    ``aliases`` are other correct spellings of the answer (KnowEdit's WikiData
    files list them). Teacher-forced scoring uses ``answer`` only; the
    generation-based QA scores accept any of them.
    """

    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.answer, str):
            raise RequestError(
                f"probe prompt and answer must be strings, got {type(self.prompt).__name__} "
                f"and {type(self.answer).__name__}"
            )
        aliases = _as_str_tuple(self.aliases, "probe aliases")
        object.__setattr__(self, "aliases", tuple(a for a in dict.fromkeys(aliases) if a != self.answer))

    @property
    def answers(self) -> tuple[str, ...]:
        """The answer first, then its aliases."""
        return (self.answer, *self.aliases)

    def to_list(self) -> list[Any]:
        """``[prompt, answer]``, or ``[prompt, answer, [aliases]]`` when there are aliases."""
        return [self.prompt, self.answer, list(self.aliases)] if self.aliases else [self.prompt, self.answer]


ProbeGroups = dict[str, tuple[Probe, ...]]


def _as_str_tuple(value: Any, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, Iterable):
        items = tuple(value)
        for item in items:
            if not isinstance(item, str):
                raise RequestError(
                    f"{field_name} must be a string or a list of strings, found an item of type "
                    f"{type(item).__name__}: {item!r}"
                )
        return tuple(item for item in items if item.strip())
    raise RequestError(f"{field_name} must be a string or a list of strings, got {type(value).__name__}")


def _as_probe_groups(value: Any, field_name: str) -> ProbeGroups:
    """Accept {name: [Probe | (prompt, answer) | {"prompt":..., "answer"/"ground_truth":...}]}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RequestError(
            f"{field_name} must map a group name to a list of (prompt, answer) pairs, "
            f"got {type(value).__name__}"
        )
    groups: ProbeGroups = {}
    for name, items in value.items():
        if isinstance(items, (Probe, Mapping)) or (
            isinstance(items, tuple) and len(items) == 2 and all(isinstance(x, str) for x in items)
        ):
            items = [items]
        probes = []
        for item in items:
            probes.append(_as_probe(item, f"{field_name}[{name!r}]"))
        if probes:
            groups[str(name)] = tuple(probes)
    return groups


def _as_probe(item: Any, where: str) -> Probe:
    if isinstance(item, Probe):
        return item
    if isinstance(item, Mapping):
        answer = item.get("answer", item.get("ground_truth"))
        if "prompt" not in item or answer is None:
            raise RequestError(f"{where}: a probe needs 'prompt' and 'answer' (or 'ground_truth'), got keys {sorted(item)}")
        return Probe(item["prompt"], answer, item.get("aliases") or ())
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return Probe(*item)
    raise RequestError(f"{where}: a probe must be a (prompt, answer[, aliases]) list or a mapping, got {item!r}")


@dataclass(frozen=True)
class EditRequest:
    """One fact to install: ``prompt`` should be completed by ``target_new``.

    ``subject`` is required by methods that locate the subject's tokens
    (ROME-style); when given it must occur verbatim in the prompt.
    """

    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrase: tuple[str, ...] = ()
    locality: ProbeGroups = field(default_factory=dict)
    portability: ProbeGroups = field(default_factory=dict)
    case_id: str | None = None
    # Extra per-request data for metric suites (lmedit.evaluation.suites), e.g. ConvSent's answer
    # sets or CounterFact's generation prompts; JSON-native, written by to_dict only when non-empty.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("prompt", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise RequestError(f"{self._where()}: {name} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise RequestError(f"{self._where()}: {name} is empty; every edit needs a non-empty {name}")
        if self.case_id is not None and not isinstance(self.case_id, str):
            object.__setattr__(self, "case_id", str(self.case_id))
        for name in ("subject", "ground_truth"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise RequestError(f"{self._where()}: {name} must be a string or None, got {type(value).__name__}")
        if self.subject is not None and not self.subject.strip():
            object.__setattr__(self, "subject", None)
        object.__setattr__(self, "rephrase", _as_str_tuple(self.rephrase, "rephrase"))
        object.__setattr__(self, "locality", _as_probe_groups(self.locality, "locality"))
        object.__setattr__(self, "portability", _as_probe_groups(self.portability, "portability"))
        object.__setattr__(self, "extra", self._json_extra())

    def _json_extra(self) -> dict[str, Any]:
        """``extra`` as plain JSON data (tuples become lists), so a request round-trips through a file."""
        if self.extra is None:
            return {}
        if not isinstance(self.extra, Mapping):
            raise RequestError(f"{self._where()}: extra must be a mapping, got {type(self.extra).__name__}")
        try:
            return json.loads(json.dumps(dict(self.extra)))
        except (TypeError, ValueError) as exc:
            raise RequestError(f"{self._where()}: extra must hold JSON data only (str, numbers, lists, dicts): {exc}") from None

    def _where(self) -> str:
        return f"request {self.case_id}" if self.case_id is not None else "request"

    def require_subject(self) -> str:
        """Return the subject, or explain why a subject-locating method cannot use this request."""
        if self.subject is None:
            raise RequestError(
                f"{self._where()}: this method needs the subject (the entity whose fact changes); "
                "set EditRequest.subject to a substring of the prompt"
            )
        if self.subject not in self.prompt:
            raise RequestError(
                f"{self._where()}: subject {self.subject!r} does not occur in prompt {self.prompt!r}; "
                "the subject must be a verbatim substring of the prompt"
            )
        return self.subject

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, readable back with :meth:`from_dict`."""
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "subject": self.subject,
            "ground_truth": self.ground_truth,
            "rephrase": list(self.rephrase),
            "locality": {k: [p.to_list() for p in v] for k, v in self.locality.items()},
            "portability": {k: [p.to_list() for p in v] for k, v in self.portability.items()},
            **({"extra": dict(self.extra)} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EditRequest":
        known = {"case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase", "locality", "portability", "extra"}
        unknown = set(data) - known
        if unknown:
            raise RequestError(f"unknown request field(s) {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**dict(data))
