"""The ``latentforge`` command: one sub-command per lifecycle stage, each a thin shell over pure functions."""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import os
import re
import shutil
import sys
from pathlib import Path

from latentforge.pipelines.common.errors import DataError, UserError
from latentforge.pipelines.common.experiments import DvcExperiment, dvc_experiment
from latentforge.pipelines.common.params import DEFAULT_PARAMS, ParamsError, apply_overrides, load_params, section
from latentforge.pipelines.common.progress import quiet_library_bars
from latentforge.pipelines.common.tracking import tracking_uri
from latentforge.pipelines.prepare import load_split, prepare
from latentforge.pipelines.submit import submit_training
from latentforge.runtime.images import EditRequestError, ExportError
from latentforge.serving.demo import run_demo
from latentforge.serving.launch import ServeError, resolve_config, serve_forever

# The stages that import torch, Ray or MLflow (train, classifier, evaluate, export, registry, text) are
# imported inside their commands: `latentforge --help` and the light commands must not pay for them.


def _params(args: argparse.Namespace) -> dict:
    return apply_overrides(load_params(args.params), args.set or [])


def cmd_prepare(args: argparse.Namespace) -> int:
    out_dir, manifest = prepare(_params(args))
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    if manifest.get("kind") == "timeseries":
        shape = f"windows of {manifest['window']} points x {manifest['channels']} channel(s), stride {manifest['stride']}"
        print(f"prepared {manifest['name']} (timeseries, {manifest['count']} points): {counts} windows; {shape} -> {out_dir}")
    else:
        print(f"prepared {manifest['name']} ({manifest['source']}): {counts}; image {tuple(manifest['image_shape'])} -> {out_dir}")
    if args.json:
        print(json.dumps(manifest["splits"]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from latentforge.pipelines.train import resolve_job, run_training

    job = resolve_job(
        load_params(args.params), args.model, args.set or [],
        num_workers=args.num_workers, use_gpu=args.use_gpu or None, run_name=args.run_name,
    )
    summary = run_training(job)
    print(json.dumps({k: summary[k] for k in ("mlflow_run_id", "checkpoint", "model_dir", "val_metric", "val_score")}))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    for item in args.set or []:
        train_args += ["--set", item]
    if not any(a == "--model" or a.startswith("--model=") for a in train_args):
        raise ParamsError("submit: give the train arguments after --, e.g. `latentforge submit -- --model vae`")
    job_id, status = submit_training(args.address, train_args, params_path=args.params, wait=not args.no_wait)
    print(json.dumps({"job_id": job_id, "status": status}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from latentforge.pipelines.export import export_from_params

    out_dir, manifest = export_from_params(_params(args), args.model, out=args.out, metrics_path=args.metrics)
    figures = ", ".join(f"{name} {diff:.2g}" for name, diff in manifest["parity"].items())
    print(f"exported {manifest['family']} ({len(manifest['graphs'])} graphs, opset {manifest['opset']}) -> {out_dir}; "
          f"parity max |onnx - torch|: {figures}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from latentforge.runtime.images import ModelRuntime
    from latentforge.serving.codec import BadInput, decode_png, encode_png

    export_dir = args.export_dir
    if export_dir is None:
        if not args.model:
            raise ParamsError("edit: give --model <family> (its export under artifacts/export) or --export-dir")
        export_dir = Path((_params(args).get("export") or {}).get("output_dir") or "artifacts/export") / args.model
    rt = ModelRuntime.from_export(export_dir)
    if "edit" not in rt.capabilities:
        raise ExportError(f"{export_dir}: this {rt.manifest['family']} export cannot edit (no attribute vectors: a "
                          f"continuous latent with an encoder, exported by `latentforge export` on data with factors or classes)")
    try:
        image = decode_png(base64.b64encode(args.image.read_bytes()).decode("ascii"), "--image", rt.image_shape)
    except BadInput as exc:
        raise DataError(f"--image {args.image}: {exc.reason}") from None
    edited, source = rt.edit(image[None], args.factor, args.value, args.strength, args.source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_bytes(base64.b64decode(encode_png(edited[0])))
    tmp.replace(args.out)
    print(f"edited {args.image}: {args.factor} {source[0]} -> {args.value} (strength {args.strength:g}) -> {args.out}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from latentforge.pipelines.registry import register_from_params

    dvc_exp = dvc_experiment()
    version, decision = register_from_params(_params(args), args.model, export_dir=args.export_dir, name=args.name,
                                             promote_it=args.promote, dvc_exp=dvc_exp)
    metric = version.tags.get("primary_metric")
    value = version.tags.get("primary_metric_value")
    print(f"registered {version.name} version {version.version} (run {version.run_id}; {metric} = {value or 'not recorded'})")
    if decision is not None:
        print(f"{version.name} version {decision['version']}: {decision['reason']}")
        if dvc_exp:
            name_arg = f" --name {args.name}" if args.name else ""
            _print_champion_kept(dvc_exp, version, f"latentforge promote --model {args.model}{name_arg} --version {version.version}")
    if args.record:
        _write_record(args.record, {"name": version.name, "version": int(version.version), "run_id": version.run_id,
                                    "primary_metric": metric, "primary_metric_value": value, "promotion": decision,
                                    "dvc_experiment": dvc_exp.name if dvc_exp else None})
    return 0


def _print_champion_kept(dvc_exp: DvcExperiment, version, promote_command: str) -> None:
    """Say that an experiment left ``champion`` where it was, and how to promote its version by hand."""
    print(f"{version.name}: champion not moved, because this runs in {dvc_exp}: an experiment never moves "
          f"champion (the main pipeline run and `latentforge promote` do). To serve version {version.version}: "
          f"{promote_command}")


def _write_record(path: Path, record: dict) -> None:
    """A small receipt of what was registered (the DVC `register`/`register_text` stages' output),
    written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def cmd_promote(args: argparse.Namespace) -> int:
    from latentforge.pipelines.registry import model_name, policy_for, promote

    params = _params(args)
    name = args.name or model_name(params, args.model)
    decision = promote(name, tracking_uri(params), version=args.version, policy=policy_for(params, args.model))
    print(f"{name} version {decision['version']}: {decision['reason']}")
    return 0


def cmd_gates(args: argparse.Namespace) -> int:
    from latentforge.pipelines.registry import RegistryError, check_gates, model_name, policy_for

    params = _params(args)
    uri = tracking_uri(params)
    failures = []
    for family in args.model or section(params, "train")["families"]:
        name = model_name(params, family)
        policy = policy_for(params, family)
        try:
            report = check_gates(name, uri, policy)
        except RegistryError as exc:
            failures.append(f"{family}: {exc}")
            continue
        if report["champion"] is None:
            failures.append(f"{family}: {name} has no champion (nothing is served)")
        for row in report["versions"]:
            label = f"{name} version {row['version']} ({', '.join(row['roles'])})"
            if row["failed"]:
                failures.append(f"{family}: {label} fails {'; '.join(row['failed'])}")
            elif policy.gates:
                figures = ", ".join(f"{g.metric} {row['figures'][g.metric]:.4g} {g.op} {g.value:g}" for g in policy.gates)
                print(f"{label}: passes its gates: {figures}")
            else:
                print(f"{label}: no gates (params registry.policies.{family}.gates)")
    if failures:
        raise RegistryError("promotion gates failed: " + " | ".join(failures))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from latentforge.pipelines.registry import format_table, list_models

    uri = tracking_uri(_params(args))
    rows = list_models(uri, name=args.name)
    print(format_table(rows) if rows else f"no registered models in {uri}")
    return 0


def cmd_classifier(args: argparse.Namespace) -> int:
    from latentforge.pipelines.classifier import run_classifier

    out_dir, metrics = run_classifier(_params(args))
    print(json.dumps({"classifier_dir": str(out_dir), **metrics}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from latentforge.pipelines.evaluate import resolve_evaluation, run_evaluation
    from latentforge.pipelines.evaluate.series import prepared_series, resolve_series_evaluation, run_series_evaluation

    params = _params(args)
    if prepared_series(params):
        out = run_series_evaluation(resolve_series_evaluation(params, args.model))
    else:
        out = run_evaluation(resolve_evaluation(params, args.model))
    info = out["info"]
    print(json.dumps({"primary_metric": info["primary_metric"], "value": out.get(info["primary_metric"]),
                      "direction": info["primary_direction"], "mlflow_run_id": info["mlflow_run_id"]}))
    return 0


def cmd_caption_text(args: argparse.Namespace) -> int:
    from latentforge.pipelines.text.captions import captions_from_params

    record = captions_from_params(_params(args))
    print(json.dumps({k: record[k] for k in ("aligned_size", "unlabelled_count", "cosine", "seconds")}))
    return 0


def cmd_train_text(args: argparse.Namespace) -> int:
    from latentforge.pipelines.text.job import experiment_decoder, resolve_text_job
    from latentforge.pipelines.text.train import run_text_training

    model = args.model
    dvc_exp = dvc_experiment()
    if dvc_exp and args.experiment_decoder_record:
        model = experiment_decoder(args.model, args.experiment_decoder_record)
        print(f"train-text: {dvc_exp}: training against {model}, the version this experiment registered "
              f"({args.experiment_decoder_record}), not {args.model}")
    job = resolve_text_job(load_params(args.params), model, args.set or [], num_workers=args.num_workers,
                           run_name=args.run_name)
    summary = run_text_training(job)
    print(json.dumps({k: summary[k] for k in ("mlflow_run_id", "output_dir", "aligned_size", "loss_first_epoch", "loss_last_epoch")}))
    return 0


def cmd_evaluate_text(args: argparse.Namespace) -> int:
    from latentforge.pipelines.text.evaluate import evaluate_text_from_params

    out, metrics = evaluate_text_from_params(_params(args), args.model)
    print(json.dumps({"metrics": str(out / "metrics.json"), **{k: v for k, v in metrics.items() if k.endswith(
        ("per_factor", "all_factors", "drop", "copy_rate", "copy_rate_real", "entropy_ratio", "aligned_size", "classifier_min_accuracy"))}}))
    return 0


def cmd_export_text(args: argparse.Namespace) -> int:
    from latentforge.pipelines.text.export import export_text_from_params

    out, manifest = export_text_from_params(_params(args), args.model, out=args.out)
    figures = ", ".join(f"{name} {diff:.2g}" for name, diff in manifest["parity"].items())
    print(f"exported text model for {manifest['family']} -> {out}; parity max |onnx - torch|: {figures}")
    return 0


def cmd_register_text(args: argparse.Namespace) -> int:
    from latentforge.pipelines.registry import promote
    from latentforge.pipelines.text.registry import register_text

    params = _params(args)
    export_dir = args.export_dir or Path("artifacts/export-text") / args.model
    uri = tracking_uri(params)
    dvc_exp = dvc_experiment()
    version = register_text(export_dir, uri, name=args.name, tags=dvc_exp.tags if dvc_exp else None)
    print(f"registered {version.name} version {version.version} (decoder {version.tags['decoder_name']} "
          f"version {version.tags['decoder_version']})")
    decision = None
    if args.champion:
        decision = promote(version.name, uri, version=int(version.version),
                           hold_champion=f"this runs in {dvc_exp}" if dvc_exp else None)
        print(f"{version.name} version {decision['version']}: {decision['reason']}")
        if dvc_exp:
            _print_champion_kept(dvc_exp, version, f"latentforge promote --model {args.model} --name {version.name} "
                                                   f"--version {version.version}")
    if args.record:
        _write_record(args.record, {"name": version.name, "version": int(version.version), "run_id": version.run_id,
                                    "decoder_name": version.tags["decoder_name"],
                                    "decoder_version": version.tags["decoder_version"], "promotion": decision,
                                    "dvc_experiment": dvc_exp.name if dvc_exp else None})
    return 0


def text_models_with_champion(uri: str, decoders: list[str]) -> list[dict]:
    """``<decoder>-text`` models that have a ``champion`` (what ``dvc repro``'s register_text stages
    make), each bound to the ``<decoder>@champion`` it must have been trained against."""
    from mlflow.exceptions import MlflowException

    from latentforge.pipelines.registry import connect

    client, found = connect(uri), []
    for decoder in decoders:
        try:
            client.get_model_version_by_alias(f"{decoder}-text", "champion")
        except MlflowException:
            continue
        found.append({"name": f"{decoder}-text", "alias": "champion", "decoder": f"{decoder}@champion"})
    return found


def cmd_serve(args: argparse.Namespace) -> int:
    """Deploy serving/config.yaml (or --config) on Ray Serve and serve until Ctrl-C."""
    params = _params(args)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    models = None
    if args.params_store or args.model:
        from latentforge.pipelines.registry import model_name

        if args.params_store:
            uri = tracking_uri(params)
        families = args.model or (section(params, "train").get("families") if args.params_store else None)
        models = [model_name(params, family) for family in families] if families else None
        if models and args.params_store:
            models += text_models_with_champion(uri, models)
    config = resolve_config(args.config, tracking_uri=uri, models=models, host=args.host, port=args.port)

    def ready(url: str) -> None:
        if args.demo:
            data = section(params, "data")
            test = load_split(Path(data["output_dir"]) / data["name"], "test")["images"]
            for line in run_demo(url, test, args.demo):
                print(line, flush=True)
        print(f"serving at {url}/ (the page; the API at {url}/docs); Ctrl-C stops", flush=True)

    serve_forever(config, address=args.address, num_cpus=args.num_cpus, on_ready=ready)
    return 0


def cmd_mlflow_server(args: argparse.Namespace) -> int:
    """Replace this process with `mlflow server` on a sqlite backend and a local artifact store."""
    exe = shutil.which("mlflow")
    if exe is None:
        raise FileNotFoundError("the `mlflow` command is not on PATH; run `make install` and activate .venv")
    artifacts = Path(args.artifacts).resolve()
    argv = [exe, "server", "--backend-store-uri", args.backend_store_uri, "--artifacts-destination", str(artifacts),
            "--host", args.host, "--port", str(args.port)]
    print(f"MLflow at http://{args.host}:{args.port} (export MLFLOW_TRACKING_URI=http://{args.host}:{args.port})", flush=True)
    os.execv(exe, argv)
    return 0  # not reached


def plain_text(docstring: str) -> str:
    """A docstring as terminal help: reStructuredText's ``literal`` and :role:`target` markup removed."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", docstring)
    return re.sub(r"``([^`]+)``", r"\1", text)


def package_version() -> str:
    """The installed latentforge distribution's version (pyproject.toml's ``version``)."""
    return importlib.metadata.version("latentforge")


# A declarative table of the sub-commands and their options: exempt from the 80-line rule for functions.
def build_parser() -> argparse.ArgumentParser:
    """The ``latentforge`` argument parser: one sub-command per stage, each with ``--params`` and ``--set``."""
    parser = argparse.ArgumentParser(prog="latentforge", description=plain_text(__doc__))
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=plain_text(help), description=plain_text(help))
        p.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a param: a dotted key (data.name=digits, train.epochs=3) or, for train, "
                            "a field of the model's config (beta=4); repeatable")
        return p

    p = stage("prepare", "turn the configured data set into data/prepared/<name>/ (train/val/test Parquet + manifest.json)")
    p.add_argument("--json", action="store_true", help="also print the split summary as JSON")
    p.set_defaults(func=cmd_prepare)

    p = stage("train", "train a model family on Ray Train, tracked in MLflow; the same --run-name resumes")
    p.add_argument("--model", required=True, help="model family, e.g. vae, vqvae2, gan, conv_ae, lstm_ae (an unknown name lists them all)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (default: params train.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    p.add_argument("--run-name", help="run name (default: <family>-<data name>-<digest of config and data>); "
                   "an existing run of that name is resumed from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = stage("submit", "submit 'latentforge train ...' as a job to a running Ray cluster (Ray Jobs API)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="the cluster's Jobs API, http://<head>:8265 (default: $RAY_ADDRESS or 127.0.0.1)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of waiting for the result")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of 'latentforge train'")
    p.set_defaults(func=cmd_submit)

    p = stage("export", "export a trained model to parity-checked ONNX graphs + manifest.json (artifacts/export/<family>)")
    p.add_argument("--model", required=True, help="model family, e.g. vae; reads <train.output_dir>/<family>/model")
    p.add_argument("--out", type=Path, help="output folder (default: <export.output_dir or artifacts/export>/<family>)")
    p.add_argument("--metrics", type=Path, help="JSON metrics to record in the manifest "
                   "(default: artifacts/evaluate/<family>/metrics.json when present)")
    p.set_defaults(func=cmd_export)

    p = stage("edit", "edit a PNG in the latent space of an export: encode, move along an attribute vector, decode")
    p.add_argument("--model", help="model family whose export (<export.output_dir or artifacts/export>/<family>) to use")
    p.add_argument("--export-dir", type=Path, help="the export directory instead of --model's")
    p.add_argument("--image", type=Path, required=True, help="a PNG of the model's size and channels")
    p.add_argument("--factor", required=True, help="the factor to change (the export's manifest lists them), e.g. shape")
    p.add_argument("--value", required=True, help="the value it should show, e.g. square")
    p.add_argument("--strength", type=float, default=1.0, help="0 to 3: how far along the attribute vector (default 1)")
    p.add_argument("--source", help="the image's current value when known (default: read from its latent)")
    p.add_argument("--out", type=Path, required=True, help="where to write the edited PNG")
    p.set_defaults(func=cmd_edit)

    p = stage("register", "register a family's ONNX export (artifacts/export/<family>) as a new MLflow model version")
    p.add_argument("--model", required=True, help="model family, e.g. vae, vqvae2, gan")
    p.add_argument("--export-dir", type=Path, help="the export directory (default: <export.output_dir>/<family>)")
    p.add_argument("--name", help="registered model name (default: <family>-<data name of the export>)")
    p.add_argument("--promote", action="store_true", help="then apply the promotion policy (params registry.policies)")
    p.add_argument("--record", type=Path, help="also write what was registered (name, version, promotion) as JSON here")
    p.set_defaults(func=cmd_register)

    p = stage("promote", "move the champion/challenger aliases: by the family's policy, or to --version by hand")
    p.add_argument("--model", required=True, help="model family; the registered model is <family>-<data.name>")
    p.add_argument("--version", type=int, help="make this version champion by hand (default: apply the policy to the newest)")
    p.add_argument("--name", help="registered model name (default: <family>-<data.name>)")
    p.set_defaults(func=cmd_promote)

    p = stage("gates", "check the promotion gates (params registry.policies.<family>.gates) of each family's newest "
                       "version and champion; exit 2 naming the family and the figure when one fails")
    p.add_argument("--model", action="append", help="a family to check (repeatable; default: train.families)")
    p.set_defaults(func=cmd_gates)

    p = stage("models", "list registered model versions with their aliases and primary metric")
    p.add_argument("--name", help="only this registered model")
    p.set_defaults(func=cmd_models)

    p = stage("classifier", "train the domain classifier (features for evaluate) -> artifacts/classifier/<data name>/")
    p.set_defaults(func=cmd_classifier)

    p = stage("evaluate", "evaluate a trained family on the test split -> artifacts/evaluate/<family>/, logged to its MLflow run")
    p.add_argument("--model", required=True, help="model family, e.g. vae, vqvae2, gan, conv_ae, lstm_ae (an unknown name lists them all)")
    p.set_defaults(func=cmd_evaluate)

    p = stage("caption-text", "train the image captioner on the aligned pairs and pseudo-caption the unlabelled train "
              "images, once for every family's train-text -> artifacts/text-captions")
    p.set_defaults(func=cmd_caption_text)

    p = stage("train-text", "learn f_tau (text -> latent space) on an aligned subset, decoder frozen -> artifacts/text/<family>")
    p.add_argument("--model", required=True, help="the decoder: a family (its artifacts/train/<family>/model), a "
                   "save_pretrained directory, or a registered model (vae-shapes, vae-shapes@champion, vae-shapes/3)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (default: params text.num_workers)")
    p.add_argument("--run-name", help="MLflow run name (default: <family>-<data>-text-<digest>)")
    p.add_argument("--experiment-decoder-record", type=Path,
                   help="inside a DVC experiment (dvc exp run), train against the version this register record "
                        "names (the version the experiment registered: it never becomes champion) instead of --model")
    p.set_defaults(func=cmd_train_text)

    p = stage("evaluate-text", "score a text model's images with the attribute classifier, per mode (generate, retrieve, "
              "rerank) at temperature 0 and 1 (8 per prompt), with copy rates: seen prompts, paraphrases, held-out "
              "(shape, colour) combinations of tiers a and b, free factors -> artifacts/evaluate/<family>-text/metrics.json")
    p.add_argument("--model", required=True, help="model family whose text model (artifacts/text/<family>) to evaluate")
    p.set_defaults(func=cmd_evaluate_text)

    p = stage("export-text", "export a text model (f_tau + its frozen decoder [+ MiniLM]) to parity-checked ONNX -> artifacts/export-text/<family>")
    p.add_argument("--model", required=True, help="model family whose text model (artifacts/text/<family>) to export")
    p.add_argument("--out", type=Path, help="output folder (default: artifacts/export-text/<family>)")
    p.set_defaults(func=cmd_export_text)

    p = stage("register-text", "register a text export as a version of <family>-<data>-text, tagged with its decoder version")
    p.add_argument("--model", required=True, help="model family (reads artifacts/export-text/<family>)")
    p.add_argument("--export-dir", type=Path, help="the export-text directory (default: artifacts/export-text/<family>)")
    p.add_argument("--name", help="registered model name (default: <family>-<data name>-text)")
    p.add_argument("--champion", action="store_true", help="then make this version the champion (what serving loads)")
    p.add_argument("--record", type=Path, help="also write what was registered (name, version, decoder) as JSON here")
    p.set_defaults(func=cmd_register_text)

    p = stage("serve", "serve the registered models over HTTP: Ray Serve + ONNX Runtime (serving/config.yaml)")
    p.add_argument("--config", type=Path, default=Path("serving/config.yaml"), help="Serve config (default: serving/config.yaml)")
    p.add_argument("--model", action="append", metavar="FAMILY",
                   help="serve the champion of <family>-<data.name> (repeatable; default: the config's models)")
    p.add_argument("--params-store", action="store_true",
                   help="use the MLflow store of params.yaml (mlflow.tracking_uri) instead of the config's, and "
                        "serve the champions of its train.families (unless --model is given)")
    p.add_argument("--demo", type=Path, metavar="DIR",
                   help="once up, call every endpoint on the prepared test images and save the images to DIR")
    p.add_argument("--host", help="HTTP host (default: the config's, 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: the config's, 8000)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray runtime)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray runtime (default: all)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("mlflow-server", help="start an MLflow tracking server (sqlite backend, local artifact store)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    p.add_argument("--artifacts", default="mlartifacts", help="artifact store folder (served by the server)")
    p.set_defaults(func=cmd_mlflow_server)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can cause: one line on stderr and exit status 2, no traceback. The pipelines' own
    are all :class:`UserError`; the others come from the layers that cannot import pipelines."""
    from latentforge.models.base import ConfigError  # imports torch: only once a command has failed

    return (UserError, ServeError, ConfigError, FileNotFoundError, ExportError, EditRequestError)


def main(argv: list[str] | None = None) -> int:
    """Run the ``latentforge`` command line; returns the exit status (2 for a user error)."""
    args = build_parser().parse_args(argv)
    quiet_library_bars()
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"latentforge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
