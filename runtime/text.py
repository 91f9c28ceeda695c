"""Text-conditioned decoding without PyTorch: numpy + ONNX Runtime (+ ``tokenizers`` for MiniLM).

``TextDecoder.load(export_dir)`` reads a ``latentforge export-text`` directory (``manifest.json``, the
f_tau graph, the frozen decoder's graph and the text encoder) and ``decoder(texts, n, seed)`` generates

    text -> embedding (hashed n-grams in numpy, or MiniLM's ONNX graph) -> f_tau (ONNX)
         -> latent noise around f_tau(y) / codes sampled per position, drawn by numpy from ``seed``
         -> decoder (ONNX) -> images (T, n, C, H, W) float32 in [0, 1]

Two more things an export can offer (``modes``): ``retrieve`` (:meth:`TextDecoder.retrieve`, a VQ-VAE-2
text model with a code bank) returns training images, the bank's code maps the text scores best, and
their train-split row ids; it makes no new image. ``rerank`` (a text model with a captioner graph):
generate k samples per text and keep the n the captioner's text/image cosine ranks best.

Nothing here imports torch, so a serving replica stays small. The serving endpoint
``POST /v1/models/{name}/text-decode`` is a thin shell over :func:`validate_request` and
:meth:`TextDecoder.__call__`; :class:`TextRequestError` names the field of a bad request (a 4xx).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FORMAT_VERSION = 2  # 2: the bank is a retrieval mode with training row ids; the captioner graph for reranking
# Request limits (the endpoint's 4xx): texts per request, characters per text, images per text, samples
# drawn per text to rerank.
MAX_TEXTS = 16
MAX_TEXT_CHARS = 256
MAX_N = 16
MAX_RERANK = 32
# Seeds of every request (text and image endpoints): integers a JSON client holds exactly, JavaScript's
# included (Number.MAX_SAFE_INTEGER), so that a seed the server returns replays; numpy takes any of them.
MAX_SEED = 2**53 - 1
# text-decode's ``mode``: make new images, or return the training images the code bank scores best.
MODES = ("generate", "retrieve")
# Words f_tau's word attention reads per text (``pooling: attention``); later words are dropped.
MAX_WORDS = 32


def unit_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (a norm under ``eps`` divides by ``eps``: torch's F.normalize)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


class TextRequestError(ValueError):
    """A bad text-decode request; ``field`` is the request field at fault (``texts``, ``texts[2]``, ``n``)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class DecoderMismatchError(RuntimeError):
    """A text model loaded against a decoder version other than the one it was trained with."""


# ----------------------------------------------------------------------------------------------------
# Text encoders


_WORD = re.compile(r"[a-z0-9]+")


class HashedTextEncoder:
    """A dependency-light sentence encoder: hashed word unigrams, word bigrams and character n-grams.

    ``encode(texts)`` -> (N, dim) float32, each row L2-normalised. Each feature (``w:red``,
    ``b:red_circle``, ``c3:<re``) is hashed by blake2b to a bucket and a sign (signed hashing keeps
    collisions unbiased); character n-grams of ``<word>`` make it robust to inflections and typos
    ("squares", "colored"). Deterministic across processes and machines (no Python ``hash``).
    """

    def __init__(self, dim: int = 1024, char_ngrams: Sequence[int] = (3, 4), char_weight: float = 0.5):
        if dim <= 0 or not char_ngrams or min(char_ngrams) <= 0:
            raise ValueError(f"hashed encoder: dim and char_ngrams must be > 0, got {dim}, {list(char_ngrams)}")
        self.dim, self.char_ngrams, self.char_weight = int(dim), tuple(int(n) for n in char_ngrams), float(char_weight)
        self._cache: dict[str, tuple[int, float]] = {}

    @property
    def spec(self) -> dict[str, Any]:
        """The manifest's ``text_encoder`` entry (:func:`encoder_from_spec` rebuilds the encoder from it)."""
        return {"kind": "hashed", "dim": self.dim, "char_ngrams": list(self.char_ngrams), "char_weight": self.char_weight}

    def _bucket(self, feature: str) -> tuple[int, float]:
        hit = self._cache.get(feature)
        if hit is None:
            h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
            hit = (h % self.dim, 1.0 if (h >> 63) & 1 else -1.0)
            if len(self._cache) < 200_000:
                self._cache[feature] = hit
        return hit

    def features(self, text: str) -> list[tuple[str, float]]:
        """The (feature, weight) pairs of one text: words, word bigrams and character n-grams."""
        words = _WORD.findall(text.lower())
        feats = [(f"w:{w}", 1.0) for w in words] + [(f"b:{a}_{b}", 1.0) for a, b in zip(words, words[1:])]
        for w in words:
            padded = f"<{w}>"
            for n in self.char_ngrams:
                feats += [(f"c{n}:{padded[i:i + n]}", self.char_weight) for i in range(len(padded) - n + 1)]
        return feats

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) texts -> (N, dim) float32, each row L2-normalised."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature, weight in self.features(text):
                bucket, sign = self._bucket(feature)
                out[row, bucket] += sign * weight
        return unit_rows(out, 1e-8)

    def inputs(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """f_tau's inputs: ``{"embedding": (N, dim)}``."""
        return {"embedding": self.encode(texts)}


_POOLED_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def words_of(text: str) -> list[str]:
    """The words ``pooling: words`` embeds one by one: lower-cased runs of letters and digits (``mid-sized``
    and ``don't`` stay whole); a text with none is its own single word."""
    return _POOLED_WORD.findall(text.lower()) or [text.strip() or text]


class VocabularyWeights:
    """How much each word counts in :func:`pool_words`: like a word of the aligned captions or not.

    A word's weight is ``clip((c - floor) / (1 - floor), 0, 1)``, ``c`` its highest cosine to the
    vocabulary's words (1 for one of them). f_tau only ever saw means of caption words; the words of
    another style ("please draw me ... of the picture") are unlike all of them (cosine 0.3-0.5 for
    MiniLM) and fall out, while a near-synonym of a caption word keeps part of its weight. The captions'
    own words keep weight 1, so the training embeddings are the plain means.
    """

    def __init__(self, vocabulary: Sequence[str], floor: float, encode: Any):
        if not vocabulary or not 0 <= floor < 1:
            raise ValueError(f"vocabulary weights need words and a floor in [0, 1), got {len(vocabulary)} words, floor {floor}")
        self.floor = float(floor)
        self.vectors = np.asarray(encode(list(vocabulary)), dtype=np.float32)

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        """(W, D) unit word embeddings -> (W,) weights in [0, 1]."""
        closest = (vectors @ self.vectors.T).max(1)
        return np.clip((closest - self.floor) / (1 - self.floor), 0.0, 1.0)


def pool_words(texts: Sequence[str], encode: Any, weights: VocabularyWeights | None = None) -> np.ndarray:
    """(N, D): the mean of the unit embeddings of each text's words (``encode(list of words)`` -> (V, D)),
    L2-normalised; with ``weights``, a weighted mean (:class:`VocabularyWeights`; a text none of whose
    words counts falls back to the plain mean). A bag of words: order is lost, but so is the sentence's
    style, which the pooled sentence embedding mixes into every attribute (paraphrases lose size and
    position in it)."""
    pooled = []
    for v in _word_vectors(texts, encode):
        w = weights(v) if weights is not None else np.ones(len(v), dtype=np.float32)
        pooled.append((w[:, None] * v).sum(0) if w.sum() > 0 else v.mean(0))
    out = np.stack(pooled)
    return unit_rows(out, 1e-8).astype(np.float32)


def word_set(texts: Sequence[str], encode: Any, max_words: int = MAX_WORDS) -> dict[str, np.ndarray]:
    """f_tau's word-attention inputs: ``embedding`` (N, max_words, D), each word's unit embedding
    (``encode(list of words)`` -> (V, D)) in order, zeros after the last, and ``mask`` (N, max_words)
    float32, 1 for a word. Fixed width, so the exported graph needs one dynamic axis only."""
    per_text = _word_vectors(texts, encode, max_words)
    emb = np.zeros((len(texts), max_words, per_text[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(texts), max_words), dtype=np.float32)
    for i, vectors in enumerate(per_text):
        emb[i, : len(vectors)] = vectors
        mask[i, : len(vectors)] = 1.0
    return {"embedding": emb, "mask": mask}


def _word_vectors(texts: Sequence[str], encode: Any, max_words: int | None = None) -> list[np.ndarray]:
    """Per text, (words, D) float32: its words' embeddings in order, each distinct word encoded once."""
    per_text = [words_of(t)[:max_words] for t in texts]
    vocab = sorted({w for ws in per_text for w in ws})
    index = {w: i for i, w in enumerate(vocab)}
    vectors = np.asarray(encode(vocab), dtype=np.float32)
    return [vectors[[index[w] for w in ws]] for ws in per_text]


class OnnxMiniLMEncoder:
    """all-MiniLM-L6-v2 as an ONNX graph (``input_ids``, ``attention_mask`` -> mean-pooled, L2-normalised
    ``sentence_embedding`` (N, 384)) with its tokenizer run by the ``tokenizers`` package; no PyTorch.
    ``pooling="words"``: each text is the normalised mean of its words' embeddings (:func:`pool_words`);
    ``pooling="attention"``: f_tau gets the words' embeddings themselves (:func:`word_set`)."""

    def __init__(self, graph: str | Path, tokenizer: str | Path, max_length: int = 128, pooling: str = "sentence",
                 vocabulary: Sequence[str] | None = None, vocab_floor: float | None = None):
        if pooling not in ("sentence", "words", "attention"):
            raise ValueError(f"MiniLM pooling must be sentence, words or attention, got {pooling!r}")
        self.pooling = pooling
        # Imported here: hashing texts and validating requests need neither ONNX Runtime nor tokenizers.
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        # pooling words with a vocabulary (text.vocab_floor): the weighted mean train-text used
        self.weights = (VocabularyWeights(vocabulary, vocab_floor, self._sentences)
                        if pooling == "words" and vocabulary and vocab_floor is not None else None)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 384): one embedding per text (pooling attention: the mean of its words')."""
        if self.pooling in ("words", "attention"):
            return pool_words(texts, self._sentences, self.weights)
        return self._sentences(texts)

    def inputs(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """f_tau's inputs: ``{"embedding": (N, 384)}``, or for pooling attention ``{"embedding": (N, L, 384),
        "mask": (N, L)}``."""
        if self.pooling == "attention":
            return word_set(texts, self._sentences)
        return {"embedding": self.encode(texts)}

    def _sentences(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return self.session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]


def encoder_from_spec(spec: dict[str, Any], directory: str | Path | None = None):
    """The torch-free encoder a manifest's ``text_encoder`` spec names (MiniLM's files are in ``directory``)."""
    if spec["kind"] == "hashed":
        return HashedTextEncoder(spec["dim"], spec["char_ngrams"], spec.get("char_weight", 0.5))
    if spec["kind"] == "minilm":
        directory = Path(directory or ".")
        return OnnxMiniLMEncoder(directory / spec["graph"], directory / spec["tokenizer"], spec.get("max_length", 128),
                                 spec.get("pooling", "sentence"), spec.get("vocabulary"), spec.get("vocab_floor"))
    raise ValueError(f"unknown text encoder kind {spec.get('kind')!r}")


# ----------------------------------------------------------------------------------------------------
# Requests


def validate_request(texts: Any, n: Any = 1, seed: Any = None) -> tuple[list[str], int, int | None]:
    """Check a text-decode request; return ``(texts, n, seed)`` or raise :class:`TextRequestError`.

    ``texts``: a non-empty list of at most :data:`MAX_TEXTS` strings, each with non-whitespace content
    and at most :data:`MAX_TEXT_CHARS` characters; ``n``: an int in 1..:data:`MAX_N`; ``seed``: None or
    an int in 0..:data:`MAX_SEED`.
    """
    if not isinstance(texts, (list, tuple)):
        raise TextRequestError("texts", f"must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise TextRequestError("texts", "must hold at least one text")
    if len(texts) > MAX_TEXTS:
        raise TextRequestError("texts", f"at most {MAX_TEXTS} texts per request, got {len(texts)}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TextRequestError(f"texts[{i}]", f"must be a string, got {type(text).__name__}")
        if not text.strip():
            raise TextRequestError(f"texts[{i}]", "is empty or whitespace only")
        if len(text) > MAX_TEXT_CHARS:
            raise TextRequestError(f"texts[{i}]", f"at most {MAX_TEXT_CHARS} characters, got {len(text)}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TextRequestError("n", f"must be an integer, got {n!r}")
    if not 1 <= n <= MAX_N:
        raise TextRequestError("n", f"must be between 1 and {MAX_N}, got {n}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise TextRequestError("seed", f"must be null or an integer in [0, {MAX_SEED}], got {seed!r}")
    return list(texts), n, seed


# ----------------------------------------------------------------------------------------------------
# The decoder


def sample_codes_np(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """(..., K) logits -> (...) int64: argmax at temperature 0, else Gumbel-max draws of softmax(logits / T)."""
    return gumbel_perturbed_np(logits, temperature, rng).argmax(-1).astype(np.int64)


def gumbel_perturbed_np(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """``logits`` at temperature 0, else logits / T plus Gumbel noise (``models.text.gumbel_perturbed``)."""
    if temperature <= 0:
        return logits
    u = np.clip(rng.random(logits.shape, dtype=np.float32), 1e-9, 1 - 1e-9)
    return logits / temperature - np.log(-np.log(u))


def project_np(embedding: np.ndarray, centre: np.ndarray | None, whiten: np.ndarray | None) -> np.ndarray:
    """(B, E) embeddings -> unit rows in a retrieval space (``models.text.project``; only normalised without one)."""
    unit = unit_rows(embedding)
    return unit if whiten is None else unit_rows((unit - centre) @ whiten)


def load_space(path: str | Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(centre, whiten) float32 of a retrieval space saved in an ``.npz`` (None, None without ``whiten``)."""
    with np.load(path) as f:
        return tuple(f[k].astype(np.float32) if "whiten" in f else None for k in ("centre", "whiten"))  # type: ignore[return-value]


class CodeBankNp:
    """:class:`models.text.CodeBank` in numpy (``bank.npz`` of an export): the code maps of the train images
    and their train-split ``rows``, scored by f_tau's log-likelihood plus ``text_weight`` * positions * the
    caption-retrieval cosine (in the bank's retrieval space when it has one: ``centre``, ``whiten``)."""

    def __init__(self, path: str | Path):
        with np.load(path) as f:
            if "rows" not in f:
                raise ValueError(f"{path}: the code bank records no training rows; re-run train-text and export-text")
            self.top, self.bottom = f["top"].astype(np.int64), f["bottom"].astype(np.int64)
            self.rows = f["rows"].astype(np.int64)
            embedding = f["embedding"].astype(np.float32) if "embedding" in f else None
            self.text_weight = float(f["text_weight"])
        self.centre, self.whiten = load_space(path)
        self.keys = None if embedding is None else self.project(embedding)  # the bank side, projected once

    def project(self, embedding: np.ndarray) -> np.ndarray:
        """(B, E) embeddings -> unit rows in the bank's retrieval space (only normalised without one)."""
        return project_np(embedding, self.centre, self.whiten)

    def scores(self, top_logits: np.ndarray, bottom_logits: np.ndarray, text_embedding: np.ndarray | None) -> np.ndarray:
        """(B, N) scores of every bank map for B prompts."""
        total = _map_log_likelihood_np(top_logits, self.top) + _map_log_likelihood_np(bottom_logits, self.bottom)
        if self.keys is not None and self.text_weight > 0 and text_embedding is not None:
            positions = self.top[0].size + self.bottom[0].size
            total = total + self.text_weight * positions * (self.project(text_embedding) @ self.keys.T)
        return total

    def pick(self, scores: np.ndarray, n: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
        """(B, n) bank rows: the n best at temperature 0, else Gumbel-top-n of scores / temperature."""
        scores = gumbel_perturbed_np(scores, temperature, rng)
        k = min(n, scores.shape[1])
        picks = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.tile(picks, (1, -(-n // k)))[:, :n]


class CaptionScorerNp:
    """:class:`models.text.CaptionScorer` without torch: the captioner's ONNX graph (``images`` (B, C, H, W)
    -> ``embedding`` (B, E)) and the retrieval space (``.npz``) the text/image cosine is taken in."""

    def __init__(self, session: Any, space_path: str | Path):
        self.session = session
        self.centre, self.whiten = load_space(space_path)

    def scores(self, text_embedding: np.ndarray, images: np.ndarray) -> np.ndarray:
        """(T, k) cosines of T texts' embeddings (T, E) to each text's k images (T, k, C, H, W)."""
        t, k = images.shape[:2]
        keys = self.session.run(["embedding"], {"images": images.reshape(t * k, *images.shape[2:]).astype(np.float32)})[0]
        keys = project_np(keys, self.centre, self.whiten).reshape(t, k, -1)
        return np.einsum("te,tke->tk", project_np(text_embedding, self.centre, self.whiten), keys)


def rerank_np(images: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """(T, n, ...) of (T, k, ...) ``images``: per text the n with the highest ``scores``, best first
    (ties: the earlier sample), as ``models.text.rerank``."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    return np.take_along_axis(images, order.reshape(*order.shape, *([1] * (images.ndim - 2))), axis=1)


def _map_log_likelihood_np(logits: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(B, h, w, K) logits, (N, h, w) codes -> (B, N): sum over positions of log softmax(logits)[code]."""
    flat_logits = logits.reshape(logits.shape[0], -1, logits.shape[-1]).astype(np.float64)
    top = flat_logits.max(-1, keepdims=True)
    logp = flat_logits - top - np.log(np.exp(flat_logits - top).sum(-1, keepdims=True))
    flat = codes.reshape(codes.shape[0], -1)
    total = np.zeros((logits.shape[0], flat.shape[0]))
    for p in range(flat.shape[1]):
        total += logp[:, p, flat[:, p]]
    return total


class TextDecoder:
    """A loaded text export: ``decoder(texts, n, seed, temperature, rerank)`` -> generated images (T, n, C, H, W)
    float32; ``decoder.retrieve(...)`` -> training images and their rows (a model with a code bank)."""

    def __init__(self, manifest: dict[str, Any], directory: Path):
        import onnxruntime as ort  # here, as in OnnxMiniLMEncoder: loaded only with a model

        self.manifest, self.directory = manifest, directory
        session = lambda f: ort.InferenceSession(str(directory / f), providers=["CPUExecutionProvider"])  # noqa: E731
        self.text_map = session(manifest["text_map"]["file"])
        self.decoder = session(manifest["decoder_graph"]["file"])
        self.encoder = encoder_from_spec(manifest["text_encoder"], directory)
        self.kind = manifest["text_map"]["kind"]
        retrieval, rerank = manifest.get("retrieval"), manifest.get("rerank")
        self.bank = CodeBankNp(directory / retrieval["file"]) if retrieval else None
        self.scorer = CaptionScorerNp(session(rerank["captioner"]), directory / rerank["space"]) if rerank else None
        self.name, self.version, self.alias = manifest.get("family", ""), "", None  # set by a server

    @classmethod
    def load(cls, export_dir: str | Path, decoder_name: str | None = None, decoder_version: int | str | None = None) -> "TextDecoder":
        """Load an export-text directory; with ``decoder_name``/``decoder_version`` (the decoder being
        served), refuse a text model trained against another decoder (:class:`DecoderMismatchError`)."""
        export_dir = Path(export_dir)
        path = export_dir / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{export_dir}: no manifest.json; is it a `latentforge export-text` directory?")
        manifest = json.loads(path.read_text())
        if manifest.get("kind") != "text" or manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a text export of format {FORMAT_VERSION} (kind {manifest.get('kind')!r}, format "
                             f"{manifest.get('format_version')!r}); re-run `latentforge export-text`")
        check_decoder(manifest, decoder_name, decoder_version)
        return cls(manifest, export_dir)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        h, w, c = self.manifest["data"]["image_shape"]
        return (c, h, w)

    @property
    def modes(self) -> list[str]:
        """The ``mode`` values text-decode takes: ``generate``, and ``retrieve`` with a code bank."""
        return ["generate"] + (["retrieve"] if self.bank is not None else [])

    def embed(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """(T,) strings -> f_tau's inputs: ``embedding`` (T, E) float32, or (T, L, E) and ``mask`` (T, L)."""
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.encoder.inputs(texts).items()}

    def __call__(self, texts: Sequence[str], n: int = 1, seed: int | None = None, temperature: float = 1.0,
                 rerank: int | None = None) -> np.ndarray:
        """Generated images (T, n, C, H, W) float32 in [0, 1]; the same ``seed`` gives the same images.
        ``temperature`` 0 gives the mode n times. ``rerank`` k: draw k samples per text and keep the n the
        captioner's cosine ranks best. Never reads the code bank. Validates the request first
        (:func:`validate_request`, :func:`check_rerank`)."""
        texts, n, seed = validate_request(texts, n, seed)
        check_rerank(rerank, n, self.scorer is not None)
        rng = np.random.default_rng(seed)
        inputs = self.embed(texts)
        out = self.text_map.run(None, inputs)
        draws = rerank or n
        images = self.decoder.run(["images"], decoder_feed(self.manifest, out, draws, temperature, rng))[0]
        images = images.reshape(len(texts), draws, *images.shape[1:])
        if rerank:
            images = rerank_np(images, self.scorer.scores(inputs["embedding"], np.clip(images, 0.0, 1.0)), n)
        return images

    def retrieve(self, texts: Sequence[str], n: int = 1, seed: int | None = None, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(images (T, n, C, H, W), rows (T, n) int64): the decoder's renderings of the training code maps
        the bank scores best for each text (the n best at ``temperature`` 0, drawn above) and the
        train-split rows they come from. :class:`TextRequestError` (``mode``) without a bank."""
        texts, n, seed = validate_request(texts, n, seed)
        if self.bank is None:
            raise TextRequestError("mode", f"retrieve needs a code bank, which this text model has not; modes: {', '.join(self.modes)}")
        rng = np.random.default_rng(seed)
        inputs = self.embed(texts)
        out = self.text_map.run(None, inputs)
        embedding = inputs["embedding"] if inputs["embedding"].ndim == 2 else None
        picks = self.bank.pick(self.bank.scores(out[0], out[1], embedding), n, temperature, rng)
        flat = picks.reshape(-1)
        images = self.decoder.run(["images"], {"top_indices": self.bank.top[flat], "bottom_indices": self.bank.bottom[flat]})[0]
        return images.reshape(len(texts), n, *images.shape[1:]), self.bank.rows[picks]

    # -- what a serving endpoint needs ------------------------------------------------------------------

    capabilities = ["text-decode"]

    def text_decode(self, body: dict[str, Any]) -> dict[str, Any]:
        """One ``POST /v1/models/{name}/text-decode`` body -> ``{"seed", "mode", "images"}`` (+ ``"rows"``
        for retrieve).

        ``body``: ``texts`` (list of strings), ``n`` (default 1), ``seed`` (default: drawn here and
        returned, so the response can be reproduced), ``temperature`` (default 1; 0 = the mode), ``mode``
        (``generate``, the default, or ``retrieve``), ``rerank`` (generate only: k samples per text, the
        best n kept). Images: (T, n, C, H, W) float32 in [0, 1]; rows: (T, n) train-split row ids.
        Raises :class:`TextRequestError` naming the field (a 4xx).
        """
        req = parse_text_decode(body)
        if req["mode"] not in self.modes:
            raise TextRequestError("mode", f"{req['mode']} is not a mode of this text model; its modes: {', '.join(self.modes)}")
        seed = req["seed"] if req["seed"] is not None else int(np.random.default_rng().integers(0, MAX_SEED, endpoint=True))
        if req["mode"] == "retrieve":
            images, rows = self.retrieve(req["texts"], req["n"], seed, req["temperature"])
            return {"seed": seed, "mode": "retrieve", "images": images, "rows": rows}
        images = self(req["texts"], req["n"], seed, req["temperature"], req["rerank"])
        return {"seed": seed, "mode": "generate", "images": images}

    def describe(self) -> dict[str, Any]:
        """What is served, for ``GET /v1/models``: among it the ``modes`` and whether it can ``rerank``."""
        m = self.manifest
        return {"name": self.name, "version": self.version, "alias": self.alias, "family": m["family"], "kind": "text",
                "capabilities": self.capabilities, "modes": self.modes,
                "rerank": {"max_k": MAX_RERANK} if self.scorer is not None else None,
                "image_shape": list(self.image_shape), "text_encoder": m["text_encoder"]["kind"],
                "sampling": (m.get("sampling") or {}).get("kind"),
                "retrieval": {k: v for k, v in (m.get("retrieval") or {}).items() if k != "file"} or None,
                "decoder": {k: m["decoder"].get(k) for k in ("name", "version", "sha256")},
                "aligned_size": m["aligned"]["aligned_size"], "limits": m.get("limits"), "metrics": m.get("metrics") or {}}


def decoder_feed(manifest: dict[str, Any], out: list[np.ndarray], n: int, temperature: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The decoder graph's inputs for n generated images per text from f_tau's outputs ``out``: latents
    with noise (``latent`` (T * n, *latent)) or codes sampled per position (``top_indices``,
    ``bottom_indices``), by the export's ``manifest``."""
    if manifest["text_map"]["kind"] == "latent":
        z = np.repeat(out[0], n, axis=0)
        if temperature > 0:
            z = z + (temperature * manifest["sampling"]["sample_std"]) * rng.standard_normal(z.shape, dtype=np.float32)
        return {"latent": z.astype(np.float32)}
    top, bottom = (sample_codes_np(np.repeat(t, n, axis=0), temperature, rng) for t in out)
    return {"top_indices": top, "bottom_indices": bottom}


def check_rerank(rerank: Any, n: int, available: bool) -> None:
    """Raise :class:`TextRequestError` (``rerank``) unless ``rerank`` is None or an int k with n <= k <=
    :data:`MAX_RERANK` on a model that can rerank (``available``)."""
    if rerank is None:
        return
    if isinstance(rerank, bool) or not isinstance(rerank, int):
        raise TextRequestError("rerank", f"must be null or an integer, got {rerank!r}")
    if not n <= rerank <= MAX_RERANK:
        raise TextRequestError("rerank", f"must be between n ({n}) and {MAX_RERANK}, got {rerank}")
    if not available:
        raise TextRequestError("rerank", "this text model has no captioner to rank samples with (trained without pseudo-captions)")


def parse_text_decode(body: dict[str, Any]) -> dict[str, Any]:
    """A text-decode request body -> ``{texts, n, seed, temperature, mode, rerank}``, or
    :class:`TextRequestError` naming the field: an unknown field, a temperature outside [0, 10], a mode
    not in :data:`MODES`, rerank with mode retrieve or out of range, or what :func:`validate_request` refuses."""
    unknown = sorted(set(body) - {"texts", "n", "seed", "temperature", "format", "mode", "rerank"})
    if unknown:
        raise TextRequestError(unknown[0], "unknown field")
    temperature = body.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 10:
        raise TextRequestError("temperature", f"must be a number in [0, 10], got {temperature!r}")
    mode = "generate" if body.get("mode") is None else body["mode"]
    if mode not in MODES:
        raise TextRequestError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    texts, n, seed = validate_request(body.get("texts"), body.get("n", 1), body.get("seed"))
    rerank = body.get("rerank")
    if rerank is not None and mode != "generate":
        raise TextRequestError("rerank", "reranks generated samples: only with mode generate")
    check_rerank(rerank, n, True)
    return {"texts": texts, "n": n, "seed": seed, "temperature": float(temperature), "mode": mode, "rerank": rerank}


def check_decoder(manifest: dict[str, Any], name: str | None, version: int | str | None) -> None:
    """Raise :class:`DecoderMismatchError` when the served decoder (``name``, ``version``) is not the one
    the text model was trained against (``manifest["decoder"]``). ``None`` skips that part of the check."""
    trained = manifest.get("decoder") or {}
    t_name, t_version = trained.get("name"), trained.get("version")
    if name is not None and t_name != name or version is not None and str(t_version) != str(version):
        raise DecoderMismatchError(
            f"text model {manifest.get('name') or manifest.get('family')} was trained against decoder "
            f"{t_name} version {t_version}, not {name} version {version}: serve {t_name} version {t_version}, "
            f"or train a new text model with `latentforge train-text --model {name}/{version}`"
        )
