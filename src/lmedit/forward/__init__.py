"""The forward layer: every way the framework runs a model forward, below the methods and the evaluation.

It owns tokenising an edit's ``(prompt, answer)`` pair (:mod:`.tokens`),
laying sequences out as a pass's inputs, packed or left-padded
(:mod:`.batching`), planning teacher-forced answer passes with their shared
prefixes (:mod:`.answers`), finding and caching prefixes many sequences
share (:mod:`.prefix`), reading logits at chosen positions only (:mod:`.reading`),
greedy generation (:mod:`.generation`) and partial forwards that rerun a
model from one block or one column on (:mod:`.partial`).

Dependencies run one way: this package builds only on the contracts
(:mod:`lmedit.spec`, :mod:`lmedit.compat`) and imports nothing from
evaluation, the methods, locate, the orchestration (runner, editor,
registry) or the commands, so all of those can import it at module level.
"""

from lmedit.forward.answers import AnswerBatch, answer_batches
from lmedit.forward.batching import (
    BatchInputs,
    ProgressFn,
    Row,
    SharedPrefix,
    build_inputs,
    left_pad,
    plan_packed,
    plan_padded,
    supports_packing,
)
from lmedit.forward.generation import generate_greedy
from lmedit.forward.partial import SuffixForward, UpperForward, block_of, last_columns_logits
from lmedit.forward.prefix import MIN_SHARED_TOKENS, checked_prefix, shared_prefix_groups
from lmedit.forward.reading import forward_reading, forward_tail, logits_at
from lmedit.forward.tokens import TokenizedPair, pad_id_of, tokenize_pair

__all__ = [
    "MIN_SHARED_TOKENS",
    "AnswerBatch",
    "BatchInputs",
    "ProgressFn",
    "Row",
    "SharedPrefix",
    "SuffixForward",
    "TokenizedPair",
    "UpperForward",
    "answer_batches",
    "block_of",
    "build_inputs",
    "checked_prefix",
    "forward_reading",
    "forward_tail",
    "generate_greedy",
    "last_columns_logits",
    "left_pad",
    "logits_at",
    "pad_id_of",
    "plan_packed",
    "plan_padded",
    "shared_prefix_groups",
    "supports_packing",
    "tokenize_pair",
]
