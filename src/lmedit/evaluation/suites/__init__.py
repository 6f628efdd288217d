"""Metric suites: optional named evaluations next to the core metrics (``--suite NAME[:key=value,...]``).

* ``fluency``: weighted n-gram entropy of greedy generations (KnowEdit's Fluency);
* ``convsent``: ConvSent's edit score and KL locality (switched on by ConvSent data);
* ``counterfact``: ROME's CounterFact efficacy / paraphrase / neighborhood scores and generation entropy;
* ``qa``: free generation in a QA context, exact match and token F1 (WILD, "The Mirage of Model Editing").

The contract is :class:`lmedit.evaluation.suites.base.MetricSuite`; the
evaluator runs the selected suites inside its capture and score calls.
"""

from __future__ import annotations

from typing import Any, Sequence

from lmedit.evaluation.suites.base import (
    MetricSuite,
    SuiteCapture,
    SuiteContext,
    SuiteError,
    SuiteOptions,
    merge_metrics,
    parse_options,
)
from lmedit.evaluation.suites.convsent import ConvSentSuite
from lmedit.evaluation.suites.counterfact import CounterFactSuite
from lmedit.evaluation.suites.fluency import FluencySuite
from lmedit.evaluation.suites.qa import QASuite
from lmedit.requests import EditRequest

SUITES: dict[str, type[MetricSuite]] = {cls.name: cls for cls in (FluencySuite, ConvSentSuite, CounterFactSuite, QASuite)}

__all__ = [
    "SUITES",
    "MetricSuite",
    "SuiteCapture",
    "SuiteContext",
    "SuiteError",
    "SuiteOptions",
    "build_suite",
    "build_suites",
    "canonical_specs",
    "merge_metrics",
    "required_specs",
]


def build_suite(spec: str) -> MetricSuite:
    """``"name"`` or ``"name:key=value,..."`` into a configured suite."""
    if not isinstance(spec, str) or not spec.strip():
        raise SuiteError(f"a suite is named by a non-empty string, got {spec!r}")
    name, _, options = spec.strip().partition(":")
    cls = SUITES.get(name.strip().lower())
    if cls is None:
        raise SuiteError(f"unknown metric suite {name!r}; choose from {', '.join(SUITES)}")
    return cls(parse_options(cls.options_type, cls.name, options))


def build_suites(specs: Sequence[str]) -> list[MetricSuite]:
    """Configured suites in order; a suite named twice is refused (its settings would be ambiguous)."""
    suites = [build_suite(spec) for spec in specs]
    names = [s.name for s in suites]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SuiteError(f"suite(s) {', '.join(repeated)} selected more than once; give each suite once")
    return suites


def canonical_specs(specs: Sequence[str]) -> tuple[str, ...]:
    """The specs as written back by the suites (defaults dropped), e.g. for a run's identity."""
    return tuple(s.spec() for s in build_suites(specs))


def required_specs(requests: Sequence[EditRequest], selected: Sequence[str] = ()) -> tuple[str, ...]:
    """``selected`` plus every suite the requests' data needs (e.g. ConvSent), in a stable order."""
    chosen = {build_suite(s).name for s in selected}
    needed = [name for name, cls in SUITES.items() if name not in chosen and any(cls.required_by(r) for r in requests)]
    return tuple(selected) + tuple(needed)


def describe(suites: Sequence[MetricSuite], tok: Any | None = None) -> list[dict[str, Any]]:
    """Resolved settings of each suite, for a run's config."""
    return [s.settings(tok) for s in suites]
