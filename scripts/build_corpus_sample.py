"""Rebuild the corpus sample shipped in the package (src/lmedit/data/corpus/enwiki2015-sample).

The sample holds the first 1,000 articles of ../shared/corpus/enwiki2015 in the
corpus's reading order, each cut at the character budget that the statistics
code itself cuts a 256-token sample at, so statistics with up to 1,000 samples
of up to 256 tokens are the same from the sample as from the full corpus (the
script checks this for the embedded tokenizer). Each article keeps its
WikiExtractor header (id, url, title) as the CC BY-SA attribution.

    python scripts/build_corpus_sample.py [--corpus ../shared/corpus/enwiki2015]
"""

from __future__ import annotations

import argparse
import lzma
from pathlib import Path

from lmedit.locate import corpus as corpus_module
from lmedit.locate.corpus import _CHARS_PER_TOKEN_BUDGET, _data_files, _open_text, _prefix_text, iter_wikiextractor_articles

ARTICLES = 1000
SAMPLE_LENGTH = 256
TARGET = Path(__file__).resolve().parent.parent / "src" / "lmedit" / "data" / "corpus" / "enwiki2015-sample"


def articles(root: Path, count: int) -> list[tuple[str, str, str]]:
    kept = []
    for path in _data_files(root):
        with _open_text(path) as handle:
            for header, title, text in iter_wikiextractor_articles(handle):
                kept.append((header, title, _prefix_text(text, SAMPLE_LENGTH * _CHARS_PER_TOKEN_BUDGET).rstrip()))
                if len(kept) == count:
                    return kept
    return kept


def write_sample(kept: list[tuple[str, str, str]], target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    blocks = [f"{header}\n{title}\n\n{text}\n</doc>\n" for header, title, text in kept]
    path = target / "articles.xz"
    path.write_bytes(lzma.compress("".join(blocks).encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    return path


def check_same_samples(full: Path, sample: Path) -> None:
    """Token samples of the embedded tokenizer agree between the full corpus and the sample."""
    from lmedit.models import load_model

    _, tok = load_model("smollm2-135m")
    sample_docs = list(corpus_module.resolve_corpus(sample).documents())
    for length in (16, 64, 128, SAMPLE_LENGTH):
        full_samples = corpus_module.tokenize_samples(tok, corpus_module.resolve_corpus(full).documents(), length)
        sample_samples = corpus_module.tokenize_samples(tok, sample_docs, length)
        for index, (x, y) in zip(range(len(sample_docs)), zip(full_samples, sample_samples)):
            if x.input_ids != y.input_ids:
                raise SystemExit(f"sample {index} differs at length {length}")
    print(f"\ntoken samples agree for {len(sample_docs)} articles at lengths 16, 64, 128, {SAMPLE_LENGTH}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("../shared/corpus/enwiki2015"))
    args = parser.parse_args()
    kept = articles(args.corpus, ARTICLES)
    path = write_sample(kept, TARGET)
    print(f"wrote {len(kept)} articles to {path} ({path.stat().st_size / 1e6:.2f} MB)")
    check_same_samples(args.corpus, TARGET)


if __name__ == "__main__":
    main()
