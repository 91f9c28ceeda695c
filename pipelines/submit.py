"""Sending a training job to a running Ray cluster through the Ray Jobs API.

``latentforge submit --address http://<head>:8265 -- --model vae --set epochs=20`` is the same as
``ray job submit --working-dir . -- python -m latentforge.pipelines.cli train --model vae --set epochs=20``, plus:
local paths in the params (prepared data, checkpoint storage, the sqlite MLflow store) are made
absolute so that a job on a cluster of this machine finds them; on a real cluster point them at shared
storage (``--set train.storage_path=s3://...``, ``MLFLOW_TRACKING_URI=http://mlflow:5000``).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Callable

from latentforge.pipelines.common.errors import TrainingError
from latentforge.pipelines.common.params import load_params
from latentforge.pipelines.common.tracking import tracking_uri

# Never uploaded with the job: environments, caches and run outputs (the cluster has its own).
EXCLUDES = [".venv", ".git", "data", "dvc-storage", ".dvc/cache", "mlruns", "mlartifacts", "mlflow.db",
            "ray_results", "artifacts", "bench/results", "__pycache__", ".pytest_cache"]


def local_path_overrides(params_path: Path, train_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """``--set`` overrides and env vars that pin this machine's relative paths for the job."""
    params = load_params(params_path)
    overrides: list[str] = []
    given = " ".join(train_args)
    for key, value in (("data.output_dir", params["data"]["output_dir"]), ("train.storage_path", params["train"]["storage_path"])):
        if f"{key}=" not in given and "://" not in value:
            overrides += ["--set", f"{key}={Path(value).resolve()}"]
    return overrides, {"MLFLOW_TRACKING_URI": tracking_uri(params)}


def submit_training(
    address: str,
    train_args: list[str],
    params_path: Path = Path("params.yaml"),
    working_dir: Path = Path("."),
    wait: bool = True,
    timeout_s: float = 3600,
    echo: Callable[[str], None] = print,
) -> tuple[str, str]:
    """Submit ``latentforge train <train_args>`` as a Ray job; return (job id, final or current status)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, ValueError: the message names the address
        raise TrainingError(f"cannot reach the Ray Jobs API at {address}: {exc}") from None
    overrides, env = local_path_overrides(params_path, train_args)
    entrypoint = shlex.join(["python", "-m", "latentforge.pipelines.cli", "train", "--params", str(params_path), *train_args, *overrides])
    runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env}
    # A head that has just started answers "No available agent" until its job agent is up: retry briefly.
    for attempt in range(30):
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or attempt == 29:
                raise TrainingError(f"the Ray Jobs API at {address} refused the job: {exc}") from None
            time.sleep(2)
    echo(f"submitted {job_id} to {address}: {entrypoint}")
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    deadline = time.monotonic() + timeout_s
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        if time.monotonic() > deadline:
            raise TrainingError(f"job {job_id} still {status} after {timeout_s:g}s (it keeps running; `ray job logs {job_id}`)")
        time.sleep(2)
    logs = client.get_job_logs(job_id).strip().splitlines()
    for line in logs[-5:]:
        echo(line)
    if status != JobStatus.SUCCEEDED:
        raise TrainingError(f"job {job_id} {status}; see `ray job logs {job_id} --address {address}`")
    return job_id, str(status)
