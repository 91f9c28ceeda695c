"""``evaluate`` on a time series (prepared data of kind ``timeseries``): per-point anomaly scores.

``latentforge evaluate --model lstm_ae`` with such data scores every point of the val and test parts
(runtime/series.py: the mean reconstruction error of the windows that cover it), chooses the threshold
on val, and writes ``<evaluate.output_dir>/<family>/``:

* ``metrics.json``: ``threshold`` and how it was chosen, on the labelled test part the point-wise
  ``auroc`` and ``auprc``, the range-based ``range_precision`` / ``range_recall`` / ``range_f1`` at the
  threshold (pipelines/evaluate/metrics.py) and ``flagged_fraction``; ``val_score_mean`` /
  ``test_score_mean``; ``info`` (points, windows, anomalies, the primary metric). A test part without
  labelled anomalies has no AUROC: those figures are null and ``info.unlabelled`` says why;
* ``scores.csv``: point, split, label, score (the DVC plot of scores against points);
* ``plots/series_scores.png``: the series with true anomalies shaded above its scores and the threshold.

The threshold: when val holds labelled anomalies, the one of best point-wise F1 on val; otherwise the
``evaluate.threshold_quantile`` quantile of the val scores (val is normal data: 1.0 is its largest
score). Metrics (``eval/<name>``) and files (under ``evaluate/``) go to the training's MLflow run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentforge.models import MODELS, PretrainedModel
from latentforge.pipelines.common.errors import EvaluationError
from latentforge.pipelines.common.files import atomic_directory
from latentforge.pipelines.common.params import ParamsError, check_keys, section
from latentforge.pipelines.common.tracking import tracking_uri
from latentforge.pipelines.evaluate.job import EvalJob, training_metrics, log_to_mlflow, open_training_run
from latentforge.pipelines.evaluate.metrics import best_f1_threshold, point_detection_figures
from latentforge.pipelines.evaluate.plots import series_scores_png
from latentforge.pipelines.prepare import read_manifest
from latentforge.pipelines.series import load_series_part
from latentforge.runtime.series import point_scores

SERIES_EVALUATE_SCHEMA: dict[str, Any] = {"threshold_quantile": float, "seed": int, "output_dir": str}
PRIMARY = ("auroc", "max")  # the registry compares time-series versions by test AUROC
SCORES_FILE = "scores.csv"


def prepared_series(params: dict[str, Any]) -> bool:
    """Whether the prepared data that ``params`` names holds time-series windows."""
    data = section(params, "data")
    return read_manifest(Path(data["output_dir"]) / data["name"]).get("kind") == "timeseries"


def resolve_series_evaluation(params: dict[str, Any], family: str) -> EvalJob:
    """Check the ``evaluate`` section, the prepared series and the trained model (its window and
    channels match the data) before any scoring."""
    settings = check_keys(section(params, "evaluate"), SERIES_EVALUATE_SCHEMA, "evaluate")
    if not 0 < settings["threshold_quantile"] <= 1:
        raise ParamsError(f"params evaluate.threshold_quantile must be in (0, 1], got {settings['threshold_quantile']}")
    data = section(params, "data")
    data_dir = Path(data["output_dir"]) / data["name"]
    manifest = read_manifest(data_dir)
    train_dir = Path(section(params, "train")["output_dir"]) / family
    model_dir = train_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise EvaluationError(f"no trained model at {model_dir}; run `latentforge train --model {family}` first")
    config = json.loads((model_dir / "config.json").read_text())["config"]
    if (config.get("seq_len"), config.get("features")) != (manifest["window"], manifest["channels"]):
        raise EvaluationError(
            f"{model_dir} takes windows of {config.get('seq_len')} points x {config.get('features')} channels, "
            f"but {data_dir} has {manifest['window']} x {manifest['channels']}; train again on this data")
    return EvalJob(
        family=family, model_dir=model_dir, train_metrics=training_metrics(family, train_dir / "metrics.json"),
        data_dir=data_dir, manifest=manifest, classifier_dir=None, settings=settings,
        out_dir=Path(settings["output_dir"]) / family, tracking_uri=tracking_uri(params),
    )


def torch_reconstruct(model) -> Callable[[np.ndarray], np.ndarray]:
    """The model's ``reconstruct_series`` as a numpy function (B, T, F) -> (B, T, F), for runtime.series."""
    def reconstruct(windows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.reconstruct_series(torch.from_numpy(windows)).numpy()
    return reconstruct


def choose_threshold(val_scores: np.ndarray, val_labels: np.ndarray, quantile: float) -> tuple[float, str]:
    """(threshold, how it was chosen) from the val part's (n,) scores and labels (1 anomaly, 0 normal, -1 unknown)."""
    if (val_labels == 1).any():
        return best_f1_threshold(val_scores, val_labels == 1), "best point-wise F1 on the labelled val part"
    return float(np.quantile(val_scores, quantile)), f"quantile {quantile:g} of the val scores (val holds no labelled anomaly)"


def score_part(model, data_dir: Path, manifest: dict[str, Any], split: str) -> dict[str, np.ndarray]:
    """One part's points (``values``, ``labels``, ``points``) and their (n,) ``scores``."""
    part = load_series_part(data_dir, manifest, split)
    if len(part["values"]) < manifest["window"]:
        raise EvaluationError(f"{data_dir}: the {split} part has {len(part['values'])} points, fewer than one window")
    return {**part, "scores": point_scores(part["values"], manifest["window"], torch_reconstruct(model))}


def series_figures(val: dict[str, np.ndarray], test: dict[str, np.ndarray], quantile: float) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, info) from the scored val and test parts (see the module doc)."""
    threshold, rule = choose_threshold(val["scores"], val["labels"], quantile)
    metrics = {"threshold": threshold, "val_score_mean": float(val["scores"].mean()), "test_score_mean": float(test["scores"].mean())}
    info: dict[str, Any] = {"threshold_rule": rule, "test_points": len(test["scores"]), "val_points": len(val["scores"]),
                            "test_anomalous_points": int((test["labels"] == 1).sum())}
    if (test["labels"] == 1).any() and (test["labels"] == 0).any():
        metrics.update(point_detection_figures(test["scores"], test["labels"] == 1, threshold))
    else:
        metrics.update({k: math.nan for k in ("auroc", "auprc", "range_precision", "range_recall", "range_f1")})
        metrics["flagged_fraction"] = float((test["scores"] > threshold).mean())
        info["unlabelled"] = "the test part has no labelled anomalous (or no normal) point: no AUROC, AUPRC or range F1"
    return metrics, info


def _scores_csv(parts: dict[str, dict[str, np.ndarray]]) -> str:
    lines = ["point,split,label,score"]
    for split, part in parts.items():
        lines += [f"{p},{split},{lab},{s:.6g}" for p, lab, s in zip(part["points"], part["labels"], part["scores"])]
    return "\n".join(lines) + "\n"


def run_series_evaluation(job: EvalJob, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Score, choose the threshold, write ``metrics.json``, ``scores.csv`` and the plot atomically, and
    log them to the training's MLflow run. Returns the metrics dict (as written)."""
    client = open_training_run(job)
    t0 = time.time()
    model = PretrainedModel.from_pretrained(job.model_dir).eval()
    if not isinstance(model, MODELS[job.family]) or not getattr(model, "is_series", False):
        raise EvaluationError(f"{job.model_dir} is not a time-series {job.family} model")
    val = score_part(model, job.data_dir, job.manifest, "val")
    test = score_part(model, job.data_dir, job.manifest, "test")
    metrics, info = series_figures(val, test, job.settings["threshold_quantile"])
    info.update({"primary_metric": PRIMARY[0], "primary_direction": PRIMARY[1], "mlflow_run_id": job.run_id,
                 "data": job.manifest["name"], "window": job.manifest["window"], "seconds": round(time.time() - t0, 2)})
    with atomic_directory(job.out_dir) as tmp:
        (tmp / "plots").mkdir()
        title = (f"{job.family} on {job.manifest['name']} (test part): AUROC {metrics['auroc']:.3f}, range F1 "
                 f"{metrics['range_f1']:.3f}" if math.isfinite(metrics["auroc"]) else f"{job.family} on {job.manifest['name']} (test part, unlabelled)")
        series_scores_png(test["points"], test["values"], test["scores"], test["labels"], metrics["threshold"], title,
                          tmp / "plots" / "series_scores.png")
        (tmp / SCORES_FILE).write_text(_scores_csv({"val": val, "test": test}))
        out = {**{k: (float(v) if math.isfinite(v) else None) for k, v in sorted(metrics.items())}, "info": info}
        (tmp / "metrics.json").write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
        log_to_mlflow(client, job, metrics, tmp, *PRIMARY)
    echo(f"[evaluate {job.family}] auroc {metrics['auroc']:.4g}, auprc {metrics['auprc']:.4g}, range_f1 "
         f"{metrics['range_f1']:.4g} at threshold {metrics['threshold']:.4g} ({info['threshold_rule']}) -> {job.out_dir}")
    return out
