"""Second-moment statistics on tiny random models: correctness, one pass, cache, resume, fingerprints."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, build_tiny_llama
from lmedit.locate import stats as stats_mod
from lmedit.locate.corpus import resolve_corpus, tokenize_samples
from lmedit.locate.stats import (
    StatsConfig,
    StatsError,
    clear_memory_cache,
    forget_fingerprint,
    layer_stats,
    model_fingerprint,
    second_moments,
    stats_cache_entries,
)
from lmedit.spec import ModelSpec, get_module


class Interrupted(Exception):
    pass


def _write_corpus(root: Path, files: int = 3, per_file: int = 5, seed: int = 0) -> Path:
    """WikiExtractor-format articles of 55-110 words from the word tokenizer's vocabulary."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for f in range(files):
        with (root / f"wiki_{f:02d}").open("w") as handle:
            for d in range(per_file):
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(55, 110)))
                handle.write(f'<doc id="{f}{d}" url="u" title="T{f}{d}">\nT{f}{d}\n\n{words}\n</doc>\n')
    return root


@pytest.fixture
def corpus(tmp_path):
    return _write_corpus(tmp_path / "corpus")


@pytest.fixture
def cache(tmp_path):
    clear_memory_cache()
    yield tmp_path / "stats"
    clear_memory_cache()


def _config(corpus: Path, **changes) -> StatsConfig:
    values = dict(corpus=str(corpus), n_samples=12, sample_length=80, batch_tokens=256)
    values.update(changes)
    return StatsConfig(**values)


def _reference(model, tok, corpus: Path, config: StatsConfig, layer: int) -> tuple[torch.Tensor, int]:
    """One unpadded sample at a time, full forward, plain float64 sum: the definition of E[k kᵀ]."""
    module = get_module(model, ModelSpec.from_model(model).mlp_out(layer))
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    docs = list(resolve_corpus(corpus).documents())[: config.n_samples]
    try:
        with torch.no_grad():
            for sample in tokenize_samples(tok, docs, config.sample_length):
                model(torch.tensor([sample.input_ids]))
    finally:
        handle.remove()
    keys = torch.cat(seen).double()
    return keys.T @ keys / keys.shape[0], keys.shape[0]


def test_matches_the_unbatched_definition_on_llama_and_gpt2(tiny_model, word_tok, corpus, cache):
    config = _config(corpus)
    found = layer_stats(tiny_model, word_tok, [0, 2], config, cache_dir=cache, progress=False)
    d_in = 64 if tiny_model.config.model_type == "llama" else 128  # llama intermediate 64, gpt2 4 x 32
    for layer in (0, 2):
        expected, tokens = _reference(tiny_model, word_tok, corpus, config, layer)
        result = found[layer]
        assert result.mom2.dtype == torch.float64 and result.mom2.shape == (d_in, d_in)
        assert result.tokens == tokens  # padding excluded: exactly the real tokens
        assert result.source == "computed" and result.n_samples == 12
        torch.testing.assert_close(result.mom2, expected, rtol=1e-5, atol=1e-9)
    lengths = {len(s.input_ids) for s in tokenize_samples(word_tok, resolve_corpus(corpus).documents(), 80)}
    assert len(lengths) > 1 and max(lengths) == 80  # the corpus really needs padding


def test_one_pass_stops_after_the_deepest_requested_layer(tiny_llama, word_tok, corpus, cache):
    calls = {"forward": 0, "top_block": 0}
    tiny_llama.register_forward_pre_hook(lambda m, a: calls.__setitem__("forward", calls["forward"] + 1))
    tiny_llama.model.layers[2].register_forward_pre_hook(lambda m, a: calls.__setitem__("top_block", calls["top_block"] + 1))
    batches = []
    layer_stats(tiny_llama, word_tok, [1, 0], _config(corpus), cache_dir=cache, progress=False,
                on_batch=lambda b, s: batches.append(b))
    assert calls["forward"] == len(batches) > 1  # both layers from the same forward passes
    assert calls["top_block"] == 0  # nothing above layer 1 was computed


def test_second_call_uses_the_cache_without_running_the_model(tiny_llama, word_tok, corpus, cache, monkeypatch):
    first = second_moments(tiny_llama, word_tok, [0, 1], _config(corpus), cache_dir=cache, progress=False)

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran although the statistics are cached")

    monkeypatch.setattr(tiny_llama, "forward", no_forward)
    again = layer_stats(tiny_llama, word_tok, [0, 1], _config(corpus), cache_dir=cache, progress=False)
    assert {r.source for r in again.values()} == {"memory"}
    assert again[0].mom2 is first[0]  # the very tensor already loaded
    clear_memory_cache()
    from_disk = layer_stats(tiny_llama, word_tok, [0, 1], _config(corpus), cache_dir=cache, progress=False)
    assert {r.source for r in from_disk.values()} == {"disk"}
    assert torch.equal(from_disk[1].mom2, first[1])
    moved = cache.parent / "elsewhere" / corpus.name
    shutil.copytree(corpus, moved)
    clear_memory_cache()
    elsewhere = layer_stats(tiny_llama, word_tok, [0], _config(moved), cache_dir=cache, progress=False)
    assert elsewhere[0].source == "disk"  # the key names the corpus content, not its path


def test_entries_are_safetensors_with_a_json_sidecar_and_change_with_the_config(tiny_llama, word_tok, corpus, cache):
    found = layer_stats(tiny_llama, word_tok, [1], _config(corpus), cache_dir=cache, progress=False)[1]
    assert found.path.suffix == ".safetensors" and found.path.parent.parent == cache
    assert torch.equal(load_file(str(found.path))["mom2"], found.mom2)
    import json

    meta = json.loads(found.path.with_suffix(".json").read_text())
    assert meta["key"]["module"] == "model.layers.1.mlp.down_proj" and meta["tokens"] == found.tokens
    assert meta["key"]["model"] == model_fingerprint(tiny_llama)
    assert not list(cache.rglob("*.pt")) and not list(cache.rglob("*.pkl"))
    for change in ({"n_samples": 11}, {"sample_length": 60}, {"dtype": "float32"}):
        other = layer_stats(tiny_llama, word_tok, [1], _config(corpus, **change), cache_dir=cache, progress=False)[1]
        assert other.source == "computed" and other.path != found.path
    same = layer_stats(tiny_llama, word_tok, [1], _config(corpus, batch_tokens=160), cache_dir=cache, progress=False)[1]
    assert same.source == "memory"  # batch size only changes rounding, not the statistic
    entries = [e for e in stats_cache_entries(cache) if e["state"] == "complete"]
    assert len(entries) == 4 and {e["module"] for e in entries} == {"model.layers.1.mlp.down_proj"}


def test_float32_accumulation_agrees_with_float64(tiny_gpt2, word_tok, corpus, cache):
    f64 = second_moments(tiny_gpt2, word_tok, [1], _config(corpus), cache_dir=cache, progress=False)[1]
    f32 = second_moments(tiny_gpt2, word_tok, [1], _config(corpus, dtype="float32"), cache_dir=cache, progress=False)[1]
    assert f32.dtype == torch.float64 and not torch.equal(f32, f64)
    torch.testing.assert_close(f32, f64, rtol=1e-4, atol=1e-7)


def test_different_weights_never_share_an_entry(word_tok, corpus, cache):
    a, b = build_tiny_llama(len(word_tok), seed=0), build_tiny_llama(len(word_tok), seed=1)
    assert model_fingerprint(a) != model_fingerprint(b)
    stats_a = layer_stats(a, word_tok, [0], _config(corpus), cache_dir=cache, progress=False)[0]
    stats_b = layer_stats(b, word_tok, [0], _config(corpus), cache_dir=cache, progress=False)[0]
    assert stats_b.source == "computed" and stats_b.path != stats_a.path
    assert not torch.allclose(stats_a.mom2, stats_b.mom2)
    twin = build_tiny_llama(len(word_tok), seed=0)  # same weights, another object
    assert layer_stats(twin, word_tok, [0], _config(corpus), cache_dir=cache, progress=False)[0].source == "memory"


def test_fingerprint_is_remembered_across_in_place_edits(tiny_llama, word_tok, corpus, cache):
    original = second_moments(tiny_llama, word_tok, [0], _config(corpus), cache_dir=cache, progress=False)[0]
    base = model_fingerprint(tiny_llama)
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.down_proj.weight.mul_(2.0)
        tiny_llama.model.layers[0].mlp.up_proj.weight.mul_(3.0)  # changes the keys themselves
    assert model_fingerprint(tiny_llama) == base
    clear_memory_cache()
    after_edit = second_moments(tiny_llama, word_tok, [0], _config(corpus), cache_dir=cache, progress=False)[0]
    assert torch.equal(after_edit, original)  # the original model's statistics
    with pytest.raises(StatsError, match="modified since"):
        second_moments(tiny_llama, word_tok, [1], _config(corpus), cache_dir=cache, progress=False)
    explicit = layer_stats(tiny_llama, word_tok, [0], _config(corpus), cache_dir=cache, progress=False,
                           fingerprint="edited-model")[0]
    assert explicit.source == "computed" and not torch.allclose(explicit.mom2, original)
    forget_fingerprint(tiny_llama)
    assert model_fingerprint(tiny_llama) != base


def test_interrupted_run_resumes_and_equals_a_clean_run(tiny_llama, word_tok, corpus, tmp_path, caplog):
    config = _config(corpus, batch_tokens=160)  # two samples per batch, six batches
    clean = second_moments(tiny_llama, word_tok, [0, 2], config, cache_dir=tmp_path / "clean", progress=False)
    clear_memory_cache()
    cache = tmp_path / "resumed"

    def stop_after_three(batches, samples):
        if batches == 3:
            raise Interrupted

    with caplog.at_level(logging.WARNING, logger="lmedit.locate.stats"), pytest.raises(Interrupted):
        second_moments(tiny_llama, word_tok, [0, 2], config, cache_dir=cache, progress=False,
                       checkpoint_every=100, on_batch=stop_after_three)
    assert "resumes" in caplog.text
    (partial,) = [e for e in stats_cache_entries(cache) if e["state"] == "partial"]
    assert partial["samples_done"] == 6 and len(partial["modules"]) == 2
    seen = []
    resumed = layer_stats(tiny_llama, word_tok, [0, 2], config, cache_dir=cache, progress=False,
                          on_batch=lambda b, s: seen.append(b))
    assert seen == [4, 5, 6]  # only the remaining batches ran
    for layer in (0, 2):
        # float64 sums of the same batches; BLAS may round the last bit differently after a reload
        assert torch.allclose(resumed[layer].mom2, clean[layer], rtol=1e-12, atol=0)
        assert resumed[layer].tokens == layer_stats(tiny_llama, word_tok, [layer], config,
                                                    cache_dir=tmp_path / "clean", progress=False)[layer].tokens
    assert [e["state"] for e in stats_cache_entries(cache)] == ["complete", "complete"]  # partial removed


def test_periodic_checkpoint_survives_a_hard_kill(tiny_llama, word_tok, corpus, tmp_path):
    config = _config(corpus, batch_tokens=160)
    clean = second_moments(tiny_llama, word_tok, [1], config, cache_dir=tmp_path / "clean", progress=False)
    clear_memory_cache()
    cache = tmp_path / "killed"
    saved = tmp_path / "checkpoint-at-kill"

    def kill_at_five(batches, samples):
        if batches == 5:  # the periodic checkpoint was written after batch 4
            (checkpoint,) = cache.glob("*/partial.*.safetensors")
            shutil.copy(checkpoint, saved)
            raise Interrupted

    with pytest.raises(Interrupted):
        second_moments(tiny_llama, word_tok, [1], config, cache_dir=cache, progress=False, checkpoint_every=2,
                       on_batch=kill_at_five)
    (checkpoint,) = cache.glob("*/partial.*.safetensors")
    shutil.copy(saved, checkpoint)  # as if the process died without its final save
    seen = []
    resumed = second_moments(tiny_llama, word_tok, [1], config, cache_dir=cache, progress=False,
                             on_batch=lambda b, s: seen.append(b))
    assert seen == [5, 6]
    assert torch.equal(resumed[1], clean[1])


def test_small_corpus_uses_every_document_and_records_it(tiny_llama, word_tok, corpus, cache, caplog):
    with caplog.at_level(logging.WARNING, logger="lmedit.locate.stats"):
        found = layer_stats(tiny_llama, word_tok, [0], _config(corpus, n_samples=50), cache_dir=cache, progress=False)
    assert found[0].n_samples == 15 and found[0].meta["n_samples_used"] == 15
    assert found[0].meta["n_samples_requested"] == 50
    assert "only 15 documents" in caplog.text


def test_invalid_requests_fail_clearly(tiny_gpt2, word_tok, corpus, cache):
    with pytest.raises(StatsError, match="sample_length 200 exceeds"):
        second_moments(tiny_gpt2, word_tok, [0], _config(corpus, sample_length=200), cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        StatsConfig(dtype="float16")
    with pytest.raises(ValueError, match="n_samples"):
        StatsConfig(n_samples=0)
    with pytest.raises(IndexError):
        second_moments(tiny_gpt2, word_tok, [7], _config(corpus), cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="no layers"):
        second_moments(tiny_gpt2, word_tok, [], _config(corpus), cache_dir=cache, progress=False)


def test_model_mode_and_hooks_are_restored(tiny_llama, word_tok, corpus, cache):
    tiny_llama.train()
    second_moments(tiny_llama, word_tok, [0], _config(corpus), cache_dir=cache, progress=False)
    assert tiny_llama.training
    assert not tiny_llama.model.layers[0].mlp.down_proj._forward_pre_hooks


def test_default_cache_dir_follows_lmedit_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LMEDIT_HOME", str(tmp_path / "home"))
    assert stats_mod.default_stats_dir() == tmp_path / "home" / "stats"


@pytest.mark.embedded
def test_embedded_model_statistics_are_a_valid_second_moment(embedded, tmp_path):
    root = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "enwiki2015"
    if not root.is_dir():
        pytest.skip(f"shared corpus not found at {root}")
    model, tok = embedded
    config = StatsConfig(corpus=str(root), n_samples=4, sample_length=32)
    clear_memory_cache()
    found = layer_stats(model, tok, [3, 5], config, cache_dir=tmp_path, progress=False)
    for layer in (3, 5):
        mom2 = found[layer].mom2
        assert mom2.shape == (1536, 1536) and found[layer].tokens == 4 * 32
        assert torch.equal(mom2, mom2.T)
        eig = torch.linalg.eigvalsh(mom2)
        assert eig[0] > -1e-9 * eig[-1] and eig[-1] > 0
    assert not torch.allclose(found[3].mom2, found[5].mom2)
    clear_memory_cache()


def test_cached_statistics_are_reused_where_their_corpus_is_absent(tiny_llama, word_tok, tmp_path, cache, monkeypatch):
    """A machine without the corpus (a user outside the checkout) still finds statistics cached for it by name."""
    corpora = tmp_path / "corpora"
    _write_corpus(corpora / "mini")
    monkeypatch.setenv("LMEDIT_CORPUS_DIR", str(corpora))
    config = StatsConfig(corpus="mini", n_samples=6, sample_length=40, batch_tokens=256)
    computed = layer_stats(tiny_llama, word_tok, [0, 1], config, cache_dir=cache, progress=False)
    clear_memory_cache()
    monkeypatch.delenv("LMEDIT_CORPUS_DIR")
    monkeypatch.chdir(tmp_path)
    reused = layer_stats(tiny_llama, word_tok, [0, 1], config, cache_dir=cache, progress=False)
    assert all(torch.equal(reused[k].mom2, computed[k].mom2) and reused[k].source == "disk" for k in (0, 1))
    with pytest.raises(Exception, match="'mini' not found"):  # other settings: nothing to reuse, nothing to compute from
        layer_stats(tiny_llama, word_tok, [0], StatsConfig(corpus="mini", n_samples=5, sample_length=40), cache_dir=cache,
                    progress=False)
    with pytest.raises(Exception, match="'mini' not found"):  # a layer never computed
        layer_stats(tiny_llama, word_tok, [2], config, cache_dir=cache, progress=False)


def test_a_memory_budget_shrinks_the_pass_and_leaves_the_statistic(tiny_llama, word_tok, corpus, cache):
    from lmedit.limits import activation_bytes_per_token, set_memory_budget

    reference = layer_stats(build_tiny_llama(len(word_tok)), word_tok, [1], _config(corpus), cache_dir=cache / "a",
                            progress=False)[1]
    weights = sum(p.numel() * p.element_size() for p in tiny_llama.parameters())
    sums = 8 * (64 * 64 + 64)  # the float64 sum and mean of the 64-wide down-projection input
    set_memory_budget(tiny_llama, weights + sums + 100 * activation_bytes_per_token(tiny_llama))
    stats_mod._MEMORY.clear()  # the same weights: computed again, not served from this process's cache
    try:
        found = layer_stats(tiny_llama, word_tok, [1], _config(corpus), cache_dir=cache / "b", progress=False)[1]
    finally:
        set_memory_budget(tiny_llama, None)
    assert found.meta["batch_tokens"] == 100  # 256 asked; 100 tokens of activations fit
    assert torch.allclose(found.mom2, reference.mom2, rtol=1e-5, atol=1e-12)  # other batches round differently
    assert found.tokens == reference.tokens
