"""The aligned set on the driver: which captioned train images f_tau learns from (held-out combinations
left out), their embeddings and the frozen decoder's targets, as arrays for the Ray workers; and the
unlabelled images (pseudo-captions, the code bank), without the tier (b) combinations."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from latentforge.models import PretrainedModel
from latentforge.pipelines.common.errors import DataError
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import load_split
from latentforge.pipelines.text.encoders import encoder_spec, text_features
from latentforge.pipelines.text.job import TextJob, holdout_pairs
from latentforge.runtime.text import words_of


def aligned_rows(captions: np.ndarray, factors: np.ndarray, manifest: dict[str, Any], fraction: float,
                 holdout: list[tuple[int, int]], seed: int) -> np.ndarray:
    """Row indices (sorted) of the aligned set in a split: ``fraction`` of its captioned rows, drawn
    (seeded) from the rows whose (shape, colour) is not held out."""
    captioned = np.array([bool(c and c.strip()) for c in captions])
    eligible = captioned & ~combination_rows(factors, manifest, holdout)
    k = min(int(round(fraction * captioned.sum())), int(eligible.sum()))
    if k <= 0:
        raise DataError(f"the aligned set is empty: {int(captioned.sum())} captioned train images x "
                        f"text.aligned_fraction {fraction} (with {len(holdout)} held-out combinations)")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.flatnonzero(eligible), size=k, replace=False))


def combination_rows(factors: np.ndarray, manifest: dict[str, Any], pairs: list[tuple[int, int]]) -> np.ndarray:
    """(N,) bool: which rows of ``factors`` show one of the (shape, colour) index ``pairs``."""
    hit = np.zeros(len(factors), dtype=bool)
    if pairs:
        names = manifest["factor_names"]
        s, c = factors[:, names.index("shape")], factors[:, names.index("colour")]
        for shape, colour in pairs:
            hit |= (s == shape) & (c == colour)
    return hit


def prepare_arrays(job: TextJob, echo: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The aligned set as arrays for the workers, and what to record about it.

    Arrays: ``embedding`` (N, E) float32, ``image`` (N, H, W, C) uint8 and the targets: ``target_latent``
    (N, *latent) float32 (flat-latent families with an encoder) or ``top`` (N, ht, wt), ``bottom``
    (N, hb, wb) int64 (VQ-VAE-2), and ``row`` (N,) int64, the train-split rows. With ``text.pseudo_ratio``
    > 0 (or a code bank), the same for every other train image (the unlabelled ones) under
    ``pseudo_``-prefixed keys, without embeddings (``train-text`` adds the ``caption-text`` stage's
    pseudo-captions, :func:`pipelines.text.captions.load_captions`).
    The unlabelled images keep the tier (a) combinations (``text.holdout``) and lose the tier (b) ones
    (``text.holdout_strict``): no pseudo-caption and no bank entry shows those.
    """
    text = job.text
    train = load_split(job.data_dir, "train")
    rows, captions, spec, holdout, strict = aligned_selection(text, job.manifest, train)
    t0 = time.time()
    arrays: dict[str, np.ndarray] = {**text_features(spec, captions), "image": np.array(train["images"][rows]), "row": rows}
    echo(f"aligned set: {len(rows)} of {len(train['captions'])} train images ({text['aligned_fraction']:g}), "
         f"{len(holdout)} + {len(strict)} held-out (shape, colour) combinations (tier a + b); "
         f"{spec['kind']} embeddings in {time.time() - t0:.1f}s")
    decoder = PretrainedModel.from_pretrained(job.decoder_dir).eval()
    arrays.update(decoder_targets(decoder, arrays["image"]))
    pseudo_count = 0
    others = np.zeros(0, dtype=np.int64)
    # The unlabelled images: pseudo-captioned for f_tau, and (a code-map decoder with text.bank) the bank's maps.
    if text["pseudo_ratio"] > 0 or (text["bank"] and hasattr(decoder, "decode_indices")):
        others = unlabelled_rows(train, job.manifest, rows, strict)
        pseudo = {"image": np.array(train["images"][others]), **decoder_targets(decoder, train["images"][others]), "row": others}
        arrays.update({f"pseudo_{k}": v for k, v in pseudo.items()})
    if text["pseudo_ratio"] > 0:
        pseudo_count = int(len(arrays["pseudo_image"]))
        echo(f"pseudo-captions: {pseudo_count} unlabelled train images, {text['pseudo_ratio']:g} per aligned pair each epoch")
    info = {
        "aligned_size": int(len(rows)),
        "pseudo_count": pseudo_count,
        "aligned_rows": rows.tolist(),
        "unlabelled_rows": others.tolist(),  # the pseudo-captioned / bank images (tier b excluded)
        "train_count": int(len(train["captions"])),
        "holdout": [[job.manifest["factor_values"]["shape"][s], job.manifest["factor_values"]["colour"][c]] for s, c in holdout],
        "holdout_strict": [[job.manifest["factor_values"]["shape"][s], job.manifest["factor_values"]["colour"][c]] for s, c in strict],
        "text_encoder": spec,
        "sample_captions": captions[:16],
    }
    return arrays, info


def aligned_selection(text: dict[str, Any], manifest: dict[str, Any], train: dict[str, np.ndarray]
                      ) -> tuple[np.ndarray, list[str], dict[str, Any], list[tuple[int, int]], list[tuple[int, int]]]:
    """What the aligned set is, whatever the decoder: (its train-split rows, their captions, the encoder
    spec (with the captions' vocabulary for pooled words), tier (a) and tier (b) held-out pairs)."""
    holdout = holdout_pairs(text["holdout"], manifest)
    strict = holdout_pairs(text["holdout_strict"], manifest)
    rows = aligned_rows(train["captions"], train["factors"], manifest, text["aligned_fraction"], holdout + strict, text["seed"])
    captions = [str(c) for c in train["captions"][rows]]
    spec = encoder_spec(text)
    if spec.get("pooling") == "words" and text["vocab_floor"] is not None:
        # The aligned captions' words: at serving a word unlike all of them counts less (VocabularyWeights).
        spec.update(vocabulary=sorted({w for c in captions for w in words_of(c)}), vocab_floor=float(text["vocab_floor"]))
    return rows, captions, spec, holdout, strict


def unlabelled_rows(train: dict[str, np.ndarray], manifest: dict[str, Any], rows: np.ndarray,
                    strict: list[tuple[int, int]]) -> np.ndarray:
    """The train-split rows outside the aligned set ``rows``, without the tier (b) combinations ``strict``:
    the images that are pseudo-captioned and go into the code bank."""
    others = np.setdiff1d(np.arange(len(train["captions"])), rows)
    return others[~combination_rows(train["factors"][others], manifest, strict)]


def decoder_targets(decoder, images: np.ndarray) -> dict[str, np.ndarray]:
    """What f_tau is trained towards for (N, H, W, C) uint8 ``images``: the codes (VQ-VAE-2: ``top``,
    ``bottom``), the encoder's mean (``target_latent``), or nothing (no encoder: the pixel loss only)."""
    targets: dict[str, list] = {}
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = batch_to_tensor(images[i:i + 256])
            if hasattr(decoder, "decode_indices"):
                top, bottom = decoder.encode(x).indices
                targets.setdefault("top", []).append(top.numpy())
                targets.setdefault("bottom", []).append(bottom.numpy())
            elif decoder.has_encoder and type(decoder).__name__ != "GLO":  # GLO encodes by optimisation: pixels only
                targets.setdefault("target_latent", []).append(decoder.encode(x).point.numpy())
    return {k: np.concatenate(v) for k, v in targets.items()}
