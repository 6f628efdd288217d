"""``lmedit stats``: layer parsing, compute-then-cache on a tiny saved model, errors with exit code 2."""

from __future__ import annotations

import random

import pytest
import torch
from typer.testing import CliRunner

from conftest import WORDS, build_tiny_llama, build_word_tokenizer
from lmedit.cli import app
from lmedit.commands.stats import parse_layers, top_eigenvalue
from lmedit.locate.stats import clear_memory_cache

runner = CliRunner()


def _flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny Llama and the word tokenizer saved like any local model folder."""
    tok = build_word_tokenizer()
    folder = tmp_path / "tiny-llama"
    build_tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(1)
    root = tmp_path / "corpus"
    root.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (root / name).write_text(" ".join(rng.choice(WORDS) for _ in range(40)))
    return root


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    clear_memory_cache()
    yield
    clear_memory_cache()


def test_parse_layers_accepts_lists_and_ranges():
    assert parse_layers("5") == [5]
    assert parse_layers("7,5,6") == [5, 6, 7]
    assert parse_layers("4-8") == [4, 5, 6, 7, 8]
    assert parse_layers("1, 3-4,3") == [1, 3, 4]
    for bad in ("a", "5-3", "", "1-"):
        with pytest.raises(ValueError, match="layers"):
            parse_layers(bad)


def test_top_eigenvalue_matches_a_full_decomposition():
    import torch

    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 40, dtype=torch.float64, generator=generator) * torch.linspace(0.1, 3.0, 40, dtype=torch.float64)
    mom2 = keys.T @ keys / 200
    assert abs(top_eigenvalue(mom2) - float(torch.linalg.eigvalsh(mom2)[-1])) < 1e-6 * float(mom2.trace())


def test_stats_computes_then_reads_the_cache(tiny_folder, corpus, tmp_path):
    args = ["stats", "--model", str(tiny_folder), "--layers", "0-1", "--corpus", str(corpus),
            "--n-samples", "3", "--sample-length", "16", "--no-progress"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.output.count("computed") >= 2 and "model.layers.1.mlp.down_proj" in first.output
    stored = list((tmp_path / "home" / "stats").rglob("*.safetensors"))
    assert len(stored) == 2  # under $LMEDIT_HOME/stats
    clear_memory_cache()
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "disk" in second.output and "computed" not in second.output
    listing = runner.invoke(app, ["stats", "--list"])
    assert listing.exit_code == 0 and "complete" in listing.output and "2 entries" in _flat(listing.output)


def test_errors_exit_with_code_2_and_a_message(tiny_folder, tmp_path):
    missing_corpus = runner.invoke(app, ["stats", "--model", str(tiny_folder), "--layers", "0",
                                         "--corpus", str(tmp_path / "nothing-here"), "--no-progress"])
    assert missing_corpus.exit_code == 2 and "not found" in _flat(missing_corpus.output)
    no_layers = runner.invoke(app, ["stats", "--model", str(tiny_folder)])
    assert no_layers.exit_code == 2 and "--layers" in _flat(no_layers.output)
    bad_layers = runner.invoke(app, ["stats", "--model", str(tiny_folder), "--layers", "x"])
    assert bad_layers.exit_code == 2 and "cannot read layers" in _flat(bad_layers.output)


def test_max_memory_shrinks_the_pass_and_says_so(tiny_folder, corpus):
    from lmedit.limits import activation_bytes_per_token, size, weights_bytes_on_disk
    from lmedit.models import load_model

    model, _ = load_model(str(tiny_folder))
    weights = weights_bytes_on_disk(tiny_folder, torch.float32)
    budget = weights + 2 * 8 * (64 * 64 + 64) + 40 * activation_bytes_per_token(model)  # two layers' sums, 40 tokens
    args = ["stats", "--model", str(tiny_folder), "--layers", "0-1", "--corpus", str(corpus), "--n-samples", "3",
            "--sample-length", "16", "--batch-tokens", "64", "--max-memory", str(budget), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "--max-memory: 40 tokens per pass instead of 64" in result.output, size(budget)
