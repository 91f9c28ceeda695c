"""The shared plumbing of the stages: the atomic directory write, hashes, the tracking URI, the errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from latentforge.pipelines.common.errors import DataError, ParamsError, TrainingError, UserError
from latentforge.pipelines.common.files import atomic_directory, sha256_file
from latentforge.pipelines.common.experiments import DvcExperiment, dvc_experiment
from latentforge.pipelines.common.tracking import fluent_tracking, mlflow_client, tracking_uri
from latentforge.runtime.store import absolute_uri


def test_atomic_directory_replaces_the_target_whole(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").is_file()  # the old output stays until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old directory left


def test_atomic_directory_keeps_the_old_output_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_creates_missing_parents(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "a" / "b") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "x").read_text() == "x"


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"latentforge" * 200_000)  # more than one 1 MiB chunk
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tracking_uri_env_wins_and_local_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking_uri({"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri({"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}) == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ParamsError, match="mlflow.tracking_uri is missing"):
        tracking_uri({"mlflow": {}})


def test_absolute_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("http://host:5000") == "http://host:5000"
    assert absolute_uri("mlruns") == str(tmp_path.resolve() / "mlruns")
    assert absolute_uri("sqlite:///m.db", base=tmp_path / "repo") == f"sqlite:///{tmp_path.resolve()}/repo/m.db"
    assert absolute_uri("sqlite:////abs/m.db", base=tmp_path) == "sqlite:////abs/m.db"
    assert absolute_uri("mlruns", base=tmp_path / "repo") == str(tmp_path.resolve() / "repo" / "mlruns")


def test_dvc_experiment_from_the_variables_dvc_exp_run_sets(tmp_path: Path) -> None:
    assert dvc_experiment({"DVC_ROOT": str(tmp_path), "DVC_STAGE": "register@vae"}) is None  # a plain `dvc repro`
    exp = dvc_experiment({"DVC_EXP_NAME": "beta-4", "DVC_EXP_BASELINE_REV": "0123456789abcdef", "DVC_ROOT": str(tmp_path)})
    assert exp == DvcExperiment("beta-4", "0123456789abcdef", tmp_path)
    assert exp.tags == {"dvc_experiment": "beta-4", "dvc_experiment_baseline_rev": "0123456789abcdef"}
    assert str(exp) == "DVC experiment 'beta-4' (baseline 0123456)"


def test_tracking_uri_inside_a_temp_experiment_is_the_main_repositorys_store(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run --temp` runs stages in <repo>/.dvc/tmp/exps/<tmp>/ with DVC_ROOT=<repo>: a relative store
    is the main repository's, not the throwaway copy's."""
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef")
    params = {"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking_uri(params) == f"sqlite:///{copy.resolve()}/mlflow.db"  # not an experiment: the working directory
    monkeypatch.setenv("DVC_EXP_NAME", "beta-4")
    assert tracking_uri(params) == f"sqlite:///{repo.resolve()}/mlflow.db"
    assert tracking_uri({"mlflow": {"tracking_uri": "sqlite:////elsewhere/m.db"}}) == "sqlite:////elsewhere/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(params) == "http://127.0.0.1:5000"


def test_fluent_tracking_puts_back_the_uri_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    inner = f"sqlite:///{tmp_path}/inner.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    with fluent_tracking(inner):
        assert mlflow.get_tracking_uri() == inner
    assert not mlflow.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # set by the environment only
    with fluent_tracking(inner):
        assert mlflow.get_tracking_uri() == inner
    assert mlflow.get_tracking_uri() == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")  # the environment still decides
    assert mlflow.get_tracking_uri() == "http://127.0.0.1:5001"

    explicit = f"sqlite:///{tmp_path}/explicit.db"
    mlflow.set_tracking_uri(explicit)  # set explicitly (this also writes the environment variable)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    try:
        with fluent_tracking(inner):
            assert mlflow.get_tracking_uri() == inner
        assert mlflow.get_tracking_uri() == explicit and os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    finally:
        mlflow.set_tracking_uri(None)


def test_unreachable_store_raises_the_callers_error() -> None:
    with pytest.raises(TrainingError, match="MLflow tracking store http://127.0.0.1:9 is unreachable"):
        mlflow_client("http://127.0.0.1:9", TrainingError)


def test_user_errors_keep_their_builtin_bases() -> None:
    assert issubclass(DataError, ValueError) and issubclass(DataError, UserError)
    assert issubclass(TrainingError, RuntimeError) and issubclass(TrainingError, UserError)


def test_ray_data_executions_stay_off_the_console_of_a_connected_process(tmp_path: Path) -> None:
    """connect_ray's process prints no "Dataset ... execution finished" line; Ray Data's log file has it."""
    import subprocess
    import sys

    script = (
        "import ray, ray.data\n"
        "from latentforge.pipelines.common.cluster import connect_ray, ray_log_dir\n"
        "connect_ray(num_cpus=1)\n"
        "ray.data.range(10).materialize()\n"
        "print('LOGS', ray_log_dir())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "execution finished" not in out.stdout + out.stderr
    logs = Path(out.stdout.split("LOGS ")[1].strip())
    assert any("execution finished" in f.read_text(errors="replace") for f in logs.rglob("ray-data*.log"))
