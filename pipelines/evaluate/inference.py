"""Running a trained family, generically (duck-typed on the models' public surface): encode, decode,
sample, its own validation figures, and the seeded subsets every section draws its images from."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from latentforge.pipelines.imaging import batch_to_tensor

BATCH = 256


def encode_kwargs(model, settings: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
    """Families that encode by optimisation (GLO's ``encode(x, steps=..., generator=...)``) get the
    evaluation's few steps and a seeded generator; the others take none."""
    params = inspect.signature(model.encode).parameters
    kwargs: dict[str, Any] = {}
    if "steps" in params:
        kwargs["steps"] = settings["encode_steps"]
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def encodes_by_optimisation(model) -> bool:
    """Whether ``model.encode`` runs an optimisation (takes ``steps``), which makes encoding slow."""
    return "steps" in inspect.signature(model.encode).parameters


def encode_images(model, images: np.ndarray, kwargs: dict[str, Any], batch: int = BATCH):
    """Encode (N, H, W, C) uint8 images; returns latents (N, ...), reconstructions (N, C, H, W) float in
    [0, 1] and, for quantised families, the code indices (one (N, h, w) array per level) or None."""
    latents, recons, indices = [], [], []
    for i in range(0, len(images), batch):
        x = batch_to_tensor(images[i : i + batch])
        with torch.no_grad():
            enc = model.encode(x, **kwargs)
            recons.append(model.decode(enc.latent).images.float().clamp(0, 1))
        latents.append(enc.latent.detach())
        if enc.indices is not None:
            indices.append([t.numpy() for t in enc.indices])
    levels = [np.concatenate([b[j] for b in indices]) for j in range(len(indices[0]))] if indices else None
    return torch.cat(latents), torch.cat(recons), levels


def decode(model, latents: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """Decode (N, ...) latents in batches; (N, C, H, W) float images in [0, 1]."""
    with torch.no_grad():
        return torch.cat([model.decode(latents[i : i + batch]).images.float().clamp(0, 1) for i in range(0, len(latents), batch)])


def sample(model, n: int, generator: torch.Generator, sampler: str | None = None, batch: int = 32) -> torch.Tensor:
    """``n`` samples of the model, (n, C, H, W) float images in [0, 1]; ``sampler``: an ex-post sampler
    the model carries (``model.sample(..., sampler=name)``), None for the model's own."""
    kwargs = {} if sampler is None else {"sampler": sampler}
    # Small batches: an autoregressive prior's KV-cached step copies its whole cache each position,
    # so its cost grows faster than linearly with the batch (memory-bound); a CNN decoder does not care.
    with torch.no_grad():
        out = [model.sample(min(batch, n - i), generator=generator, **kwargs).images.float().clamp(0, 1)
               for i in range(0, n, batch)]
    return torch.cat(out)


def subset(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """A seeded subset of ``min(k, n)`` row indices of ``range(n)``, in increasing order."""
    return np.sort(rng.permutation(n)[: min(k, n)])


def validation_figures(model, images: np.ndarray, seed: int) -> dict[str, float]:
    """Batch-size-weighted means of ``model.validation_step`` over (N, H, W, C) uint8 images."""
    torch.manual_seed(seed)  # validation_step may draw (a VAE's posterior sample, a GAN's z)
    sums: dict[str, float] = {}
    for i in range(0, len(images), BATCH):
        x = batch_to_tensor(images[i : i + BATCH])
        batch = {"image": x, "label": torch.full((len(x),), -1), "index": torch.arange(len(x))}
        with torch.no_grad():
            for k, v in model.validation_step(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(x)
    return {k: v / len(images) for k, v in sums.items()}
