"""`dvc repro` for real, in a temporary git + DVC copy of this repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipelines.conftest import tiny_section

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: dvc and the `latentforge` console script


def sh(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    # DVC_STUDIO_OFFLINE: `dvc exp run` posts live metrics to Studio otherwise (no network here).
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own params decide where runs go
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """The files git would check out (tracked + untracked-not-ignored), committed in a fresh repo."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    dest = tmp_path / "repo"
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    # Small data, one tiny family, one epoch: these tests are about the pipeline, not the models.
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"]["shapes"].update(num_images=120, image_size=16)
    params["train"].update(epochs=1, family_epochs=None, batch_size=16, families=["vae"], log_every_steps=2)
    params["train"]["models"] = {"vae": tiny_section("vae")}
    params["classifier"].update(epochs=1, widths=[8, 16], feature_dim=32)
    params["evaluate"].update(iwae_k=4, iwae_images=16, num_samples=32, split_images=64,
                              validation_images=32, tsne_points=40, interp_pairs=2, interp_steps=3)
    # An untrained tiny VAE cannot pass the demo's sample-quality gates; the pipeline still needs a champion.
    params["registry"]["policies"]["vae"]["gates"] = None
    params["text"].update(encoder="hashed", hashed_dim=256, epochs=2, hidden_dim=32, eval_prompts=16, cpus_per_worker=1,
                          captioner_epochs=3)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy", cwd=dest)
    return dest


def test_dvc_repro_twice_then_push(repo_copy):
    first = sh("dvc", "repro", cwd=repo_copy)
    assert "Running stage 'prepare'" in first.stdout and "Running stage 'train@vae'" in first.stdout
    assert "Running stage 'train_text@vae'" in first.stdout and "Running stage 'evaluate_text@vae'" in first.stdout
    prepared = repo_copy / "data" / "prepared" / "shapes"
    assert (prepared / "manifest.json").is_file() and (prepared / "train.parquet").is_file()
    assert "/shapes" in (repo_copy / "data" / "prepared" / ".gitignore").read_text()
    # The train stage's outputs: a loadable model directory and its metrics, shown by `dvc metrics`.
    from latentforge.models import PretrainedModel

    model = PretrainedModel.from_pretrained(repo_copy / "artifacts" / "train" / "vae" / "model")
    assert model.sample(1).images.shape == (1, 3, 16, 16)
    shown = sh("dvc", "metrics", "show", "--json", cwd=repo_copy).stdout
    assert "val_score" in shown and "mlflow_run_id" in shown
    assert (repo_copy / "mlflow.db").is_file()
    # ... then evaluate, export and register: the version is in the registry as champion.
    evaluation = json.loads((repo_copy / "artifacts" / "evaluate" / "vae" / "metrics.json").read_text())
    assert "recon_psnr" in json.dumps(evaluation)
    # `dvc metrics show` (and `dvc exp show`) lists the evaluations' key figures, not their hundreds.
    shown = sh("dvc", "metrics", "show", "--json", cwd=repo_copy).stdout
    assert "artifacts/evaluate/vae/summary.json" in shown and "artifacts/evaluate/vae-text/summary.json" in shown
    assert '"recon_psnr_db"' in shown and '"generate_t1_seen_all_factors"' in shown
    assert "edit_success_shape" not in shown and "artifacts/evaluate/vae/metrics.json" not in shown
    exported = json.loads((repo_copy / "artifacts" / "export" / "vae" / "manifest.json").read_text())
    assert exported["attributes"]["labels_per_value"] == 50 and "shape" in exported["attributes"]["values"]  # for edit
    assert "edit_success_shape" in evaluation
    record = json.loads((repo_copy / "artifacts" / "register" / "vae.json").read_text())
    assert record["name"] == "vae-shapes" and record["version"] == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("vae-shapes", "champion")
    assert champion.version in (1, "1")
    # The version names the trained LoggedModel it was exported from, and evaluate's figures are linked to it.
    trained = client.get_logged_model(champion.tags["trained_model_id"])
    assert trained.source_run_id == champion.tags["mlflow_run_id"]
    assert {"eval/recon_mse", "val_score"} <= {m.key for m in trained.metrics or []}
    assert "artifacts/evaluate/vae/plots" in sh("dvc", "plots", "show", "--json", cwd=repo_copy).stdout
    # ... and the text model: trained against that champion, exported, registered as champion of its own
    # model with the decoder version it must be served beside.
    text = json.loads((repo_copy / "artifacts" / "register" / "vae-text.json").read_text())
    assert text["name"] == "vae-shapes-text" and (text["decoder_name"], text["decoder_version"]) == ("vae-shapes", "1")
    assert (repo_copy / "artifacts" / "export-text" / "vae" / "text_map.onnx").is_file()
    text_champion = client.get_model_version_by_alias("vae-shapes-text", "champion")
    assert text_champion.tags["decoder_version"] == "1"
    seen = json.loads((repo_copy / "artifacts" / "evaluate" / "vae-text" / "metrics.json").read_text())["generate_t1_seen_per_factor"]
    assert float(text_champion.tags["primary_metric_value"]) == seen  # evaluate_text's figure, shown by `models`

    second = sh("dvc", "repro", cwd=repo_copy)
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout

    # A param change re-runs the stage; the default local remote takes a push.
    sh("dvc", "repro", "--force", "prepare", cwd=repo_copy)
    pushed = sh("dvc", "push", cwd=repo_copy)
    assert "pushed" in pushed.stdout or "Everything is up to date" in pushed.stdout
    assert any((repo_copy / "dvc-storage").rglob("*"))


def test_dvc_tracks_user_raw_data(repo_copy):
    """The README's recipe: `dvc add` raw files under data/raw, point params at them, `dvc repro`."""
    from tests.pipelines.test_data import write_idx
    import numpy as np

    raw = repo_copy / "data" / "raw" / "mine"
    raw.mkdir(parents=True)
    write_idx(raw / "images.gz", np.arange(40 * 6 * 6, dtype=np.uint8).reshape(40, 6, 6), gz=True)
    write_idx(raw / "labels.gz", np.arange(40, dtype=np.uint8) % 2, gz=True)
    sh("dvc", "add", "data/raw/mine", cwd=repo_copy)
    assert (repo_copy / "data" / "raw" / "mine.dvc").is_file()
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["data"].update(name="mine", source="idx")
    params["data"]["idx"] = {"images": "data/raw/mine/images.gz", "labels": "data/raw/mine/labels.gz", "class_names": ["even", "odd"]}
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc", "repro", "prepare", cwd=repo_copy)
    assert "Running stage 'prepare'" in out.stdout
    manifest = yaml.safe_load((repo_copy / "data" / "prepared" / "mine" / "manifest.json").read_text())
    assert manifest["count"] == 40 and manifest["class_names"] == ["even", "odd"]
    assert "up to date" in sh("dvc", "repro", "prepare", cwd=repo_copy).stdout
