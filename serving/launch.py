"""``latentforge serve``: start Ray (or join a cluster), deploy ``serving/config.yaml``, serve until stopped.

It deploys the config file the way ``serve run serving/config.yaml`` does (the same Serve schema, the
same deploy call), after filling in what the project knows: the MLflow store of ``params.yaml`` (or
``$MLFLOW_TRACKING_URI``), the models ``--model`` names and the host and port. It then waits until the
application runs, so that a registry without the configured alias fails here with one line rather than
in a replica's log.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from latentforge.runtime.store import absolute_uri

# ray is imported inside deploy and serve_forever: the CLI imports this module (ServeError is one of
# the errors it prints as one line) for every command, `latentforge --help` included, and importing
# ray takes seconds.

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


class ServeError(RuntimeError):
    """The application could not be deployed; the message says why (Serve's own message included)."""


def resolve_config(
    path: str | Path = DEFAULT_CONFIG,
    tracking_uri: str | None = None,
    models: list[str | dict[str, Any]] | None = None,
    host: str | None = None,
    port: int | None = None,
) -> dict[str, Any]:
    """The Serve config at ``path`` with these overrides applied to its first application. ``models``:
    registered model names or ``args.models`` entries (``{"name", "alias", "decoder"}``); deployments
    that it adds get the options of the config's first model deployment."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    config = yaml.safe_load(path.read_text())
    try:
        app = config["applications"][0]
        args = app.setdefault("args", {})
    except (KeyError, IndexError, TypeError):
        raise ServeError(f"{path}: expected a Serve config with an `applications` list") from None
    if tracking_uri:
        args["tracking_uri"] = tracking_uri
    if args.get("tracking_uri"):
        args["tracking_uri"] = absolute_uri(args["tracking_uri"])  # the builder may run in another directory
    if models:
        entries = [m if isinstance(m, dict) else {"name": m} for m in models]
        names = [m["name"] for m in entries]
        template = next((d for d in app.get("deployments", []) if d.get("name") != "ingress"), None)
        known = {d.get("name") for d in app.get("deployments", [])}
        args["models"] = entries
        app["deployments"] = [d for d in app.get("deployments", []) if d.get("name") in {"ingress", *names}]
        app["deployments"] += [{**template, "name": n} for n in names if n not in known and template]
    http = config.setdefault("http_options", {})
    if host:
        http["host"] = host
    if port:
        http["port"] = int(port)
    return config


def deploy(config: dict[str, Any], timeout_s: float = 300.0) -> str:
    """Deploy ``config`` on the connected Ray runtime; wait until its applications run. Returns the URL."""
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    # Private on purpose: Ray Serve has no public Python call that deploys a config file. serve.run and
    # serve.run_many take Application objects built in this process, so the `deployments:` overrides of
    # the config (replicas, autoscaling, ray_actor_options, queue bounds) would have to be re-applied
    # here, duplicating Serve's own merge; the config path (the controller's apply_config, which keeps
    # `serve deploy` and `serve status` working on the result) is reached only by the `serve run` /
    # `serve deploy` CLIs (these two calls, ray/serve/scripts.py) and the dashboard's REST API, which
    # this launcher does not start. The public serve.start does the first half but returns no client.
    # Tested on ray 2.60.0, the range pyproject.toml pins (>=2.60,<2.61); tests/serving/test_launch.py checks
    # that the installed Ray still has both calls.
    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)  # not blocking: the loop below surfaces DEPLOY_FAILED
    names = [a.name for a in schema.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n] for n in names if n in apps}
        failed = [(n, s) for n, s in states.items() if str(s.status).endswith("DEPLOY_FAILED")]
        if failed:
            name, state = failed[0]
            # The deployments' messages end with the replica's exception: the reason a user can act on.
            reasons = [f"{d}: {_last_line(s.message)}" for d, s in state.deployments.items() if s.message]
            raise ServeError(f"application {name!r} failed to deploy: {'; '.join(reasons) or _last_line(state.message)}")
        if len(states) == len(names) and all(str(s.status).endswith("RUNNING") for s in states.values()):
            break
        if time.monotonic() > deadline:
            raise ServeError(f"applications not running after {timeout_s:g} s: "
                             + ", ".join(f"{n} {s.status}" for n, s in states.items()))
        time.sleep(0.5)
    http = schema.http_options
    return f"http://{http.host}:{http.port}"


def _last_line(message: str) -> str:
    lines = [line for line in str(message).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def serve_forever(config: dict[str, Any], address: str | None = None, num_cpus: int | None = None,
                  on_ready=None) -> None:
    """Start (or join, with ``address``) Ray, deploy ``config`` and block until SIGINT/SIGTERM; then
    shut Serve down and, when this process started it, the Ray runtime."""
    import ray
    from ray import serve

    kwargs: dict[str, Any] = {"namespace": "serve", "include_dashboard": False}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=num_cpus, _node_ip_address="127.0.0.1")
    ray.init(**kwargs)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deploy(config)
        if on_ready:
            on_ready(url)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
