"""`dvc exp run` never moves the production champion: a real git + DVC repository in a temp dir whose one
stage is the real `latentforge register --promote` (the `register` stage of dvc.yaml, on ready exports),
with a real MLflow sqlite store at the repository's root, where params put it (`sqlite:///mlflow.db`).

The exports are tiny ae models with known psnr figures (20, 21, 22 dB), ranked by psnr with a margin of
0.5 dB, so that every experiment registers a version the policy would make champion.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from latentforge.pipelines.export import export_model
from tests.e2e.test_dvc_repro import sh
from tests.pipelines.test_registry import _tiny_model

NAME = "ae-shapes"
PSNR = {"ae-good": 20.0, "ae-better": 21.0, "ae-best": 22.0}
DVC_YAML = """\
stages:
  register:
    cmd: latentforge register --model ae --export-dir exports/${export} --promote --record artifacts/register/ae.json
    deps:
      - exports/${export}
    params:
      - export
    outs:
      - artifacts/register/ae.json:
          cache: false
"""


@pytest.fixture(scope="module")
def exp_repo(project, tmp_path_factory) -> Path:
    """A committed git + DVC repository: the register stage, three exports, params choosing ``ae-good``."""
    root, params = project
    repo = tmp_path_factory.mktemp("exp-repo")
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    model = _tiny_model("ae", prepared, root / "exp-models")
    for label, psnr in PSNR.items():
        export_model(model, prepared, repo / "exports" / label, metrics={"psnr": psnr})
    params = json.loads(json.dumps(params))
    params["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"  # relative: the repository's own store
    params["registry"]["policies"] = {"default": {"metric": "psnr", "mode": "max", "margin": 0.5}}
    params["export"] = "ae-good"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    _commit(repo, "a register stage and three exports")
    return repo


def _commit(repo: Path, message: str) -> str:
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, cwd=repo)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def _set_export(repo: Path, label: str) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["export"] = label
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_an_experiment_never_moves_champion_and_logs_into_the_main_store(exp_repo):
    from mlflow.tracking import MlflowClient

    repo = exp_repo
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")

    def aliases() -> dict[str, str]:
        return {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}

    # The main pipeline run: the first version becomes champion (nothing to beat).
    out = sh("dvc", "repro", cwd=repo).stdout
    assert f"{NAME} version 1: champion by policy: no champion before" in out
    assert aliases() == {"champion": "1"}
    baseline = _commit(repo, "dvc repro: version 1 is champion")

    # A workspace experiment registers a better version (21 dB > 20 + 0.5): challenger, champion kept.
    out = sh("dvc", "exp", "run", "-S", "export=ae-better", "-n", "better", cwd=repo).stdout
    assert "challenger, not champion: would be champion by policy: psnr 21 > 20 + margin 0.5" in out, out
    assert (f"{NAME}: champion not moved, because this runs in DVC experiment 'better' (baseline {baseline[:7]})" in out
            and "To serve version 2: latentforge promote --model ae --version 2" in out), out
    assert aliases() == {"champion": "1", "challenger": "2"}
    tags = client.get_model_version(NAME, "2").tags
    assert (tags["dvc_experiment"], tags["dvc_experiment_baseline_rev"]) == ("better", baseline)
    record = json.loads((repo / "artifacts" / "register" / "ae.json").read_text())
    assert (record["version"], record["dvc_experiment"], record["promotion"]["alias"]) == (2, "better", "challenger")

    # --temp runs the stage in a copy under .dvc/tmp/exps/ that lacks the git-ignored store: the version
    # still lands in the main repository's store, and champion stays.
    sh("git", "reset", "-q", "--hard", cwd=repo)
    out = sh("dvc", "exp", "run", "--temp", "-S", "export=ae-best", "-n", "best-temp", cwd=repo).stdout
    assert "Ran experiment(s): best-temp" in out, out
    assert aliases() == {"champion": "1", "challenger": "3"}
    assert client.get_model_version(NAME, "3").tags["dvc_experiment"] == "best-temp"

    # A plain `dvc repro` of the same change is the main pipeline: it moves champion (22 > 20 + 0.5).
    _set_export(repo, "ae-best")
    out = sh("dvc", "repro", cwd=repo).stdout
    assert f"{NAME} version 4: champion by policy: psnr 22 > 20 + margin 0.5 (version 1)" in out, out
    assert "champion not moved" not in out
    assert aliases()["champion"] == "4"
    assert "dvc_experiment" not in client.get_model_version(NAME, "4").tags
