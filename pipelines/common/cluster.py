"""Ray plumbing (driver side): join or start the cluster, read its resources, ask an autoscaler for more."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


# The level of the ``ray`` logger in every process of the job (driver, tasks, actors). Ray's internal
# warnings, e.g. Ray Train's PlacementGroupCleaner repeating "Failed to query Ray Train Controller actor
# state" every second or two while the state API is slow on a busy machine, would otherwise be forwarded to
# the driver's console; errors still are. Ray Train's own logs keep every level in its log files.
RAY_CONSOLE_LOG_LEVEL = "ERROR"


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one (only on 127.0.0.1); Ray's warnings stay off
    the console (:data:`RAY_CONSOLE_LOG_LEVEL`), and where its logs are is printed once."""
    import ray

    # Ray Train's workers send every print() through a logger that also writes to stdout, so each line of
    # a training loop reached the log twice; unpatched, a print is one line of the worker's stdout. Read
    # by each trainer when it starts, which passes it on to its workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if ray.is_initialized():
        return
    quiet = ray.LoggingConfig(log_level=RAY_CONSOLE_LOG_LEVEL)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, logging_config=quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", logging_config=quiet)
    quiet_ray_data()
    print(f"Ray's logs: {ray_log_dir()}", flush=True)


def ray_log_dir() -> str:
    """The log folder of the connected Ray session, on its head node: ``<ray temp dir>/<session>/logs``
    (Ray's temp dir is ``$RAY_TMPDIR`` or ``$TMPDIR`` or /tmp, then ``ray``)."""
    import ray

    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return str(Path(temp) / "ray" / ray.get_runtime_context().get_session_name() / "logs")


def cluster_resources() -> dict[str, Any]:
    """The live cluster's CPU and GPU totals and its number of alive nodes."""
    import ray

    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"CPU": res.get("CPU", 0.0), "GPU": res.get("GPU", 0.0), "nodes": len(nodes)}


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Ask an autoscaling cluster for ``bundles`` (an empty list clears the request); a no-op elsewhere."""
    try:
        from ray.autoscaler.sdk import request_resources as _request

        _request(bundles=bundles)
    except Exception:  # no autoscaler (a local or fixed-size cluster): nothing to ask
        pass


def train_logging_config():
    """Ray Train's logging for a ``RunConfig``: its INFO records (each report's metrics as a
    ``TrainingReport(...)``, checkpoint paths) go to its log files under :func:`ray_log_dir` only."""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING")


def quiet_worker_logging() -> None:
    """In a Ray Train worker: INFO records of loggers outside ``ray.train`` off its console. Ray Train
    logs each ``ray.train.report`` ("Reporting training result N: TrainingReport(...)") at INFO through a
    logger named by its source file, which the ``RunConfig`` level does not reach; Ray Train's own files
    (:func:`train_logging_config`) keep its records."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data's console lines in this process at :data:`RAY_CONSOLE_LOG_LEVEL`: each dataset's "execution
    finished in ..." (two per epoch) and its progress-bar hint stay in its ``ray-data.log`` file. Ray Data
    configures its ``ray.data`` logger when imported, with a handler named ``console``."""
    import logging

    import ray.data  # noqa: F401  (its import sets up the handlers changed here)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(RAY_CONSOLE_LOG_LEVEL)
