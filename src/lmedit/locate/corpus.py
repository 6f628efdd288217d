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
  that ROME uses, streamed through the optional ``datasets`` package;
  ``"wikitext[:<config>]"`` (WikiText, one document per article) and
  ``"hf:<dataset>[:<config>]"`` (any hub dataset with a ``text`` column, one
  document per row) likewise, for users who have the hub;
* the packaged sample ``enwiki2015-sample`` (the first 1,000 articles of
  ``enwiki2015``, each cut where a 256-token sample ends; CC BY-SA 3.0, see its
  SOURCES.md), which a bare ``enwiki2015`` falls back to when the full corpus is
  not beside the user, so the embedded model's presets work from any folder.

A WikiExtractor file may be compressed (``.gz``, ``.xz``).

Files are always read in sorted relative-path order, so the document order is
the same on every run and machine.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
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
    "PACKAGED_SAMPLES",
    "MIN_ARTICLE_WORDS",
    "Sample",
    "TokenBatch",
    "batch_samples",
    "iter_wikiextractor_articles",
    "packaged_sample",
    "read_wikiextractor",
    "resolve_corpus",
    "tokenize_samples",
]

LOG = logging.getLogger(__name__)

MIN_ARTICLE_WORDS = 50
DEFAULT_WIKIPEDIA = ("wikimedia/wikipedia", "20231101.en")
DEFAULT_WIKITEXT = ("Salesforce/wikitext", "wikitext-103-raw-v1")
# Bare corpus names that fall back to a sample shipped inside the package when the full corpus is absent.
PACKAGED_SAMPLES = {"enwiki2015": "enwiki2015-sample"}
_PACKAGED_DIR = Path(__file__).resolve().parent.parent / "data" / "corpus"
_OPENERS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".xz": lzma.open}
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


def _open_text(path: Path) -> Any:
    """A text handle on a plain, gzip or xz file (chosen by suffix)."""
    opener = _OPENERS.get(path.suffix)
    if opener is None:
        return path.open("r", encoding="utf-8", errors="replace")
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _starts_with_doc_tag(path: Path) -> bool:
    with _open_text(path) as handle:
        for line in handle:
            if line.strip():
                return line.lstrip().startswith("<doc ")
    return False


def iter_wikiextractor_articles(lines: Iterable[str], min_words: int = MIN_ARTICLE_WORDS) -> Iterator[tuple[str, str, str]]:
    """(header line, title, text) per kept article: title line dropped, stubs under `min_words` skipped."""
    header = title = None
    body: list[str] = []
    for raw in lines:
        line = raw.rstrip("\n")
        if title is None:
            if line.lstrip().startswith("<doc "):
                match = _DOC_TITLE.search(line)
                header, title, body = line.strip(), (match.group("title") if match else ""), []
            continue
        if line.strip() == "</doc>":
            text = _article_text(title, body)
            if len(text.split()) >= min_words:
                yield header or "", title, text
            title = None
            continue
        body.append(line)


def read_wikiextractor(lines: Iterable[str], min_words: int = MIN_ARTICLE_WORDS) -> Iterator[str]:
    """Article texts from WikiExtractor lines: title line dropped, stubs under `min_words` skipped."""
    for _, _, text in iter_wikiextractor_articles(lines, min_words):
        yield text


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
            with _open_text(path) as handle:
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


def _datasets_module(hint: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"hub corpora need the optional 'datasets' package, which is not installed; {hint}") from None
    return datasets


def _hub_documents(dataset: str, config: str | None, hint: str) -> Iterator[Any]:
    """Rows of a Hugging Face dataset's train split, streamed (no full download)."""
    datasets = _datasets_module(hint)
    try:
        yield from datasets.load_dataset(dataset, config, split="train", streaming=True)
    except CorpusError:
        raise
    except Exception as exc:  # offline, hub changes: all end in the same advice
        raise CorpusError(f"could not stream {dataset} ({config}) from the Hugging Face hub: {exc}; {hint}") from None


_HUB_HINT = ("pass a local corpus path instead, e.g. --corpus ../shared/corpus/enwiki2015 (or a name under "
             "$LMEDIT_CORPUS_DIR), or the packaged sample --corpus enwiki2015-sample")
_WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")


def _rows_as_documents(rows: Iterable[Any]) -> Iterator[str]:
    for row in rows:
        text = (row.get("text") or "").strip()
        if text:
            yield text


def _wikitext_articles(rows: Iterable[Any]) -> Iterator[str]:
    """WikiText stores one line per row; an article starts at each top-level `` = Title = `` heading."""
    current: list[str] = []
    for row in rows:
        line = (row.get("text") or "").rstrip("\n")
        if _WIKITEXT_HEADING.match(line) and current:
            text = "\n".join(current).strip()
            if text:
                yield text
            current = []
        elif not _WIKITEXT_HEADING.match(line):
            current.append(line.strip())
    text = "\n".join(current).strip()
    if text:
        yield text


def _hub_corpus(name: str, dataset: str, config: str | None, kind: str,
                documents: Callable[[Iterable[Any]], Iterator[str]]) -> Corpus:
    def reader() -> Iterator[str]:
        return documents(_hub_documents(dataset, config, _HUB_HINT))

    _datasets_module(_HUB_HINT)  # fail before any work when the package is missing
    return Corpus(name, kind, f"{name}:{dataset}:{config}", f"hf://{dataset}/{config}", reader)


def _parse_hub_spec(text: str) -> Corpus | None:
    """``wikipedia[:config]``, ``wikitext[:config]`` or ``hf:dataset[:config]``; None for anything else."""
    head, _, rest = text.partition(":")
    if head == "wikipedia":
        dataset, default = DEFAULT_WIKIPEDIA
        return _hub_corpus("wikipedia", dataset, rest or default, "hf-wikipedia-v1", _rows_as_documents)
    if head == "wikitext":
        dataset, default = DEFAULT_WIKITEXT
        return _hub_corpus("wikitext", dataset, rest or default, "hf-wikitext-articles-v1", _wikitext_articles)
    if head == "hf":
        dataset, _, config = rest.partition(":")
        if not dataset:
            raise CorpusError(f"corpus {text!r}: name the dataset, e.g. hf:Salesforce/wikitext:wikitext-2-raw-v1")
        return _hub_corpus(dataset.replace("/", "--"), dataset, config or None, "hf-text-rows-v1", _rows_as_documents)
    return None


def packaged_sample(name: str) -> Path | None:
    """The folder of a corpus sample shipped inside the package (by its own name or the full corpus's), or None."""
    folder = _PACKAGED_DIR / PACKAGED_SAMPLES.get(name, name)
    return folder if folder.is_dir() and _data_files(folder) else None


_FELL_BACK: set[str] = set()
"""Corpus names already replaced by their packaged sample in this process (the warning is given once)."""


def resolve_corpus(spec: str | os.PathLike[str], *, cwd: Path | None = None, packaged_fallback: bool = True) -> Corpus:
    """Turn a path, a bare name or a hub spec (``wikipedia[:config]``, ``wikitext[:config]``, ``hf:...``) into a `Corpus`.

    A bare name is looked up as: an existing path; ``$LMEDIT_CORPUS_DIR/<name>``;
    ``shared/corpus/<name>`` in the current directory or any parent (so
    ``enwiki2015`` works from inside the project checkout); a sample shipped in
    the package under that name. With `packaged_fallback`, a full corpus that is
    not found (``enwiki2015``) is replaced by its packaged sample, with a warning.
    """
    text = os.fspath(spec)
    hub = _parse_hub_spec(text)
    if hub is not None:
        return hub
    candidate = Path(text).expanduser()
    if candidate.exists():
        return _local_corpus(candidate)
    tried = [str(candidate.resolve())]
    if len(candidate.parts) == 1:
        found = find_shared(text, kind="corpus", cwd=cwd)
        if found is not None:
            return _local_corpus(found)
        sample = packaged_sample(text) if text in PACKAGED_SAMPLES.values() else None
        if sample is not None:
            return _local_corpus(sample)
        env_dir = os.environ.get(CORPUS_DIR_ENV)
        env = str(Path(env_dir).expanduser() / text) if env_dir else f"${CORPUS_DIR_ENV}/{text} (${CORPUS_DIR_ENV} is not set)"
        tried += [env, f"shared/corpus/{text} in {(cwd or Path.cwd()).resolve()} and its parents"]
        sample = packaged_sample(text) if packaged_fallback and text in PACKAGED_SAMPLES else None
        if sample is not None:
            log = LOG.warning if text not in _FELL_BACK else LOG.debug  # said once per process, not per layer
            _FELL_BACK.add(text)
            log("corpus %r is not here (looked at: %s); using the packaged sample %r, which gives the same "
                "statistics for up to 1,000 samples of up to 256 tokens", text, "; ".join(tried), sample.name)
            return _local_corpus(sample)
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
