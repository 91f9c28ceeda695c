"""The training job: one generic Ray Train loop for every model family, tracked in MLflow.

``latentforge train --model vae`` resolves a :class:`TrainJob` from ``params.yaml`` (the ``train`` and
``mlflow`` sections, the family's section ``train.models.<family>``, ``--set`` overrides and the
prepared data's manifest), then :func:`run_training` runs it on a Ray Train ``TorchTrainer``:

* data: the prepared Parquet splits through Ray Data (``datasets=`` + ``get_dataset_shard``);
* model: DDP through ``prepare_model``; bf16 autocast on GPU; per-rank seeds;
* every epoch a validation pass, every ``checkpoint_every`` epochs a checkpoint: the model's
  ``save_pretrained`` directory plus the optimiser state, scored by the family's validation metric;
* MLflow (rank 0 only): params, per-step and per-epoch metrics, sample/reconstruction grids, system
  metrics; the driver creates the run so that a resumed run (same run name) logs into the same one;
* after training, the driver fits the ex-post latent sampler of ``train.sampler`` (models/samplers.py)
  to the encoded training images (GLO: to its learned codes) of every family with a flat latent, and
  writes it into the model directory's ``sampler/`` folder (:func:`fit_sampler`).

Running the same run name again resumes from its latest checkpoint (Ray Train restores the run from
``<storage_path>/<run name>``), and the MLflow run is found again by its ``latentforge.run_name`` tag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml

from latentforge.models import MODELS, ConfigError, PretrainedModel, train_step
from latentforge.models.samplers import GaussianMixtureConfig, GaussianMixtureSampler, encode_latents
from latentforge.pipelines.common.cluster import (
    cluster_resources, connect_ray, quiet_worker_logging, request_resources, train_logging_config,
)
from latentforge.pipelines.common.errors import DataError, TrainingError
from latentforge.pipelines.common.files import atomic_directory
from latentforge.pipelines.common.params import ParamsError, apply_overrides, check_keys, section
from latentforge.pipelines.common.progress import progress
from latentforge.pipelines.common.tracking import experiment_id, git_commit, log_data_input, mlflow_client, tracking_uri
from latentforge.pipelines.imaging import batch_to_tensor, tensor_to_uint8
from latentforge.pipelines.prepare import load_split, read_manifest
from latentforge.runtime.grid import make_grid
from latentforge.runtime.store import absolute_uri

# Ray and MLflow are imported where they are used: the training workers must never import MLflow
# (see _MlflowSink), and reading this module's settings (TRAIN_SCHEMA, DATA_FIELDS) needs no Ray runtime.

TRAIN_SCHEMA: dict[str, Any] = {
    "epochs": int,
    "family_epochs": (dict, type(None)),
    "lr_schedule": str,
    "batch_size": int,
    "num_workers": int,
    "use_gpu": bool,
    "bf16": bool,
    "cpus_per_worker": (int, float),
    "checkpoint_every": int,
    "keep_checkpoints": int,
    "max_failures": int,
    "storage_path": str,
    "output_dir": str,
    "log_every_steps": int,
    "images_every": int,
    "resource_timeout_s": (int, float),
    "seed": int,
    "families": list,
    "models": dict,
    "sampler": (dict, type(None)),
}
# train settings that are no `--set` key: sections of their own, or per-family (dotted keys set them).
NOT_SET_KEYS = ("models", "families", "family_epochs", "sampler")
LR_SCHEDULES = ("constant", "cosine")
MLFLOW_SCHEMA: dict[str, Any] = {"tracking_uri": str, "experiment": str}
# Model config fields that come from the prepared data, not from params (time series: seq_len, features).
DATA_FIELDS = ("image_size", "channels", "num_samples", "seq_len", "features")
# train.sampler: the kinds of ex-post latent sampler, and its keys besides the GaussianMixtureConfig fields.
SAMPLER_KINDS = ("gmm",)
SAMPLER_MAX_IMAGES = 10_000  # default of train.sampler.max_images: training images encoded for the fit
LATENTS_PER_COMPONENT = 10  # the fewest latents per mixture component the fit accepts (fit_sampler)


@dataclass
class TrainJob:
    """Everything a training run needs, resolved and checked before Ray starts."""

    family: str
    model_config: dict[str, Any]
    train: dict[str, Any]
    data_dir: str
    manifest: dict[str, Any]
    run_name: str
    tracking_uri: str
    experiment: str

    @property
    def storage_path(self) -> str:
        return absolute_uri(self.train["storage_path"])

    @property
    def output_dir(self) -> Path:
        return Path(self.train["output_dir"]) / self.family


# ----------------------------------------------------------------------------------------------------
# Resolving the job from params


def resolve_job(
    params: dict[str, Any],
    family: str,
    overrides: list[str] | None = None,
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    run_name: str | None = None,
) -> TrainJob:
    """Check everything a user can get wrong (family, ``--set`` keys and types, data) before Ray starts.

    ``overrides``: ``key=value``; a dotted key sets that param (``train.epochs=3``), a bare key sets the
    family's config field (``beta=4``) or else a ``train`` setting (``epochs=3``).
    """
    if family not in MODELS:
        raise ConfigError(f"unknown model family {family!r}; choose one of: {', '.join(sorted(MODELS))}")
    cls = MODELS[family]
    overrides = overrides or []
    params = apply_overrides(params, [o for o in overrides if "." in o.partition("=")[0]])
    train_params = section(params, "train")
    model_section = dict((train_params.get("models") or {}).get(family) or {})
    train_extra = _bare_overrides(overrides, cls.config_class, model_section)
    train = _train_settings(train_params, train_extra, family, num_workers, use_gpu)

    data = section(params, "data")
    data_dir = Path(data["output_dir"]) / data["name"]
    manifest = read_manifest(data_dir)
    model_config = _model_config(cls.config_class, model_section, manifest, data["name"], data_dir)

    if run_name is None:
        run_name = f"{family}-{data['name']}-{config_digest(model_config, train, manifest['data_hash'])}"
    mlflow_params = check_keys(section(params, "mlflow"), MLFLOW_SCHEMA, "mlflow")
    return TrainJob(
        family=family,
        model_config=model_config,
        train=train,
        data_dir=str(data_dir.resolve()),
        manifest=manifest,
        run_name=run_name,
        tracking_uri=tracking_uri(params),
        experiment=mlflow_params["experiment"],
    )


def _bare_overrides(overrides: list[str], config_class, model_section: dict[str, Any]) -> dict[str, Any]:
    """Apply the bare ``key=value`` overrides: a config field goes into ``model_section`` (in place), a
    ``train`` setting into the returned dict; anything else is a ParamsError naming both lists."""
    config_fields = {f.name for f in dataclasses.fields(config_class)}
    train_extra: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if "." in key:
            continue
        if not sep or not key:
            raise ParamsError(f"--set {item!r}: expected key=value")
        value = yaml.safe_load(raw) if raw else ""
        if key in config_fields:
            model_section[key] = value
        elif key in TRAIN_SCHEMA and key not in NOT_SET_KEYS:
            train_extra[key] = value
        else:
            raise ParamsError(
                f"--set {key}: not a field of {config_class.__name__} ({', '.join(sorted(config_fields))}) "
                f"nor a train setting ({', '.join(k for k in TRAIN_SCHEMA if k not in NOT_SET_KEYS)})"
            )
    return train_extra


def _train_settings(
    train_params: dict[str, Any], train_extra: dict[str, Any], family: str, num_workers: int | None, use_gpu: bool | None
) -> dict[str, Any]:
    """The checked ``train`` section with the bare overrides, the family's epochs and the CLI flags applied."""
    train = check_keys({**train_params, **train_extra}, TRAIN_SCHEMA, "train")
    # A family that needs more (or fewer) epochs than train.epochs; an explicit --set epochs=N wins.
    family_epochs = train.pop("family_epochs") or {}  # check_keys: a dict or null
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in family_epochs.values()):
        raise ParamsError(f"params train.family_epochs must map family names to epochs > 0, got {family_epochs!r}")
    unknown = sorted(set(family_epochs) - set(MODELS))
    if unknown:
        raise ParamsError(f"params train.family_epochs names unknown model families: {', '.join(unknown)}")
    if family in family_epochs and "epochs" not in train_extra:
        train["epochs"] = family_epochs[family]
    if num_workers is not None:
        train["num_workers"] = num_workers
    if use_gpu is not None:
        train["use_gpu"] = use_gpu
    train["sampler"] = sampler_settings(train["sampler"])
    if train["lr_schedule"] not in LR_SCHEDULES:
        raise ParamsError(f"params train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {train['lr_schedule']!r}")
    for key in ("epochs", "batch_size", "num_workers", "checkpoint_every", "keep_checkpoints", "log_every_steps", "images_every"):
        if train[key] <= 0:
            raise ParamsError(f"params train.{key} must be > 0, got {train[key]}")
    return train


def sampler_settings(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checked ``train.sampler`` section with its defaults filled in, or None (no sampler).

    ``kind``: one of :data:`SAMPLER_KINDS`; ``max_images``: at most this many training images (a seeded
    subset) are encoded for the fit; every other key is a :class:`models.samplers.GaussianMixtureConfig`
    field (``components``, ``covariance``, ``restarts`` ...). A bad key or value is a ParamsError naming it.
    """
    if value is None:
        return None
    values = dict(value)
    known = {"kind", "max_images", *GaussianMixtureConfig.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParamsError(f"params train.sampler: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kind = values.pop("kind", None)
    if kind not in SAMPLER_KINDS:
        raise ParamsError(f"params train.sampler.kind must be one of {', '.join(SAMPLER_KINDS)} (or train.sampler: null "
                          f"for none), got {kind!r}")
    max_images = values.pop("max_images", SAMPLER_MAX_IMAGES)
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ParamsError(f"params train.sampler.max_images must be an int >= 1, got {max_images!r}")
    try:
        config = GaussianMixtureConfig.from_dict(values)
    except ConfigError as exc:
        # "GaussianMixtureConfig.components must be >= 1" -> "params train.sampler.components must be >= 1"
        raise ParamsError(f"params {str(exc).replace('GaussianMixtureConfig.', 'train.sampler.')}") from None
    return {"kind": kind, "max_images": max_images, **config.to_dict()}


def _model_config(
    config_class, model_section: dict[str, Any], manifest: dict[str, Any], data_name: str, data_dir: Path
) -> dict[str, Any]:
    """The family's config (validated by ``from_dict``) with the fields that come from the data
    (:data:`DATA_FIELDS`) filled in; a params value that contradicts the data is a ConfigError."""
    config_fields = {f.name for f in dataclasses.fields(config_class)}
    if is_series(manifest):
        if "seq_len" not in config_fields:
            raise ConfigError(f"{config_class.__name__} reads images, but {data_name} is a time series "
                              f"(kind: timeseries); train lstm_ae on it")
        height = width = None
        derived = {"seq_len": manifest["window"], "features": manifest["channels"]}
    else:
        height, width, channels = manifest["image_shape"]
        derived = {"image_size": height, "channels": channels, "num_samples": manifest["splits"]["train"]["count"]}
    for key, value in derived.items():
        if key not in config_fields:
            continue
        if key in model_section and model_section[key] != value and key != "num_samples":
            raise ConfigError(
                f"{config_class.__name__}.{key}={model_section[key]} does not match the data "
                f"{data_name} ({key}={value})"
            )
        model_section[key] = value
    if height != width:
        raise DataError(f"{data_dir}: images are {height}x{width}; the models need square images")
    return config_class.from_dict(model_section).to_dict()  # validates types and values


# Settings that change what is trained; the others (epochs, workers, logging ...) do not, so changing
# them keeps the run name, and running again resumes the same run (more epochs continue it).
DIGEST_TRAIN_KEYS = ("batch_size", "bf16", "seed")


def config_digest(model_config: dict[str, Any], train: dict[str, Any], data_hash: str) -> str:
    """8 hex digits naming what a run trains: the model config, the training settings that change
    the result, and the data. The default run name ends with it."""
    key = {"model": model_config, "train": {k: train[k] for k in DIGEST_TRAIN_KEYS}, "data": data_hash}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def start_or_resume_run(client, job: TrainJob, cluster: dict[str, Any]) -> tuple[str, bool]:
    """The MLflow run of ``job.run_name``: found again by tag (resume) or created with params and tags."""
    from mlflow.entities import Param

    exp_id = experiment_id(client, job.experiment, job.tracking_uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`latentforge.run_name` = '{job.run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    tags = {
        "mlflow.runName": job.run_name,
        "latentforge.run_name": job.run_name,
        "latentforge.family": job.family,
        "latentforge.data_name": job.manifest["name"],
        "latentforge.data_hash": job.manifest["data_hash"],
        "mlflow.source.git.commit": git_commit(),
        "ray.num_nodes": str(cluster["nodes"]),
        "ray.num_cpus": str(cluster["CPU"]),
        "ray.num_gpus": str(cluster["GPU"]),
    }
    run = client.create_run(exp_id, run_name=job.run_name, tags=tags)
    flat = {f"model.{k}": v for k, v in job.model_config.items()}
    flat.update({f"train.{k}": v for k, v in job.train.items() if k not in ("models", "families")})
    flat.update({"family": job.family, "data.name": job.manifest["name"], "data.count": job.manifest["count"]})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
    log_data_input(client, run.info.run_id, job.manifest, job.data_dir, "training")
    return run.info.run_id, False


def wait_for_resources(job: TrainJob, timeout_s: float) -> dict[str, Any]:
    """Fail fast where Ray would wait forever: the job needs more CPUs/GPUs than the cluster has.

    An autoscaling cluster may grow, so this waits up to ``timeout_s`` before giving up.
    """
    need_cpu = job.train["num_workers"] * job.train["cpus_per_worker"]
    need_gpu = job.train["num_workers"] if job.train["use_gpu"] else 0
    deadline = time.monotonic() + timeout_s
    requested = False
    while True:
        have = cluster_resources()
        if have["CPU"] >= need_cpu and have["GPU"] >= need_gpu:
            return have
        if not requested:
            # Ask an autoscaling cluster for the nodes (a GPU worker group may start at zero pods);
            # run_training clears the request once the job is over.
            bundle = {"CPU": job.train["cpus_per_worker"], **({"GPU": 1} if need_gpu else {})}
            request_resources([bundle] * job.train["num_workers"])
            requested = True
        if time.monotonic() >= deadline:
            request_resources([])
            raise TrainingError(
                f"the job needs {job.train['num_workers']} workers x {job.train['cpus_per_worker']} CPU"
                + (f" + 1 GPU each" if need_gpu else "")
                + f" = {need_cpu:g} CPU / {need_gpu} GPU, but the Ray cluster has {have['CPU']:g} CPU / "
                f"{have['GPU']:g} GPU (waited {timeout_s:g}s); lower --num-workers or add nodes"
            )
        time.sleep(1.0)


def run_training(job: TrainJob, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``job`` on Ray Train; return the summary (run id, checkpoint path, metrics, output dir)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    client = mlflow_client(job.tracking_uri, TrainingError)
    connect_ray()
    cluster = wait_for_resources(job, job.train["resource_timeout_s"])
    run_id, resumed = start_or_resume_run(client, job, cluster)
    echo(f"{'resuming' if resumed else 'starting'} {job.run_name}: {job.family} on {job.manifest['name']}, "
         f"{job.train['num_workers']} worker(s), {'GPU' if job.train['use_gpu'] else 'CPU'}; MLflow run {run_id}")

    val_metric = MODELS[job.family].val_metric
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one progress line per epoch is ours; Ray Data's bars drown it
    ctx.print_on_execution_start = False
    datasets = {
        # Materialised up front: with every CPU given to training workers, lazy read tasks could starve.
        split: ray.data.read_parquet(str(Path(job.data_dir) / f"{split}.parquet")).materialize()
        for split in ("train", "val")
    }
    loop_config = {
        "family": job.family,
        "model_config": job.model_config,
        "train": {k: v for k, v in job.train.items() if k not in ("models", "families")},
        "image_shape": sample_shape(job.manifest),
        "series": is_series(job.manifest),
        "train_count": job.manifest["splits"]["train"]["count"],
        "tracking_uri": job.tracking_uri,
        "run_id": run_id,
        "val_metric": val_metric,
        "system_metrics": system_metrics_enabled(),
    }
    scaling = ray.train.ScalingConfig(
        num_workers=job.train["num_workers"],
        use_gpu=job.train["use_gpu"],
        resources_per_worker={"CPU": job.train["cpus_per_worker"], **({"GPU": 1} if job.train["use_gpu"] else {})},
    )
    run_config = ray.train.RunConfig(
        name=job.run_name,
        storage_path=job.storage_path,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=job.train["keep_checkpoints"],
            checkpoint_score_attribute="val_score",
            checkpoint_score_order="min",
        ),
        failure_config=ray.train.FailureConfig(max_failures=job.train["max_failures"]),
        logging_config=train_logging_config(),
    )
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
        run_config=run_config, datasets=datasets,
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception as exc:
        client.set_terminated(run_id, status="FAILED")
        raise TrainingError(f"training {job.run_name} failed: {root_cause(exc)}") from exc
    finally:
        request_resources([])
    if result.error is not None:
        client.set_terminated(run_id, status="FAILED")
        raise TrainingError(f"training {job.run_name} failed: {root_cause(result.error)}")
    best = result.get_best_checkpoint(metric="val_score", mode="min") or result.checkpoint
    if best is None:
        raise TrainingError(f"training {job.run_name} reported no checkpoint")
    model_id = start_trained_model(client, job, run_id)
    try:
        history = epoch_history(client, run_id)
        summary = _write_outputs(job, best, result.metrics, run_id, time.time() - t0, echo, history, model_id)
    except Exception as exc:
        client.finalize_logged_model(model_id, "FAILED")
        client.set_terminated(run_id, status="FAILED")
        raise TrainingError(f"writing the outputs of {job.run_name} failed: {type(exc).__name__}: {exc}") from exc
    client.log_artifacts(run_id, str(job.output_dir / "model"), artifact_path="model")
    client.log_artifact(run_id, str(job.output_dir / "metrics.json"))
    finish_trained_model(client, run_id, model_id, summary)
    client.set_terminated(run_id, status="FINISHED")
    echo(f"done {job.run_name}: best checkpoint {summary['checkpoint']} ({val_metric} {summary['val_score']:.5g}); "
         f"model -> {summary['model_dir']}; MLflow run {run_id}")
    return summary


TRAINED_MODEL_TYPE = "latentforge-checkpoint"  # the LoggedModel type of a trained (not yet exported) model


def start_trained_model(client, job: TrainJob, run_id: str) -> str:
    """A PENDING MLflow LoggedModel for the checkpoint this run is about to write; returns its model id.

    It holds no files of its own: the checkpoint is the run's ``model/`` artifact already, which the
    ``latentforge.checkpoint`` tag names. Every finished training (a resumed run too) gets a new one,
    since each writes a new checkpoint; ``metrics.json`` names it (``mlflow_model_id``), so that
    ``evaluate`` links its metrics to it.
    """
    experiment = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(
        experiment, name=job.family, source_run_id=run_id, model_type=TRAINED_MODEL_TYPE,
        tags={"latentforge.checkpoint": f"runs:/{run_id}/model", "latentforge.data_hash": job.manifest["data_hash"]},
    )
    return model.model_id


def finish_trained_model(client, run_id: str, model_id: str, summary: dict[str, Any]) -> None:
    """Link the chosen checkpoint's validation figures (``val/<name>``, ``val_score``) to the trained
    LoggedModel and mark it READY."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    figures = {"val_score": summary["val_score"], **{f"val/{k}": v for k, v in summary["val"].items()}}
    metrics = [Metric(k, float(v), now, int(summary["step"]), model_id=model_id)
               for k, v in figures.items() if isinstance(v, (int, float)) and math.isfinite(v)]
    client.log_batch(run_id, metrics=metrics)
    client.finalize_logged_model(model_id, "READY")


def root_cause(exc: BaseException) -> str:
    """``"<type>: <last line>"`` of the innermost ``__cause__`` of ``exc``: what a failed Ray run reports
    as its reason, without the layers of wrapping exceptions."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


# <output_dir>/<family>/history/<figure>.tsv: one row per epoch, columns epoch and value (the DVC train
# stage declares them as plots, x: epoch, y: value, so `dvc plots diff` overlays two experiments).
HISTORY_DIR = "history"
HISTORY_PREFIX = "epoch/"  # the MLflow keys of the per-epoch figures (see _log_epoch)
HISTORY_FIGURES = ("train_", "val_")  # of those, the losses and validation figures; not timings
HISTORY_REPEATS = ("val_score",)  # the family's val_<metric> again, under the name checkpoints are scored by


def epoch_history(client, run_id: str) -> list[dict[str, float]]:
    """One dict per epoch of the MLflow run, in order: ``epoch`` (1, 2, ...) and each per-epoch training
    loss and validation figure (``train_loss``, ``val_mse`` ...), read back from the run's ``epoch/*``
    metrics. A resumed run's earlier epochs are in the same run, so they are counted too."""
    names = [k[len(HISTORY_PREFIX):] for k in client.get_run(run_id).data.metrics if k.startswith(HISTORY_PREFIX)]
    keys = [k for k in names if k.startswith(HISTORY_FIGURES) and k not in HISTORY_REPEATS]
    rows: dict[int, dict[str, float]] = {}
    for key in sorted(keys):
        for metric in client.get_metric_history(run_id, HISTORY_PREFIX + key):
            rows.setdefault(metric.step, {})[key] = metric.value
    return [{"epoch": i + 1, **row} for i, (_, row) in enumerate(sorted(rows.items()))]


def write_history(history: list[dict[str, float]], folder: Path) -> None:
    """Write ``history`` (:func:`epoch_history`) as one ``<figure>.tsv`` per figure in ``folder``: a header
    ``epoch<TAB>value``, then one row per epoch that has the figure."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = sorted({k for row in history for k in row if k != "epoch"})
    for figure in figures:
        lines = [f"{row['epoch']}\t{row[figure]:.6g}" for row in history if figure in row]
        path = folder / f"{figure}.tsv"  # a figure named a/b (the GAN's train_disc/d_fake) is a folder a
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("epoch\tvalue\n" + "\n".join(lines) + "\n")


def system_metrics_enabled() -> bool:
    """Whether rank 0's MLflow sink logs system metrics (CPU, memory, GPU): on unless MLflow's own switch,
    ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``, is set to false (read on the driver, which may be elsewhere)."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() in ("true", "1")


def _write_outputs(job: TrainJob, checkpoint, last_metrics: dict, run_id: str, seconds: float,
                   echo: Callable[[str], None] = print, history: list[dict[str, float]] | None = None,
                   model_id: str | None = None) -> dict[str, Any]:
    """Copy the chosen checkpoint's model to ``<output_dir>/<family>/model``, with the latent sampler of
    ``train.sampler`` fitted to it (:func:`fit_sampler`), and write ``metrics.json`` and the per-epoch
    ``history/`` plots (:func:`write_history`) (DVC stage outputs), atomically."""
    out = job.output_dir
    with atomic_directory(out) as tmp:
        write_history(history or [], tmp / HISTORY_DIR)
        with checkpoint.as_directory() as ckpt_dir:
            shutil.copytree(Path(ckpt_dir) / "model", tmp / "model")
            state = json.loads((Path(ckpt_dir) / "metrics.json").read_text())
        sampler_fit = None
        if job.train["sampler"] is not None and is_series(job.manifest):
            echo("latent sampler: none for time-series windows (the model scores, it does not generate)")
        elif job.train["sampler"] is not None:
            sampler_fit = fit_sampler(tmp / "model", job.data_dir, job.train["sampler"], job.train["seed"], echo)
        summary = {
            "family": job.family,
            "run_name": job.run_name,
            "mlflow_run_id": run_id,
            "mlflow_model_id": model_id,  # the trained LoggedModel (start_trained_model)
            "checkpoint": checkpoint.path,
            "val_metric": state["val_metric"],
            "val_score": state["val_score"],
            "epoch": state["epoch"],
            "step": state["step"],
            "val": state["val"],
            "last_epoch_metrics": {k: v for k, v in last_metrics.items() if isinstance(v, (int, float))},
            "data_hash": job.manifest["data_hash"],
            "seconds": round(seconds, 2),
            "sampler": sampler_fit,
        }
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    summary["model_dir"] = str(out / "model")
    return summary


def fit_sampler(model_dir: Path, data_dir: str | Path, settings: dict[str, Any], seed: int,
                echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Fit the ex-post latent sampler of ``settings`` (:func:`sampler_settings`) to the model saved in
    ``model_dir`` and save the model again with it (its ``sampler/`` folder); returns the fit's figures
    for ``metrics.json``, or None for a family without a flat latent (said in one ``echo`` line).

    The latents: the encoder's point estimates (a VAE's mean) of at most ``max_images`` training images
    (a subset seeded with ``seed``); GLO, which has no encoder, gives its learned codes instead. The
    figures: components, covariance, latents and their dim, the mean log-likelihood per latent (nats)
    of the training latents and of the val split's, and the seconds the fit took.
    """
    t0 = time.time()
    model = PretrainedModel.from_pretrained(model_dir)
    latents = _training_latents(model, Path(data_dir), settings["max_images"], seed)
    if latents is None:
        echo(f"latent sampler: none for {type(model).__name__} (no flat latent with an encoder or learned codes)")
        return None
    values = {k: v for k, v in settings.items() if k not in ("kind", "max_images")}
    # A small data set: each component needs latents enough to estimate more than its mean (with one latent
    # apiece its covariance is the regulariser alone); at most one component per LATENTS_PER_COMPONENT latents.
    most = max(1, len(latents) // LATENTS_PER_COMPONENT)
    if values["components"] > most:
        echo(f"latent sampler: {len(latents)} latents, so {most} components instead of {values['components']} "
             f"(at least {LATENTS_PER_COMPONENT} latents each)")
        values["components"] = most
    config = GaussianMixtureConfig.from_dict(values)
    model.latent_sampler = GaussianMixtureSampler.fit(latents, config)
    model.save_pretrained(model_dir)
    fit = {
        "kind": settings["kind"],
        "components": config.components,
        "covariance": config.covariance,
        "latents": len(latents),
        "dim": latents.shape[1],
        "train_log_likelihood": float(model.latent_sampler.log_prob(latents).mean()),
    }
    if not hasattr(model, "learned_codes"):  # held-out latents: only an encoder gives them
        val = _split_images(Path(data_dir), "val", settings["max_images"], seed)
        if len(val):
            fit["val_log_likelihood"] = float(model.latent_sampler.log_prob(encode_latents(model, val)).mean())
    fit["seconds"] = round(time.time() - t0, 2)
    echo(f"latent sampler: {config.components}-component {settings['kind']} ({config.covariance}) fitted to "
         f"{fit['latents']} latents of dim {fit['dim']} in {fit['seconds']:.1f}s; mean log-likelihood "
         f"{fit['train_log_likelihood']:.4g} (val {fit.get('val_log_likelihood', float('nan')):.4g})")
    return fit


def _training_latents(model, data_dir: Path, max_images: int, seed: int) -> torch.Tensor | None:
    """(N, D) latents to fit a sampler to, N <= ``max_images``: GLO's learned codes, else the encoded
    training images of a family with an encoder and a flat latent; None for the others (GAN: no
    encoder; VQ-VAE-2: a grid of codes, sampled by its own prior)."""
    generator = torch.Generator().manual_seed(seed)
    if hasattr(model, "learned_codes"):
        codes = model.learned_codes()
        keep = torch.randperm(len(codes), generator=generator)[:max_images].sort().values
        return codes[keep]
    if not model.has_encoder or len(tuple(getattr(model, "latent_shape", ()) or ())) != 1:
        return None
    return encode_latents(model, _split_images(data_dir, "train", max_images, seed))


def _split_images(data_dir: Path, split: str, max_images: int, seed: int) -> torch.Tensor:
    """At most ``max_images`` images (N, C, H, W) in [0, 1] of a prepared split: a subset seeded with
    ``seed``, in split order; an absent split gives none."""
    if split not in read_manifest(data_dir)["splits"]:
        return torch.zeros(0)
    images = load_split(data_dir, split)["images"]
    rows = np.random.default_rng(seed).permutation(len(images))[:max_images]
    return batch_to_tensor(np.array(images[np.sort(rows)]))


# ----------------------------------------------------------------------------------------------------
# The loop every worker runs


def is_series(manifest: dict[str, Any]) -> bool:
    """Whether a prepared data set holds time-series windows (pipelines/series.py) rather than images."""
    return manifest.get("kind") == "timeseries"


def sample_shape(manifest: dict[str, Any]) -> list[int]:
    """The shape of one prepared sample: an image's [H, W, C] or a window's [T, F]."""
    return manifest["window_shape"] if is_series(manifest) else manifest["image_shape"]


def decode_batch(batch: dict[str, Any], image_shape: list[int]) -> dict[str, Any]:
    """A Ray Data numpy batch (image as raw HWC bytes) -> the models' batch dict of tensors:
    ``image`` (B, C, H, W) float in [0, 1], ``label`` and ``index`` (B,) int64. A batch of time-series
    windows (raw float32 bytes of ``image_shape`` = [T, F]) gives ``series`` (B, T, F) instead of ``image``."""
    if "window" in batch:
        blob = b"".join(batch["window"])
        windows = np.frombuffer(blob, dtype=np.float32).reshape((len(batch["window"]), *image_shape))
        return {
            "series": torch.from_numpy(windows.copy()),
            "label": torch.tensor(batch["label"], dtype=torch.int64),
            "index": torch.tensor(batch["index"], dtype=torch.int64),
        }
    blob = b"".join(batch["image"])
    images = np.frombuffer(blob, dtype=np.uint8).reshape((len(batch["image"]), *image_shape))
    return {
        "image": batch_to_tensor(images),
        "label": torch.tensor(batch["label"], dtype=torch.int64),
        "index": torch.tensor(batch["index"], dtype=torch.int64),
    }


@dataclass
class _Worker:
    """What one worker's epochs share: its place in the group, the model (DDP-wrapped and bare), its
    optimisers with their base learning rates, and rank 0's logger (None elsewhere)."""

    cfg: dict[str, Any]
    rank: int
    world: int
    device: Any
    amp: bool
    wrapped: Any
    core: Any
    optimizers: dict[str, Any]
    base_lrs: dict[str, list[float]]
    logger: Any
    total_steps: int

    def forward(self, batch, phase, step):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.wrapped(batch, phase=phase, step=step)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the same for every family (no per-family branch)."""
    import ray.train
    import ray.train.torch

    quiet_worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train_cfg = cfg["train"]
    torch.manual_seed(train_cfg["seed"] + rank)
    np.random.seed(train_cfg["seed"] + rank)
    device = ray.train.torch.get_device()
    amp = train_cfg["use_gpu"] and train_cfg["bf16"] and device.type == "cuda"

    model, start_epoch, step, opt_state = _restore_or_build(cfg)
    model.train()
    wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    core = wrapped.module if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else wrapped
    optimizers = core.configure_optimizers()
    # The families' own learning rates, before a checkpoint's (scheduled) ones overwrite them.
    base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in optimizers.items()}
    if opt_state is not None:
        for name, opt in optimizers.items():
            opt.load_state_dict(opt_state[name])

    logger = _RankZeroLogger(cfg) if rank == 0 else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_size, epochs = train_cfg["batch_size"], train_cfg["epochs"]
    total_steps = epochs * max(1, cfg["train_count"] // (batch_size * world))
    worker = _Worker(cfg, rank, world, device, amp, wrapped, core, optimizers, base_lrs, logger, total_steps)
    run_start = time.time()
    for epoch in range(start_epoch, epochs):
        core.train()
        epoch_start = time.time()
        step, sums, n_steps = _train_epoch(worker, train_shard, epoch, step)
        epoch_seconds = time.time() - epoch_start
        val, val_images = _validate(core, val_shard, cfg["image_shape"], batch_size, worker.to_device, world)
        score = val[cfg["val_metric"]]
        metrics = {
            "epoch": epoch,
            "step": step,
            "val_score": score,
            **{f"val_{k}": v for k, v in val.items()},
            **{f"train_{k}": v / max(n_steps, 1) for k, v in sums.items()},
            "epoch_seconds": epoch_seconds,
            "epoch_samples_per_sec": n_steps * batch_size * world / max(epoch_seconds, 1e-9),
        }
        if logger:
            _log_epoch(worker, metrics, val_images, epoch, start_epoch, run_start)
        _report(worker, metrics, val, epoch, step)
        if world > 1:
            dist.barrier()
    if world > 1:
        _check_replicas_in_sync(core)
    if logger:
        logger.close()


def _restore_or_build(cfg: dict[str, Any]) -> tuple[Any, int, int, dict[str, Any] | None]:
    """(model, first epoch, step, optimiser states): from Ray Train's latest checkpoint of this run when
    there is one (a resume or a restart after a failure), else a fresh model from ``cfg["model_config"]``."""
    import ray.train

    cls = MODELS[cfg["family"]]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return cls(cls.config_class.from_dict(cfg["model_config"])), 0, 0, None
    with checkpoint.as_directory() as ckpt_dir:
        model = cls.from_pretrained(Path(ckpt_dir) / "model")
        state = torch.load(Path(ckpt_dir) / "training_state.pt", map_location="cpu", weights_only=False)
    return model, state["epoch"] + 1, state["step"], state["optimizers"]


def _train_epoch(worker: _Worker, shard, epoch: int, step: int) -> tuple[int, dict[str, float], int]:
    """One pass over this worker's train shard; returns (step after it, summed step logs, steps taken).

    Sets every optimiser's learning rate by :func:`lr_factor` before each step; rank 0 logs the step's
    losses, learning rates and throughput every ``log_every_steps`` steps, and shows the epoch's progress
    (a plain line now and then: a worker's stdout is no terminal, see common/progress.py)."""
    train_cfg = worker.cfg["train"]
    batch_size = train_cfg["batch_size"]
    window_start, window_samples = time.time(), 0
    sums: dict[str, float] = {}
    n_steps = 0
    batches = shard.iter_batches(
        batch_size=batch_size, batch_format="numpy", drop_last=True,
        local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=train_cfg["seed"] + 1000 * epoch + worker.rank,
    )
    if worker.logger:
        steps = max(1, worker.cfg["train_count"] // (batch_size * worker.world))
        batches = progress(batches, f"epoch {epoch + 1}/{train_cfg['epochs']}", total=steps, unit="steps")
    for raw in batches:
        factor = lr_factor(train_cfg["lr_schedule"], step, worker.total_steps)
        for name, opt in worker.optimizers.items():
            for group, base in zip(opt.param_groups, worker.base_lrs[name]):
                group["lr"] = base * factor
        batch = worker.to_device(decode_batch(raw, worker.cfg["image_shape"]))
        logs = train_step(worker.core, worker.optimizers, batch, step, forward=worker.forward)
        step += 1
        n_steps += 1
        window_samples += batch_size * worker.world
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v
        if worker.logger and step % train_cfg["log_every_steps"] == 0:
            rate = window_samples / max(time.time() - window_start, 1e-9)
            lrs = {f"lr/{name}": opt.param_groups[0]["lr"] for name, opt in worker.optimizers.items()}
            worker.logger.log({**{f"train/{k}": v for k, v in logs.items()}, **lrs, "samples_per_sec": rate}, step)
            window_start, window_samples = time.time(), 0
    return step, sums, n_steps


def _log_epoch(worker: _Worker, metrics: dict[str, Any], val_images, epoch: int, start_epoch: int, run_start: float) -> None:
    """Rank 0's end of epoch: the epoch metrics to MLflow, one progress line, and the image grids every
    ``images_every`` epochs and after the last."""
    cfg, epochs = worker.cfg, worker.cfg["train"]["epochs"]
    worker.logger.log({f"epoch/{k}": v for k, v in metrics.items() if k not in ("epoch", "step")}, metrics["step"])
    done = epoch + 1 - start_epoch
    eta = (time.time() - run_start) / done * (epochs - epoch - 1)
    losses = "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("train_") and k.endswith("loss"))
    # A generative family's sample diversity (1 ~ as varied as real images, 0: one repeated image) shows
    # a collapse while it happens.
    diversity = f"  val_diversity {metrics['val_diversity']:.3g}" if "val_diversity" in metrics else ""
    print(f"[latentforge] epoch {epoch + 1}/{epochs}  {losses}  val_{cfg['val_metric']} {metrics['val_score']:.4g}{diversity}  "
          f"{metrics['epoch_samples_per_sec']:.0f} samples/s  ETA {eta:.0f}s", flush=True)
    if not cfg["series"] and ((epoch + 1) % cfg["train"]["images_every"] == 0 or epoch + 1 == epochs):
        worker.logger.log_images(worker.core, val_images, epoch)


def _report(worker: _Worker, metrics: dict[str, Any], val: dict[str, float], epoch: int, step: int) -> None:
    """Report the epoch's metrics to Ray Train, with a checkpoint every ``checkpoint_every`` epochs and
    after the last: the model's ``save_pretrained`` directory, the optimiser states and the val scores
    (written by rank 0; every rank reports)."""
    import ray.train

    cfg, train_cfg = worker.cfg, worker.cfg["train"]
    if (epoch + 1) % train_cfg["checkpoint_every"] != 0 and epoch + 1 != train_cfg["epochs"]:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if worker.rank == 0:
            worker.core.save_pretrained(Path(tmp) / "model")
            optimizers = {k: o.state_dict() for k, o in worker.optimizers.items()}
            torch.save({"epoch": epoch, "step": step, "optimizers": optimizers}, Path(tmp) / "training_state.pt")
            (Path(tmp) / "metrics.json").write_text(json.dumps(
                {"epoch": epoch, "step": step, "val_metric": cfg["val_metric"], "val_score": metrics["val_score"], "val": val}))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """The multiplier of every optimiser's learning rate at ``step`` of ``total_steps``: 1 (``constant``),
    or (``cosine``) half a cosine from 1 down to 0 at the last step. A function of the step alone, so a
    resumed run picks it up where it stopped; running the same run again with more epochs stretches it."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))


def _check_replicas_in_sync(core) -> None:
    """All workers must end with the same weights and buffers (DDP gradients, all-reduced EMA codebooks);
    a divergence is a bug worth failing the run for rather than a silently wrong checkpoint."""
    state = core.state_dict()
    mine = torch.stack([t.detach().double().sum() for t in state.values() if t.is_floating_point()])
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    divergence = max(float((g - gathered[0]).abs().max()) for g in gathered)
    if divergence > 0:
        names = [k for k, t in state.items() if t.is_floating_point()]
        worst = names[int(torch.stack([(g - gathered[0]).abs() for g in gathered]).amax(0).argmax())]
        raise RuntimeError(f"workers diverged after training (max checksum difference {divergence:g}, first at {worst})")


def _validate(core, shard, shape, batch_size, to_device, world):
    """Batch-size-weighted mean of ``validation_step`` over this worker's val shard, averaged over workers.

    Also returns up to 32 of the val images, for the reconstruction grid: every rank must iterate its
    shard in step with the others (a streaming split), so rank 0 cannot read the val set on its own.
    """
    core.eval()
    sums: dict[str, float] = {}
    count = 0
    first = None
    with torch.no_grad():
        for raw in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            batch = to_device(decode_batch(raw, shape))
            first = batch["image"][:32] if first is None and "image" in batch else first
            n = len(batch["index"])
            for k, v in core.validation_step(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            count += n
    core.train()
    keys = sorted(sums) if sums else [core.val_metric]
    if world > 1:
        # Every rank must contribute the same keys; an empty shard contributes zeros.
        t = torch.tensor([sums.get(k, 0.0) for k in keys] + [float(count)], dtype=torch.float64)
        dist.all_reduce(t)
        values, count = t[:-1].tolist(), t[-1].item()
        sums = dict(zip(keys, values))
    return {k: sums.get(k, 0.0) / max(count, 1) for k in keys}, first


SYSTEM_METRICS_INTERVAL_S = 5  # seconds between MLflow's system-metrics samples


class _MlflowSink:
    """A Ray actor on rank 0's node that does all of rank 0's MLflow work: metrics, image grids and MLflow's
    system metrics (its monitor samples the node, so any process on it measures the same).

    Why a separate process: with MLflow imported and its store open in the training process, even with
    no metric logged, the VAE's steps ran ~8% slower (bench/README.md, train_throughput). Calls run in
    the order rank 0 makes them, so steps stay monotonic."""

    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        # After a restart from a checkpoint the steps since that checkpoint come again; MLflow already
        # has them from the failed attempt, so skip up to the last step logged to keep steps monotonic.
        logged = [m.step for key in ("samples_per_sec", "epoch/val_score") for m in self.client.get_metric_history(run_id, key)]
        self.resume_step = max(logged, default=-1)
        # MLflow's documented switch: start_run(log_system_metrics=True) on the existing run starts its
        # monitor (resuming its steps), end_run() stops it. The fluent state is this actor process's own.
        # Its INFO lines (monitor started, stopped) would be forwarded to the driver's console: warnings only.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        if step > self.resume_step:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, timestamp_ms, step) for k, v in metrics.items()])

    def log_images(self, images: dict[str, np.ndarray], epoch: int) -> None:
        """Each (H, W, 3) uint8 image as MLflow's time-stepped image ``key`` at step ``epoch`` (1, 2, ...),
        so that the run's page steps through the epochs."""
        for key, image in images.items():
            self.client.log_image(self.run_id, image, key=key, step=epoch)

    def close(self) -> None:
        """Stop the system-metrics monitor. The run stays RUNNING: the driver ends it once its outputs
        are written."""
        import mlflow

        mlflow.end_run(status="RUNNING")


class _RankZeroLogger:
    """MLflow logging from rank 0 (metrics with monotonic steps, image grids, system metrics), sent to
    an :class:`_MlflowSink` actor: the training process never imports MLflow."""

    def __init__(self, cfg: dict[str, Any]):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.sink = ray.remote(num_cpus=0)(_MlflowSink).options(scheduling_strategy=node).remote(
            cfg["tracking_uri"], cfg["run_id"], cfg["system_metrics"])
        self.pending: list = []  # the sink's replies, checked in close()

    def log(self, metrics: dict[str, float], step: int) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}
        self.pending.append(self.sink.log.remote(metrics, step, int(time.time() * 1000)))

    def log_images(self, core, val_images, epoch) -> None:
        """The grid of 64 samples (fixed noise) and, for a family with an encoder, of val images beside
        their reconstructions, as MLflow images ``samples`` and ``reconstructions`` at step ``epoch + 1``."""
        core.eval()
        with torch.no_grad():
            gen = torch.Generator(device=next(core.parameters()).device).manual_seed(0)
            samples = core.sample(64, generator=gen).images
            grids = {"samples": make_grid(tensor_to_uint8(samples))}
            if core.has_encoder and val_images is not None:
                x = val_images
                recon = core.decode(core.encode(x).latent).images
                pairs = torch.stack([x, recon.to(x.dtype)], dim=1).flatten(0, 1)  # original, recon, ...
                grids["reconstructions"] = make_grid(tensor_to_uint8(pairs), nrow=8)
        # Twice the size (nearest), so that 32x32 images are visible in MLflow's page.
        grids = {key: grid.repeat(2, axis=0).repeat(2, axis=1) for key, grid in grids.items()}
        self.pending.append(self.sink.log_images.remote(grids, epoch + 1))
        core.train()

    def close(self) -> None:
        import ray

        ray.get(self.pending)  # every metric and grid written (raises if one failed)
        self.pending.clear()
        ray.get(self.sink.close.remote())
        ray.kill(self.sink)
