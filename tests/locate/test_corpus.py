"""Corpus reading, name resolution, identity, token samples and batching."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from lmedit.locate.corpus import (
    CorpusError,
    Sample,
    batch_samples,
    read_wikiextractor,
    resolve_corpus,
    tokenize_samples,
)

LONG = " ".join(["the capital of france is paris"] * 12)  # 72 words


def _article(doc_id: str, title: str, body: str) -> str:
    return f'<doc id="{doc_id}" url="http://x?curid={doc_id}" title="{title}">\n{title}\n\n{body}\n</doc>\n'


def _wiki_folder(root: Path) -> Path:
    (root / "AB").mkdir(parents=True)
    (root / "AA").mkdir()
    (root / "AB" / "wiki_00").write_text(_article("3", "Third", "rome " + LONG))
    (root / "AA" / "wiki_12").write_text(_article("2", "Second", "berlin " + LONG))
    (root / "AA" / "wiki_00").write_text(_article("1", "First", "paris " + LONG) + _article("9", "Stub", "too short"))
    return root


def test_wikiextractor_drops_the_title_line_skips_stubs_and_reads_in_sorted_order(tmp_path):
    corpus = resolve_corpus(_wiki_folder(tmp_path / "wiki"))
    docs = list(corpus.documents())
    assert corpus.kind.startswith("wikiextractor")
    assert [d.split()[0] for d in docs] == ["paris", "berlin", "rome"]  # AA/wiki_00, AA/wiki_12, AB/wiki_00
    assert not any(d.startswith(("First", "Second", "Third")) for d in docs)
    assert list(corpus.documents()) == docs  # a fresh iterator each time


def test_read_wikiextractor_keeps_paragraphs_and_a_first_line_that_is_not_the_title():
    lines = _article("1", "Title", "Not the title line.\n" + LONG).splitlines(keepends=True)
    lines[1] = "Something else\n"  # the body no longer starts with the title: keep it
    (text,) = read_wikiextractor(lines)
    assert text.startswith("Something else\n\nNot the title line.\nthe capital")


def test_identity_ignores_the_location_and_follows_the_files(tmp_path):
    first = resolve_corpus(_wiki_folder(tmp_path / "a" / "wiki"))
    moved = tmp_path / "b" / "wiki"
    shutil.copytree(tmp_path / "a" / "wiki", moved)
    assert resolve_corpus(moved).identity == first.identity
    assert resolve_corpus(moved).location != first.location
    with (moved / "AB" / "wiki_00").open("a") as handle:
        handle.write(_article("4", "Fourth", LONG))
    assert resolve_corpus(moved).identity != first.identity


def test_identity_uses_sha256sums_when_present(tmp_path):
    root = _wiki_folder(tmp_path / "wiki")
    (root / "SHA256SUMS").write_text("abc  ./AA/wiki_00\n")
    before = resolve_corpus(root).identity
    (root / "AA" / "wiki_12").write_text(_article("2", "Second", "madrid " + LONG))  # same size, new text
    assert resolve_corpus(root).identity == before  # the checksum file vouches for the content
    (root / "SHA256SUMS").write_text("def  ./AA/wiki_00\n")
    assert resolve_corpus(root).identity != before
    assert len(list(resolve_corpus(root).documents())) == 3  # SHA256SUMS is not read as data


def test_text_folder_is_one_document_per_file_and_a_single_file_one_per_paragraph(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("second file\n\nstill second")
    (folder / "a.txt").write_text("first file")
    (folder / "empty.txt").write_text("  \n")
    corpus = resolve_corpus(folder)
    assert corpus.kind.startswith("text-files")
    assert list(corpus.documents()) == ["first file", "second file\n\nstill second"]
    single = resolve_corpus(folder / "b.txt")
    assert single.kind.startswith("text-paragraphs")
    assert list(single.documents()) == ["second file", "still second"]


def test_unknown_folder_format_is_an_error(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(CorpusError, match="format"):
        resolve_corpus(tmp_path)


def test_bare_name_resolution_order(tmp_path, monkeypatch):
    upward = _wiki_folder(tmp_path / "shared" / "corpus" / "mini")
    work = tmp_path / "work" / "main"
    work.mkdir(parents=True)
    monkeypatch.delenv("LMEDIT_CORPUS_DIR", raising=False)
    monkeypatch.chdir(work)
    assert resolve_corpus("mini").location == str(upward.resolve())
    env_dir = tmp_path / "elsewhere"
    _wiki_folder(env_dir / "mini")
    monkeypatch.setenv("LMEDIT_CORPUS_DIR", str(env_dir))
    assert resolve_corpus("mini").location == str((env_dir / "mini").resolve())
    local = _wiki_folder(work / "mini")
    assert resolve_corpus("mini").location == str(local.resolve())


def test_missing_corpus_error_says_what_was_searched_and_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMEDIT_CORPUS_DIR", str(tmp_path / "corpora"))
    with pytest.raises(CorpusError) as info:
        resolve_corpus("nowhere")
    message = str(info.value)
    assert "--corpus PATH" in message and "LMEDIT_CORPUS_DIR" in message
    assert str(tmp_path / "corpora" / "nowhere") in message and "shared/corpus/nowhere" in message


def test_wikipedia_without_datasets_asks_for_a_local_corpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(CorpusError, match="datasets.*local corpus path"):
        resolve_corpus("wikipedia")


def test_samples_are_document_prefixes_with_default_special_tokens(word_tok):
    long_text = " ".join(["paris rome berlin"] * 2000)  # far past the character budget
    docs = ["the sky is blue", long_text, "red green"]
    samples = list(tokenize_samples(word_tok, docs, 5))
    assert [s.index for s in samples] == [0, 1, 2]
    assert samples[0].input_ids == tuple(word_tok("the sky is blue")["input_ids"])
    assert samples[1].input_ids == tuple(word_tok(long_text)["input_ids"][:5])
    assert list(tokenize_samples(word_tok, docs, 5, start=2)) == [samples[2]]


def test_batches_respect_the_token_budget_pad_right_and_restart_identically():
    samples = [Sample(i, tuple(range(1, n + 1))) for i, n in enumerate([4, 3, 4, 2, 5, 1, 4])]
    batches = list(batch_samples(samples, batch_tokens=8, pad_id=0))
    assert [b.first_index for b in batches] == [0, 2, 4, 5]  # [5, 1] would need 2 x 5 > 8
    for batch in batches:
        assert batch.input_ids.numel() <= 8 or batch.size == 1
    second = batches[1]
    assert second.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert second.input_ids.tolist() == [[1, 2, 3, 4], [1, 2, 0, 0]]
    restarted = list(batch_samples(samples[2:], batch_tokens=8, pad_id=0))
    assert [b.input_ids.tolist() for b in restarted] == [b.input_ids.tolist() for b in batches[1:]]
    (alone,) = list(batch_samples([Sample(0, tuple(range(20)))], batch_tokens=8, pad_id=0))
    assert alone.size == 1  # an over-long sample still gets a batch


def test_shared_enwiki2015_resolves_by_name_from_the_project(monkeypatch):
    root = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "enwiki2015"
    if not root.is_dir():
        pytest.skip(f"shared corpus not found at {root}")
    monkeypatch.delenv("LMEDIT_CORPUS_DIR", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    corpus = resolve_corpus("enwiki2015")
    first = next(corpus.documents())
    assert corpus.name == "enwiki2015" and first.startswith("Anarchism is a political philosophy")


def test_compressed_wikiextractor_file_reads_like_the_plain_one(tmp_path):
    import gzip
    import lzma

    plain = _wiki_folder(tmp_path / "plain")
    expected = list(resolve_corpus(plain).documents())
    text = "".join((plain / rel).read_text() for rel in ("AA/wiki_00", "AA/wiki_12", "AB/wiki_00"))
    for suffix, compress in ((".xz", lzma.compress), (".gz", gzip.compress)):
        folder = tmp_path / f"packed{suffix.strip('.')}"
        folder.mkdir()
        (folder / f"articles{suffix}").write_bytes(compress(text.encode()))
        corpus = resolve_corpus(folder)
        assert corpus.kind.startswith("wikiextractor") and list(corpus.documents()) == expected


def test_packaged_sample_resolves_by_its_name_and_keeps_attribution(tmp_path, monkeypatch):
    from lmedit.locate.corpus import packaged_sample

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMEDIT_CORPUS_DIR", raising=False)
    corpus = resolve_corpus("enwiki2015-sample")
    assert corpus.name == "enwiki2015-sample"
    documents = list(corpus.documents())
    assert len(documents) == 1000 and all(len(d) < 4096 for d in documents)
    folder = packaged_sample("enwiki2015")
    assert folder is not None and "CC BY-SA 3.0" in (folder / "SOURCES.md").read_text()


def test_a_missing_full_corpus_falls_back_to_its_packaged_sample_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # no shared/ above a temporary folder
    monkeypatch.delenv("LMEDIT_CORPUS_DIR", raising=False)
    with caplog.at_level("WARNING", logger="lmedit.locate.corpus"):
        corpus = resolve_corpus("enwiki2015")
    assert corpus.name == "enwiki2015-sample" and "packaged sample" in caplog.text
    with pytest.raises(CorpusError, match="not found"):
        resolve_corpus("enwiki2015", packaged_fallback=False)


def test_packaged_sample_gives_the_full_corpus_token_samples(word_tok, monkeypatch):
    """The sample is the full corpus's first 1,000 articles cut where a 256-token sample ends."""
    full = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "enwiki2015"
    if not full.is_dir():
        pytest.skip("the shared enwiki2015 corpus is not beside this checkout")
    length = 64
    ours = [s.input_ids for s in tokenize_samples(word_tok, resolve_corpus("enwiki2015-sample").documents(), length)]
    theirs = tokenize_samples(word_tok, resolve_corpus(full).documents(), length)
    assert ours == [next(theirs).input_ids for _ in ours]


class _FakeDatasets:
    """Stands in for the optional `datasets` package: records the call, streams given rows."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def load_dataset(self, name, config, split, streaming):
        self.calls.append((name, config, split, streaming))
        return iter(self.rows)


def test_hub_corpora_stream_documents_through_datasets(monkeypatch):
    wikitext = [{"text": ""}, {"text": " = Paris = \n"}, {"text": " Paris is a city . \n"}, {"text": " = = History = = \n"},
                {"text": " It is old . \n"}, {"text": " = Rome = \n"}, {"text": " Rome is too . \n"}]
    fake = _FakeDatasets(wikitext)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    corpus = resolve_corpus("wikitext:wikitext-2-raw-v1")
    assert list(corpus.documents()) == ["Paris is a city .\n= = History = =\nIt is old .", "Rome is too ."]
    assert fake.calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "train", True)]
    assert corpus.identity == "wikitext:Salesforce/wikitext:wikitext-2-raw-v1"
    fake = _FakeDatasets([{"text": "one"}, {"text": " "}, {"text": "two"}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    rows = resolve_corpus("hf:someone/texts:cfg")
    assert list(rows.documents()) == ["one", "two"] and fake.calls[0][:2] == ("someone/texts", "cfg")
    with pytest.raises(CorpusError, match="name the dataset"):
        resolve_corpus("hf:")
