"""The evaluation's sections, one function each, over one shared :class:`Evaluation`.

Each section adds its figures to ``ev.metrics``, says what they were computed on in ``ev.info`` and
queues its plots in ``ev.plots`` (drawn when the outputs are written), and returns whether it applied to
this family. They run in the order of :data:`SECTIONS`: the later ones read what reconstruction
encoded, and the seeded generators they draw from follow one another in that order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentforge.models import PretrainedModel
from latentforge.pipelines.classifier import DomainClassifier, embed_images, load_classifier
from latentforge.pipelines.evaluate import metrics as M
from latentforge.pipelines.evaluate.inference import (
    BATCH,
    decode,
    encode_images,
    encode_kwargs,
    encodes_by_optimisation,
    sample,
    samples_autoregressively,
    subset,
    validation_figures,
)
from latentforge.pipelines.evaluate.job import EvalJob, loss_history, primary_metric
from latentforge.pipelines.evaluate.plots import grid_png, loss_png, tsne_png
from latentforge.pipelines.imaging import batch_to_tensor, tensor_to_uint8
from latentforge.pipelines.prepare import load_split

PR_K = 3
MIG_BINS = 20


@dataclass
class Evaluation:
    """One evaluation in progress: the loaded model, classifier and test split, the seeded test subset,
    what the sections found so far (metrics, info, queued plots) and the encodings later sections reuse."""

    job: EvalJob
    client: Any  # MlflowClient of the training run's store
    model: PretrainedModel  # in eval mode
    classifier: DomainClassifier  # in eval mode
    cmeta: dict[str, Any]  # the classifier's config.json
    test: dict[str, np.ndarray]  # the test split (writable copies)
    rng: np.random.Generator
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    slow: bool = False  # the family encodes by optimisation (GLO)
    cap: int = 0  # images encoded per split
    test_rows: np.ndarray | None = None  # (n,) rows of the test split the encoder sections use
    x_test: torch.Tensor | None = None  # (n, C, H, W) those images in [0, 1]
    test_latents: torch.Tensor | None = None  # (n, ...) their latents (families with an encoder)
    test_recons: torch.Tensor | None = None  # (n, C, H, W) their reconstructions
    test_indices: list[np.ndarray] | None = None  # code indices, one (n, h, w) array per level (quantised families)
    errors: np.ndarray | None = None  # (n,) per-image reconstruction MSE
    samples: torch.Tensor | None = None  # (m, C, H, W) model samples in [0, 1]

    @property
    def settings(self) -> dict[str, Any]:
        return self.job.settings

    @property
    def seed(self) -> int:
        return self.job.settings["seed"]

    @property
    def class_names(self) -> list[str]:
        return self.job.manifest["class_names"]

    @property
    def has_labels(self) -> bool:
        labels = self.test["labels"]
        return bool(len(self.class_names) > 1 and (labels >= 0).any())

    @cached_property
    def train(self) -> dict[str, np.ndarray]:
        """The train split (read-only arrays), read once for the sample floor and the probe."""
        return load_split(self.job.data_dir, "train")

    def generator(self, offset: int = 0) -> torch.Generator:
        """A torch generator seeded ``seed + offset``: one offset per section keeps them independent."""
        return torch.Generator().manual_seed(self.seed + offset)


def load_evaluation(job: EvalJob, client) -> Evaluation:
    """Load the model, the classifier and the test split; start ``info`` and pick the test subset."""
    seed = job.settings["seed"]
    torch.manual_seed(seed)
    model = PretrainedModel.from_pretrained(job.model_dir)
    model.eval()
    classifier, cmeta = load_classifier(job.classifier_dir)
    # Writable copies: load_split's arrays are read-only views of the Parquet buffers.
    test = {k: np.array(v) for k, v in load_split(job.data_dir, "test").items()}
    ev = Evaluation(job=job, client=client, model=model, classifier=classifier, cmeta=cmeta, test=test,
                    rng=np.random.default_rng(seed))
    manifest = job.manifest
    ev.info = {
        "family": job.family,
        "model_class": type(model).__name__,
        "model_dir": str(job.model_dir),
        "mlflow_run_id": job.run_id,
        "data_name": manifest["name"],
        "data_hash": manifest["data_hash"],
        "model_data_hash": job.train_metrics.get("data_hash"),
        "classifier": {
            "dir": str(job.classifier_dir),
            "feature_dim": cmeta["feature_dim"],
            "main_head": cmeta["main_head"],
            "metrics": _read_json(job.classifier_dir / "metrics.json"),
        },
        "settings": dict(job.settings),
        "counts": {"test": int(len(test["images"]))},
    }
    ev.info["primary_metric"], ev.info["primary_direction"] = primary_metric(job.family, model.has_encoder)
    ev.slow = model.has_encoder and encodes_by_optimisation(model)
    ev.cap = job.settings["optimised_encode_images"] if ev.slow else job.settings["split_images"]
    ev.test_rows = subset(ev.rng, len(test["images"]), ev.cap)
    return ev


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------------
# Families with an encoder


def reconstruction(ev: Evaluation) -> bool:
    """``recon_mse``, ``recon_psnr_db``, ``recon_ssim`` on the test subset; keeps its latents,
    reconstructions, code indices and per-image errors for the later sections."""
    if not ev.model.has_encoder:
        return False
    s = ev.settings
    ev.info["encode"] = {"images_per_split": int(ev.cap), "by_optimisation": ev.slow,
                         **({"steps": s["encode_steps"]} if ev.slow else {})}
    kwargs = encode_kwargs(ev.model, s, ev.generator(1))
    images = ev.test["images"][ev.test_rows]
    ev.x_test = x_test = batch_to_tensor(images)
    ev.test_latents, ev.test_recons, ev.test_indices = encode_images(ev.model, images, kwargs)
    ev.errors = M.per_image_mse(x_test, ev.test_recons)
    ev.metrics["recon_mse"] = float(ev.errors.mean())
    ev.metrics["recon_psnr_db"] = float(M.psnr(x_test, ev.test_recons).mean())
    ev.metrics["recon_ssim"] = float(M.ssim(x_test, ev.test_recons).mean())
    ev.info["counts"]["reconstruction"] = int(len(ev.test_rows))
    pairs = torch.stack([x_test[:32], ev.test_recons[:32]], 1).flatten(0, 1)
    ev.plots["reconstructions.png"] = lambda p, pairs=pairs: grid_png(tensor_to_uint8(pairs), p, nrow=8)
    return True


def validation_step(ev: Evaluation) -> bool:
    """``test_<key>`` for each figure of the family's own ``validation_step`` on the test split."""
    if not ev.model.has_encoder or ev.slow:  # GLO's would re-run the optimisation
        return False
    rows = ev.test_rows[: ev.settings["validation_images"]]
    figures = validation_figures(ev.model, ev.test["images"][rows], ev.seed)
    ev.metrics.update({f"test_{k}": v for k, v in figures.items()})
    ev.info["counts"]["validation_step"] = int(len(rows))
    return True


def vae_likelihood(ev: Evaluation) -> bool:
    """VAE: ``iwae_nll`` (nats per image), ``iwae_nll_bits_per_dim`` and ``elbo`` (``-test_nelbo``)."""
    if not ev.model.has_encoder or not hasattr(ev.model, "iwae_nll"):
        return False
    s, images = ev.settings, ev.test["images"]
    rows = subset(np.random.default_rng(ev.seed + 2), len(images), s["iwae_images"])
    nll = []
    g = ev.generator(2)
    for i in range(0, len(rows), 64):
        xb = batch_to_tensor(images[rows[i : i + 64]])
        nll.append(ev.model.iwae_nll(xb, k=s["iwae_k"], generator=g).double().numpy())
    nll = np.concatenate(nll)
    ev.metrics["iwae_nll"] = float(nll.mean())
    ev.metrics["iwae_nll_bits_per_dim"] = float(nll.mean() / (math.log(2) * np.prod(images.shape[1:])))
    if "test_nelbo" in ev.metrics:
        ev.metrics["elbo"] = -ev.metrics["test_nelbo"]
    ev.info["counts"]["iwae_images"] = int(len(rows))
    ev.info["iwae_k"] = s["iwae_k"]
    return True


def codebooks(ev: Evaluation) -> bool:
    """Quantised families: usage and perplexity per level, code / PNG / prior bits per image."""
    if ev.test_indices is None:
        return False
    num_codes = int(ev.model.config.num_codes)
    indices = ev.test_indices
    levels = ["top", "bottom"] if len(indices) == 2 else [f"level{j}" for j in range(len(indices))]
    for level, idx in zip(levels, indices):
        usage, perplexity = M.codebook_usage(idx, num_codes)
        ev.metrics[f"codebook_usage_{level}"] = usage
        ev.metrics[f"codebook_perplexity_{level}"] = perplexity
    shapes = [idx.shape[1:] for idx in indices]
    ev.metrics["code_bits_per_image"] = M.code_bits_per_image(shapes, num_codes)
    ev.metrics["png_bits_per_image"] = float(M.png_bits(ev.test["images"][ev.test_rows]).mean())
    ev.metrics["compression_ratio"] = ev.metrics["png_bits_per_image"] / ev.metrics["code_bits_per_image"]
    ce = [ev.metrics.get(f"test_prior_ce_{level}") for level in levels]
    if all(v is not None for v in ce):
        ev.metrics["prior_bits_per_image"] = float(sum(v * math.prod(sh) for v, sh in zip(ce, shapes)) / math.log(2))
    ev.info["code_levels"] = {level: list(map(int, sh)) for level, sh in zip(levels, shapes)}
    return True


def denoising(ev: Evaluation) -> bool:
    """Denoising AE: ``denoise_psnr_db`` (restored vs clean) beside ``noisy_psnr_db`` and their gain."""
    model, x_test = ev.model, ev.x_test
    if not model.has_encoder or not hasattr(model, "corrupt"):
        return False
    g = ev.generator(3)
    with torch.no_grad():
        noisy = torch.cat([model.corrupt(x_test[i : i + BATCH], generator=g) for i in range(0, len(x_test), BATCH)])
    with torch.no_grad():
        restored = torch.cat([
            model.decode(model.encode(noisy[i : i + BATCH]).latent).images.float().clamp(0, 1)
            for i in range(0, len(noisy), BATCH)
        ])
    ev.metrics["noisy_psnr_db"] = float(M.psnr(x_test, noisy).mean())
    ev.metrics["denoise_psnr_db"] = float(M.psnr(x_test, restored).mean())
    ev.metrics["denoise_psnr_gain_db"] = ev.metrics["denoise_psnr_db"] - ev.metrics["noisy_psnr_db"]
    ev.info["denoise"] = {"corruption": model.config.corruption, "noise_level": model.config.noise_level}
    return True


# ----------------------------------------------------------------------------------------------------
# Every family


def samples(ev: Evaluation) -> bool:
    """Draw ``num_samples`` samples (``prior_samples`` for autoregressive priors) and queue their grid."""
    key = "prior_samples" if samples_autoregressively(ev.model) else "num_samples"
    n = min(ev.settings[key], len(ev.test["images"]))
    ev.samples = sample(ev.model, n, ev.generator(4))
    ev.plots["samples.png"] = lambda p, x=ev.samples[:64]: grid_png(tensor_to_uint8(x), p)
    return True


def sample_quality(ev: Evaluation) -> bool:
    """``fd_classifier``, ``sample_precision`` / ``sample_recall`` against as many test images, and
    ``fd_classifier_floor`` (as many test vs train images), in the classifier's feature space."""
    n = len(ev.samples)
    real_rows = subset(np.random.default_rng(ev.seed + 4), len(ev.test["images"]), n)
    real_feats, _ = embed_images(ev.classifier, ev.test["images"][real_rows])
    fake_feats, _ = embed_images(ev.classifier, ev.samples)
    ev.metrics["fd_classifier"] = M.frechet_distance_features(real_feats, fake_feats)
    ev.metrics["sample_precision"], ev.metrics["sample_recall"] = M.precision_recall(real_feats, fake_feats, k=PR_K)
    floor_rows = subset(np.random.default_rng(ev.seed + 5), len(ev.train["images"]), n)
    floor_feats = embed_images(ev.classifier, ev.train["images"][floor_rows])[0]
    ev.metrics["fd_classifier_floor"] = M.frechet_distance_features(real_feats, floor_feats)
    ev.info["counts"]["samples"] = int(n)
    ev.info["sample_metrics"] = {
        "features": f"domain classifier penultimate layer ({ev.cmeta['feature_dim']}-d), not Inception",
        "precision_recall_k": PR_K,
        "real": f"{n} test images",
        "floor": f"fd_classifier between {n} test and {n} train images",
    }
    return True


def linear_probe(ev: Evaluation) -> bool:
    """``probe_accuracy``: logistic regression on train latents -> labels, scored on the test latents."""
    if not (ev.model.has_encoder and ev.has_labels):
        return False
    train = ev.train
    rows = subset(np.random.default_rng(ev.seed + 6), len(train["images"]), ev.cap)
    kwargs = encode_kwargs(ev.model, ev.settings, ev.generator(6))
    train_latents = encode_images(ev.model, train["images"][rows], kwargs)[0]
    ev.metrics["probe_accuracy"] = M.linear_probe_accuracy(
        train_latents.flatten(1).numpy(), train["labels"][rows],
        ev.test_latents.flatten(1).numpy(), ev.test["labels"][ev.test_rows], seed=ev.seed,
    )
    dims = int(ev.test_latents[0].numel())
    ev.info["probe"] = {"train_images": int(len(rows)), "test_images": int(len(ev.test_rows)), "latent_dims": dims,
                        "pca_dims": 256 if dims > 256 else None, "model": "standardise + logistic regression"}
    return True


def anomaly(ev: Evaluation) -> bool:
    """``anomaly_auroc_class_<c>`` (reconstruction MSE, class c vs the others, test split) and
    ``anomaly_threshold`` (a percentile of the other classes' errors on the val split)."""
    if not (ev.model.has_encoder and ev.has_labels):
        return False
    s, class_names = ev.settings, ev.class_names
    c = s["anomaly_class"] % len(class_names)  # checked in range by resolve_evaluation
    labels = ev.test["labels"][ev.test_rows]
    anomalous = labels == c
    normal = (labels >= 0) & ~anomalous
    if anomalous.any() and normal.any():
        ev.metrics[f"anomaly_auroc_class_{c}"] = M.anomaly_auroc(ev.errors[normal], ev.errors[anomalous])
    val = load_split(ev.job.data_dir, "val")
    val_rows = np.flatnonzero((val["labels"] >= 0) & (val["labels"] != c))
    val_rows = val_rows[subset(np.random.default_rng(ev.seed + 7), len(val_rows), ev.cap)]
    if len(val_rows):
        _, val_recons, _ = encode_images(ev.model, val["images"][val_rows], encode_kwargs(ev.model, s, ev.generator(7)))
        val_errors = M.per_image_mse(batch_to_tensor(val["images"][val_rows]), val_recons)
        ev.metrics["anomaly_threshold"] = float(np.percentile(val_errors, s["anomaly_percentile"]))
    ev.info["anomaly"] = {
        "class": int(c),
        "class_name": class_names[c],
        "score": "per-image reconstruction MSE (pixels in [0, 1])",
        "auroc": f"class {c} vs the other classes on the test split ({int(anomalous.sum())} vs {int(normal.sum())} images)",
        "threshold": f"percentile {s['anomaly_percentile']:g} of the val errors of the other classes ({len(val_rows)} images)",
        "note": "the model was trained on all classes, this one included; a held-out-of-training AUROC needs "
                "a training run on data without this class",
    }
    return True


def interpolation(ev: Evaluation) -> bool:
    """``interp_min_confidence``: the classifier's least max-softmax along decoded latent paths."""
    paths = _latent_paths(ev)
    if paths is None:
        return False
    path_images, strips, endpoints = paths
    p, t = path_images.shape[:2]
    _, probs = embed_images(ev.classifier, path_images.flatten(0, 1))
    ev.metrics["interp_min_confidence"] = M.interpolation_confidence(probs.reshape(p, t, -1))
    ev.info["interpolation"] = {"pairs": int(p), "steps": int(t), "endpoints": endpoints, "path": "linear in the latent space",
                                "confidence": f"max softmax of the classifier's {ev.cmeta['main_head']} head"}
    ev.plots["interpolation.png"] = lambda path, strips=strips, cols=strips.shape[1]: grid_png(
        tensor_to_uint8(strips[:8].flatten(0, 1)), path, nrow=cols)
    return True


def _latent_paths(ev: Evaluation):
    """Decoded linear latent paths: (P, T, C, H, W) images, the strips to plot (P, T [+2], C, H, W),
    and what the endpoints are. Pairs of test images of different classes (encoder families), else
    pairs of prior draws (needs ``model.latent_shape``); None when neither is possible."""
    p, t = ev.settings["interp_pairs"], ev.settings["interp_steps"]
    generator = ev.generator(8)
    if ev.test_latents is not None:
        test_rows = ev.test_rows
        labels = ev.test["labels"][test_rows]
        a_idx, b_idx = [], []
        for _ in range(20 * p):
            i, j = ev.rng.integers(0, len(test_rows), size=2)
            if i != j and (labels[i] != labels[j] or (labels < 0).all()):
                a_idx.append(i)
                b_idx.append(j)
            if len(a_idx) == p:
                break
        if not a_idx:
            return None
        za, zb = ev.test_latents[a_idx], ev.test_latents[b_idx]
        endpoints = "test images of different classes (their latents from encode)"
        xa = batch_to_tensor(ev.test["images"][test_rows[a_idx]])
        xb = batch_to_tensor(ev.test["images"][test_rows[b_idx]])
    else:
        shape = getattr(ev.model, "latent_shape", None)
        if shape is None:
            return None
        za = torch.randn((p, *shape), generator=generator)
        zb = torch.randn((p, *shape), generator=generator)
        endpoints = "pairs of prior draws z ~ N(0, I) (no encoder)"
        xa = xb = None
    h, w, c = ev.test["images"].shape[1:]
    weights = torch.linspace(0, 1, t).view(1, t, *[1] * (za.dim() - 1))
    path = (1 - weights) * za.unsqueeze(1) + weights * zb.unsqueeze(1)  # (P, T, ...)
    images = decode(ev.model, path.flatten(0, 1)).view(len(za), t, c, h, w)
    strips = images if xa is None else torch.cat([xa.unsqueeze(1), images, xb.unsqueeze(1)], 1)
    return images, strips, endpoints


def disentanglement(ev: Evaluation) -> bool:
    """``mig`` and ``mig_<factor>`` (data with factors, flat latents): mutual information gap."""
    factors = ev.test["factors"]
    if ev.test_latents is None or ev.test_latents.dim() != 2 or factors.shape[1] == 0:
        return False
    per_factor = M.mig_per_factor(ev.test_latents.numpy(), factors[ev.test_rows], bins=MIG_BINS)
    ev.metrics["mig"] = float(np.nanmean(per_factor))
    for fname, v in zip(ev.job.manifest["factor_names"], per_factor):
        if np.isfinite(v):
            ev.metrics[f"mig_{fname}"] = float(v)
    ev.info["mig"] = {"bins": MIG_BINS, "images": int(len(ev.test_rows)),
                      "latent": "encode(x).latent (the posterior mean for a VAE)"}
    return True


# ----------------------------------------------------------------------------------------------------
# Plots only (drawn, and timed, with the others when the outputs are written)


def tsne(ev: Evaluation) -> bool:
    """Queue ``tsne.png``: up to ``tsne_points`` test latents, coloured by label."""
    if ev.test_latents is None:
        return False
    k = min(ev.settings["tsne_points"], len(ev.test_latents))
    rows = subset(np.random.default_rng(ev.seed + 9), len(ev.test_latents), k)
    lat, lab = ev.test_latents[rows].flatten(1).numpy(), ev.test["labels"][ev.test_rows][rows]
    ev.plots["tsne.png"] = lambda p, lat=lat, lab=lab: tsne_png(lat, lab, ev.class_names, ev.seed, p)
    ev.info["counts"]["tsne"] = int(k)
    return True


def loss_curves(ev: Evaluation) -> bool:
    """Queue ``loss_curves.png``: the training run's ``train/*loss`` and ``epoch/val_score`` histories."""
    history = loss_history(ev.client, ev.job.run_id)
    ev.plots["loss_curves.png"] = lambda p: loss_png(history, ev.job.family, p)
    return True


# (name in info.seconds, section), in the order they must run.
SECTIONS: tuple[tuple[str, Callable[[Evaluation], bool]], ...] = (
    ("reconstruction", reconstruction),
    ("validation_step", validation_step),
    ("iwae", vae_likelihood),
    ("codes", codebooks),
    ("denoising", denoising),
    ("sampling", samples),
    ("sample metrics", sample_quality),
    ("linear probe", linear_probe),
    ("anomaly", anomaly),
    ("interpolation", interpolation),
    ("mig", disentanglement),
)
# Sections that only queue a plot: their time is counted with the plots'.
PLOT_SECTIONS: tuple[Callable[[Evaluation], bool], ...] = (tsne, loss_curves)
