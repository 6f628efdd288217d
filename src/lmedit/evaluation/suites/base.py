"""The metric-suite contract: optional, named evaluations that run next to the core metrics.

A suite follows the evaluator's rules: whatever it needs from the unedited
model is taken by :meth:`MetricSuite.capture` before any edit, the post-edit
scores come from :meth:`MetricSuite.score` against that capture, prompts go
through the model in batches, and the model is never changed. A suite is
selected by name (``--suite fluency``), optionally with settings
(``--suite fluency:max_new_tokens=50``); its resolved settings are written
into the run's config so that a number can always be traced to how it was made.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from lmedit.requests import EditRequest

class SuiteError(ValueError):
    """A suite was asked for wrongly, or cannot score these requests; the message says how to fix it."""


def _unwrapped(text: str) -> str:
    return text


@dataclass(frozen=True)
class SuiteContext:
    """What a suite needs from the evaluator: its batching limits and how edit prompts are wrapped."""

    batch_size: int = 128
    max_batch_tokens: int = 2048
    packing: bool = True
    edit_prompt: Callable[[str], str] = _unwrapped
    generation_cache: bool = True  # False for methods that read their whole input on every call (WISE, DEFER)


@dataclass
class SuiteCapture:
    """A suite's pre-edit capture: per request, the pre-edit metric values and private state."""

    suite: str
    metrics: list[dict[str, float]]
    states: list[Any]
    keys: list[Any] = field(default_factory=list)
    shared: Any = None

    def subset(self, indices: Sequence[int]) -> "SuiteCapture":
        """The capture of some requests only, in the order of ``indices`` (shared state is kept)."""
        return SuiteCapture(
            self.suite,
            [self.metrics[i] for i in indices],
            [self.states[i] for i in indices],
            [self.keys[i] for i in indices] if self.keys else [],
            self.shared,
        )


@dataclass(frozen=True)
class SuiteOptions:
    """Base class of a suite's settings; subclasses are frozen dataclasses with defaults."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class MetricSuite(ABC):
    """One named suite. Subclasses set ``name``, ``options_type`` and implement capture/score.

    ``required_by(request)`` says whether a request's data needs this suite
    (then it is switched on automatically, e.g. ConvSent); ``applies_to``
    whether the suite can score the request at all.
    """

    name: ClassVar[str]
    options_type: ClassVar[type[SuiteOptions]]
    summary: ClassVar[str] = ""

    def __init__(self, options: SuiteOptions | None = None) -> None:
        self.options = options if options is not None else self.options_type()

    # ------------------------------------------------------------------ what the suite applies to

    @classmethod
    def required_by(cls, request: EditRequest) -> bool:
        return False

    def check_requests(self, requests: Sequence[EditRequest]) -> None:
        """Raise a SuiteError naming the first request this suite cannot score."""

    # ------------------------------------------------------------------ the contract

    @abstractmethod
    def capture(
        self, model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], context: SuiteContext
    ) -> SuiteCapture:
        """Pre-edit state of ``requests`` on the (unedited) model."""

    @abstractmethod
    def score(
        self,
        model: torch.nn.Module,
        tok: Any,
        requests: Sequence[EditRequest],
        pre: SuiteCapture,
        context: SuiteContext,
    ) -> list[dict[str, float]]:
        """Post-edit metrics of ``requests``, one dict per request, measured against ``pre``."""

    def settings(self, tok: Any | None = None) -> dict[str, Any]:
        """The resolved settings recorded in a run's config."""
        return {"suite": self.name, **self.options.to_dict()}

    def spec(self) -> str:
        """The canonical ``name:key=value,...`` string of this suite with its non-default settings."""
        defaults = self.options_type().to_dict()
        changed = {k: v for k, v in self.options.to_dict().items() if defaults.get(k) != v}
        if not changed:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in changed.items())


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_options(options_type: type[SuiteOptions], suite: str, text: str) -> SuiteOptions:
    """``key=value,key=value`` into the suite's options dataclass; unknown keys are refused by name."""
    known = {f.name: f for f in fields(options_type)}
    defaults = options_type().to_dict()
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise SuiteError(f"suite {suite}: setting {item!r} is not key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        if key not in known:
            raise SuiteError(f"suite {suite} has no setting {key!r}; its settings are {', '.join(sorted(known)) or 'none'}")
        values[key] = _coerce(raw, defaults[key], suite, key)
    return options_type(**values)


def _coerce(raw: str, default: Any, suite: str, key: str) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise SuiteError(f"suite {suite}: {key}={raw!r} is not a {type(default).__name__}") from None
    return raw


def require_unrouted(model: torch.nn.Module, suite: str) -> None:
    """Suites score the network as it is; a probe router (IKE, SERAC) would be bypassed silently."""
    try:
        from lmedit.routing import router_kind, router_of
    except ImportError:  # routing not available in this build: nothing can be routed
        return
    router = router_of(model)
    if router is not None:
        raise SuiteError(
            f"the {suite} suite does not support routed methods yet (this model carries a "
            f"{router_kind(router)} router, as IKE and SERAC do); run without --suite {suite}"
        )


def request_key(request: EditRequest) -> tuple[Any, ...]:
    """What must not change between a capture and the scoring that uses it."""
    return (request.case_id, request.prompt, request.target_new)


def check_same_requests(suite: str, pre: SuiteCapture, requests: Sequence[EditRequest]) -> None:
    if pre.keys and [request_key(r) for r in requests] != pre.keys:
        raise SuiteError(f"the {suite} pre-edit capture was made for other requests; capture them again")


def merge_metrics(rows: list[dict[str, float]], extra: Sequence[Mapping[str, float]]) -> None:
    """Add a suite's per-request metrics to the evaluator's rows (in place); names must not collide."""
    if len(rows) != len(extra):
        raise SuiteError(f"a suite returned {len(extra)} metric rows for {len(rows)} requests")
    for row, more in zip(rows, extra):
        clash = set(row) & set(more)
        if clash:
            raise SuiteError(f"suite metric names {sorted(clash)} collide with other metrics")
        row.update(more)
