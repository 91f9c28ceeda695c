"""Training on a real local Ray runtime with a real MLflow store (sqlite in a temp dir), 127.0.0.1 only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml
from mlflow.entities import LoggedModelStatus

from latentforge.models import MODELS, ConfigError, PretrainedModel
from latentforge.pipelines.data import DataError
from latentforge.pipelines.common.params import ParamsError
from latentforge.pipelines.train import (
    HISTORY_DIR, TrainingError, epoch_history, fit_sampler, lr_factor, resolve_job, run_training, system_metrics_enabled,
    write_history,
)
from tests.pipelines.conftest import REPO, mlflow_runs


@pytest.mark.parametrize("family", ["vae", "vqvae2", "gan"])
def test_two_worker_ddp_run(project, local_ray, family):
    root, params = project
    job = resolve_job(params, family, num_workers=2, run_name=f"ddp-{family}")
    lines: list[str] = []
    summary = run_training(job, echo=lines.append)

    # The model written as the stage output loads on its own and works.
    model = PretrainedModel.from_pretrained(summary["model_dir"])
    assert type(model) is MODELS[family]
    assert model.sample(2).images.shape == (2, 3, 16, 16)
    metrics = json.loads((Path(summary["model_dir"]).parent / "metrics.json").read_text())
    assert metrics["mlflow_run_id"] == summary["mlflow_run_id"] and metrics["epoch"] == 1
    # train.sampler (params.yaml's Gaussian mixture): fitted to the VAE's encoded training images and
    # saved with the model; the GAN (no encoder) and VQ-VAE-2 (a grid of codes) have none, said once.
    if family == "vae":
        assert (Path(summary["model_dir"]) / "sampler").is_dir()
        # params' components, or one per 10 latents when the tiny train split has fewer latents than that
        components = min(params["train"]["sampler"]["components"], job.manifest["splits"]["train"]["count"] // 10)
        assert model.latent_sampler.kind == "gmm" and model.latent_sampler.config.components == components
        assert model.sample(2, sampler="gmm").images.shape == (2, 3, 16, 16)
        fit = metrics["sampler"]
        assert fit["components"] == components and fit["latents"] == job.manifest["splits"]["train"]["count"]
        assert fit["dim"] == 4 and math.isfinite(fit["train_log_likelihood"]) and math.isfinite(fit["val_log_likelihood"])
        assert fit["seconds"] >= 0
    else:
        assert model.latent_sampler is None and metrics["sampler"] is None
        assert sum(line.startswith("latent sampler: none for") for line in lines) == 1

    client, runs = mlflow_runs(params)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["family"] == family and run.data.params["train.num_workers"] == "2"
    assert run.data.tags["latentforge.data_hash"] == job.manifest["data_hash"]
    assert "mlflow.source.git.commit" in run.data.tags and run.data.tags["ray.num_cpus"] == "2.0"
    # The prepared data is the run's dataset input, its digest the data hash (MLflow keeps 36 characters).
    [data_input] = run.inputs.dataset_inputs
    assert data_input.dataset.name == job.manifest["name"] and data_input.dataset.digest == job.manifest["data_hash"][:36]
    assert {t.key: t.value for t in data_input.tags} == {"mlflow.data.context": "training",
                                                          "latentforge.data_hash": job.manifest["data_hash"]}
    # The trained model is a LoggedModel of the run, READY, with the chosen checkpoint's val figures linked.
    trained = client.get_logged_model(metrics["mlflow_model_id"])
    assert trained.source_run_id == run.info.run_id and trained.status == LoggedModelStatus.READY
    assert trained.tags["latentforge.checkpoint"] == f"runs:/{run.info.run_id}/model"
    linked = {m.key: m.value for m in trained.metrics}
    assert linked["val_score"] == pytest.approx(metrics["val_score"])
    assert linked[f"val/{MODELS[family].val_metric}"] == pytest.approx(metrics["val"][MODELS[family].val_metric])
    assert "samples_per_sec" in run.data.metrics and "epoch/val_score" in run.data.metrics
    assert any(k.startswith("train/") for k in run.data.metrics)
    # Image grids are MLflow time-stepped images, one per epoch (step 1, 2), so the run's page steps through them.
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    keys = ["samples"] + (["reconstructions"] if family != "gan" else [])
    for key in keys:
        steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images
                       if p.startswith(f"images/{key}+step+") and p.endswith(".png"))
        assert steps == [1, 2], (key, images)
    # The per-epoch plots the DVC train stage declares: one <figure>.tsv per loss / val figure, a row per epoch.
    history = Path(summary["model_dir"]).parent / "history"
    assert not (history / "val_score.tsv").exists()  # val_score repeats val_<metric>: no figure of its own
    files = {str(f.relative_to(history).with_suffix("")): f.read_text().splitlines() for f in history.rglob("*.tsv")}
    assert f"val_{MODELS[family].val_metric}" in files and any(k.startswith("train_") and k.endswith("loss") for k in files)
    for figure, lines in files.items():
        assert lines[0] == "epoch\tvalue" and [line.split("\t")[0] for line in lines[1:]] == ["1", "2"], figure
        assert all(math.isfinite(float(line.split("\t")[1])) for line in lines[1:])
    if family == "vqvae2":
        # Both workers ended with identical codebooks: the loop all-gathers a checksum of every
        # weight and buffer and fails the run on any difference, and the run finished.
        assert any("usage" in k or "perplexity" in k for k in run.data.metrics)


def test_resume_same_run_name(project, local_ray):
    root, params = project
    job = resolve_job(params, "vae", ["lr_schedule=cosine"], run_name="resume-me")
    first = run_training(job, echo=lambda s: None)
    assert json.loads((Path(first["model_dir"]).parent / "metrics.json").read_text())["epoch"] == 1
    # Same name, more epochs: it continues from the last checkpoint (epoch index 1 -> 2 -> 3).
    lines: list[str] = []
    second = run_training(resolve_job(params, "vae", ["epochs=4", "lr_schedule=cosine"], run_name="resume-me"), echo=lines.append)
    assert lines[0].startswith("resuming resume-me")
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    state = json.loads((Path(second["model_dir"]).parent / "metrics.json").read_text())
    assert state["epoch"] == 3
    client, runs = mlflow_runs(params)
    assert sum(r.data.tags.get("latentforge.run_name") == "resume-me" for r in runs) == 1
    steps = [m.step for m in client.get_metric_history(first["mlflow_run_id"], "epoch/val_score")]
    assert steps == sorted(steps) and len(steps) == 4 and len(set(steps)) == 4
    # The cosine schedule: each logged lr (after the step at which it was set) is the family's lr times
    # lr_factor of that step, over the run's length then: 2 epochs first, 4 after the resume.
    per_epoch = job.manifest["splits"]["train"]["count"] // job.train["batch_size"]
    base = MODELS["vae"].config_class.from_dict(job.model_config).lr
    history = client.get_metric_history(first["mlflow_run_id"], "lr/main")
    assert len(history) >= 4 and history[0].value < base
    for m in history:
        total = (2 if m.step <= 2 * per_epoch else 4) * per_epoch
        assert m.value == pytest.approx(base * lr_factor("cosine", m.step - 1, total), rel=1e-6)
    assert history[-1].value < 0.05 * base


@pytest.mark.parametrize("family", ["glo", "lstm_ae", "vqvae2"])
def test_fit_sampler_by_family(project, tmp_path, family):
    """The fit run after training, without Ray: GLO's learned codes, an autoencoder's encoded images (a
    seeded subset of max_images), nothing for VQ-VAE-2."""
    root, params = project
    job = resolve_job(params, family, ["train.sampler.components=3", "train.sampler.max_images=50"])
    assert job.train["sampler"]["covariance"] == "full"  # a default filled in
    cls = MODELS[family]
    model_dir = cls(cls.config_class.from_dict(job.model_config)).save_pretrained(tmp_path / "model")
    lines: list[str] = []
    fit = fit_sampler(model_dir, job.data_dir, job.train["sampler"], seed=0, echo=lines.append)
    loaded = PretrainedModel.from_pretrained(model_dir)
    if family == "vqvae2":
        assert fit is None and loaded.latent_sampler is None and not (model_dir / "sampler").exists()
        assert lines == ["latent sampler: none for VQVAE2 (no flat latent with an encoder or learned codes)"]
        return
    assert fit["components"] == 3 and fit["latents"] == 50 and fit["dim"] == loaded.config.latent_dim
    assert ("val_log_likelihood" in fit) == (family != "glo")  # GLO's codes have no held-out twin
    assert loaded.latent_sampler.config.components == 3 and lines[0].startswith("latent sampler: 3-component gmm")
    # The same seed, the same subset and fit.
    again = fit_sampler(model_dir, job.data_dir, job.train["sampler"], seed=0, echo=lines.append)
    assert again["train_log_likelihood"] == fit["train_log_likelihood"]


def test_fit_sampler_caps_components_at_the_latents(project, tmp_path):
    """More components than a small data set supports: one per 10 latents, said in a line, not a crash."""
    root, params = project
    job = resolve_job(params, "lstm_ae", ["train.sampler.components=80", "train.sampler.max_images=50"])
    cls = MODELS["lstm_ae"]
    model_dir = cls(cls.config_class.from_dict(job.model_config)).save_pretrained(tmp_path / "model")
    lines: list[str] = []
    fit = fit_sampler(model_dir, job.data_dir, job.train["sampler"], seed=0, echo=lines.append)
    assert fit["components"] == 5 and fit["latents"] == 50
    assert lines[0] == "latent sampler: 50 latents, so 5 components instead of 80 (at least 10 latents each)"
    assert PretrainedModel.from_pretrained(model_dir).latent_sampler.config.components == 5


def test_epoch_history_reads_the_epoch_figures_back_from_mlflow(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("h", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    # Three epochs ending at steps 15, 30, 45, as _log_epoch logs them; timings and val_score are no figures.
    for epoch, step in enumerate((15, 30, 45)):
        figures = {"train_loss": 1.0 / (epoch + 1), "val_mse": 0.5 - 0.1 * epoch, "val_score": 0.5 - 0.1 * epoch,
                   "epoch_seconds": 3.0}
        client.log_batch(run_id, metrics=[Metric(f"epoch/{k}", v, 0, step) for k, v in figures.items()])
    client.log_batch(run_id, metrics=[Metric("train/loss", 9.0, 0, 7)])  # a step metric: not per epoch
    history = epoch_history(client, run_id)
    assert history == [{"epoch": 1, "train_loss": 1.0, "val_mse": 0.5}, {"epoch": 2, "train_loss": 0.5, "val_mse": 0.4},
                       {"epoch": 3, "train_loss": pytest.approx(1 / 3), "val_mse": pytest.approx(0.3)}]
    write_history(history, tmp_path / "history")
    assert sorted(f.name for f in (tmp_path / "history").iterdir()) == ["train_loss.tsv", "val_mse.tsv"]
    assert (tmp_path / "history" / "val_mse.tsv").read_text() == "epoch\tvalue\n1\t0.5\n2\t0.4\n3\t0.3\n"


def test_write_history_puts_a_figure_named_with_a_slash_in_a_folder(tmp_path):
    """The GAN logs its discriminator's figures as train_disc/d_fake: one file in a folder train_disc."""
    write_history([{"epoch": 1, "train_disc/d_fake": 0.25}, {"epoch": 2, "train_disc/d_fake": 0.5}], tmp_path)
    assert (tmp_path / "train_disc" / "d_fake.tsv").read_text() == "epoch\tvalue\n1\t0.25\n2\t0.5\n"


def test_dvc_train_stage_declares_the_history_plots():
    """`dvc plots diff` overlays experiments only for plots whose x and y it knows."""
    train = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]
    plots = {path: props for entry in train["plots"] for path, props in entry.items()}
    props = plots[f"${{train.output_dir}}/${{item}}/{HISTORY_DIR}"]
    assert props["x"] == "epoch" and props["y"] == "value" and props["cache"] is False


def test_system_metrics_switch(monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    assert system_metrics_enabled()
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    assert not system_metrics_enabled()


def test_lr_factor():
    assert [lr_factor("constant", s, 10) for s in (0, 5, 10, 99)] == [1.0, 1.0, 1.0, 1.0]
    assert [round(lr_factor("cosine", s, 10), 6) for s in (0, 5, 10, 99)] == [1.0, 0.5, 0.0, 0.0]
    assert lr_factor("cosine", 0, 0) == 1.0  # a run shorter than one batch: no division by zero


def test_job_too_big_for_cluster_fails_fast(project, local_ray):
    root, params = project
    job = resolve_job(params, "vae", num_workers=5, run_name="too-big")
    t0 = time.monotonic()
    with pytest.raises(TrainingError, match=r"needs 5 workers .* the Ray cluster has 2 CPU"):
        run_training(job, echo=lambda s: None)
    assert time.monotonic() - t0 < 30
    gpu = resolve_job(params, "vae", use_gpu=True, run_name="no-gpu")
    with pytest.raises(TrainingError, match="GPU"):
        run_training(gpu, echo=lambda s: None)


def test_bad_inputs_resolve(project):
    root, params = project
    with pytest.raises(ConfigError, match="unknown model family 'vea'"):
        resolve_job(params, "vea")
    with pytest.raises(ParamsError, match="--set bta: not a field of VAEConfig"):
        resolve_job(params, "vae", ["bta=4"])
    with pytest.raises(ConfigError, match="beta"):
        resolve_job(params, "vae", ["beta=lots"])
    with pytest.raises(ParamsError, match="unknown key 'epochz'"):
        resolve_job(params, "vae", ["train.epochz=3"])
    with pytest.raises(ParamsError, match="train.epochs: expected int"):
        resolve_job(params, "vae", ["epochs=two"])
    missing = {**params, "data": {**params["data"], "name": "never-prepared"}}
    with pytest.raises(DataError, match="no prepared data .*never-prepared.*latentforge prepare"):
        resolve_job(missing, "vae")
    job = resolve_job(params, "vae", ["beta=4", "epochs=3"])
    assert job.model_config["beta"] == 4.0 and job.train["epochs"] == 3
    # train.family_epochs: a family's own epochs over train.epochs; --set epochs=N over both
    per_family = {**params, "train": {**params["train"], "family_epochs": {"vqvae2": 5}}}
    assert resolve_job(per_family, "vqvae2").train["epochs"] == 5
    assert resolve_job(per_family, "vae").train["epochs"] == params["train"]["epochs"]
    assert resolve_job(per_family, "vqvae2", ["epochs=1"]).train["epochs"] == 1
    assert "family_epochs" not in resolve_job(per_family, "vqvae2").train
    with pytest.raises(ParamsError, match="train.family_epochs names unknown model families: vqvea2"):
        resolve_job({**params, "train": {**params["train"], "family_epochs": {"vqvea2": 5}}}, "vae")
    with pytest.raises(ParamsError, match="train.family_epochs must map family names to epochs"):
        resolve_job({**params, "train": {**params["train"], "family_epochs": {"vqvae2": "many"}}}, "vae")
    with pytest.raises(ParamsError, match="--set family_epochs: not a field"):
        resolve_job(params, "vae", ["family_epochs=3"])
    with pytest.raises(ParamsError, match="train.family_epochs must map family names to epochs"):
        resolve_job({**params, "train": {**params["train"], "family_epochs": {"vqvae2": 0}}}, "vae")
    with pytest.raises(ParamsError, match="train.lr_schedule must be one of constant, cosine, got 'cosin'"):
        resolve_job(params, "vae", ["lr_schedule=cosin"])
    assert resolve_job(params, "vae", ["lr_schedule=cosine"]).train["lr_schedule"] == "cosine"
    assert job.model_config["image_size"] == 16 and job.model_config["channels"] == 3
    # train.sampler: checked before Ray starts, defaults filled in; null turns it off.
    assert job.train["sampler"]["kind"] == "gmm" and job.train["sampler"]["max_images"] == 10_000
    assert resolve_job(params, "vae", ["train.sampler=null"]).train["sampler"] is None
    with pytest.raises(ParamsError, match="train.sampler.kind must be one of gmm"):
        resolve_job(params, "vae", ["train.sampler.kind=kde"])
    with pytest.raises(ParamsError, match="train.sampler.components must be >= 1, got 0"):
        resolve_job(params, "vae", ["train.sampler.components=0"])
    with pytest.raises(ParamsError, match="train.sampler.max_images must be an int >= 1"):
        resolve_job({**params, "train": {**params["train"], "sampler": {"kind": "gmm", "max_images": "all"}}}, "vae")
    with pytest.raises(ParamsError, match="train.sampler: unknown key.s. componets"):
        resolve_job({**params, "train": {**params["train"], "sampler": {"kind": "gmm", "componets": 5}}}, "vae")
    with pytest.raises(ParamsError, match="train.sampler: expected"):
        resolve_job(params, "vae", ["train.sampler=20"])


def test_unreachable_mlflow(project, monkeypatch):
    root, params = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    job = resolve_job(params, "vae")
    t0 = time.monotonic()
    with pytest.raises(TrainingError, match="MLflow tracking store http://127.0.0.1:9 is unreachable"):
        run_training(job, echo=lambda s: None)
    assert time.monotonic() - t0 < 60
