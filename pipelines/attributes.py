"""Attribute vectors for editing in the latent space, from a few labelled training images.

A change that is hard in pixel space (a circle into a square) is often a translation in the latent
space: the difference of the mean latents of two groups. For each factor of the data (``shapes``:
shape, colour, size, hpos, vpos; a labelled data set without factors: ``label``, its classes) and each
of its values, the mean latent of ``labels_per_value`` seeded train images with that value, encoded by
the model (its posterior mean for a VAE). The export stores them (``attributes.npz`` + the manifest's
``attributes`` entry); :class:`runtime.images.Attributes` edits with them, torch-free.

Params (``edit``): ``labels_per_value`` (labelled train images per value, default 50), ``method``
(``translate`` or ``difference``, :data:`runtime.images.EDIT_METHODS`), ``seed``, and for ``evaluate``
``eval_labels`` (the label counts it compares), ``eval_images`` (test images edited per factor) and
``eval_strength`` (the strength it edits at).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.pipelines.common.errors import ParamsError
from latentforge.pipelines.common.params import check_keys
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import load_split
from latentforge.runtime.images import ATTRIBUTES_FILE, EDIT_METHODS, MAX_EDIT_STRENGTH, Attributes

EDIT_SCHEMA: dict[str, Any] = {
    "labels_per_value": int,
    "method": str,
    "seed": int,
    "eval_labels": list,
    "eval_images": int,
    "eval_strength": float,
}
EDIT_DEFAULTS: dict[str, Any] = {"labels_per_value": 50, "method": "translate", "seed": 0,
                                 "eval_labels": [5, 50, 500], "eval_images": 50, "eval_strength": 1.0}
LABEL_FACTOR = "label"  # the factor of a data set with classes and no factors


def edit_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The ``edit`` section (defaults for what it leaves out), typed and range-checked."""
    settings = check_keys({**EDIT_DEFAULTS, **(params.get("edit") or {})}, EDIT_SCHEMA, "edit")
    if settings["labels_per_value"] <= 0:
        raise ParamsError(f"params edit.labels_per_value must be > 0, got {settings['labels_per_value']}")
    if settings["method"] not in EDIT_METHODS:
        raise ParamsError(f"params edit.method must be one of {', '.join(EDIT_METHODS)}, got {settings['method']!r}")
    labels = settings["eval_labels"]
    if not labels or not all(isinstance(n, int) and n > 0 for n in labels):
        raise ParamsError(f"params edit.eval_labels must be a non-empty list of positive ints, got {labels!r}")
    if settings["eval_images"] <= 0:
        raise ParamsError(f"params edit.eval_images must be > 0, got {settings['eval_images']}")
    if not 0 <= settings["eval_strength"] <= MAX_EDIT_STRENGTH:
        raise ParamsError(f"params edit.eval_strength must be in [0, {MAX_EDIT_STRENGTH:g}], got {settings['eval_strength']}")
    return settings


def factor_columns(split: dict[str, np.ndarray], manifest: dict[str, Any]) -> dict[str, tuple[list[str], np.ndarray]]:
    """factor -> (its value names, (N,) int64 value rows of ``split``, -1 unknown): every factor of the
    data, or ``label`` (the classes) for labelled data without factors; empty for neither."""
    if manifest.get("factor_names"):
        return {name: (list(manifest["factor_values"][name]), split["factors"][:, j].astype(np.int64))
                for j, name in enumerate(manifest["factor_names"])}
    if len(manifest.get("class_names") or []) > 1 and (split["labels"] >= 0).any():
        return {LABEL_FACTOR: (list(manifest["class_names"]), split["labels"].astype(np.int64))}
    return {}


def labelled_rows(column: np.ndarray, num_values: int, per_value: int, seed: int) -> list[np.ndarray]:
    """Per value of a (N,) column, up to ``per_value`` rows with that value: the first of a permutation
    seeded by ``seed`` and the value, so fewer labels are a prefix of more (5 of 50 of 500)."""
    return [np.random.default_rng([seed, v]).permutation(np.flatnonzero(column == v))[:per_value]
            for v in range(num_values)]


@torch.no_grad()
def encode_points(model, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, H, W, C) uint8 images -> (N, *latent) float32: each image's latent without sampling (the
    posterior mean of a VAE), as the exported encoder gives it."""
    out = [model.encode(batch_to_tensor(images[i : i + batch])).point.float().numpy() for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def mean_latents(columns: dict[str, tuple[list[str], np.ndarray]], latent_of_rows, per_value: int, seed: int,
                 method: str = "translate") -> tuple[Attributes, dict[str, list[int]]]:
    """The :class:`Attributes` of ``per_value`` labelled rows per value (values without any dropped) and
    the counts used per value. ``latent_of_rows(rows (k,)) -> (k, *latent)`` gives the latents."""
    values, means, counts = {}, {}, {}
    for factor, (names, column) in columns.items():
        picked = labelled_rows(column, len(names), per_value, seed)
        kept = [v for v, rows in enumerate(picked) if len(rows)]
        if len(kept) < 2:
            continue  # nothing to translate between
        values[factor] = [names[v] for v in kept]
        means[factor] = np.stack([latent_of_rows(picked[v]).mean(0) for v in kept]).astype(np.float32)
        counts[factor] = [int(len(picked[v])) for v in kept]
    return Attributes(values, means, method), counts


def train_attributes(model, prepared_dir: str | Path, manifest: dict[str, Any], per_value: int, seed: int,
                     method: str = "translate") -> tuple[Attributes, dict[str, list[int]]] | None:
    """:func:`mean_latents` over the train split of ``prepared_dir``, encoded by ``model``; None when the
    data has neither factors nor classes."""
    train = load_split(prepared_dir, "train")
    columns = factor_columns(train, manifest)
    if not columns:
        return None
    rows = np.unique(np.concatenate([r for names, col in columns.values()
                                     for r in labelled_rows(col, len(names), per_value, seed)]))
    latents = encode_points(model, np.array(train["images"][rows]))

    def latent_of_rows(picked: np.ndarray) -> np.ndarray:
        return latents[np.searchsorted(rows, picked)]

    return mean_latents(columns, latent_of_rows, per_value, seed, method)


def write_attributes(folder: Path, attributes: Attributes, counts: dict[str, list[int]], per_value: int) -> dict[str, Any]:
    """Save the means as ``attributes.npz`` in ``folder``; returns the manifest's ``attributes`` entry."""
    np.savez(folder / ATTRIBUTES_FILE, **attributes.means)
    return {"file": ATTRIBUTES_FILE, "values": attributes.values, "counts": counts, "labels_per_value": per_value,
            "method": attributes.method, "source": "train split, mean latent (posterior mean) per value"}
