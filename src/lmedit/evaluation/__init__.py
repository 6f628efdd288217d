"""Evaluation, the same for every method: teacher-forced and generation metrics, batched."""

from lmedit.evaluation.evaluator import EVAL_MODES, EvalConfig, Evaluator, Snapshot, aggregate, locality_agreement
from lmedit.evaluation.scoring import generate_greedy, score_teacher_forced, token_match

__all__ = [
    "EVAL_MODES",
    "EvalConfig",
    "Evaluator",
    "Snapshot",
    "aggregate",
    "generate_greedy",
    "locality_agreement",
    "score_teacher_forced",
    "token_match",
]
