"""Tiny data for running a method on a tiny random model: what the contract test and a contributor's smoke run need.

A method registers ``tiny_setup(model, tok, workdir) -> overrides`` (see
:mod:`lmedit.registry`): hyperparameters that make it run in seconds on a
model of a few layers, whatever its layout. The helpers here make the data
such a setup needs from the tokenizer's own vocabulary, so they work with
any tokenizer and never read a benchmark file: a small text corpus (key
statistics), training edits (MEND, MALMEN, SERAC), a demonstration pool (IKE), and
a hashed bag-of-words sentence encoder (retrieval without model files; it
measures word overlap only and is not meant for real retrieval).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Sequence

import torch

SMOKE_ENCODER = "hashed-words"
"""The name under which :class:`HashedWords` is registered with :mod:`lmedit.encoders`."""


class HashedWords:
    """Unit-length counts of hashed words in 64 buckets: deterministic, instant, no model files."""

    name = SMOKE_ENCODER
    dim = 64

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        rows = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                rows[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return torch.nn.functional.normalize(rows, dim=-1)


def use_smoke_encoder() -> str:
    """Register :class:`HashedWords` (idempotent) and return its encoder name."""
    from lmedit.encoders import register_encoder

    register_encoder(SMOKE_ENCODER, HashedWords)
    return SMOKE_ENCODER


def vocabulary_words(tok: Any, limit: int = 200) -> list[str]:
    """Plain alphabetic words of the tokenizer's vocabulary that tokenise back to themselves, sorted."""
    words = []
    for token in sorted(tok.get_vocab()):
        word = token.lstrip("Ġ▁")
        if word.isalpha() and word.islower() and len(word) > 1:
            words.append(word)
    return sorted(set(words))[:limit]


def _rng_words(tok: Any, seed: int) -> tuple[random.Random, list[str]]:
    words = vocabulary_words(tok)
    if len(words) < 8:
        raise ValueError("the tokenizer's vocabulary has fewer than 8 plain words; smoke data cannot be made from it")
    return random.Random(seed), words


def write_corpus(tok: Any, folder: Path, *, documents: int = 30, length: int = 60, seed: int = 0) -> Path:
    """A plain-text corpus of random vocabulary words (documents separated by blank lines)."""
    rng, words = _rng_words(tok, seed)
    path = Path(folder) / "smoke-corpus.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(length)) for _ in range(documents)))
    return path


def edit_records(tok: Any, n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` zsRE-like records (src, alt, rephrase, loc, loc_ans, subject) made of vocabulary words."""
    rng, words = _rng_words(tok, seed)
    records = []
    for i in range(n):
        a, b, subject = rng.sample(words, 3)
        target, loc_answer, other = rng.sample(words, 3)
        records.append({
            "case_id": i, "src": f"{a} {b} {subject}", "subject": subject, "alt": target,
            "rephrase": f"{b} {a} {subject}", "loc": f"{other} {a}", "loc_ans": loc_answer,
        })
    return records


def write_edit_file(tok: Any, folder: Path, name: str, n: int, *, seed: int = 0) -> Path:
    """:func:`edit_records` as a JSON file that :func:`lmedit.data.load_requests` reads."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(edit_records(tok, n, seed=seed)))
    return path


def edit_examples(tok: Any, n: int, *, seed: int = 0) -> list[Any]:
    """Training examples for meta-learned editors (:class:`lmedit.training.EditExample`)."""
    from lmedit.training import EditExample

    return [EditExample(r["src"], r["alt"], r["rephrase"], r["loc"], r["loc_ans"]) for r in edit_records(tok, n, seed=seed)]
