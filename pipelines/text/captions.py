"""The ``caption-text`` stage: train the image captioner once and pseudo-caption the unlabelled train
images for every family's ``train-text``.

Neither the aligned set, nor its caption embeddings, nor the unlabelled images depend on the decoder
(:func:`pipelines.text.aligned.aligned_selection`), so the captioner and its captions are the same for
every family: captioning them in each ``train-text`` run (about 35 s of the demo's 2-core stage each)
repeated the same work three times. ``latentforge caption-text`` writes ``<text.captions_dir>/``:

* ``captioner.safetensors``: the captioner (:class:`models.text.CaptionScorer` without a retrieval space;
  ``train-text`` fits the space on it);
* ``captions.npz``: ``row`` (N,) the unlabelled train-split rows, ``embedding`` (N, E) their pseudo-captions;
* ``captions.json``: the settings and data they were made from (:func:`captions_key`), the captioner's
  cosine to the aligned captions and the seconds it took.

``train-text`` reads them (:func:`load_captions`) and refuses captions made from other settings or data.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from latentforge.models.text import CaptionScorer
from latentforge.pipelines.common.errors import DataError
from latentforge.pipelines.common.files import atomic_directory
from latentforge.pipelines.common.params import check_keys, section
from latentforge.pipelines.prepare import load_split, read_manifest
from latentforge.pipelines.text.aligned import aligned_selection, unlabelled_rows
from latentforge.pipelines.text.captioner import caption, fit_captioner
from latentforge.pipelines.text.encoders import minilm_dir, text_features
from latentforge.pipelines.text.job import TEXT_SCHEMA, check_holdouts, check_text

# The text settings the captions depend on: what the aligned set and its embeddings are, and how the
# captioner is trained. Any other text setting (f_tau's, the bank's) leaves them as they are.
CAPTION_SETTINGS = ("encoder", "hashed_dim", "vocab_floor", "aligned_fraction", "holdout", "holdout_strict",
                    "captioner_epochs", "batch_size", "seed")


def captions_key(text: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """What the captions are made from: :data:`CAPTION_SETTINGS` of ``text`` and the data set's hash."""
    return {**{k: text[k] for k in CAPTION_SETTINGS}, "data_hash": manifest["data_hash"]}


def captions_from_params(params: dict[str, Any], echo: Callable[[str], None] = print) -> dict[str, Any]:
    """``latentforge caption-text``: check the text settings and the data, then :func:`write_captions`."""
    text = check_keys(dict(section(params, "text")), TEXT_SCHEMA, "text")
    check_text(text)
    if text["encoder"].startswith("minilm"):
        minilm_dir()
    data = section(params, "data")
    data_dir = Path(data["output_dir"]) / data["name"]
    manifest = read_manifest(data_dir)
    check_holdouts(text, manifest)
    if text["pseudo_ratio"] <= 0:
        # Nothing to caption (and word attention has no one embedding per caption to train on); the
        # stage output still exists, saying so, and train-text with pseudo_ratio > 0 refuses it.
        record = {"key": captions_key(text, manifest), "skipped": "text.pseudo_ratio is 0", "aligned_size": 0,
                  "unlabelled_count": 0, "cosine": float("nan"), "seconds": 0.0}
        with atomic_directory(text["captions_dir"]) as tmp:
            (tmp / "captions.json").write_text(json.dumps(record, indent=2) + "\n")
        echo(f"caption-text: text.pseudo_ratio is 0, nothing to caption -> {text['captions_dir']}")
        return record
    return write_captions(text, data_dir, manifest, echo)


def write_captions(text: dict[str, Any], data_dir: str | Path, manifest: dict[str, Any],
                   echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the captioner on the aligned pairs, caption the unlabelled train images and write
    ``<text.captions_dir>/`` atomically; return ``captions.json``'s record."""
    t0 = time.time()
    train = load_split(data_dir, "train")
    rows, captions, spec, _, strict = aligned_selection(text, manifest, train)
    embedding = text_features(spec, captions)["embedding"]
    images = np.array(train["images"])
    captioner, cosine = fit_captioner(images[rows], embedding, text["captioner_epochs"], text["batch_size"], text["seed"])
    others = unlabelled_rows(train, manifest, rows, strict)
    pseudo = caption(captioner, images[others])
    record = {"key": captions_key(text, manifest), "aligned_size": int(len(rows)), "unlabelled_count": int(len(others)),
              "cosine": float(cosine), "seconds": round(time.time() - t0, 1)}
    with atomic_directory(text["captions_dir"]) as tmp:
        CaptionScorer(captioner).save(tmp / "captioner.safetensors")
        np.savez(tmp / "captions.npz", row=others.astype(np.int64), embedding=pseudo)
        (tmp / "captions.json").write_text(json.dumps(record, indent=2) + "\n")
    echo(f"captioner: cosine {cosine:.3f} to the {len(rows)} aligned captions; {len(others)} unlabelled train images "
         f"captioned in {record['seconds']:.1f}s -> {text['captions_dir']}")
    return record


def check_captions(text: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """``captions.json`` of ``<text.captions_dir>``, or a DataError when it is missing or was made from
    other settings or data than ``text`` and ``manifest`` name (it says which, and what to run)."""
    path = Path(text["captions_dir"]) / "captions.json"
    rerun = "run `latentforge caption-text` (the DVC stage caption_text) first"
    if not path.is_file():
        raise DataError(f"no pseudo-captions at {text['captions_dir']} (text.pseudo_ratio > 0 needs them): {rerun}")
    record = json.loads(path.read_text())
    if record.get("skipped"):
        raise DataError(f"{text['captions_dir']} holds no pseudo-captions ({record['skipped']} when they were made): {rerun}")
    want = captions_key(text, manifest)
    stale = sorted(k for k in want if record["key"].get(k) != want[k])
    if stale:
        raise DataError(f"the pseudo-captions at {text['captions_dir']} were made with other {', '.join(stale)} "
                        f"than this run's: {rerun}")
    return record


def load_captions(text: dict[str, Any], manifest: dict[str, Any], rows: np.ndarray) -> tuple[np.ndarray, bytes, dict[str, Any]]:
    """(embedding (N, E) float32 of the unlabelled train-split ``rows``, in that order; the captioner's
    ``captioner.safetensors`` bytes; ``captions.json``'s record) from ``<text.captions_dir>``."""
    record = check_captions(text, manifest)
    folder = Path(text["captions_dir"])
    with np.load(folder / "captions.npz") as f:
        stored, embedding = f["row"], f["embedding"]
    if not np.array_equal(stored, rows):
        raise DataError(f"the pseudo-captions at {folder} are of other train images than this run's unlabelled ones: "
                        "run `latentforge caption-text` (the DVC stage caption_text) again")
    return embedding.astype(np.float32), (folder / "captioner.safetensors").read_bytes(), record


def captioner_from_bytes(blob: bytes):
    """The :class:`models.text.ImageCaptioner` in a ``captioner.safetensors`` file's bytes (the Ray
    workers get the file's bytes in their config: they may run on another node)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "captioner.safetensors"
        path.write_bytes(blob)
        return CaptionScorer.load(path).captioner
