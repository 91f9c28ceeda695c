"""The timeseries source and its anomaly chain on a tiny synthetic series with an injected anomaly:
prepare (splits, train-part scaling, labels, bad input), the detection metrics, per-point scoring, and
prepare -> Ray Train -> evaluate -> ONNX export -> torch-free scoring of the exported model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from latentforge.models import train_step
from latentforge.models.autoencoders import LSTMAEConfig, LSTMAutoEncoder
from latentforge.pipelines.common.errors import DataError, ParamsError
from latentforge.pipelines.common.params import load_params
from latentforge.pipelines.evaluate.metrics import best_f1_threshold, point_detection_figures, range_f1
from latentforge.pipelines.prepare import prepare
from latentforge.pipelines.series import load_series_part, load_windows
from latentforge.runtime.series import SeriesRuntime, check_series, point_scores

REPO = Path(__file__).resolve().parents[2]
WINDOW = 16
ANOMALY = slice(300, 306)  # test part: points 240..399


def synthetic_csv(path: Path, n: int = 400, channels: int = 2) -> Path:
    """A periodic series (period 20) with a level shift injected at ANOMALY, labelled there."""
    t = np.arange(n)
    values = np.stack([10 + 3 * np.sin(2 * np.pi * t / 20 + c) for c in range(channels)], axis=1)
    values[ANOMALY] += 6.0
    labels = np.zeros(n, dtype=int)
    labels[ANOMALY] = 1
    header = "timestamp," + ",".join(f"ch{c}" for c in range(channels)) + ",is_anomaly"
    rows = [f"{i}," + ",".join(f"{v:.5f}" for v in values[i]) + f",{labels[i]}" for i in range(n)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def series_params(root: Path, csv: Path, **series) -> dict:
    params = yaml.safe_load((REPO / "examples" / "timeseries" / "params.yaml").read_text())
    params["data"].update(name="synthetic", output_dir=str(root / "prepared"), splits={"train": 0.45, "val": 0.15, "test": 0.4})
    params["data"]["timeseries"].update({"path": str(csv), "window": WINDOW, "stride": 2, **series})
    return params


def test_prepare_cuts_scales_and_windows_a_series(tmp_path):
    csv = synthetic_csv(tmp_path / "s.csv")
    out, manifest = prepare(series_params(tmp_path, csv))
    assert {p.name for p in out.iterdir()} == {"train.parquet", "val.parquet", "test.parquet", "series.parquet", "manifest.json"}
    assert manifest["kind"] == "timeseries" and manifest["window_shape"] == [WINDOW, 2] and manifest["channel_names"] == ["ch0", "ch1"]
    assert {s: v["points"] for s, v in manifest["splits"].items()} == {"train": [0, 180], "val": [180, 240], "test": [240, 400]}
    assert manifest["splits"]["test"]["anomalous_points"] == 6 and manifest["splits"]["train"]["anomalous_points"] == 0
    assert manifest["splits"]["train"]["count"] == (180 - WINDOW) // 2 + 1  # stride 2, inside the part only
    # Scaled by the train part alone: its values span [0, 1]; the injected shift in test goes above 1.
    train, test = (load_series_part(out, manifest, s) for s in ("train", "test"))
    assert np.allclose(train["values"].min(0), 0) and np.allclose(train["values"].max(0), 1)
    assert test["values"][ANOMALY.start - 240].max() > 1.2 and test["labels"][ANOMALY.start - 240] == 1
    windows = load_windows(out, manifest, "test")
    assert windows["windows"].shape[1:] == (WINDOW, 2) and windows["start"][0] == 240
    assert windows["label"].max() == 1 and windows["label"].min() == 0
    # Same params, same bytes.
    again = prepare(series_params(tmp_path, csv))[1]
    assert again["data_hash"] == manifest["data_hash"]


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows.__setitem__(5, "5,nan,1.0,0"), r"column 'ch0' has NaN, missing or infinite values \(first at row 5\)"),
    (lambda rows: rows.__setitem__(7, "7,abc,1.0,0"), r"column 'ch0' is not numeric \(row 7: 'abc'\)"),
    (lambda rows: rows.__setitem__(9, "9,1.0,1.0,2"), r"column 'is_anomaly' must hold 0 \(normal\) or 1 \(anomaly\)"),
])
def test_bad_series_files_are_one_clear_error(tmp_path, edit, message):
    csv = synthetic_csv(tmp_path / "s.csv")
    rows = csv.read_text().splitlines()
    edit(rows)
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=message) as info:
        prepare(series_params(tmp_path, csv))
    assert str(csv) in str(info.value)
    assert not (tmp_path / "prepared" / "synthetic").exists()  # nothing half-written


def test_bad_series_params_are_one_clear_error(tmp_path):
    csv = synthetic_csv(tmp_path / "s.csv")
    with pytest.raises(DataError, match=r"window \(100\) is longer than the val part \(60 points\)"):
        prepare(series_params(tmp_path, csv, window=100))
    with pytest.raises(DataError, match="no column 'label'"):
        prepare(series_params(tmp_path, csv, label_column="label"))
    with pytest.raises(DataError, match="no value column"):
        prepare(series_params(tmp_path, csv, columns=["ch0", "ch9"]))
    with pytest.raises(ParamsError, match="data.timeseries: unknown key"):
        prepare(series_params(tmp_path, csv, length=3))
    # The CLI: exit 2, one line naming the file and the problem, no traceback.
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,value\n0,1.0\n1,\n")
    params = series_params(tmp_path, bad, label_column=None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = subprocess.run([sys.executable, "-m", "latentforge.pipelines.cli", "prepare", "--params", str(tmp_path / "params.yaml")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and str(bad) in run.stderr and "NaN" in run.stderr


def test_ts_files_and_aeon_bundled_series(tmp_path):
    ts = tmp_path / "s.ts"
    ts.write_text("@problemName s\n@univariate false\n@data\n" + ":".join(",".join(str(v) for v in range(c, c + 200)) for c in (0, 5)) + "\n")
    params = series_params(tmp_path, ts, columns=None, label_column=None, time_column=None)
    manifest = prepare(params)[1]
    assert manifest["channels"] == 2 and manifest["count"] == 200 and not manifest["labelled"]
    # aeon's wheel carries the real series, read offline by path.
    params = series_params(tmp_path, tmp_path, columns=None)
    params["data"]["timeseries"]["path"] = "aeon:KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv"
    manifest = prepare(params)[1]
    assert manifest["count"] == 7501 and manifest["channels"] == 1 and manifest["labelled"]
    assert sum(s["anomalous_points"] for s in manifest["splits"].values()) == 12


def test_detection_metrics():
    labels = np.array([0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0])
    flags = np.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    # true ranges [2, 6) half flagged and [9, 10) missed: recall (0.5 + 0) / 2; predicted [3, 5) all true, [7, 9) none.
    assert range_f1(labels, flags) == pytest.approx((0.5, 0.25, 1 / 3))
    assert range_f1(labels, np.zeros(12)) == (0.0, 0.0, 0.0)
    scores = np.where(labels == 1, 2.0, 1.0) + np.linspace(0, 0.1, 12)
    figures = point_detection_figures(scores, labels, threshold=1.5)
    assert figures["auroc"] == 1.0 and figures["auprc"] == pytest.approx(1.0) and figures["range_f1"] == 1.0
    assert (scores > best_f1_threshold(scores, labels)).tolist() == labels.astype(bool).tolist()


def test_point_scores_average_the_windows_covering_each_point():
    values = np.arange(10, dtype=np.float32).reshape(10, 1)
    # A "model" that reconstructs zeros: every window sees error x^2 at each point, so each score is x^2.
    assert np.allclose(point_scores(values, 4, np.zeros_like), values[:, 0] ** 2)
    assert np.allclose(point_scores(values, 4, lambda x: x), 0)
    with pytest.raises(ValueError, match="expected 2 channel"):
        check_series(np.zeros((10, 3)), 2, 4)
    with pytest.raises(ValueError, match="NaN or infinite value at point 3"):
        check_series([0, 1, 2, float("nan"), 4], 1, 2)
    with pytest.raises(ValueError, match="fewer than one window"):
        check_series([0, 1, 2], 1, 4)
    with pytest.raises(ValueError, match="must be numbers"):
        check_series([[0, "a"]], 2, 1)


def test_trained_tiny_model_scores_the_injected_anomaly_above_the_rest(tmp_path):
    out, manifest = prepare(series_params(tmp_path, synthetic_csv(tmp_path / "s.csv", channels=1)))
    torch.manual_seed(0)
    model = LSTMAutoEncoder(LSTMAEConfig.tiny(seq_len=WINDOW, features=1, hidden_dim=32, loss="mse", lr=1e-2))
    optimizers = model.configure_optimizers()
    windows = torch.from_numpy(load_windows(out, manifest, "train")["windows"].copy())
    for step in range(150):
        train_step(model, optimizers, {"series": windows}, step)
    model.eval()
    test = load_series_part(out, manifest, "test")
    with torch.no_grad():
        scores = point_scores(test["values"], WINDOW, lambda x: model.reconstruct_series(torch.from_numpy(x)).numpy())
    anomalous = test["labels"] == 1
    assert scores[anomalous].max() > scores[~anomalous].max(), (scores[anomalous].max(), scores[~anomalous].max())
    assert point_detection_figures(scores, anomalous, 0.0)["auroc"] > 0.95


def test_pipeline_trains_evaluates_exports_and_scores(tmp_path, local_ray):
    """prepare -> latentforge train (Ray Train, MLflow) -> evaluate -> export (parity) -> SeriesRuntime."""
    from latentforge.pipelines.evaluate.series import resolve_series_evaluation, run_series_evaluation
    from latentforge.pipelines.export import export_from_params
    from latentforge.pipelines.train import resolve_job, run_training

    csv = synthetic_csv(tmp_path / "s.csv", channels=1)
    params = series_params(tmp_path, csv)
    params["train"].update(epochs=2, storage_path=str(tmp_path / "ray"), output_dir=str(tmp_path / "train"), cpus_per_worker=1,
                           resource_timeout_s=5)
    params["train"]["models"]["lstm_ae"] = {"hidden_dim": 16, "latent_dim": 4, "loss": "mse", "lr": 0.01}
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params["evaluate"]["output_dir"] = str(tmp_path / "evaluate")
    prepare(params)
    summary = run_training(resolve_job(params, "lstm_ae"), echo=lambda _: None)
    assert json.loads((Path(summary["model_dir"]) / "config.json").read_text())["config"]["seq_len"] == WINDOW

    out = run_series_evaluation(resolve_series_evaluation(params, "lstm_ae"), echo=lambda _: None)
    evaluated = tmp_path / "evaluate" / "lstm_ae"
    assert (evaluated / "plots" / "series_scores.png").stat().st_size > 0
    assert (evaluated / "scores.csv").read_text().count("\n") == 1 + 60 + 160
    assert 0 <= out["auroc"] <= 1 and out["threshold"] > 0 and out["info"]["test_anomalous_points"] == 6

    export_dir, manifest = export_from_params(params, "lstm_ae", out=tmp_path / "export",
                                              metrics_path=evaluated / "metrics.json")
    assert manifest["kind"] == "timeseries" and manifest["threshold"] == out["threshold"]
    assert manifest["parity"]["reconstruct"] <= manifest["parity_atol"]
    runtime = SeriesRuntime.from_export(export_dir)
    raw = np.loadtxt(csv, delimiter=",", skiprows=1, usecols=1)
    result = runtime.score(raw)
    assert result["scores"].shape == (400,) and result["flags"].dtype == bool
    # The exported graph scores the test part as evaluate did (raw points scaled with the train statistics).
    test = load_series_part(prepare(params)[0], manifest_of(params), "test")
    assert np.allclose(runtime.score(raw[240:])["scores"], point_scores(test["values"], WINDOW, runtime.reconstruct), atol=1e-5)
    with pytest.raises(ValueError, match="expected 1 channel"):
        runtime.score(np.zeros((40, 2)))


def manifest_of(params: dict) -> dict:
    return json.loads((Path(params["data"]["output_dir"]) / params["data"]["name"] / "manifest.json").read_text())
