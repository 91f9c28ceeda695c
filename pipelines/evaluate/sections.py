"""The evaluation's sections, one function each, over one shared :class:`Evaluation`.

Each section adds its figures to ``ev.metrics``, says what they were computed on in ``ev.info`` and
queues its plots in ``ev.plots`` (drawn when the outputs are written), and returns whether it applied to
this family. They run in the order of :data:`SECTIONS`: the later ones read what reconstruction
encoded, and the seeded generators they draw from follow one another in that order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentforge.models import PretrainedModel
from latentforge.pipelines.attributes import LABEL_FACTOR, encode_points, factor_columns, labelled_rows, mean_latents
from latentforge.pipelines.classifier import (
    CONFIDENT,
    LABEL_HEAD,
    DomainClassifier,
    embed_images,
    load_classifier,
    read_images,
    reading_heads,
)
from latentforge.pipelines.evaluate import metrics as M
from latentforge.pipelines.evaluate.inference import (
    BATCH,
    decode,
    encode_images,
    encode_kwargs,
    encodes_by_optimisation,
    sample,
    subset,
    validation_figures,
)
from latentforge.pipelines.evaluate.job import EvalJob, loss_history, primary_metric
from latentforge.pipelines.evaluate.plots import (
    edit_labels_png,
    grid_png,
    label_efficiency_png,
    loss_png,
    pair_grid_png,
    tsne_png,
)
from latentforge.pipelines.imaging import batch_to_tensor, tensor_to_uint8
from latentforge.pipelines.prepare import load_split
from latentforge.runtime.images import Attributes

PR_K = 3
MIG_BINS = 20
TRUSTED_ACCURACY = 0.9  # feature-space figures from a classifier below this main-head accuracy are untrusted
NEAREST_GRID = 64  # samples shown beside their nearest training images


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
    probe_rows: np.ndarray | None = None  # (k,) rows of the train split the probe is fitted on
    probe_latents: torch.Tensor | None = None  # (k, ...) their latents
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # sampler -> (m, C, H, W) samples in [0, 1]
    sample_features: dict[str, np.ndarray] = field(default_factory=dict)  # sampler -> (m, D) classifier features

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


# The samplers evaluate draws from, in one place: the model's own (``model.sample(n, generator)``, its
# figures unprefixed) and each ex-post sampler named here that the model carries fitted
# (``model.sample(n, generator, sampler=name)``, its figures prefixed ``<name>_``: gmm_sample_precision).
# name -> whether a model carries it.
EXTRA_SAMPLERS: dict[str, Callable[[PretrainedModel], bool]] = {
    # the ex-post Gaussian mixture the train stage fits to the encoded training latents (models/samplers.py)
    "gmm": lambda model: getattr(getattr(model, "latent_sampler", None), "kind", None) == "gmm",
}
MODEL_SAMPLER = "model"  # the name of the model's own sampler in info and plot names


def sampler_names(model: PretrainedModel) -> list[str]:
    """:data:`MODEL_SAMPLER`, then each of :data:`EXTRA_SAMPLERS` the model carries."""
    return [MODEL_SAMPLER, *(name for name, carried in EXTRA_SAMPLERS.items() if carried(model))]


def sampler_prefix(name: str) -> str:
    """The prefix of a sampler's figures and plots: none for the model's own, ``<name>_`` for the others."""
    return "" if name == MODEL_SAMPLER else f"{name}_"


def samples(ev: Evaluation) -> bool:
    """Draw ``num_samples`` samples from each sampler (timed: ``info.sampling``) and queue their grids."""
    n = min(ev.settings["num_samples"], len(ev.test["images"]))
    ev.info["sampling"] = {}
    for name in sampler_names(ev.model):
        t0 = time.perf_counter()
        x = sample(ev.model, n, ev.generator(4), sampler=None if name == MODEL_SAMPLER else name)
        seconds = time.perf_counter() - t0
        ev.samples[name] = x
        ev.info["sampling"][name] = {"samples": n, "seconds": round(seconds, 2), "ms_per_sample": round(1000 * seconds / n, 2)}
        ev.plots[f"{sampler_prefix(name)}samples.png"] = lambda p, x=x[:64]: grid_png(tensor_to_uint8(x), p)
    ev.info["counts"]["samples"] = int(n)
    return True


def sample_quality(ev: Evaluation) -> bool:
    """The figures of each sampler's samples, read by the domain classifier, against ``n`` test images,
    each beside its value for ``n`` train images (a disjoint real set: what a perfect model scores at
    this ``n``). Unprefixed for the model's own sampler, ``<name>_`` for the others:

    * ``fd_classifier`` (floor ``fd_classifier_floor``; ``fd_classifier_ratio`` = fd / floor, ~1 is
      perfect), ``sample_precision`` / ``sample_recall`` (ceilings ``sample_precision_real`` /
      ``sample_recall_real``; ``*_ratio`` = figure / ceiling): the feature space;
    * ``sample_validity`` (fraction of samples whose every factor is read with probability >= 0.9;
      ``sample_validity_real``) and ``sample_coverage`` (distinct factor combinations among valid samples
      / the same for the test images; ``sample_coverage_real``: the train images' ratio): the heads;
    * ``classifier_accuracy`` (the main head's test accuracy) and ``features_trusted`` (1 when it is
      >= 0.9, else 0: the figures above are only as good as the classifier).
    """
    n = ev.info["counts"]["samples"]
    heads = reading_heads(ev.classifier.heads)
    test_rows = subset(np.random.default_rng(ev.seed + 4), len(ev.test["images"]), n)
    train_rows = subset(np.random.default_rng(ev.seed + 5), len(ev.train["images"]), n)
    real = read_images(ev.classifier, ev.test["images"][test_rows])
    other = read_images(ev.classifier, ev.train["images"][train_rows])
    ceiling = _sample_figures(real, other, heads)
    ev.metrics.update({
        "fd_classifier_floor": ceiling["fd_classifier"],
        "sample_precision_real": ceiling["sample_precision"],
        "sample_recall_real": ceiling["sample_recall"],
        "sample_validity_real": ceiling["sample_validity"],
        "sample_coverage_real": ceiling["sample_coverage"],
    })
    readings = {"test_images": real[1], "train_images": other[1]}
    for name, x in ev.samples.items():
        fake = read_images(ev.classifier, x)
        ev.sample_features[name], readings[f"samples_{name}"] = fake
        figures = _sample_figures(real, fake, heads)
        figures["fd_classifier_ratio"] = _ratio(figures["fd_classifier"], ceiling["fd_classifier"])
        for key in ("sample_precision", "sample_recall"):
            figures[f"{key}_ratio"] = _ratio(figures[key], ceiling[key])
        ev.metrics.update({f"{sampler_prefix(name)}{k}": v for k, v in figures.items()})
    trusted = _classifier_trust(ev)
    combinations = {key: M.combinations_read([probs[h] for h in heads], CONFIDENT) for key, probs in readings.items()}
    ev.info["sample_metrics"] = {
        "features": f"domain classifier penultimate layer ({ev.cmeta['feature_dim']}-d), not Inception",
        "features_trusted": trusted,
        "precision_recall_k": PR_K,
        "real": f"{n} test images",
        "ceiling": f"*_real, fd_classifier_floor: {n} train images against the same {n} test images",
        "validity": f"every head of {', '.join(heads)} reads with probability >= {CONFIDENT}",
        "coverage": "distinct combinations of those heads' readings among valid images / the same for the test images",
        "combinations": {"possible": math.prod(ev.classifier.heads[h].out_features for h in heads), **combinations},
        "samplers": list(ev.samples),
    }
    return True


def _classifier_trust(ev: Evaluation) -> bool:
    """``classifier_accuracy`` (its main head's test accuracy, NaN when unknown) and ``features_trusted``
    (1 when it is >= :data:`TRUSTED_ACCURACY`); returns whether it is."""
    accuracy = ev.info["classifier"]["metrics"].get(f"test_accuracy_{ev.classifier.main_head}")
    accuracy = float(accuracy) if isinstance(accuracy, (int, float)) else float("nan")
    trusted = bool(accuracy >= TRUSTED_ACCURACY)
    ev.metrics["classifier_accuracy"] = accuracy
    ev.metrics["features_trusted"] = float(trusted)
    return trusted


def _sample_figures(real, fake, heads: list[str]) -> dict[str, float]:
    """FD, precision, recall, validity and coverage of ``fake`` against ``real``; each a
    :func:`read_images` result (features (N, D), head -> (N, K) probabilities)."""
    (real_feats, real_probs), (fake_feats, fake_probs) = real, fake
    precision, recall = M.precision_recall(real_feats, fake_feats, k=PR_K)
    return {
        "fd_classifier": M.frechet_distance_features(real_feats, fake_feats),
        "sample_precision": precision,
        "sample_recall": recall,
        "sample_validity": M.validity([fake_probs[h] for h in heads], CONFIDENT),
        "sample_coverage": M.coverage_ratio([fake_probs[h] for h in heads], [real_probs[h] for h in heads], CONFIDENT),
    }


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("nan")


def nearest_training(ev: Evaluation) -> bool:
    """Queue ``<prefix>samples_nearest.png`` per sampler: 64 samples (left) beside the training image
    nearest to each in the classifier's feature space (right): copies of training images show."""
    train_feats = torch.from_numpy(read_images(ev.classifier, ev.train["images"])[0])
    for name, x in ev.samples.items():
        feats = torch.from_numpy(ev.sample_features[name][:NEAREST_GRID])
        nearest = torch.cdist(feats, train_feats).argmin(1).numpy()
        left, right = tensor_to_uint8(x[:NEAREST_GRID]), np.asarray(ev.train["images"][nearest])
        ev.plots[f"{sampler_prefix(name)}samples_nearest.png"] = lambda p, a=left, b=right: pair_grid_png(a, b, p)
    ev.info["counts"]["nearest_training_pool"] = int(len(train_feats))
    return True


def linear_probe(ev: Evaluation) -> bool:
    """``probe_accuracy``: logistic regression on train latents -> labels, scored on the test latents."""
    if not (ev.model.has_encoder and ev.has_labels):
        return False
    train = ev.train
    rows = subset(np.random.default_rng(ev.seed + 6), len(train["images"]), ev.cap)
    kwargs = encode_kwargs(ev.model, ev.settings, ev.generator(6))
    train_latents = encode_images(ev.model, train["images"][rows], kwargs)[0]
    ev.probe_rows, ev.probe_latents = rows, train_latents
    ev.metrics["probe_accuracy"] = M.linear_probe_accuracy(
        train_latents.flatten(1).numpy(), train["labels"][rows],
        ev.test_latents.flatten(1).numpy(), ev.test["labels"][ev.test_rows], seed=ev.seed,
    )
    dims = int(ev.test_latents[0].numel())
    ev.info["probe"] = {"train_images": int(len(rows)), "test_images": int(len(ev.test_rows)), "latent_dims": dims,
                        "pca_dims": 256 if dims > 256 else None, "model": "standardise + logistic regression"}
    return True


def label_efficiency(ev: Evaluation) -> bool:
    """The few-label curve: for each n of ``probe_labels``, ``probe_accuracy_labels_<n>`` (the linear probe
    on the latents of n labelled train images) beside ``pixel_probe_accuracy_labels_<n>`` (the same probe
    on their pixels), test accuracy averaged over ``probe_repeats`` seeded draws of the n images (one draw
    when n takes every labelled image). Both probes see the same images and labels; only the latents
    saw the unlabelled rest of the train split (through training), which is the notes' claim to measure."""
    if ev.probe_latents is None:
        return False
    s = ev.settings
    labels = ev.train["labels"][ev.probe_rows]
    labelled = np.flatnonzero(labels >= 0)
    latents = ev.probe_latents.flatten(1).numpy()
    pixels = batch_to_tensor(ev.train["images"][ev.probe_rows]).flatten(1).numpy()
    test_latents = ev.test_latents.flatten(1).numpy()
    test_pixels = ev.x_test.flatten(1).numpy()
    test_labels = ev.test["labels"][ev.test_rows]
    curve: dict[str, dict[str, Any]] = {}
    for n in s["probe_labels"]:
        if n > len(labelled):
            continue
        repeats = 1 if n == len(labelled) else s["probe_repeats"]
        rng = np.random.default_rng(ev.seed + 60 + n)
        scores: dict[str, list[float]] = {"latents": [], "pixels": []}
        for _ in range(repeats):
            pick = rng.choice(labelled, size=n, replace=False)
            if len(np.unique(labels[pick])) < 2:
                continue  # a draw with one class fits no probe
            for name, train_x, test_x in (("latents", latents, test_latents), ("pixels", pixels, test_pixels)):
                scores[name].append(M.linear_probe_accuracy(train_x[pick], labels[pick], test_x, test_labels, seed=ev.seed))
        if not scores["latents"]:
            continue
        ev.metrics[f"probe_accuracy_labels_{n}"] = float(np.mean(scores["latents"]))
        ev.metrics[f"pixel_probe_accuracy_labels_{n}"] = float(np.mean(scores["pixels"]))
        curve[str(n)] = {"draws": len(scores["latents"]),
                         "latents_std": float(np.std(scores["latents"])), "pixels_std": float(np.std(scores["pixels"]))}
    if not curve:
        return False
    ev.info["label_efficiency"] = {
        "labelled_pool": int(len(labelled)), "per_label_count": curve,
        "probe": "standardise (+ PCA to 256 dims when wider, fitted on the n images) + logistic regression, "
                 "on latents and on pixels in [0, 1]",
    }
    points = [(int(n), ev.metrics[f"probe_accuracy_labels_{n}"], ev.metrics[f"pixel_probe_accuracy_labels_{n}"])
              for n in curve]
    ev.plots["label_efficiency.png"] = lambda p, points=points: label_efficiency_png(points, len(ev.class_names), ev.job.family, p)
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
# Editing by attribute vectors

# The ways of editing compared at the exported label count: (method, whether the source value is the
# image's true label rather than read from its latent). Serving reads the source unless a request names it.
EDIT_VARIANTS = {"translate": ("translate", False), "translate_known": ("translate", True), "difference": ("difference", False)}
EDIT_ROWS_PER_FACTOR = 2  # test images per factor in edits.png


def editing(ev: Evaluation) -> bool:
    """Edits by attribute vectors (:mod:`pipelines.attributes`), read by the classifier's factor heads.

    For each label count ``n`` of ``edit.eval_labels`` (and ``edit.labels_per_value``, the exported one),
    the mean latents of ``n`` seeded train images per value; each of ``edit.eval_images`` test latents is
    moved (``edit.eval_strength``) to every other value of each factor and decoded (:func:`_edit_figures`):
    ``edit_success_<factor>_n<n>`` (the factor reads as the target value), ``edit_preservation_<factor>_n<n>``
    (the other factors read as on the unedited reconstruction), ``edit_clean_<factor>_n<n>`` (both at
    once), and their means over factors (without ``<factor>_``). At ``labels_per_value`` with
    ``edit.method``: the same figures unsuffixed (``edit_success_<factor>``, ``edit_success``); each way of
    editing of :data:`EDIT_VARIANTS` as ``edit_<figure>_by_<variant>``; ``edit_source_accuracy_<factor>``:
    how often the nearest value mean is the test image's true value.
    """
    if ev.test_latents is None or ev.test_indices is not None or ev.slow:
        return False
    manifest, s = ev.job.manifest, ev.job.edit
    heads = {f: h for f in factor_columns(ev.test, manifest)
             if (h := LABEL_HEAD if f == LABEL_FACTOR else f"factor_{f}") in ev.classifier.heads}
    train_columns = {f: c for f, c in factor_columns(ev.train, manifest).items() if f in heads}
    if not train_columns:
        return False
    default = s["labels_per_value"]
    counts = sorted(set(s["eval_labels"]) | {default})
    # Fewer labels are a prefix of more: one encoding of the rows of the largest count serves them all.
    rows = np.unique(np.concatenate([r for names, col in train_columns.values()
                                     for r in labelled_rows(col, len(names), counts[-1], s["seed"])]))
    latents = encode_points(ev.model, np.array(ev.train["images"][rows]))

    def latent_of_rows(picked: np.ndarray) -> np.ndarray:
        return latents[np.searchsorted(rows, picked)]

    k = min(s["eval_images"], len(ev.test_rows))
    z = ev.test_latents[:k].numpy()
    truth = {f: c[ev.test_rows[:k]] for f, (_, c) in factor_columns(ev.test, manifest).items() if f in heads}
    recon_reads = _head_reads(ev, ev.test_recons[:k], heads)
    edits = 0
    for n in counts:
        attrs, _ = mean_latents(train_columns, latent_of_rows, n, s["seed"], s["method"])
        variants = EDIT_VARIANTS if n == default else {s["method"]: (s["method"], False)}
        for variant, (method, known) in variants.items():
            figures = {f: _edit_figures(ev, attrs, f, z, truth, recon_reads, heads, s["eval_strength"], method, known)
                       for f in attrs.values}
            edits += sum(v.pop("edits") for v in figures.values())
            if variant == s["method"]:
                _put_edit_figures(ev.metrics, f"_n{n}", figures)
                if n == default:
                    _put_edit_figures(ev.metrics, "", figures)
            if n == default:
                for name in ("success", "preservation", "clean"):
                    values = [v[name] for v in figures.values() if np.isfinite(v[name])]
                    if values:
                        ev.metrics[f"edit_{name}_by_{variant}"] = float(np.mean(values))
        if n == default:
            accuracy = {f: _source_accuracy(ev, attrs, f, z, truth[f]) for f in attrs.values}
            ev.metrics.update({f"edit_source_accuracy_{f}": v for f, v in accuracy.items()})
            ev.metrics["edit_source_accuracy"] = float(np.mean(list(accuracy.values())))
            ev.plots["edits.png"] = _edits_plot(ev, attrs, z[:EDIT_ROWS_PER_FACTOR], s["eval_strength"])
    series = {f: [(n, ev.metrics.get(f"edit_success_{f}_n{n}"), ev.metrics.get(f"edit_preservation_{f}_n{n}")) for n in counts]
              for f in train_columns}
    ev.plots["edit_labels.png"] = lambda p, series=series: edit_labels_png(series, p)
    ev.info["edit"] = {
        "labels_per_value": default, "label_counts": counts, "method": s["method"], "strength": s["eval_strength"],
        "test_images": int(k), "edits": int(edits), "factors": list(train_columns),
        "success": "the classifier's head of the factor reads the target value",
        "preservation": "every other factor head reads as on the unedited reconstruction",
        "clean": "both: the target value and every other factor as before",
        "source": "read from the latent (the nearest value mean), as serving does; translate_known: the true label",
    }
    return True


def _head_reads(ev: Evaluation, images: torch.Tensor, heads: dict[str, str]) -> dict[str, np.ndarray]:
    """factor -> (N,) the classifier's reading (argmax of the factor's head) of (N, C, H, W) images."""
    probs = read_images(ev.classifier, images)[1]
    return {f: probs[h].argmax(1) for f, h in heads.items()}


def _edit_figures(ev: Evaluation, attrs: Attributes, factor: str, z: np.ndarray, truth: dict[str, np.ndarray],
                 recon_reads: dict[str, np.ndarray], heads: dict[str, str], strength: float = 1.0,
                 method: str = "translate", known: bool = False) -> dict[str, float]:
    """Move each latent z (k, *latent) with a known value of ``factor`` (``truth``: factor -> (k,) value
    rows, -1 unknown) to every other value ``attrs`` has, decode and read: ``success``, ``preservation``
    (NaN without another factor), ``clean`` (both) as fractions of the edits, and ``edits``, their number.
    ``known``: translate from the true value instead of the one read from the latent."""
    names = attrs.values[factor]
    all_names = _value_names(ev, factor)
    value_rows = np.array([names.index(all_names[t]) if t >= 0 and all_names[t] in names else -1 for t in truth[factor]])
    others = [f for f in heads if f != factor]
    hits, kept = [], []
    for target, name in enumerate(names):
        sel = np.flatnonzero((value_rows >= 0) & (value_rows != target))
        if not len(sel):
            continue
        edited, _ = attrs.shift(factor, name, z[sel], strength, value_rows[sel] if known else None, method)
        reads = _head_reads(ev, decode(ev.model, torch.from_numpy(edited)), heads)
        hits.append(reads[factor] == all_names.index(name))
        kept.append(np.all([reads[f] == recon_reads[f][sel] for f in others], axis=0) if others else np.ones(len(sel), bool))
    if not hits:
        return {"success": float("nan"), "preservation": float("nan"), "clean": float("nan"), "edits": 0}
    hit, keep = np.concatenate(hits), np.concatenate(kept)
    return {"success": float(hit.mean()), "preservation": float(keep.mean()) if others else float("nan"),
            "clean": float((hit & keep).mean()), "edits": int(len(hit))}


def _value_names(ev: Evaluation, factor: str) -> list[str]:
    """Every value name of ``factor``, in the order of the classifier head's classes."""
    manifest = ev.job.manifest
    return list(manifest["class_names"] if factor == LABEL_FACTOR else manifest["factor_values"][factor])


def _source_accuracy(ev: Evaluation, attrs: Attributes, factor: str, z: np.ndarray, truth: np.ndarray) -> float:
    """How often the nearest value mean of a latent is its true value (images whose value has a mean)."""
    names, all_names = attrs.values[factor], _value_names(ev, factor)
    true = np.array([all_names[t] if t >= 0 else "" for t in truth])
    known = np.isin(true, names)
    return float(np.mean(np.array(names)[attrs.read(factor, z[known])] == true[known])) if known.any() else float("nan")


def _put_edit_figures(metrics: dict[str, float], suffix: str, figures: dict[str, dict[str, float]]) -> None:
    """``edit_<figure>_<factor><suffix>`` of each factor's :func:`_edit_figures` and ``edit_<figure><suffix>``,
    their mean over factors, for the figures success, preservation and clean."""
    for name in ("success", "preservation", "clean"):
        values = {f: v[name] for f, v in figures.items() if np.isfinite(v[name])}
        metrics.update({f"edit_{name}_{f}{suffix}": v for f, v in values.items()})
        if values:
            metrics[f"edit_{name}{suffix}"] = float(np.mean(list(values.values())))


def _edits_plot(ev: Evaluation, attrs: Attributes, z: np.ndarray, strength: float) -> Callable[[Path], None]:
    """``edits.png``: per factor and test image a row: the image, its reconstruction, then its edit
    (at ``strength``) to each value of the factor in order; black tiles pad the shorter rows."""
    x = ev.x_test[: len(z)]
    recon = ev.test_recons[: len(z)]
    width = 2 + max(len(v) for v in attrs.values.values())
    rows = []
    for factor, names in attrs.values.items():
        edited = [decode(ev.model, torch.from_numpy(attrs.shift(factor, name, z, strength)[0])) for name in names]
        for i in range(len(z)):
            tiles = [x[i], recon[i], *(e[i] for e in edited)]
            tiles += [torch.zeros_like(x[i])] * (width - len(tiles))
            rows.append(torch.stack(tiles))
    # A dark grey frame per tile: on black backgrounds the grid's padding would not show where tiles end.
    tiles = np.pad(tensor_to_uint8(torch.cat(rows)), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=64)
    return lambda p, tiles=tiles, width=width: grid_png(tiles, p, nrow=width)


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
    ("nearest training images", nearest_training),
    ("linear probe", linear_probe),
    ("label efficiency", label_efficiency),
    ("anomaly", anomaly),
    ("interpolation", interpolation),
    ("mig", disentanglement),
    ("edit", editing),
)
# Sections that only queue a plot: their time is counted with the plots'.
PLOT_SECTIONS: tuple[Callable[[Evaluation], bool], ...] = (tsne, loss_curves)
