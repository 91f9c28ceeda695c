"""MLflow plumbing every stage shares: where the tracking store is, a checked client, the experiment,
the git commit runs are tagged with, and a scope for MLflow's fluent API."""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterator

from latentforge.pipelines.common.errors import UserError
from latentforge.pipelines.common.experiments import dvc_experiment
from latentforge.pipelines.common.params import ParamsError, section
from latentforge.runtime.store import absolute_uri


def tracking_uri(params: dict[str, Any]) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else params ``mlflow.tracking_uri``; local paths made absolute.

    A relative local store (``sqlite:///mlflow.db``) is resolved against the working directory, except
    inside a DVC experiment: there it is resolved against the main repository's root, because ``dvc exp
    run --temp`` and ``--queue`` run the stages in a throwaway copy of the repository (under
    ``<repo>/.dvc/tmp/exps/``) that lacks the git-ignored store. Every experiment, wherever it runs,
    logs into the one store that ``dvc repro`` uses.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or section(params, "mlflow").get("tracking_uri")
    if not uri:
        raise ParamsError("params mlflow.tracking_uri is missing (or set MLFLOW_TRACKING_URI)")
    experiment = dvc_experiment()
    return absolute_uri(uri, base=experiment.repo_root if experiment else None)


def mlflow_client(uri: str, error: type[Exception] = UserError):
    """An MlflowClient for ``uri``, checked reachable within seconds (no endless retries); ``error`` is
    raised, naming the store, when it is not."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    client = MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # the store's own exception types differ by backend
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"MLflow tracking store {uri} is unreachable: {first}") from None
    return client


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing (a sqlite store keeps artifacts beside its file)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the sqlite file, not in whatever the cwd happens to be.
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def git_commit() -> str:
    """The project's commit: $LATENTFORGE_GIT_COMMIT (set where there is no .git, e.g. in an image) or git."""
    if os.environ.get("LATENTFORGE_GIT_COMMIT"):
        return os.environ["LATENTFORGE_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def fluent_tracking(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (start_run, log_model, register_model) at ``uri`` for the block only.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` (and unsets it when given None), so the
    caller's environment is put back as it was, not only MLflow's global.
    """
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    # An explicitly set URI other than the environment's is put back as it was; otherwise the global is
    # unset again and MLflow reads the environment (put back below), as it did before the block.
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    if previous == env:
        previous = None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


# MLflow's stores keep a dataset digest of at most 36 characters; the data hash (sha256, 64 hex digits)
# is the digest's source, so the digest is its first 36 digits and the full hash is an input tag.
DIGEST_CHARS = 36


def log_data_input(client, run_id: str, manifest: dict[str, Any], data_dir: str | Path, context: str) -> None:
    """Log the prepared data set as an MLflow dataset input of run ``run_id`` (``mlflow.log_input``'s record):
    named ``manifest["name"]``, its digest the data hash (see :data:`DIGEST_CHARS`), its source the
    prepared folder, tagged ``mlflow.data.context`` (``training``, ``evaluation``) and the full hash."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-artifact source twice and warns that a local path matches both.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(Path(data_dir).resolve()))
    dataset = MetaDataset(source, name=str(manifest["name"]), digest=str(manifest["data_hash"])[:DIGEST_CHARS])
    tags = [InputTag("mlflow.data.context", context), InputTag("latentforge.data_hash", str(manifest["data_hash"]))]
    client.log_inputs(run_id, datasets=[DatasetInput(Dataset(**dataset.to_dict()), tags=tags)])
