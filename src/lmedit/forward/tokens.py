"""Tokenising an edit's ``(prompt, answer)`` pair the way every forward pass and every method reads it.

One place decides where the answer starts, so that scoring, training and
the methods' own losses all slice the same tokens (EasyEdit's slicing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence


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


class ContextLengthError(ValueError):
    """An edit's text does not fit the model's context; the message names the request and the limit."""


def context_length(model: Any) -> int | None:
    """The most positions the model can attend over (its config's limit), or None when it states none."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def request_texts(request: Any) -> Iterator[tuple[str, str]]:
    """(what, text) for every text the edit and its evaluation feed the model, answer appended."""
    yield "prompt + target_new", f"{request.prompt} {request.target_new}"
    for index, rephrase in enumerate(request.rephrase):
        yield f"rephrase {index} + target_new", f"{rephrase} {request.target_new}"
    for kind in ("locality", "portability"):
        for group, probes in getattr(request, kind).items():
            for index, probe in enumerate(probes):
                yield f"{kind} {group!r} probe {index}", f"{probe.prompt} {probe.answer}"


def check_fits_context(model: Any, tok: Any, requests: Sequence[Any], *, reserve: int = 0,
                       first_index: int = 0) -> None:
    """Refuse, before any work, a request whose texts are longer than the model's context.

    A prompt past the context is not an edit any method can make: the
    position embeddings run out, and on a CPU the attention over ten
    thousand tokens would run for many minutes before failing. `reserve`
    keeps room for what a method or the evaluation adds (context prefixes,
    generated tokens).
    """
    limit = context_length(model)
    if limit is None:
        return
    for offset, request in enumerate(requests):
        for what, text in request_texts(request):
            if len(text.encode("utf-8")) + 4 + reserve <= limit:  # byte-level and byte-fallback tokenizers make
                continue  # at most one token per byte (plus special tokens): most texts need no tokenising
            count = len(tok(text).input_ids)
            if count + reserve > limit:
                name = f" (case_id {request.case_id})" if getattr(request, "case_id", None) else ""
                raise ContextLengthError(
                    f"request {first_index + offset}{name}: {what} is {count:,} tokens, longer than the model's "
                    f"context of {limit:,} tokens{f' less {reserve} reserved' if reserve else ''}; shorten it")
