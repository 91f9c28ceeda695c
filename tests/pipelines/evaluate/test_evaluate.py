"""The domain classifier and the evaluate stage, end to end on a tiny trained VAE with a real MLflow store
(sqlite in a temp dir)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from latentforge.models import MODELS, train_step
from latentforge.pipelines.classifier import (
    CONFIDENT,
    DEFAULT_OUTLIER_WEIGHT,
    OUTLIER_KINDS,
    head_accuracies,
    load_classifier,
    outlier_of_kind,
    read_images,
    reading_figures,
    run_classifier,
    synthetic_outliers,
    train_classifier,
)
from latentforge.pipelines.cli import main
from latentforge.pipelines.data import load_shapes
from latentforge.pipelines.evaluate import EvaluationError, resolve_evaluation, run_evaluation
from latentforge.pipelines.evaluate import metrics as M
from latentforge.pipelines.evaluate import sections
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import load_split
from tests.pipelines.conftest import tiny_section


def test_classifier_learns_shape_and_colour_and_validity_measures_what_it_names():
    """The classifier, trained with outlier exposure, learns shape and colour at 16 px, and on constructed
    cases: real images are read confidently, blank and noise images are not (a classifier trained on real
    images alone reads a black square confidently), a repeated real image covers one combination."""
    data = load_shapes(4500, seed=0, image_size=16)
    large = data.factors[:, 2] == 2  # 6-pixel shapes: a 3-pixel "small" one is hardly a shape at 16x16
    images, factors = data.images[large], data.factors[large]
    n_train = int(0.8 * len(images))
    heads = {"factor_shape": 5, "factor_colour": 8}
    targets = {"factor_shape": factors[:n_train, 0], "factor_colour": factors[:n_train, 1]}
    model = train_classifier(images[:n_train], targets, heads, epochs=10, batch_size=32, lr=1.5e-3, seed=0,
                             outlier_weight=0.5)
    test = images[n_train:]
    accs = head_accuracies(model, test, {"factor_shape": factors[n_train:, 0], "factor_colour": factors[n_train:, 1]})
    assert accs["factor_shape"] > 0.9 and accs["factor_colour"] > 0.9, accs  # outlier exposure keeps the accuracy

    def probs(x):
        return [read_images(model, x)[1][h] for h in heads]

    rng = np.random.default_rng(0)
    blank = np.zeros_like(test[:200])
    noise = rng.integers(0, 256, size=test[:200].shape, dtype=np.uint8)
    repeated = np.repeat(test[:1], 200, axis=0)
    assert M.validity(probs(test), CONFIDENT) > 0.9
    assert M.validity(probs(blank), CONFIDENT) < 0.1 and M.validity(probs(noise), CONFIDENT) < 0.1
    assert M.combinations_read(probs(repeated), CONFIDENT) == 1
    real_combinations = M.combinations_read(probs(test[:200]), CONFIDENT)
    assert real_combinations > 20
    assert M.coverage_ratio(probs(repeated), probs(test[:200]), CONFIDENT) == pytest.approx(1 / real_combinations)
    figures = reading_figures(model, test, seed=0)
    assert figures["test_validity"] > 0.9 and figures["outlier_validity"] < 0.1, figures


def test_synthetic_outliers_keep_shape_and_range():
    x = torch.rand(13, 3, 16, 16)
    out = synthetic_outliers(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out[0], out[0, :, :1, :1].expand(3, 16, 16))  # row 0: a constant image
    patches = outlier_of_kind("patches", x[:2], x, torch.Generator().manual_seed(0))
    assert torch.allclose(patches.sum((2, 3)), x[:2].sum((2, 3)), atol=1e-4)  # the same pixels, moved


# ----------------------------------------------------------------------------------------------------
# The stage


@pytest.fixture(scope="module")
def evaluated(project, tmp_path_factory, monkeypatch_module):
    """The project with a domain classifier (via the CLI), a tiny VAE trained for a few steps and saved
    as the train stage would, its MLflow run, and one evaluation of it."""
    from mlflow.tracking import MlflowClient

    root, base = project
    params = copy.deepcopy(base)
    params["classifier"].update(epochs=1, output_dir=str(root / "classifier"))
    data_dir = Path(params["data"]["output_dir"]) / params["data"]["name"]
    test = load_split(data_dir, "test")
    params["evaluate"].update(
        iwae_k=4, iwae_images=8, num_samples=20, split_images=64, validation_images=16,
        tsne_points=20, interp_pairs=3, interp_steps=4, probe_labels=[10, 64, 1000], probe_repeats=2,
        anomaly_class=int(test["labels"][0]), output_dir=str(root / "evaluate"),
    )
    params["edit"] = {"labels_per_value": 50, "method": "translate", "seed": 0, "eval_labels": [5, 50, 500], "eval_images": 8,
                      "eval_strength": 1.0}
    params_path = root / "params-eval.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["classifier", "--params", str(params_path)]) == 0

    manifest = json.loads((data_dir / "manifest.json").read_text())
    train = load_split(data_dir, "train")
    torch.manual_seed(0)
    model = MODELS["vae"](MODELS["vae"].config_class.from_dict({**tiny_section("vae"), "image_size": 16, "channels": 3}))
    opts = model.configure_optimizers()
    client = MlflowClient(params["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name("evaluate-test") or client.get_experiment(client.create_experiment("evaluate-test"))
    run_id = client.create_run(exp.experiment_id, run_name="tiny-vae").info.run_id
    for step in range(4):
        rows = slice(16 * step, 16 * (step + 1))
        batch = {"image": batch_to_tensor(train["images"][rows]), "label": torch.as_tensor(train["labels"][rows]),
                 "index": torch.as_tensor(train["index"][rows])}
        logs = train_step(model, opts, batch, step)
        client.log_metric(run_id, "train/loss", logs["loss"], step=step)
    client.log_metric(run_id, "epoch/val_score", 1000.0, step=3)
    client.set_terminated(run_id)
    model.eval()
    train_dir = Path(params["train"]["output_dir"]) / "vae"
    model.save_pretrained(train_dir / "model")
    # The trained LoggedModel the train stage makes (pipelines.train.start_trained_model), named in metrics.json.
    model_id = client.create_logged_model(exp.experiment_id, name="vae", source_run_id=run_id).model_id
    (train_dir / "metrics.json").write_text(json.dumps({"mlflow_run_id": run_id, "mlflow_model_id": model_id,
                                                        "data_hash": manifest["data_hash"]}))

    job = resolve_evaluation(params, "vae")
    lines: list[str] = []
    out = run_evaluation(job, echo=lines.append)
    return params, params_path, job, out, client, lines


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_classifier_stage_writes_model_and_test_accuracy(evaluated):
    params, *_ = evaluated
    out = Path(params["classifier"]["output_dir"]) / params["data"]["name"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test_accuracy_label", "test_accuracy_factor_shape", "test_accuracy_factor_colour"} <= set(metrics)
    assert {"test_validity", "outlier_validity", *(f"outlier_validity_{k}" for k in OUTLIER_KINDS)} <= set(metrics)
    model, meta = load_classifier(out)
    # The stage's own MLflow run, in the training's store and experiment: params, its figures, the data input.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(params["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name(params["mlflow"]["experiment"])
    [run] = client.search_runs([experiment.experiment_id], "tags.`latentforge.stage` = 'classifier'")
    assert run.info.run_name == f"classifier-{params['data']['name']}" and run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy_label"] == pytest.approx(metrics["test_accuracy_label"])
    assert run.data.params["classifier.epochs"] == "1" and run.data.tags["latentforge.data_hash"] == meta["data_hash"]
    [data_input] = run.inputs.dataset_inputs
    assert data_input.dataset.digest == meta["data_hash"][:36] and data_input.dataset.name == params["data"]["name"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.json", "metrics.json"}
    assert meta["settings"]["outlier_weight"] == DEFAULT_OUTLIER_WEIGHT  # params without the key: the default
    assert meta["heads"]["label"] == 40 and meta["heads"]["factor_shape"] == 5
    assert model.features(torch.rand(2, 3, 16, 16)).shape == (2, meta["feature_dim"])


def test_evaluate_writes_metrics_and_plots(evaluated):
    params, _, job, out, _, lines = evaluated
    folder = Path(params["evaluate"]["output_dir"]) / "vae"
    written = json.loads((folder / "metrics.json").read_text())
    assert written == out
    c = params["evaluate"]["anomaly_class"]
    expected = {
        "recon_mse", "recon_psnr_db", "recon_ssim", "elbo", "iwae_nll", "iwae_nll_bits_per_dim", "test_nelbo",
        "fd_classifier", "fd_classifier_floor", "fd_classifier_ratio", "sample_precision", "sample_recall",
        "sample_precision_real", "sample_recall_real", "sample_precision_ratio", "sample_recall_ratio",
        "sample_validity", "sample_validity_real", "sample_coverage", "sample_coverage_real",
        "classifier_accuracy", "features_trusted", "probe_accuracy",
        f"anomaly_auroc_class_{c}", "anomaly_threshold", "interp_min_confidence", "mig", "mig_shape",
        "probe_accuracy_labels_10", "pixel_probe_accuracy_labels_10", "probe_accuracy_labels_64", "pixel_probe_accuracy_labels_64",
        "edit_success", "edit_preservation", "edit_success_shape", "edit_preservation_colour", "edit_success_hpos_n5",
        "edit_success_n500", "edit_success_by_difference", "edit_success_by_translate_known", "edit_source_accuracy_vpos",
        "edit_clean", "edit_clean_size_n5", "edit_clean_by_difference",
    }
    assert expected <= set(out), expected - set(out)
    assert 0 <= out["recon_mse"] <= 1 and -1 <= out["recon_ssim"] <= 1
    assert out["iwae_nll"] <= -out["elbo"] + 50  # the IWAE bound is (noisily) no looser than the ELBO
    assert 0 <= out[f"anomaly_auroc_class_{c}"] <= 1 and out["anomaly_threshold"] > 0
    assert 0 <= out["sample_precision"] <= 1 and 0 <= out["sample_recall"] <= 1 and out["fd_classifier"] >= 0
    assert 0 <= out["sample_validity"] <= 1 and out["sample_precision_real"] > 0
    assert out["fd_classifier_ratio"] == pytest.approx(out["fd_classifier"] / out["fd_classifier_floor"])
    # The few-label curve: 1,000 labels exceed the 64 encoded train images and are left out; 64 takes them
    # all (one draw), 10 is drawn twice; the full-pool point is the plain probe on the same images.
    assert "probe_accuracy_labels_1000" not in out
    assert out["probe_accuracy_labels_64"] == pytest.approx(out["probe_accuracy"])
    assert all(0 <= out[f"{kind}probe_accuracy_labels_{n}"] <= 1 for kind in ("", "pixel_") for n in (10, 64))
    curve = out["info"]["label_efficiency"]
    assert curve["labelled_pool"] == 64 and curve["per_label_count"]["64"]["draws"] == 1
    assert 1 <= curve["per_label_count"]["10"]["draws"] <= 2
    # A one-epoch classifier on 240 images reads labels badly: its figures are marked untrusted.
    accuracy = json.loads((Path(params["classifier"]["output_dir"]) / "shapes" / "metrics.json").read_text())["test_accuracy_label"]
    assert out["classifier_accuracy"] == pytest.approx(accuracy) and out["features_trusted"] == float(accuracy >= 0.9)
    info = out["info"]
    assert info["sample_metrics"]["features_trusted"] is (accuracy >= 0.9) and info["sample_metrics"]["samplers"] == ["model"]
    assert info["sampling"]["model"]["samples"] == 20 and info["sampling"]["model"]["seconds"] >= 0
    assert info["sample_metrics"]["combinations"]["possible"] == 5 * 8 * 3 * 3 * 3
    assert info["primary_metric"] == "iwae_nll" and info["primary_direction"] == "min"
    assert info["counts"]["iwae_images"] == 8 and info["counts"]["samples"] == 20 and info["iwae_k"] == 4
    assert info["counts"]["validation_step"] == 16 and info["counts"]["reconstruction"] == 24
    assert out["edit_success"] == pytest.approx(np.mean([out[f"edit_success_{f}"] for f in ("shape", "colour", "size", "hpos", "vpos")]))
    assert out["edit_success_by_translate"] == out["edit_success"] and 0 <= out["edit_preservation"] <= 1
    # 8 test images (of 24), edited to every other value of each factor (5 + 8 + 3 + 3 + 3 values), once per
    # label count (5, 50, 500) and twice more at 50 (the other ways of editing).
    assert info["edit"]["label_counts"] == [5, 50, 500] and info["edit"]["edits"] == 8 * (4 + 7 + 2 + 2 + 2) * 5
    plots = {p.name for p in (folder / "plots").iterdir()}
    assert plots == {"samples.png", "samples_nearest.png", "reconstructions.png", "interpolation.png", "tsne.png",
                     "loss_curves.png", "label_efficiency.png", "edits.png", "edit_labels.png"}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    assert any("iwae" in line for line in lines)


def test_an_extra_sampler_gets_its_own_figures_and_plots(evaluated, monkeypatch):
    """An ex-post sampler the model carries (EXTRA_SAMPLERS) is drawn from like the model's own, with the
    same figures and plots, prefixed with its name."""
    _, _, job, _, client, _ = evaluated
    ev = sections.load_evaluation(job, client)
    own = ev.model.sample
    calls = []

    def sample(n, generator=None, sampler=None):
        calls.append(sampler)
        return own(n, generator=generator)

    monkeypatch.setattr(ev.model, "sample", sample)
    monkeypatch.setattr(sections, "EXTRA_SAMPLERS", {"gmm": lambda model: True, "flow": lambda model: False})
    for section in (sections.samples, sections.sample_quality, sections.nearest_training):
        assert section(ev)
    assert set(calls) == {None, "gmm"} and list(ev.samples) == ["model", "gmm"]
    for key in ("fd_classifier", "fd_classifier_ratio", "sample_precision_ratio", "sample_validity", "sample_coverage"):
        assert key in ev.metrics and f"gmm_{key}" in ev.metrics
    assert "gmm_fd_classifier_floor" not in ev.metrics  # the real ceilings are one per evaluation
    assert {"samples.png", "gmm_samples.png", "samples_nearest.png", "gmm_samples_nearest.png"} <= set(ev.plots)
    assert set(ev.info["sampling"]) == {"model", "gmm"}


def test_evaluate_logs_to_the_training_run(evaluated):
    _, _, job, out, client, _ = evaluated
    run = client.get_run(job.run_id)
    assert run.data.metrics["eval/recon_mse"] == pytest.approx(out["recon_mse"])
    assert run.data.metrics["eval/iwae_nll"] == pytest.approx(out["iwae_nll"])
    assert run.data.tags["latentforge.eval.primary_metric"] == "eval/iwae_nll"
    # The evaluation figures are linked to the trained LoggedModel and to the evaluated data set (the run's input).
    linked = {m.key: m for m in client.get_logged_model(job.train_metrics["mlflow_model_id"]).metrics}
    assert linked["eval/iwae_nll"].value == pytest.approx(out["iwae_nll"])
    assert linked["eval/iwae_nll"].dataset_digest == job.manifest["data_hash"][:36]
    assert linked["eval/iwae_nll"].dataset_name == job.manifest["name"]
    inputs = {(i.dataset.name, i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"])
              for i in run.inputs.dataset_inputs}
    assert inputs == {(job.manifest["name"], job.manifest["data_hash"][:36], "evaluation")}
    files = {a.path for a in client.list_artifacts(job.run_id, "evaluate")}
    assert "evaluate/metrics.json" in files
    plots = {a.path for a in client.list_artifacts(job.run_id, "evaluate/plots")}
    assert "evaluate/plots/loss_curves.png" in plots and "evaluate/plots/samples_nearest.png" in plots


def test_wrong_image_shape_is_one_clear_error_and_writes_nothing(evaluated, tmp_path, capsys):
    params, *_ = evaluated
    params = copy.deepcopy(params)
    params["train"]["output_dir"] = str(tmp_path / "train")
    params["evaluate"]["output_dir"] = str(tmp_path / "evaluate")
    model = MODELS["vae"](MODELS["vae"].config_class.tiny(image_size=32, channels=1))
    model.save_pretrained(tmp_path / "train" / "vae" / "model")
    (tmp_path / "train" / "vae" / "metrics.json").write_text(json.dumps({"mlflow_run_id": "x"}))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["evaluate", "--model", "vae", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "32x32x1" in err and "16x16x3" in err, err
    assert not (tmp_path / "evaluate").exists()


def test_missing_inputs_name_the_command_to_run(evaluated, tmp_path, capsys):
    params, *_ = evaluated
    params = copy.deepcopy(params)
    params["evaluate"]["output_dir"] = str(tmp_path / "evaluate")
    path = tmp_path / "params.yaml"

    missing_classifier = copy.deepcopy(params)
    missing_classifier["classifier"]["output_dir"] = str(tmp_path / "nowhere")
    path.write_text(yaml.safe_dump(missing_classifier))
    assert main(["evaluate", "--model", "vae", "--params", str(path)]) == 2
    assert "latentforge classifier" in capsys.readouterr().err

    path.write_text(yaml.safe_dump(params))
    assert main(["evaluate", "--model", "gan", "--params", str(path)]) == 2  # never trained here
    assert "latentforge train --model gan" in capsys.readouterr().err

    unreachable = copy.deepcopy(params)
    unreachable["mlflow"]["tracking_uri"] = "http://127.0.0.1:9"  # discard port: connection refused
    path.write_text(yaml.safe_dump(unreachable))
    assert main(["evaluate", "--model", "vae", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unreachable" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "evaluate").exists()
    # The classifier stage logs its own run: an unreachable store stops it before training, writing nothing.
    unreachable["classifier"]["output_dir"] = str(tmp_path / "classifier")
    path.write_text(yaml.safe_dump(unreachable))
    assert main(["classifier", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "MLflow tracking store http://127.0.0.1:9 is unreachable" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "classifier").exists()


def test_resolve_rejects_bad_evaluate_params(evaluated):
    from latentforge.pipelines.common.params import ParamsError

    params, *_ = evaluated
    bad = copy.deepcopy(params)
    bad["evaluate"]["iwae_k"] = 0
    with pytest.raises(ParamsError, match="iwae_k"):
        resolve_evaluation(bad, "vae")
    bad = copy.deepcopy(params)
    bad["evaluate"]["anomaly_class"] = 40  # shapes has 40 classes
    with pytest.raises(ParamsError, match="anomaly_class=40"):
        resolve_evaluation(bad, "vae")
    for counts in ([], [1, 10], [10.5]):
        bad = copy.deepcopy(params)
        bad["evaluate"]["probe_labels"] = counts
        with pytest.raises(ParamsError, match="probe_labels"):
            resolve_evaluation(bad, "vae")
    bad = copy.deepcopy(params)
    bad["evaluate"]["tsne_points"] = "many"
    with pytest.raises(ParamsError, match="tsne_points"):
        resolve_evaluation(bad, "vae")
    with pytest.raises(EvaluationError, match="no trained aae model"):
        resolve_evaluation(params, "aae")
    bad = copy.deepcopy(params)
    bad["evaluate"]["prior_samples"] = 100  # gone: every family draws num_samples
    with pytest.raises(ParamsError, match="prior_samples"):
        resolve_evaluation(bad, "vae")


def test_classifier_params_check_outlier_weight(evaluated):
    from latentforge.pipelines.classifier import resolve_classifier
    from latentforge.pipelines.common.params import ParamsError

    params, *_ = evaluated
    bad = copy.deepcopy(params)
    bad["classifier"]["outlier_weight"] = -1
    with pytest.raises(ParamsError, match="outlier_weight must be >= 0"):
        resolve_classifier(bad)
