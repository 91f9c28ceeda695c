"""Beyond one process: two Ray nodes with a worker killed mid-run, and a job sent to a `ray start` head.

Each test starts its own Ray cluster on 127.0.0.1 and stops it at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from latentforge.pipelines.train import resolve_job, run_training
from tests.pipelines.conftest import REPO, mlflow_runs

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_survive_a_killed_worker(project):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    root, params = project
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        job = resolve_job(params, "vae", ["epochs=8", "max_failures=2"], num_workers=2, run_name="fault")
        outcome: dict = {}

        def train():
            try:
                outcome["summary"] = run_training(job, echo=lambda s: None)
            except BaseException as exc:  # surfaced by the assertions below
                outcome["error"] = exc

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        run_dir = Path(job.storage_path) / "fault"
        deadline = time.monotonic() + 300
        while not any(run_dir.glob("checkpoint_*")):
            assert thread.is_alive(), outcome
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert len(workers) == 2 and len({w.node_id for w in workers}) == 2  # one worker per node
        assert thread.is_alive(), "training finished before the fault could be injected"
        os.kill(workers[-1].pid, signal.SIGKILL)
        thread.join(timeout=400)
        assert not thread.is_alive(), "training did not finish after the worker was killed"
        assert "error" not in outcome, outcome.get("error")
        summary = outcome["summary"]
        assert summary["epoch"] == 7

        client, runs = mlflow_runs(params)
        assert sum(r.data.tags.get("latentforge.run_name") == "fault" for r in runs) == 1
        for key in ("samples_per_sec", "epoch/val_score"):
            steps = [m.step for m in client.get_metric_history(summary["mlflow_run_id"], key)]
            assert steps == sorted(steps) and len(steps) == len(set(steps)), (key, steps)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def ray_head(monkeypatch):
    """`ray start --head` on 127.0.0.1 with the Jobs API; `ray stop` at the end.

    Token authentication is off for this loopback-only head, explicitly for the head and the client:
    left unset, Ray turns it on or off depending on whether ~/.ray/auth_token exists on the machine.
    """
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    dashboard = free_port()
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submit_job_to_ray_head(project, ray_head):
    from latentforge.pipelines.submit import submit_training

    root, params = project
    job_id, status = submit_training(
        ray_head, ["--model", "vae", "--run-name", "submitted", "--set", "epochs=1"],
        params_path=root / "params.yaml", working_dir=REPO, timeout_s=400, echo=lambda s: None,
    )
    assert status == "SUCCEEDED"
    client, runs = mlflow_runs(params)
    [run] = [r for r in runs if r.data.tags.get("latentforge.run_name") == "submitted"]
    assert run.info.status == "FINISHED" and "epoch/val_score" in run.data.metrics


def test_submit_to_nothing_fails_clearly(project):
    res = subprocess.run(
        [str(BIN / "latentforge"), "submit", "--params", str(project[0] / "params.yaml"),
         "--address", f"http://127.0.0.1:{free_port()}", "--", "--model", "vae"],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2 and "cannot reach the Ray Jobs API" in res.stderr, res.stderr
