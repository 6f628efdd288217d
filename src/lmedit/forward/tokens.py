"""Tokenising an edit's ``(prompt, answer)`` pair the way every forward pass and every method reads it.

One place decides where the answer starts, so that scoring, training and
the methods' own losses all slice the same tokens (EasyEdit's slicing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenizedPair:
    """``prompt + " " + answer`` tokenised, and where the answer starts (EasyEdit's slicing)."""

    ids: tuple[int, ...]
    prompt_len: int

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.ids[self.prompt_len :]


def tokenize_pair(tok: Any, prompt: str, answer: str) -> TokenizedPair:
    """Tokenise as EasyEdit does: answer span = tokens of ``prompt + ' ' + answer`` past ``len(tok(prompt))``."""
    prompt_ids = tok(prompt).input_ids
    full_ids = tok(f"{prompt} {answer}").input_ids
    if len(full_ids) <= len(prompt_ids):
        raise ValueError(f"answer {answer!r} adds no tokens after prompt {prompt!r}")
    return TokenizedPair(tuple(full_ids), len(prompt_ids))


def pad_id_of(tok: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos (causal LMs often ship without a pad token)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tok.pad_token")
    return int(pad)
