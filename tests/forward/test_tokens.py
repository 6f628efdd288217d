"""Tokenising an edit's pair: the answer span is sliced as EasyEdit slices it."""

from __future__ import annotations

from lmedit.forward import tokenize_pair


def test_tokenize_pair_slices_answer_as_easyedit(word_tok):
    pair = tokenize_pair(word_tok, "the capital of france is", "paris")
    assert pair.prompt_len == 5
    assert word_tok.convert_ids_to_tokens(list(pair.target_ids)) == ["paris"]
