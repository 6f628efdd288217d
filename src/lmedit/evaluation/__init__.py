"""Evaluation, the same for every method: teacher-forced and generation metrics, batched.

Generation itself (:func:`lmedit.forward.generate_greedy`) belongs to the forward layer.
"""

from lmedit.evaluation.evaluator import EVAL_MODES, EvalConfig, Evaluator, Snapshot, aggregate, locality_agreement
from lmedit.evaluation.scoring import score_teacher_forced, token_match

__all__ = [
    "EVAL_MODES",
    "EvalConfig",
    "Evaluator",
    "Snapshot",
    "aggregate",
    "locality_agreement",
    "score_teacher_forced",
    "token_match",
]
