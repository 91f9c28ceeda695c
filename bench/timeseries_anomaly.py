"""Time-series anomaly detection: the LSTM autoencoder against aeon's own detectors, same series, same
split, same metrics, one run.

For each of aeon's two bundled anomaly-detection series (KDD-TSAD 135, univariate with one labelled
anomaly; Daphnet S06R02E0, 9 channels, no labelled anomaly) it prepares the data as the timeseries
pipeline does (examples/timeseries/params.yaml, per-series splits below: contiguous parts, scaled with
the train part's statistics), then scores every point of the val and test parts with:

* ``lstm_ae``: the pipeline's model config, trained here in a plain loop (``models.train_step`` on the
  train part's windows, as Ray Train runs it) for ``--steps`` steps on each series (2,000: ~150 epochs of
  KDD's train part, ~37 of Daphnet's); per-point scores as ``evaluate`` computes them
  (runtime.series.point_scores);
* aeon: ``KMeansAD`` (fitted on the train part), ``STOMP`` (matrix profile of each part), ``LeftSTAMPi``
  (the left matrix profile, initialised on the train part) and ``DWT_MLEAD`` (wavelets); the
  univariate ones run only on the univariate series. Window length: the pipeline's ``window``.

Every method gets the same threshold rule as ``evaluate`` (the largest val score: val is normal data)
and the same figures on the test part: point-wise AUROC and AUPRC, range-based F1 at the threshold,
the share of points flagged, and its seconds. Writes ``bench/results/timeseries_anomaly.json``.

    .venv/bin/python bench/timeseries_anomaly.py            # both series, ~3.5 min on 2 busy CPUs
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import common  # noqa: E402  (puts the repository root on sys.path)

import numpy as np
import torch
import yaml

from latentforge.models import MODELS, train_step
from latentforge.pipelines.evaluate.metrics import point_detection_figures
from latentforge.pipelines.evaluate.series import choose_threshold, torch_reconstruct
from latentforge.pipelines.prepare import prepare
from latentforge.pipelines.series import load_series_part, load_windows
from latentforge.runtime.series import point_scores

PARAMS = common.REPO / "examples" / "timeseries" / "params.yaml"
SERIES = {
    # the UCR convention: the first 1,200 of 7,501 points are the anomaly-free train part
    "kdd135": {"path": "aeon:KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv", "splits": {"train": 0.12, "val": 0.04, "test": 0.84}},
    "daphnet": {"path": "aeon:Daphnet_S06R02E0/S06R02E0.csv", "splits": {"train": 0.5, "val": 0.1, "test": 0.4}},
}


def prepare_series(name: str, root: Path, window: int) -> tuple[Path, dict]:
    params = yaml.safe_load(PARAMS.read_text())
    params["data"].update(name=name, output_dir=str(root), splits=SERIES[name]["splits"])
    params["data"]["timeseries"].update(path=SERIES[name]["path"], window=window)
    return prepare(params), params


def train_lstm_ae(data_dir: Path, manifest: dict, model_section: dict, steps: int, seed: int) -> Any:
    """The pipeline's lstm_ae config on this data, trained for ``steps`` steps on the train windows in
    shuffled batches of 64."""
    torch.manual_seed(seed)
    cls = MODELS["lstm_ae"]
    model = cls(cls.config_class.from_dict({**model_section, "seq_len": manifest["window"], "features": manifest["channels"]}))
    optimizers = model.configure_optimizers()
    windows = torch.from_numpy(load_windows(data_dir, manifest, "train")["windows"].copy())
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        for batch in torch.randperm(len(windows), generator=gen).split(64):
            if step == steps:
                break
            train_step(model, optimizers, {"series": windows[batch]}, step)
            step += 1
    return model.eval()


def aeon_detectors(window: int, channels: int) -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """name -> score(train (n, F), part (m, F)) -> (m,) scores."""
    from aeon.anomaly_detection.series.distance_based import STOMP, KMeansAD, LeftSTAMPi
    from aeon.anomaly_detection.series.distribution_based import DWT_MLEAD

    def kmeans(train, part):  # axis=0: our arrays are (points, channels); aeon's default reads (channels, points)
        return KMeansAD(n_clusters=20, window_size=window, random_state=0).fit(train, axis=0).predict(part, axis=0)

    def left_stampi(train, part):
        scores = LeftSTAMPi(window_size=window, n_init_train=len(train)).fit_predict(np.concatenate([train, part])[:, 0])
        return scores[len(train):]

    detectors = {"aeon KMeansAD": kmeans}
    if channels == 1:
        detectors["aeon STOMP"] = lambda train, part: STOMP(window_size=window).fit_predict(part[:, 0])
        detectors["aeon LeftSTAMPi"] = left_stampi
        detectors["aeon DWT_MLEAD"] = lambda train, part: DWT_MLEAD(start_level=3).fit_predict(part[:, 0])
    return detectors


def figures(val_scores: np.ndarray, test_scores: np.ndarray, val_labels: np.ndarray, test_labels: np.ndarray) -> dict[str, Any]:
    threshold, _ = choose_threshold(val_scores, val_labels, 1.0)
    anomalous = test_labels == 1
    if anomalous.any():
        out = point_detection_figures(test_scores, anomalous, threshold)
    else:
        out = {"auroc": None, "auprc": None, "range_f1": None, "flagged_fraction": float((test_scores > threshold).mean())}
    return {"threshold": threshold, **{k: out[k] for k in ("auroc", "auprc", "range_f1", "flagged_fraction")}}


def bench_series(name: str, root: Path, args) -> dict[str, Any]:
    params_file = yaml.safe_load(PARAMS.read_text())
    (data_dir, manifest), _ = prepare_series(name, root, args.window)
    val, test, train = (load_series_part(data_dir, manifest, s) for s in ("val", "test", "train"))
    results: dict[str, Any] = {}

    t0 = time.time()
    model = train_lstm_ae(data_dir, manifest, params_file["train"]["models"]["lstm_ae"], args.steps, args.seed)
    with torch.no_grad():
        scores = [point_scores(p["values"], manifest["window"], torch_reconstruct(model)) for p in (val, test)]
    results["lstm_ae"] = {**figures(*scores, val["labels"], test["labels"]), "seconds": round(time.time() - t0, 1)}
    print(f"{name}: lstm_ae {results['lstm_ae']}", flush=True)

    for label, detect in aeon_detectors(manifest["window"], manifest["channels"]).items():
        t0 = time.time()
        scores = [np.asarray(detect(train["values"].astype(np.float64), p["values"].astype(np.float64)), np.float64) for p in (val, test)]
        results[label] = {**figures(*scores, val["labels"], test["labels"]), "seconds": round(time.time() - t0, 1)}
        print(f"{name}: {label} {results[label]}", flush=True)
    return {
        "points": manifest["count"], "channels": manifest["channels"], "window": manifest["window"],
        "parts": {s: v["points"] for s, v in manifest["splits"].items()},
        "test_anomalous_points": manifest["splits"]["test"]["anomalous_points"], "methods": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", default="kdd135,daphnet", help="comma-separated: kdd135, daphnet")
    parser.add_argument("--steps", type=int, default=2000, help="lstm_ae training steps (batches of 64) on each series")
    parser.add_argument("--window", type=int, default=yaml.safe_load(PARAMS.read_text())["data"]["timeseries"]["window"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    out: dict[str, Any] = {"environment": common.environment(), "steps": args.steps, "series": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.series.split(","):
            out["series"][name] = bench_series(name, Path(tmp), args)
    print()
    for name, res in out["series"].items():
        for method, f in res["methods"].items():
            auroc = "n/a" if f["auroc"] is None else f"{f['auroc']:.3f}"
            f1 = "n/a" if f["range_f1"] is None else f"{f['range_f1']:.3f}"
            print(f"{name:8s} {method:16s} AUROC {auroc:>6s}  range-F1 {f1:>6s}  flagged {f['flagged_fraction']:.4f}  {f['seconds']:6.1f}s")
    common.write_json(out, common.RESULTS / "timeseries_anomaly.json")
    return 0 if all(math.isfinite(f["threshold"]) for r in out["series"].values() for f in r["methods"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
