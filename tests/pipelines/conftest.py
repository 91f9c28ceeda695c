"""Shared fixtures for pipeline tests: a small prepared project and a local Ray runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from latentforge.models import MODELS
from latentforge.pipelines.common.cluster import connect_ray
from latentforge.pipelines.common.params import load_params
from latentforge.pipelines.prepare import prepare
from latentforge.pipelines.train import DATA_FIELDS

REPO = Path(__file__).resolve().parents[2]


def tiny_section(family: str) -> dict:
    cfg = MODELS[family].config_class.tiny().to_dict()
    return {k: v for k, v in cfg.items() if k not in DATA_FIELDS}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder: params with tiny models and small shapes data, prepared once per module."""
    root = tmp_path_factory.mktemp("project")
    params = load_params(REPO / "params.yaml")
    params["data"]["shapes"].update(num_images=240, image_size=16)
    params["data"]["output_dir"] = str(root / "data" / "prepared")
    params["train"].update(
        epochs=2, family_epochs=None, batch_size=16, storage_path=str(root / "ray_results"), output_dir=str(root / "artifacts"),
        log_every_steps=2, resource_timeout_s=5, cpus_per_worker=1,  # two workers fit the 2-CPU test runtimes
    )
    params["train"]["models"] = {f: tiny_section(f) for f in ("vae", "vqvae2", "gan")}
    params["mlflow"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepare(params)
    return root, params


@pytest.fixture(scope="module")
def local_ray():
    import ray

    connect_ray(num_cpus=2)  # as the commands start it (127.0.0.1 only, Ray's warnings off the console)
    yield
    ray.shutdown()


def mlflow_runs(params) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(params["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name(params["mlflow"]["experiment"])
    return client, client.search_runs([exp.experiment_id]) if exp else []


