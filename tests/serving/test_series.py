"""anomaly-score on a time-series model: a tiny lstm_ae on a synthetic series, exported, registered in a
real sqlite MLflow registry and served by ``latentforge serve`` (real Ray Serve, real HTTP)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import yaml

from latentforge.runtime.series import SeriesRuntime
from tests.pipelines.test_series import WINDOW, series_params, synthetic_csv
from tests.serving.conftest import REPO, free_port, running_serve

NAME = "lstm_ae-synthetic"


@pytest.fixture(scope="module")
def series_server(tmp_path_factory):
    """``(url, export_dir, raw (400, 2) points)``: the model served as ``champion`` of NAME."""
    import torch

    from latentforge.models import train_step
    from latentforge.models.autoencoders import LSTMAEConfig, LSTMAutoEncoder
    from latentforge.pipelines.export import export_model
    from latentforge.pipelines.prepare import prepare
    from latentforge.pipelines.registry import promote, register
    from latentforge.pipelines.series import load_windows

    root = tmp_path_factory.mktemp("series-serving")
    csv = synthetic_csv(root / "s.csv")
    prepared, manifest = prepare(series_params(root, csv))
    torch.manual_seed(0)
    model = LSTMAutoEncoder(LSTMAEConfig.tiny(seq_len=WINDOW, features=2, loss="mse"))
    optimizers = model.configure_optimizers()
    windows = torch.from_numpy(load_windows(prepared, manifest, "train")["windows"].copy())
    for step in range(3):
        train_step(model, optimizers, {"series": windows}, step)
    export_dir = root / "export"
    export_model(model.save_pretrained(root / "model"), prepared, export_dir, metrics={"threshold": 0.05, "auroc": 0.5})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    version = register(export_dir, uri, name=NAME, data_dir=prepared)
    assert version.tags["family"] == "lstm_ae"
    promote(NAME, uri, version=1)

    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    app = config["applications"][0]
    app["args"].update(tracking_uri=uri, models=[{"name": NAME}], poll_interval_s=0.5,
                       limits={"max_n": 8, "max_images": 16, "max_steps": 8, "max_body_bytes": 256 * 1024, "max_points": 1000})
    app["deployments"] = [d for d in app["deployments"] if d["name"] == "ingress"]
    app["deployments"].append({"name": NAME})
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment.update(num_replicas=1, ray_actor_options={"num_cpus": 0})
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    raw = np.loadtxt(csv, delimiter=",", skiprows=1, usecols=(1, 2))
    with running_serve(["--config", str(root / "config.yaml"), "--port", str(port), "--num-cpus", "2"], port, root / "serve.log") as url:
        yield url, export_dir, raw


def test_series_anomaly_score_per_point_and_per_window(series_server):
    url, export_dir, raw = series_server
    described = requests.get(f"{url}/v1/models", timeout=30).json()["models"]
    assert described[0]["name"] == NAME and described[0]["capabilities"] == ["anomaly-score"]
    assert described[0]["anomaly_threshold"] == 0.05

    r = requests.post(f"{url}/v1/models/{NAME}/anomaly-score", json={"series": raw.tolist()}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "1" and body["threshold"] == 0.05 and len(body["scores"]) == len(raw)
    assert body["anomalous"] == [s > 0.05 for s in body["scores"]]
    # The served scores are the torch-free runtime's on the same export.
    local = SeriesRuntime.from_export(export_dir).score(raw)
    assert np.allclose(body["scores"], local["scores"], rtol=1e-5, atol=1e-7)

    windows = np.stack([raw[i : i + WINDOW] for i in (0, 100, 300)])
    r = requests.post(f"{url}/v1/models/{NAME}/anomaly-score", json={"windows": windows.tolist()}, timeout=60)
    assert r.status_code == 200, r.text
    assert np.allclose(r.json()["scores"], SeriesRuntime.from_export(export_dir).window_scores(windows), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("payload, status, field, reason", [
    ({"series": [[1.0, float("nan")]] * 40}, 422, "series", "NaN"),
    ({"series": [[1.0, "x"]] * 40}, 422, "series", "must be numbers"),
    ({"series": [[1.0, 2.0, 3.0]] * 40}, 422, "series", "expected 2 channel"),
    ({"series": [[1.0, 2.0]] * 5}, 422, "series", "fewer than one window"),
    ({"series": [[1.0, 2.0]] * 1001}, 413, "series", "limit is 1000"),
    ({"windows": [[[1.0, 2.0]] * 3]}, 422, "windows", f"(B, {WINDOW}, 2)"),
    ({"series": [[1.0, 2.0]] * 40, "windows": [[[1.0, 2.0]] * WINDOW]}, 422, "images", "exactly one"),
    ({"images": ["iVBORw0KGgo="]}, 422, "series", "give series"),
])
def test_bad_series_requests_are_a_4xx_naming_the_field(series_server, payload, status, field, reason):
    url = series_server[0]
    # json.dumps writes NaN as the bare token NaN, which the app's parser reads back as a float
    r = requests.post(f"{url}/v1/models/{NAME}/anomaly-score", data=json.dumps(payload),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field and reason in error["reason"], error
