"""The ``evaluate`` stage: one trained family on the test split -> DVC metrics, plots, and its MLflow run.

``latentforge evaluate --model vae`` reads ``artifacts/train/vae/{model,metrics.json}``, the prepared data
and the domain classifier (``latentforge classifier``), and writes ``<evaluate.output_dir>/vae/``:
``metrics.json`` (flat numeric metrics + an ``info`` block that says what each figure was computed on)
and ``plots/*.png``. The same figures (as ``eval/<name>``) and files (under ``evaluate/``) are logged to
the training's MLflow run. Everything is written to a temporary folder first and renamed at the end.

Subsets keep a family well under a minute on 2 CPUs (``info.counts`` records every size): each split
is encoded on at most ``split_images`` seeded images (``optimised_encode_images`` for families that
encode by optimisation), the family's ``validation_step`` runs on ``validation_images`` of them, the
IWAE on ``iwae_images``, sample metrics on ``num_samples`` samples (``prior_samples`` for families that
sample from an autoregressive prior, VQ-VAE-2), the t-SNE on ``tsne_points``.

What is computed, where the family allows it:

* reconstruction (families with an encoder; GLO encodes by optimisation with ``encode_steps`` steps):
  ``recon_mse``, ``recon_psnr_db``, ``recon_ssim`` (means over test images), and ``test_<key>`` for
  each figure of the family's own ``validation_step`` on the test split (batch means where the family
  computes a figure per batch, such as codebook usage);
* VAE: ``elbo`` (``-test_nelbo``, nats per image, one posterior sample, analytic KL) and ``iwae_nll``
  (nats per image; k = ``iwae_k``, on ``iwae_images`` test images) and ``iwae_nll_bits_per_dim``. Under
  the Bernoulli likelihood on non-binary pixels these are cross-entropies, comparable only between VAEs
  of the same likelihood;
* VQ-VAE-2: ``codebook_usage_<level>``, ``codebook_perplexity_<level>`` over the test set,
  ``code_bits_per_image`` (sum over levels of h * w * log2(num_codes)), ``png_bits_per_image`` (PIL,
  optimize=False), ``compression_ratio`` (PNG bits / code bits) and ``prior_bits_per_image`` (the
  priors' cross-entropy: what an entropy coder driven by the prior would spend);
* denoising AE: ``denoise_psnr_db`` (restored vs clean) beside ``noisy_psnr_db`` (noisy input vs clean);
* samples: ``fd_classifier`` (Frechet distance in the classifier's feature space, not Inception: not
  comparable with published FIDs), ``sample_precision`` / ``sample_recall`` (k-NN manifolds, k = 3), on
  ``num_samples`` samples vs as many test images, and ``fd_classifier_floor``, the distance between as
  many test and train images (what a perfect model would score at this N);
* ``probe_accuracy``: logistic regression on train latents -> labels, scored on test latents;
* ``anomaly_auroc_class_<c>``: AUROC of per-image reconstruction MSE, class c (``anomaly_class``) vs the
  other classes, on the test split, and ``anomaly_threshold``: the ``anomaly_percentile`` percentile of
  the other classes' errors on the val split (the threshold serving flags anomalies with). NB: the model
  was trained on all classes, class c included; the figure the literature reports ("one class held out
  of training") needs a training run on data without class c;
* ``interp_min_confidence``: the mean over pairs of test images of different classes of the minimum
  along the decoded latent path of the classifier's max-softmax (prior draws for families without an
  encoder);
* ``mig`` and ``mig_<factor>`` (data with factors, flat latents): mutual information gap, 20 bins.

Plots: ``samples.png``, ``reconstructions.png``, ``interpolation.png``, ``tsne.png`` (test latents
coloured by label), ``loss_curves.png`` (``train/*loss`` and ``epoch/val_score`` from the MLflow run).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from latentforge.pipelines.common.errors import DataError, EvaluationError
from latentforge.pipelines.common.params import ParamsError, check_keys, section
from latentforge.pipelines.common.files import _replace_dir

EVALUATE_SCHEMA: dict[str, Any] = {
    "iwae_k": int,
    "iwae_images": int,
    "num_samples": int,
    "prior_samples": int,
    "split_images": int,
    "validation_images": int,
    "tsne_points": int,
    "encode_steps": int,
    "optimised_encode_images": int,
    "interp_pairs": int,
    "interp_steps": int,
    "anomaly_class": int,
    "anomaly_percentile": float,
    "seed": int,
    "output_dir": str,
}

# The figure the registry should promote by, per family: (metric, "min" | "max"). Families not listed
# use ("recon_mse", "min") when they have an encoder, else ("fd_classifier", "min").
PRIMARY_METRICS: dict[str, tuple[str, str]] = {
    "vae": ("iwae_nll", "min"),
    "vqvae2": ("recon_mse", "min"),  # its FD rests on only prior_samples samples (slow sampler)
    "gan": ("fd_classifier", "min"),
    "aae": ("fd_classifier", "min"),
    "glo": ("fd_classifier", "min"),
    "denoising_ae": ("denoise_psnr_db", "max"),
}
BATCH = 256
PR_K = 3
MIG_BINS = 20


@dataclass
class EvalJob:
    """Everything an evaluation needs, resolved and checked before any model runs."""

    family: str
    model_dir: Path
    train_metrics: dict[str, Any]
    data_dir: Path
    manifest: dict[str, Any]
    classifier_dir: Path
    settings: dict[str, Any]
    out_dir: Path
    tracking_uri: str

    @property
    def run_id(self) -> str:
        return self.train_metrics["mlflow_run_id"]


def primary_metric(family: str, has_encoder: bool) -> tuple[str, str]:
    """The metric (and direction) the registry should compare versions of ``family`` by."""
    return PRIMARY_METRICS.get(family, ("recon_mse", "min") if has_encoder else ("fd_classifier", "min"))


# ----------------------------------------------------------------------------------------------------
# Resolving the job


def resolve_evaluation(params: dict[str, Any], family: str) -> EvalJob:
    """Check every input before anything heavy runs: the family, the ``evaluate`` params, the prepared
    data, the trained model (and that it takes this data's image shape), its training metrics (MLflow
    run id) and the domain classifier (trained on this data)."""
    from latentforge.models import MODELS, ConfigError
    from latentforge.runtime.store import absolute_uri as _absolute_uri

    if family not in MODELS:
        raise ConfigError(f"unknown model family {family!r}; choose one of: {', '.join(sorted(MODELS))}")
    settings = check_keys(section(params, "evaluate"), EVALUATE_SCHEMA, "evaluate")
    for key in ("iwae_k", "iwae_images", "num_samples", "prior_samples", "split_images", "validation_images",
                "tsne_points", "optimised_encode_images", "interp_pairs", "interp_steps"):
        if settings[key] <= 0:
            raise ParamsError(f"params evaluate.{key} must be > 0, got {settings[key]}")
    if settings["encode_steps"] < 0:
        raise ParamsError(f"params evaluate.encode_steps must be >= 0, got {settings['encode_steps']}")
    if settings["interp_steps"] < 2:
        raise ParamsError(f"params evaluate.interp_steps must be >= 2, got {settings['interp_steps']}")
    if not 0 < settings["anomaly_percentile"] <= 100:
        raise ParamsError(f"params evaluate.anomaly_percentile must be in (0, 100], got {settings['anomaly_percentile']}")

    data = section(params, "data")
    data_dir = Path(data["output_dir"]) / data["name"]
    if not (data_dir / "manifest.json").is_file():
        raise DataError(f"no prepared data at {data_dir}; run `latentforge prepare` (or `dvc repro prepare`) first")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    n_classes = len(manifest["class_names"])
    if n_classes and not -n_classes <= settings["anomaly_class"] < n_classes:
        raise ParamsError(
            f"params evaluate.anomaly_class={settings['anomaly_class']} is not a class of {manifest['name']} "
            f"(0..{n_classes - 1}, or negative from the end: -1 is the last)"
        )

    train_dir = Path(section(params, "train")["output_dir"]) / family
    model_dir = train_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise EvaluationError(
            f"no trained {family} model at {model_dir}; run `latentforge train --model {family}` (or `dvc repro train@{family}`) first"
        )
    meta = json.loads((model_dir / "config.json").read_text())
    if meta.get("class") != MODELS[family].__name__:
        raise EvaluationError(f"{model_dir} holds a {meta.get('class')}, not a {MODELS[family].__name__} ({family})")
    cfg = meta["config"]
    h, w, c = manifest["image_shape"]
    model_shape = (cfg["image_size"], cfg["image_size"], cfg["channels"])
    if model_shape != (h, w, c):
        raise EvaluationError(
            f"image shape mismatch: the {family} model at {model_dir} takes {_shape(model_shape)} images, but the "
            f"data {manifest['name']} at {data_dir} has {_shape((h, w, c))} images; evaluate it on the data it was "
            f"trained on or train it on this data"
        )
    metrics_path = train_dir / "metrics.json"
    if not metrics_path.is_file():
        raise EvaluationError(f"no training metrics at {metrics_path}; run `latentforge train --model {family}` first")
    train_metrics = json.loads(metrics_path.read_text())
    if not train_metrics.get("mlflow_run_id"):
        raise EvaluationError(f"{metrics_path} has no mlflow_run_id; run `latentforge train --model {family}` again")

    classifier_dir = Path(section(params, "classifier")["output_dir"]) / manifest["name"]
    if not (classifier_dir / "config.json").is_file():
        raise EvaluationError(
            f"no domain classifier for {manifest['name']} at {classifier_dir}; run `latentforge classifier` "
            f"(or `dvc repro classifier`) first"
        )
    cmeta = json.loads((classifier_dir / "config.json").read_text())
    if cmeta.get("data_hash") != manifest["data_hash"]:
        raise EvaluationError(
            f"the domain classifier at {classifier_dir} was trained on other data (hash {str(cmeta.get('data_hash'))[:12]}) "
            f"than {data_dir} (hash {manifest['data_hash'][:12]}); run `latentforge classifier` again"
        )

    mlflow_params = section(params, "mlflow")
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow_params.get("tracking_uri")
    if not tracking_uri:
        raise ParamsError("params mlflow.tracking_uri: missing (or set MLFLOW_TRACKING_URI)")
    return EvalJob(
        family=family,
        model_dir=model_dir,
        train_metrics=train_metrics,
        data_dir=data_dir,
        manifest=manifest,
        classifier_dir=classifier_dir,
        settings=settings,
        out_dir=Path(settings["output_dir"]) / family,
        tracking_uri=_absolute_uri(tracking_uri),
    )


def _shape(hwc: tuple[int, int, int]) -> str:
    return f"{hwc[0]}x{hwc[1]}x{hwc[2]} (HxWxC)"


def _mlflow(job: EvalJob):
    """A client for the job's store, checked reachable, with the training run checked present."""
    from latentforge.pipelines.common.errors import TrainingError
    from latentforge.pipelines.common.tracking import mlflow_client

    try:
        client = mlflow_client(job.tracking_uri)
    except TrainingError as exc:
        raise EvaluationError(str(exc)) from None
    try:
        run = client.get_run(job.run_id)
    except Exception as exc:  # MlflowException (RESOURCE_DOES_NOT_EXIST) or a transport error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvaluationError(
            f"MLflow run {job.run_id} (from {job.model_dir.parent / 'metrics.json'}) not found in {job.tracking_uri}: {first}"
        ) from None
    if run.info.lifecycle_stage == "deleted":
        raise EvaluationError(f"MLflow run {job.run_id} is deleted; restore it or train again")
    return client


# ----------------------------------------------------------------------------------------------------
# Model helpers (generic over families: duck-typed on the public surface)


def _encode_kwargs(model, settings: dict[str, Any], generator) -> dict[str, Any]:
    """Families that encode by optimisation (GLO's ``encode(x, steps=..., generator=...)``) get the
    evaluation's few steps and a seeded generator; the others take none."""
    params = inspect.signature(model.encode).parameters
    kwargs: dict[str, Any] = {}
    if "steps" in params:
        kwargs["steps"] = settings["encode_steps"]
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _encodes_by_optimisation(model) -> bool:
    return "steps" in inspect.signature(model.encode).parameters


def _samples_autoregressively(model) -> bool:
    """Families that sample discrete codes from an autoregressive prior (VQ-VAE-2's ``sample_indices``):
    one network step per code position, by far the slowest sampler here."""
    return hasattr(model, "sample_indices")


def encode_images(model, images: np.ndarray, kwargs: dict[str, Any], batch: int = BATCH):
    """Encode (N, H, W, C) uint8 images; returns latents (N, ...), reconstructions (N, C, H, W) float in
    [0, 1] and, for quantised families, the code indices (one (N, h, w) array per level) or None."""
    import torch

    from latentforge.pipelines.imaging import batch_to_tensor

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


def _decode(model, latents, batch: int = BATCH):
    import torch

    with torch.no_grad():
        return torch.cat([model.decode(latents[i : i + batch]).images.float().clamp(0, 1) for i in range(0, len(latents), batch)])


def _sample(model, n: int, generator, batch: int = 32):
    # Small batches: an autoregressive prior's KV-cached step copies its whole cache each position,
    # so its cost grows faster than linearly with the batch (memory-bound); a CNN decoder does not care.
    import torch

    with torch.no_grad():
        out = [model.sample(min(batch, n - i), generator=generator).images.float().clamp(0, 1) for i in range(0, n, batch)]
    return torch.cat(out)


def _subset(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """A seeded subset of ``min(k, n)`` row indices of ``range(n)``, in increasing order."""
    return np.sort(rng.permutation(n)[: min(k, n)])


# ----------------------------------------------------------------------------------------------------
# The stage


def run_evaluation(job: EvalJob, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``job``; write ``metrics.json`` and plots atomically, log them to the training's MLflow
    run. Returns the metrics dict (as written)."""
    import torch

    from latentforge.models import PretrainedModel
    from latentforge.pipelines.evaluate import metrics as M
    from latentforge.pipelines.classifier import embed_images, load_classifier
    from latentforge.pipelines.imaging import batch_to_tensor, tensor_to_uint8
    from latentforge.pipelines.prepare import load_split

    client = _mlflow(job)  # fail fast, before the minutes of work
    s = job.settings
    seed = s["seed"]
    t_start = time.time()
    seconds: dict[str, float] = {}
    tick = [time.time()]

    def lap(name: str) -> None:
        now = time.time()
        seconds[name] = round(now - tick[0], 2)
        tick[0] = now
        echo(f"[evaluate {job.family}] {name}: {seconds[name]:.1f}s")

    torch.manual_seed(seed)
    model = PretrainedModel.from_pretrained(job.model_dir)
    model.eval()
    classifier, cmeta = load_classifier(job.classifier_dir)
    manifest = job.manifest
    class_names = manifest["class_names"]
    # Writable copies: load_split's arrays are read-only views of the Parquet buffers.
    test = {k: np.array(v) for k, v in load_split(job.data_dir, "test").items()}
    gen = lambda offset=0: torch.Generator().manual_seed(seed + offset)  # noqa: E731
    metrics: dict[str, float] = {}
    info: dict[str, Any] = {
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
        "settings": dict(s),
        "counts": {"test": int(len(test["images"]))},
    }
    name, direction = primary_metric(job.family, model.has_encoder)
    info["primary_metric"], info["primary_direction"] = name, direction
    rng = np.random.default_rng(seed)
    plots: dict[str, Callable[[Path], None]] = {}
    lap("load")

    # -- reconstruction ---------------------------------------------------------------------------
    test_latents = test_recons = None
    slow = model.has_encoder and _encodes_by_optimisation(model)
    cap = s["optimised_encode_images"] if slow else s["split_images"]  # images encoded per split
    test_rows = _subset(rng, len(test["images"]), cap)
    if model.has_encoder:
        kwargs = _encode_kwargs(model, s, gen(1))
        info["encode"] = {"images_per_split": int(cap), "by_optimisation": slow,
                          **({"steps": s["encode_steps"]} if slow else {})}
        x_test = batch_to_tensor(test["images"][test_rows])
        test_latents, test_recons, test_indices = encode_images(model, test["images"][test_rows], kwargs)
        errors = M.per_image_mse(x_test, test_recons)
        metrics["recon_mse"] = float(errors.mean())
        metrics["recon_psnr_db"] = float(M.psnr(x_test, test_recons).mean())
        metrics["recon_ssim"] = float(M.ssim(x_test, test_recons).mean())
        info["counts"]["reconstruction"] = int(len(test_rows))
        pairs = torch.stack([x_test[:32], test_recons[:32]], 1).flatten(0, 1)
        plots["reconstructions.png"] = lambda p, pairs=pairs: _grid_png(tensor_to_uint8(pairs), p, nrow=8)
        lap("reconstruction")

        if not slow:
            # The family's own validation figures, on the test split (GLO's would re-run the optimisation).
            rows = test_rows[: s["validation_images"]]
            metrics.update({f"test_{k}": v for k, v in _validation_figures(model, test["images"][rows], seed).items()})
            info["counts"]["validation_step"] = int(len(rows))
            lap("validation_step")

        # -- VAE: ELBO and IWAE ------------------------------------------------------------------
        if hasattr(model, "iwae_nll"):
            rows = _subset(np.random.default_rng(seed + 2), len(test["images"]), s["iwae_images"])
            nll = []
            g = gen(2)
            for i in range(0, len(rows), 64):
                xb = batch_to_tensor(test["images"][rows[i : i + 64]])
                nll.append(model.iwae_nll(xb, k=s["iwae_k"], generator=g).double().numpy())
            nll = np.concatenate(nll)
            metrics["iwae_nll"] = float(nll.mean())
            metrics["iwae_nll_bits_per_dim"] = float(nll.mean() / (math.log(2) * np.prod(test["images"].shape[1:])))
            if "test_nelbo" in metrics:
                metrics["elbo"] = -metrics["test_nelbo"]
            info["counts"]["iwae_images"] = int(len(rows))
            info["iwae_k"] = s["iwae_k"]
            lap("iwae")

        # -- VQ: codebooks and compression -----------------------------------------------------
        if test_indices is not None:
            num_codes = int(model.config.num_codes)
            levels = ["top", "bottom"] if len(test_indices) == 2 else [f"level{j}" for j in range(len(test_indices))]
            for level, idx in zip(levels, test_indices):
                usage, perplexity = M.codebook_usage(idx, num_codes)
                metrics[f"codebook_usage_{level}"] = usage
                metrics[f"codebook_perplexity_{level}"] = perplexity
            shapes = [idx.shape[1:] for idx in test_indices]
            metrics["code_bits_per_image"] = M.code_bits_per_image(shapes, num_codes)
            metrics["png_bits_per_image"] = float(M.png_bits(test["images"][test_rows]).mean())
            metrics["compression_ratio"] = metrics["png_bits_per_image"] / metrics["code_bits_per_image"]
            ce = [metrics.get(f"test_prior_ce_{level}") for level in levels]
            if all(v is not None for v in ce):
                metrics["prior_bits_per_image"] = float(
                    sum(v * math.prod(sh) for v, sh in zip(ce, shapes)) / math.log(2)
                )
            info["code_levels"] = {level: list(map(int, sh)) for level, sh in zip(levels, shapes)}
            lap("codes")

        # -- denoising ----------------------------------------------------------------------------
        if hasattr(model, "corrupt"):
            g = gen(3)
            with torch.no_grad():
                noisy = torch.cat([model.corrupt(x_test[i : i + BATCH], generator=g) for i in range(0, len(x_test), BATCH)])
            with torch.no_grad():
                restored = torch.cat([
                    model.decode(model.encode(noisy[i : i + BATCH]).latent).images.float().clamp(0, 1)
                    for i in range(0, len(noisy), BATCH)
                ])
            metrics["noisy_psnr_db"] = float(M.psnr(x_test, noisy).mean())
            metrics["denoise_psnr_db"] = float(M.psnr(x_test, restored).mean())
            metrics["denoise_psnr_gain_db"] = metrics["denoise_psnr_db"] - metrics["noisy_psnr_db"]
            info["denoise"] = {"corruption": model.config.corruption, "noise_level": model.config.noise_level}
            lap("denoising")

    # -- samples -----------------------------------------------------------------------------------
    n = min(s["prior_samples"] if _samples_autoregressively(model) else s["num_samples"], len(test["images"]))
    samples = _sample(model, n, gen(4))
    plots["samples.png"] = lambda p, x=samples[:64]: _grid_png(tensor_to_uint8(x), p)
    lap("sampling")
    real_rows = _subset(np.random.default_rng(seed + 4), len(test["images"]), n)
    real_feats, _ = embed_images(classifier, test["images"][real_rows])
    fake_feats, _ = embed_images(classifier, samples)
    metrics["fd_classifier"] = M.frechet_distance_features(real_feats, fake_feats)
    metrics["sample_precision"], metrics["sample_recall"] = M.precision_recall(real_feats, fake_feats, k=PR_K)
    train = load_split(job.data_dir, "train")
    floor_rows = _subset(np.random.default_rng(seed + 5), len(train["images"]), n)
    metrics["fd_classifier_floor"] = M.frechet_distance_features(real_feats, embed_images(classifier, train["images"][floor_rows])[0])
    info["counts"]["samples"] = int(n)
    info["sample_metrics"] = {
        "features": f"domain classifier penultimate layer ({cmeta['feature_dim']}-d), not Inception",
        "precision_recall_k": PR_K,
        "real": f"{n} test images",
        "floor": f"fd_classifier between {n} test and {n} train images",
    }
    lap("sample metrics")

    labels = test["labels"]
    has_labels = len(class_names) > 1 and (labels >= 0).any()

    # -- linear probe ------------------------------------------------------------------------------
    if model.has_encoder and has_labels:
        rows = _subset(np.random.default_rng(seed + 6), len(train["images"]), cap)
        train_latents = encode_images(model, train["images"][rows], _encode_kwargs(model, s, gen(6)))[0]
        metrics["probe_accuracy"] = M.linear_probe_accuracy(
            train_latents.flatten(1).numpy(), train["labels"][rows], test_latents.flatten(1).numpy(), labels[test_rows], seed=seed
        )
        dims = int(test_latents[0].numel())
        info["probe"] = {"train_images": int(len(rows)), "test_images": int(len(test_rows)), "latent_dims": dims,
                         "pca_dims": 256 if dims > 256 else None, "model": "standardise + logistic regression"}
        lap("linear probe")

    # -- anomaly detection ---------------------------------------------------------------------------
    if model.has_encoder and has_labels:
        c = s["anomaly_class"] % len(class_names)  # checked in range by resolve_evaluation
        anomalous = labels[test_rows] == c
        normal = (labels[test_rows] >= 0) & ~anomalous
        if anomalous.any() and normal.any():
            metrics[f"anomaly_auroc_class_{c}"] = M.anomaly_auroc(errors[normal], errors[anomalous])
        val = load_split(job.data_dir, "val")
        val_rows = np.flatnonzero((val["labels"] >= 0) & (val["labels"] != c))
        val_rows = val_rows[_subset(np.random.default_rng(seed + 7), len(val_rows), cap)]
        if len(val_rows):
            _, val_recons, _ = encode_images(model, val["images"][val_rows], _encode_kwargs(model, s, gen(7)))
            val_errors = M.per_image_mse(batch_to_tensor(val["images"][val_rows]), val_recons)
            metrics["anomaly_threshold"] = float(np.percentile(val_errors, s["anomaly_percentile"]))
        info["anomaly"] = {
            "class": int(c),
            "class_name": class_names[c],
            "score": "per-image reconstruction MSE (pixels in [0, 1])",
            "auroc": f"class {c} vs the other classes on the test split ({int(anomalous.sum())} vs {int(normal.sum())} images)",
            "threshold": f"percentile {s['anomaly_percentile']:g} of the val errors of the other classes ({len(val_rows)} images)",
            "note": "the model was trained on all classes, this one included; a held-out-of-training AUROC needs "
                    "a training run on data without this class",
        }
        lap("anomaly")

    # -- interpolation -------------------------------------------------------------------------------
    interp = _interpolation(model, test, test_rows, test_latents, s, rng, gen(8))
    if interp is not None:
        path_images, strips, endpoints = interp
        p, t = path_images.shape[:2]
        _, probs = embed_images(classifier, path_images.flatten(0, 1))
        metrics["interp_min_confidence"] = M.interpolation_confidence(probs.reshape(p, t, -1))
        info["interpolation"] = {"pairs": int(p), "steps": int(t), "endpoints": endpoints, "path": "linear in the latent space",
                                 "confidence": f"max softmax of the classifier's {cmeta['main_head']} head"}
        plots["interpolation.png"] = lambda path, strips=strips, cols=strips.shape[1]: _grid_png(
            tensor_to_uint8(strips[:8].flatten(0, 1)), path, nrow=cols)
        lap("interpolation")

    # -- disentanglement -------------------------------------------------------------------------------
    factors = test["factors"]
    if test_latents is not None and test_latents.dim() == 2 and factors.shape[1] > 0:
        per_factor = M.mig_per_factor(test_latents.numpy(), factors[test_rows], bins=MIG_BINS)
        metrics["mig"] = float(np.nanmean(per_factor))
        for fname, v in zip(manifest["factor_names"], per_factor):
            if np.isfinite(v):
                metrics[f"mig_{fname}"] = float(v)
        info["mig"] = {"bins": MIG_BINS, "images": int(len(test_rows)), "latent": "encode(x).latent (the posterior mean for a VAE)"}
        lap("mig")

    # -- t-SNE -------------------------------------------------------------------------------------------
    if test_latents is not None:
        k = min(s["tsne_points"], len(test_latents))
        rows = _subset(np.random.default_rng(seed + 9), len(test_latents), k)
        lat, lab = test_latents[rows].flatten(1).numpy(), labels[test_rows][rows]
        plots["tsne.png"] = lambda p, lat=lat, lab=lab: _tsne_png(lat, lab, class_names, seed, p)
        info["counts"]["tsne"] = int(k)

    history = _loss_history(client, job.run_id)
    plots["loss_curves.png"] = lambda p: _loss_png(history, job.family, p)

    # -- write ------------------------------------------------------------------------------------------
    job.out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{job.out_dir.name}.tmp-", dir=job.out_dir.parent))
    try:
        (tmp / "plots").mkdir()
        for fname, draw in plots.items():
            draw(tmp / "plots" / fname)
        lap("plots")
        seconds["total"] = round(time.time() - t_start, 2)
        info["seconds"] = seconds
        out = {**{k: _finite_or_none(v) for k, v in sorted(metrics.items())}, "info": info}
        (tmp / "metrics.json").write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
        _log_to_mlflow(client, job, metrics, tmp, name, direction)
        _replace_dir(tmp, job.out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    echo(f"[evaluate {job.family}] {name} {metrics.get(name, float('nan')):.5g} ({direction}); "
         f"{len(metrics)} metrics, {len(plots)} plots -> {job.out_dir}; MLflow run {job.run_id} ({seconds['total']:.0f}s)")
    return out


def _validation_figures(model, images: np.ndarray, seed: int) -> dict[str, float]:
    """Batch-size-weighted means of ``model.validation_step`` over (N, H, W, C) uint8 images."""
    import torch

    from latentforge.pipelines.imaging import batch_to_tensor

    torch.manual_seed(seed)  # validation_step may draw (a VAE's posterior sample, a GAN's z)
    sums: dict[str, float] = {}
    for i in range(0, len(images), BATCH):
        x = batch_to_tensor(images[i : i + BATCH])
        batch = {"image": x, "label": torch.full((len(x),), -1), "index": torch.arange(len(x))}
        with torch.no_grad():
            for k, v in model.validation_step(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(x)
    return {k: v / len(images) for k, v in sums.items()}


def _interpolation(model, test, test_rows, test_latents, s, rng, generator):
    """Decoded linear latent paths: (P, T, C, H, W) images, the strips to plot (P, T [+2], C, H, W),
    and what the endpoints are. Pairs of test images of different classes (encoder families), else
    pairs of prior draws (needs ``model.latent_shape``); None when neither is possible."""
    import torch

    from latentforge.pipelines.imaging import batch_to_tensor

    p, t = s["interp_pairs"], s["interp_steps"]
    if test_latents is not None:
        labels = test["labels"][test_rows]
        a_idx, b_idx = [], []
        for _ in range(20 * p):
            i, j = rng.integers(0, len(test_rows), size=2)
            if i != j and (labels[i] != labels[j] or (labels < 0).all()):
                a_idx.append(i)
                b_idx.append(j)
            if len(a_idx) == p:
                break
        if not a_idx:
            return None
        za, zb = test_latents[a_idx], test_latents[b_idx]
        endpoints = "test images of different classes (their latents from encode)"
        xa, xb = batch_to_tensor(test["images"][test_rows[a_idx]]), batch_to_tensor(test["images"][test_rows[b_idx]])
    else:
        shape = getattr(model, "latent_shape", None)
        if shape is None:
            return None
        za = torch.randn((p, *shape), generator=generator)
        zb = torch.randn((p, *shape), generator=generator)
        endpoints = "pairs of prior draws z ~ N(0, I) (no encoder)"
        xa = xb = None
    w = torch.linspace(0, 1, t).view(1, t, *[1] * (za.dim() - 1))
    path = (1 - w) * za.unsqueeze(1) + w * zb.unsqueeze(1)  # (P, T, ...)
    images = _decode(model, path.flatten(0, 1)).view(len(za), t, *_image_dims(test))
    strips = images if xa is None else torch.cat([xa.unsqueeze(1), images, xb.unsqueeze(1)], 1)
    return images, strips, endpoints


def _image_dims(split) -> tuple[int, int, int]:
    h, w, c = split["images"].shape[1:]
    return (c, h, w)


def _loss_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """``train/*loss`` and ``epoch/val_score`` histories of the run: key -> [(step, value), ...]."""
    import re

    keys = [k for k in client.get_run(run_id).data.metrics if re.fullmatch(r"train/(.+/)?loss", k) or k == "epoch/val_score"]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in sorted(keys)}


# ----------------------------------------------------------------------------------------------------
# Plots


def _grid_png(images: np.ndarray, path: Path, nrow: int | None = None) -> None:
    from latentforge.pipelines.imaging import make_grid, save_png

    save_png(make_grid(images, nrow=nrow), path, scale=max(1, 128 // images.shape[1]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _tsne_png(latents: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int, path: Path) -> None:
    """t-SNE of (N, D) latents (PCA to 50 dims first when D > 50), coloured by label."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plt = _pyplot()
    x = latents.astype(np.float64)
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    if len(x) >= 5:
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed).fit_transform(x)
        known = labels >= 0
        ax.scatter(xy[~known, 0], xy[~known, 1], s=6, c="lightgrey")
        sc = ax.scatter(xy[known, 0], xy[known, 1], s=6, c=labels[known], cmap="nipy_spectral",
                        vmin=0, vmax=max(len(class_names) - 1, 1))
        if 1 < len(class_names) <= 12:
            handles = [plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(i))) for i in range(len(class_names))]
            ax.legend(handles, class_names, fontsize=7, loc="best")
        elif class_names:
            fig.colorbar(sc, ax=ax, label="class index")
    else:
        ax.text(0.5, 0.5, "too few points for t-SNE", ha="center", va="center")
    ax.set_title(f"t-SNE of {len(x)} test latents, coloured by label")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _loss_png(history: dict[str, list[tuple[int, float]]], family: str, path: Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, points in history.items():
        if key == "epoch/val_score" or not points:
            continue
        steps, values = zip(*points)
        left.plot(steps, values, label=key, lw=1)
    left.set_title(f"{family}: training loss")
    left.set_xlabel("step")
    if any(k != "epoch/val_score" for k in history):
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no train/*loss history in the MLflow run", ha="center", va="center", transform=left.transAxes)
    val = history.get("epoch/val_score", [])
    if val:
        steps, values = zip(*val)
        right.plot(steps, values, marker="o", lw=1)
    else:
        right.text(0.5, 0.5, "no epoch/val_score history", ha="center", va="center", transform=right.transAxes)
    right.set_title(f"{family}: validation score (checkpoint metric)")
    right.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Output


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _log_to_mlflow(client, job: EvalJob, metrics: dict[str, float], folder: Path, primary: str, direction: str) -> None:
    """Metrics as ``eval/<name>`` (finite values only), the files under ``evaluate/``, and tags naming
    the primary metric (the registry's promotion policy reads them)."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    batch = [Metric(f"eval/{k}", float(v), now, 0) for k, v in sorted(metrics.items()) if math.isfinite(v)]
    tags = [
        RunTag("latentforge.eval.primary_metric", f"eval/{primary}"),
        RunTag("latentforge.eval.primary_direction", direction),
        RunTag("latentforge.eval.data_hash", job.manifest["data_hash"]),
    ]
    for i in range(0, max(len(batch), 1), 1000):
        client.log_batch(job.run_id, metrics=batch[i : i + 1000], tags=tags if i == 0 else [])
    client.log_artifacts(job.run_id, str(folder), artifact_path="evaluate")
