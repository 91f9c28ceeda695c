"""The ``latentforge`` command: one sub-command per lifecycle stage, each a thin shell over pure functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipelines.params import DEFAULT_PARAMS, ParamsError, apply_overrides, load_params


def _params(args: argparse.Namespace) -> dict:
    return apply_overrides(load_params(args.params), args.set or [])


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipelines.prepare import prepare

    out_dir, manifest = prepare(_params(args))
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    print(f"prepared {manifest['name']} ({manifest['source']}): {counts}; image {tuple(manifest['image_shape'])} -> {out_dir}")
    if args.json:
        print(json.dumps(manifest["splits"]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.train import resolve_job, run_training

    job = resolve_job(
        load_params(args.params), args.model, args.set or [],
        num_workers=args.num_workers, use_gpu=args.use_gpu or None, run_name=args.run_name,
    )
    summary = run_training(job)
    print(json.dumps({k: summary[k] for k in ("mlflow_run_id", "checkpoint", "model_dir", "val_metric", "val_score")}))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import submit_training

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    for item in args.set or []:
        train_args += ["--set", item]
    if not any(a == "--model" or a.startswith("--model=") for a in train_args):
        raise ParamsError("submit: give the train arguments after --, e.g. `latentforge submit -- --model vae`")
    job_id, status = submit_training(args.address, train_args, params_path=args.params, wait=not args.no_wait)
    print(json.dumps({"job_id": job_id, "status": status}))
    return 0


def cmd_mlflow_server(args: argparse.Namespace) -> int:
    """Replace this process with `mlflow server` on a sqlite backend and a local artifact store."""
    import os
    import shutil

    exe = shutil.which("mlflow")
    if exe is None:
        raise FileNotFoundError("the `mlflow` command is not on PATH; run `make install` and activate .venv")
    artifacts = Path(args.artifacts).resolve()
    argv = [exe, "server", "--backend-store-uri", args.backend_store_uri, "--artifacts-destination", str(artifacts),
            "--host", args.host, "--port", str(args.port)]
    print(f"MLflow at http://{args.host}:{args.port} (export MLFLOW_TRACKING_URI=http://{args.host}:{args.port})", flush=True)
    os.execv(exe, argv)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a param: a dotted key (data.name=digits, train.epochs=3) or, for train, "
                            "a field of the model's config (beta=4); repeatable")
        return p

    p = stage("prepare", "turn the configured data set into data/prepared/<name>/ (train/val/test Parquet + manifest.json)")
    p.add_argument("--json", action="store_true", help="also print the split summary as JSON")
    p.set_defaults(func=cmd_prepare)

    p = stage("train", "train a model family on Ray Train, tracked in MLflow; the same --run-name resumes")
    p.add_argument("--model", required=True, help="model family (see `models.MODELS`), e.g. vae, vqvae2, gan")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (default: params train.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    p.add_argument("--run-name", help="run name (default: <family>-<data name>-<digest of config and data>); "
                   "an existing run of that name is resumed from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = stage("submit", "submit `latentforge train ...` as a job to a running Ray cluster (Ray Jobs API)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="the cluster's Jobs API, http://<head>:8265 (default: $RAY_ADDRESS or 127.0.0.1)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of waiting for the result")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of `latentforge train`")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("mlflow-server", help="start an MLflow tracking server (sqlite backend, local artifact store)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    p.add_argument("--artifacts", default="mlartifacts", help="artifact store folder (served by the server)")
    p.set_defaults(func=cmd_mlflow_server)
    return parser


# Errors a user can cause: one line on stderr and exit status 2, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from models.base import ConfigError
    from pipelines.data import DataError
    from pipelines.train import TrainingError

    return (ParamsError, DataError, ConfigError, FileNotFoundError, TrainingError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"latentforge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
