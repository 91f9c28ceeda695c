"""The evaluation job: its settings, inputs and training run, resolved and checked before any model runs,
and what it reports back to that run (metrics, files, the primary-metric tags)."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag

from latentforge.models import MODELS, ConfigError
from latentforge.pipelines.attributes import EDIT_DEFAULTS, edit_settings
from latentforge.pipelines.common.errors import EvaluationError, ParamsError
from latentforge.pipelines.common.params import check_keys, section
from latentforge.pipelines.common.tracking import DIGEST_CHARS, log_data_input, mlflow_client, tracking_uri
from latentforge.pipelines.prepare import read_manifest

EVALUATE_SCHEMA: dict[str, Any] = {
    "iwae_k": int,
    "iwae_images": int,
    "num_samples": int,
    "split_images": int,
    "validation_images": int,
    "tsne_points": int,
    "encode_steps": int,
    "optimised_encode_images": int,
    "interp_pairs": int,
    "interp_steps": int,
    "anomaly_class": int,
    "anomaly_percentile": float,
    "probe_labels": list,
    "probe_repeats": int,
    "seed": int,
    "output_dir": str,
}

# The figure the registry should promote by, per family: (metric, "min" | "max"). Families not listed
# use ("recon_mse", "min") when they have an encoder, else ("fd_classifier", "min").
PRIMARY_METRICS: dict[str, tuple[str, str]] = {
    "vae": ("iwae_nll", "min"),
    "vqvae2": ("fd_classifier", "min"),
    "gan": ("fd_classifier", "min"),
    "aae": ("fd_classifier", "min"),
    "glo": ("fd_classifier", "min"),
    "denoising_ae": ("denoise_psnr_db", "max"),
}


@dataclass
class EvalJob:
    """Everything an evaluation needs, resolved and checked before any model runs."""

    family: str
    model_dir: Path
    train_metrics: dict[str, Any]
    data_dir: Path
    manifest: dict[str, Any]
    classifier_dir: Path | None  # None for a time series (pipelines/evaluate/series.py): no image classifier
    settings: dict[str, Any]
    out_dir: Path
    tracking_uri: str
    edit: dict[str, Any] = field(default_factory=lambda: dict(EDIT_DEFAULTS))  # the `edit` params (attribute vectors)

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
    if family not in MODELS:
        raise ConfigError(f"unknown model family {family!r}; choose one of: {', '.join(sorted(MODELS))}")
    settings = _check_settings(params)
    data = section(params, "data")
    data_dir = Path(data["output_dir"]) / data["name"]
    manifest = read_manifest(data_dir)
    n_classes = len(manifest["class_names"])
    if n_classes and not -n_classes <= settings["anomaly_class"] < n_classes:
        raise ParamsError(
            f"params evaluate.anomaly_class={settings['anomaly_class']} is not a class of {manifest['name']} "
            f"(0..{n_classes - 1}, or negative from the end: -1 is the last)"
        )
    train_dir = Path(section(params, "train")["output_dir"]) / family
    _check_model(family, train_dir / "model", data_dir, manifest)
    train_metrics = training_metrics(family, train_dir / "metrics.json")
    classifier_dir = Path(section(params, "classifier")["output_dir"]) / manifest["name"]
    _check_classifier(classifier_dir, data_dir, manifest)
    return EvalJob(
        family=family,
        model_dir=train_dir / "model",
        train_metrics=train_metrics,
        data_dir=data_dir,
        manifest=manifest,
        classifier_dir=classifier_dir,
        settings=settings,
        out_dir=Path(settings["output_dir"]) / family,
        tracking_uri=tracking_uri(params),
        edit=edit_settings(params),
    )


def _check_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The ``evaluate`` section, typed by EVALUATE_SCHEMA and range-checked."""
    settings = check_keys(section(params, "evaluate"), EVALUATE_SCHEMA, "evaluate")
    for key in ("iwae_k", "iwae_images", "num_samples", "split_images", "validation_images",
                "tsne_points", "optimised_encode_images", "interp_pairs", "interp_steps", "probe_repeats"):
        if settings[key] <= 0:
            raise ParamsError(f"params evaluate.{key} must be > 0, got {settings[key]}")
    if settings["encode_steps"] < 0:
        raise ParamsError(f"params evaluate.encode_steps must be >= 0, got {settings['encode_steps']}")
    if settings["interp_steps"] < 2:
        raise ParamsError(f"params evaluate.interp_steps must be >= 2, got {settings['interp_steps']}")
    counts = settings["probe_labels"]
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in counts):
        raise ParamsError(f"params evaluate.probe_labels must be a non-empty list of label counts >= 2, got {counts!r}")
    if not 0 < settings["anomaly_percentile"] <= 100:
        raise ParamsError(f"params evaluate.anomaly_percentile must be in (0, 100], got {settings['anomaly_percentile']}")
    return settings


def _check_model(family: str, model_dir: Path, data_dir: Path, manifest: dict[str, Any]) -> None:
    """A saved model of ``family`` at ``model_dir`` that takes the data's (H, W, C) images."""
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


def training_metrics(family: str, metrics_path: Path) -> dict[str, Any]:
    """The training's ``metrics.json``, which must name its MLflow run."""
    if not metrics_path.is_file():
        raise EvaluationError(f"no training metrics at {metrics_path}; run `latentforge train --model {family}` first")
    train_metrics = json.loads(metrics_path.read_text())
    if not train_metrics.get("mlflow_run_id"):
        raise EvaluationError(f"{metrics_path} has no mlflow_run_id; run `latentforge train --model {family}` again")
    return train_metrics


def _check_classifier(classifier_dir: Path, data_dir: Path, manifest: dict[str, Any]) -> None:
    """A domain classifier at ``classifier_dir`` trained on this very data (same data hash)."""
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


def _shape(hwc: tuple[int, int, int]) -> str:
    return f"{hwc[0]}x{hwc[1]}x{hwc[2]} (HxWxC)"


# ----------------------------------------------------------------------------------------------------
# The training's MLflow run


def open_training_run(job: EvalJob):
    """A client for the job's store, checked reachable, with the training run checked present."""
    client = mlflow_client(job.tracking_uri, EvaluationError)
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


def loss_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """``train/*loss`` and ``epoch/val_score`` histories of the run: key -> [(step, value), ...]."""
    keys = [k for k in client.get_run(run_id).data.metrics if re.fullmatch(r"train/(.+/)?loss", k) or k == "epoch/val_score"]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in sorted(keys)}


def log_to_mlflow(client, job: EvalJob, metrics: dict[str, float], folder: Path, primary: str, direction: str) -> None:
    """Metrics as ``eval/<name>`` (finite values only), the files under ``evaluate/``, and tags naming
    the primary metric (the registry's promotion policy reads them). The metrics are linked to the
    trained LoggedModel that ``metrics.json`` names (``mlflow_model_id``; none for a model trained before
    LoggedModels were logged) and to the evaluated data set (its name and digest, as the run's input)."""
    now = int(time.time() * 1000)
    model_id = job.train_metrics.get("mlflow_model_id")
    dataset = {"dataset_name": str(job.manifest["name"]), "dataset_digest": str(job.manifest["data_hash"])[:DIGEST_CHARS]}
    batch = [Metric(f"eval/{k}", float(v), now, 0, model_id=model_id, **dataset)
             for k, v in sorted(metrics.items()) if math.isfinite(v)]
    tags = [
        RunTag("latentforge.eval.primary_metric", f"eval/{primary}"),
        RunTag("latentforge.eval.primary_direction", direction),
        RunTag("latentforge.eval.data_hash", job.manifest["data_hash"]),
    ]
    log_data_input(client, job.run_id, job.manifest, job.data_dir, "evaluation")
    for i in range(0, max(len(batch), 1), 1000):
        client.log_batch(job.run_id, metrics=batch[i : i + 1000], tags=tags if i == 0 else [])
    client.log_artifacts(job.run_id, str(folder), artifact_path="evaluate")
