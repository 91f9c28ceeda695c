"""Fixtures for the serving tests: a tiny pipeline run into a real MLflow registry, and the app.

``registry`` (once for tests/serving): tiny VAE (two versions), VQ-VAE-2 and GAN models after two
training steps on small ``shapes`` data (the VAEs with a Gaussian-mixture latent sampler fitted to
their training latents, as the train stage does), exported with the real exporter and registered in
a sqlite MLflow store; version 1 of each is ``champion``. ``server``: ``latentforge serve`` started as a
subprocess on a free 127.0.0.1 port (real Ray, real Serve, real HTTP), stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.pipelines.conftest import REPO, tiny_section

MODELS = {"vae": "vae-shapes", "vqvae2": "vqvae2-shapes", "gan": "gan-shapes"}
POLL_S = 0.5  # the replicas' registry poll interval in the tests (config.yaml says 10 s)


def _tiny_model(family: str, prepared: Path, out: Path, seed: int) -> Path:
    """A tiny ``family`` model after two training steps on the prepared data (``save_pretrained`` dir); a
    VAE carries a 3-component latent sampler (sampler "gmm")."""
    import torch

    from latentforge.models import MODELS as FAMILIES
    from latentforge.models import train_step
    from latentforge.models.samplers import GaussianMixtureConfig, fit_latent_sampler
    from latentforge.pipelines.imaging import batch_to_tensor
    from latentforge.pipelines.prepare import load_split

    h, w, c = json.loads((prepared / "manifest.json").read_text())["image_shape"]
    cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(cls.config_class.from_dict({**tiny_section(family), "image_size": h, "channels": c}))
    optimizers = model.configure_optimizers()
    images = batch_to_tensor(load_split(prepared, "train")["images"][:16])
    batch = {"image": images, "label": torch.zeros(16, dtype=torch.int64), "index": torch.arange(16)}
    for step in range(2):
        train_step(model, optimizers, batch, step)
    if family == "vae":
        model.latent_sampler = fit_latent_sampler(model, images, GaussianMixtureConfig(components=3, restarts=1, seed=seed))
    return model.save_pretrained(out / f"{family}-{seed}" / "model")


def _samples_grid(model_dir: Path, path: Path) -> Path:
    """``samples.png`` of the model in ``model_dir``: 16 samples drawn and gridded as ``evaluate`` does."""
    import torch

    from latentforge.models import PretrainedModel
    from latentforge.pipelines.evaluate.inference import sample
    from latentforge.pipelines.evaluate.plots import grid_png
    from latentforge.pipelines.imaging import tensor_to_uint8

    model = PretrainedModel.from_pretrained(model_dir).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_png(tensor_to_uint8(sample(model, 16, torch.Generator().manual_seed(4))), path)
    return path


@pytest.fixture(scope="package")
def registry(tmp_path_factory):
    """``{"uri", "root", "prepared", "exports": {label: dir}}``: a registry with vae-shapes (versions
    1 and 2), vqvae2-shapes and gan-shapes (version 1), version 1 of each the champion; vae-shapes
    version 1 carries the grid of its samples (``sample_grids``: ``samples.png``)."""
    from latentforge.pipelines.export import export_model
    from latentforge.pipelines.common.params import load_params
    from latentforge.pipelines.prepare import prepare
    from latentforge.pipelines.registry import promote, register

    root = tmp_path_factory.mktemp("serving")
    params = load_params(REPO / "params.yaml")
    params["data"]["shapes"].update(num_images=120, image_size=16)
    params["data"]["output_dir"] = str(root / "prepared")
    prepare(params)
    prepared = root / "prepared" / params["data"]["name"]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params["mlflow"]["tracking_uri"] = uri
    params["train"]["families"] = list(MODELS)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    exports = {}
    for label, family, seed, metrics in (
        ("vae-1", "vae", 0, {"recon_mse": 0.05, "anomaly_threshold": 0.03}),
        ("vae-2", "vae", 1, {"recon_mse": 0.04, "anomaly_threshold": 0.02}),
        ("vqvae2-1", "vqvae2", 0, {"recon_mse": 0.05}),
        ("gan-1", "gan", 0, {}),
    ):
        model_dir = _tiny_model(family, prepared, root / "models", seed)
        exports[label] = root / "exports" / label
        grids = [_samples_grid(model_dir, root / "plots" / label / "samples.png")] if label == "vae-1" else []
        export_model(model_dir, prepared, exports[label], metrics=metrics, sample_grids=grids)
        version = register(exports[label], uri, name=MODELS[family], data_dir=prepared)
        if int(version.version) == 1:
            promote(MODELS[family], uri, version=1)
    return {"uri": uri, "root": root, "prepared": prepared, "exports": exports, "params": root / "params.yaml"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(registry: dict, **overrides) -> dict:
    """serving/config.yaml with the tests' store, models, small limits and queue bounds."""
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    app = config["applications"][0]
    app["args"].update(tracking_uri=registry["uri"], models=[{"name": n} for n in MODELS.values()],
                       poll_interval_s=POLL_S, limits={"max_n": 64, "max_images": 16, "max_steps": 16,
                                                        "max_body_bytes": 256 * 1024}, **overrides)
    for deployment in app["deployments"]:
        # One replica each on the 2-CPU test runtime. vqvae2-shapes admits 4 + 4 requests, so that a
        # burst of 64 overloads it; the others keep config.yaml's bounds (8 client threads fit).
        deployment.pop("autoscaling_config", None)
        deployment.update(num_replicas=1, ray_actor_options={"num_cpus": 0})
        if deployment["name"] == MODELS["vqvae2"]:
            deployment.update(max_ongoing_requests=4, max_queued_requests=4)
    return config


@pytest.fixture(scope="package")
def server(registry):
    """The app on ``http://127.0.0.1:<port>`` via ``latentforge serve`` in a subprocess: yields the base URL.

    The command is the end of ``make demo`` (``--params-store --demo``: the store and families of the
    test params, every endpoint called once up, images under ``<root>/demo``, its report in
    ``<root>/serve.log``) with the tests' config (limits, queue bounds, poll interval).
    """
    tmp = registry["root"]
    port = free_port()
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(serve_config(registry)))
    with running_serve(["--config", str(config_path), "--port", str(port), "--num-cpus", "2",
                        "--params", str(registry["params"]), "--params-store", "--demo", str(tmp / "demo")],
                       port, tmp / "serve.log") as url:
        yield url


@contextlib.contextmanager
def running_serve(args: list[str], port: int, log_path: Path):
    """``latentforge serve <args>`` in a subprocess (its output in ``log_path``) until it answers
    ``/readyz``; yields the base URL and stops it with Ctrl-C (SIGINT; SIGKILL after 60 s)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "latentforge.pipelines.cli", "serve", *args],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 240
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"latentforge serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the app was not ready in 240 s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
            yield url
        finally:
            proc.send_signal(signal.SIGINT)  # `latentforge serve` shuts Serve and its Ray runtime down
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
