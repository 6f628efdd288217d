"""Text corpora for layer statistics, read in a fixed order and cut into token samples.

ROME/MEMIT/AlphaEdit need E[k kᵀ] over "general text". The statistics are cached
under a key that names the corpus, so every corpus has an *identity*: its name,
its reading rules and a hash of its files that does not depend on where the
corpus sits on disk (two machines holding the same files share cache entries).

Sources (see `resolve_corpus`):

* a folder of WikiExtractor output (``<doc id=... url=... title=...>`` blocks,
  e.g. ``../shared/corpus/enwiki2015`` from a checkout): one document per article, the first
  body line (a repeat of the title) dropped, articles under 50 words skipped;
* a folder of ``.txt`` files: one document per file;
* a single ``.txt`` file: one document per paragraph (paragraphs are separated
  by blank lines), since a single document would make a single sample;
* ``"wikipedia"`` (or ``"wikipedia:<config>"``): the Hugging Face Wikipedia dump
  that ROME uses, streamed through the optional ``datasets`` package.

Files are always read in sorted relative-path order, so the document order is
the same on every run and machine.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from lmedit.data.shared import CORPUS_DIR_ENV, find_shared


__all__ = [
    "Corpus",
    "CorpusError",
    "DEFAULT_WIKIPEDIA",
    "MIN_ARTICLE_WORDS",
    "Sample",
    "TokenBatch",
    "batch_samples",
    "read_wikiextractor",
    "resolve_corpus",
    "tokenize_samples",
]

MIN_ARTICLE_WORDS = 50
DEFAULT_WIKIPEDIA = ("wikimedia/wikipedia", "20231101.en")
_CHECKSUM_FILE = "SHA256SUMS"
_IGNORED_NAMES = {_CHECKSUM_FILE, "SOURCES.md", "README.md", "README", "LICENSE"}
_DOC_TITLE = re.compile(r'\btitle="(?P<title>[^"]*)"')
# Characters per kept token when cutting a long document before tokenising; generous
# enough that the cut never shortens a sample (a shortfall falls back to the full text).
_CHARS_PER_TOKEN_BUDGET = 16


class CorpusError(ValueError):
    """The corpus could not be found or read; the message says what was tried and how to fix it."""


# --------------------------------------------------------------------------- corpus objects


@dataclass(frozen=True)
class Corpus:
    """A named, ordered source of documents.

    `identity` goes into cache keys: name, reading rules and a content hash, never
    the absolute location. `location` is for messages only.
    """

    name: str
    kind: str
    identity: str
    location: str
    _reader: Callable[[], Iterator[str]] = field(repr=False, compare=False)

    def documents(self) -> Iterator[str]:
        """The documents in their fixed order (a fresh iterator each call)."""
        return self._reader()


def _data_files(root: Path) -> list[Path]:
    """Regular, non-hidden files below `root`, sorted by relative path, bookkeeping files excluded."""
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.name in _IGNORED_NAMES:
            continue
        if path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _content_hash(root: Path, files: Sequence[Path]) -> str:
    """SHA256SUMS when the corpus ships one, else relative names and sizes: location independent."""
    digest = hashlib.sha256()
    checksums = root / _CHECKSUM_FILE if root.is_dir() else None
    if checksums is not None and checksums.is_file():
        digest.update(b"sha256sums\n" + checksums.read_bytes())
    else:
        base = root if root.is_dir() else root.parent
        for path in files:
            digest.update(f"{path.relative_to(base).as_posix()}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _starts_with_doc_tag(path: Path) -> bool:
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                return line.lstrip().startswith("<doc ")
    return False


def read_wikiextractor(lines: Iterable[str], min_words: int = MIN_ARTICLE_WORDS) -> Iterator[str]:
    """Article texts from WikiExtractor lines: title line dropped, stubs under `min_words` skipped."""
    title: str | None = None
    body: list[str] = []
    for raw in lines:
        line = raw.rstrip("\n")
        if title is None:
            if line.lstrip().startswith("<doc "):
                match = _DOC_TITLE.search(line)
                title, body = (match.group("title") if match else ""), []
            continue
        if line.strip() == "</doc>":
            text = _article_text(title, body)
            title = None
            if len(text.split()) >= min_words:
                yield text
            continue
        body.append(line)


def _article_text(title: str, body: list[str]) -> str:
    lines = list(body)
    while lines and not lines[0].strip():
        lines.pop(0)
    if lines and (not title or lines[0].strip() == title.strip()):
        lines.pop(0)  # WikiExtractor repeats the title as the first body line
    return "\n".join(lines).strip()


def _wikiextractor_corpus(root: Path, files: list[Path]) -> Corpus:
    def reader() -> Iterator[str]:
        for path in files:
            with path.open("r", encoding="utf-8", errors="replace") as handle:
                yield from read_wikiextractor(handle)

    kind = f"wikiextractor-v1-min{MIN_ARTICLE_WORDS}"
    return Corpus(root.name, kind, f"{root.name}:{kind}:{_content_hash(root, files)}", str(root), reader)


def _text_files_corpus(root: Path, files: list[Path]) -> Corpus:
    def reader() -> Iterator[str]:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                yield text

    kind = "text-files-v1"
    return Corpus(root.name, kind, f"{root.name}:{kind}:{_content_hash(root, files)}", str(root), reader)


def _paragraphs_corpus(path: Path) -> Corpus:
    def reader() -> Iterator[str]:
        text = path.read_text(encoding="utf-8", errors="replace")
        for paragraph in re.split(r"\n\s*\n", text):
            if paragraph.strip():
                yield paragraph.strip()

    kind = "text-paragraphs-v1"
    return Corpus(path.stem, kind, f"{path.stem}:{kind}:{_content_hash(path, [path])}", str(path), reader)


def _local_corpus(path: Path) -> Corpus:
    """Pick the reading rules from what the path holds."""
    path = path.resolve()
    if path.is_file():
        if _starts_with_doc_tag(path):
            return _wikiextractor_corpus(path.parent, [path])
        return _paragraphs_corpus(path)
    files = _data_files(path)
    if not files:
        raise CorpusError(f"corpus folder {path} holds no files")
    if _starts_with_doc_tag(files[0]):
        return _wikiextractor_corpus(path, files)
    texts = [f for f in files if f.suffix == ".txt"]
    if texts:
        return _text_files_corpus(path, texts)
    raise CorpusError(
        f"cannot tell the format of corpus folder {path}: its first file {files[0].name!r} is not "
        "WikiExtractor output (<doc ...> blocks) and the folder has no .txt files"
    )


def _wikipedia_corpus(config: str | None) -> Corpus:
    """The Hugging Face Wikipedia dump ROME samples from, streamed (no full download)."""
    dataset, default_config = DEFAULT_WIKIPEDIA
    config = config or default_config
    hint = "pass a local corpus path instead, e.g. --corpus ../shared/corpus/enwiki2015 (or a name under $LMEDIT_CORPUS_DIR)"
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"the 'wikipedia' corpus needs the optional 'datasets' package, which is not installed; {hint}") from None

    def reader() -> Iterator[str]:
        try:
            stream = datasets.load_dataset(dataset, config, split="train", streaming=True)
            for row in stream:
                text = (row.get("text") or "").strip()
                if text:
                    yield text
        except Exception as exc:  # offline, hub changes: all end in the same advice
            raise CorpusError(f"could not stream {dataset} ({config}) from the Hugging Face hub: {exc}; {hint}") from None

    return Corpus("wikipedia", "hf-wikipedia-v1", f"wikipedia:{dataset}:{config}", f"hf://{dataset}/{config}", reader)


def resolve_corpus(spec: str | os.PathLike[str], *, cwd: Path | None = None) -> Corpus:
    """Turn a path, a bare name or ``"wikipedia[:config]"`` into a `Corpus`.

    A bare name is looked up as: an existing path; ``$LMEDIT_CORPUS_DIR/<name>``;
    ``shared/corpus/<name>`` in the current directory or any parent (so
    ``enwiki2015`` works from inside the project checkout).
    """
    text = os.fspath(spec)
    if text == "wikipedia" or text.startswith("wikipedia:"):
        return _wikipedia_corpus(text.partition(":")[2] or None)
    candidate = Path(text).expanduser()
    if candidate.exists():
        return _local_corpus(candidate)
    tried = [str(candidate.resolve())]
    if len(candidate.parts) == 1:
        found = find_shared(text, kind="corpus", cwd=cwd)
        if found is not None:
            return _local_corpus(found)
        env_dir = os.environ.get(CORPUS_DIR_ENV)
        env = str(Path(env_dir).expanduser() / text) if env_dir else f"${CORPUS_DIR_ENV}/{text} (${CORPUS_DIR_ENV} is not set)"
        tried += [env, f"shared/corpus/{text} in {(cwd or Path.cwd()).resolve()} and its parents"]
    raise CorpusError(
        f"corpus {text!r} not found; looked at: {'; '.join(tried)}. Pass the corpus folder with --corpus PATH "
        f"(library: StatsConfig(corpus=PATH)) or set {CORPUS_DIR_ENV} to the folder that holds {text!r}"
    )


# --------------------------------------------------------------------------- token samples


@dataclass(frozen=True)
class Sample:
    """The first tokens of one document; `index` counts samples from the start of the corpus."""

    index: int
    input_ids: tuple[int, ...]


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded samples; `attention_mask` is 1 on real tokens and 0 on padding."""

    first_index: int
    input_ids: Any  # torch.LongTensor [batch, length]
    attention_mask: Any  # torch.LongTensor [batch, length]

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def _prefix_text(text: str, max_chars: int) -> str:
    """Cut at a whitespace boundary so the tokens before the cut match the full text's tokens."""
    if len(text) <= max_chars:
        return text
    cut = max(text.rfind(" ", 0, max_chars), text.rfind("\n", 0, max_chars))
    return text[: cut if cut > 0 else max_chars]


def _encode(tok: Any, text: str, sample_length: int) -> list[int]:
    """First `sample_length` tokens with the tokenizer's default special tokens (e.g. a BOS if it adds one)."""
    encoded = tok(text, add_special_tokens=True, truncation=True, max_length=sample_length)
    return list(encoded["input_ids"])


def tokenize_samples(tok: Any, documents: Iterable[str], sample_length: int, *, start: int = 0) -> Iterator[Sample]:
    """One sample per non-empty document, in document order; the first `start` samples are skipped.

    Long documents are cut to a generous character budget before tokenising (a
    speed-up only: when the cut text yields fewer than `sample_length` tokens the
    full text is tokenised instead).
    """
    if sample_length < 1:
        raise ValueError(f"sample_length must be at least 1, got {sample_length}")
    index = 0
    budget = sample_length * _CHARS_PER_TOKEN_BUDGET
    for text in documents:
        if index < start:
            index += 1  # every document yields a sample, so skipping needs no tokenising
            continue
        prefix = _prefix_text(text, budget)
        ids = _encode(tok, prefix, sample_length)
        if len(ids) < sample_length and len(prefix) < len(text):
            ids = _encode(tok, text, sample_length)
        if not ids:
            raise CorpusError(f"document {index} tokenised to no tokens; check the corpus and the tokenizer")
        yield Sample(index, tuple(ids))
        index += 1


def batch_samples(samples: Iterable[Sample], batch_tokens: int, pad_id: int) -> Iterator[TokenBatch]:
    """Group consecutive samples while batch size x longest sample stays within `batch_tokens`.

    Greedy and order-preserving, so the batches that follow any batch boundary
    are the same whether the run started there or earlier (needed for resuming).
    A sample longer than the budget gets a batch of its own.
    """
    import torch

    pending: list[Sample] = []
    for sample in samples:
        longest = max([len(s.input_ids) for s in pending] + [len(sample.input_ids)])
        if pending and (len(pending) + 1) * longest > batch_tokens:
            yield _pad(pending, pad_id, torch)
            pending = []
        pending.append(sample)
    if pending:
        yield _pad(pending, pad_id, torch)


def _pad(samples: list[Sample], pad_id: int, torch: Any) -> TokenBatch:
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, : len(sample.input_ids)] = torch.tensor(sample.input_ids, dtype=torch.long)
        mask[row, : len(sample.input_ids)] = 1
    return TokenBatch(samples[0].index, ids, mask)
