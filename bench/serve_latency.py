"""Serving latency and throughput: HTTP (Ray Serve + ONNX Runtime) against the same ONNX graphs called
in-process and against PyTorch eager, in one run on one machine.

Model: a VAE of the default config on 32x32 RGB ``shapes`` (the pipeline's default data set), weights as
initialised (latency does not depend on training). It is exported with the real exporter, registered in a
temporary sqlite MLflow store as ``vae-shapes`` and promoted to champion; the app is ``serving/config.yaml``
(one replica per deployment, this store) deployed on a local Ray runtime with ``serving.launch.deploy``.

Workloads: ``generate`` n=1, ``generate`` n=64 (fixed seed, PNG out for HTTP) and ``encode`` of one
image (a base64 PNG for HTTP). Paths:

* **http**: ``requests`` sessions against ``POST /v1/models/vae-shapes/<op>``, one per client thread;
* **onnx**: :class:`runtime.images.ModelRuntime` on the export (the sessions HTTP runs, no Serve);
* **torch**: the same model in PyTorch eager (``model.sample(noise=)``, ``model.encode``), no_grad.

Each cell runs ``clients`` threads (concurrency 1, 8, 32) that each send requests back to back for
``--seconds`` (after a warm-up); the figures are p50 / p99 latency of every request and throughput
(requests/s over the cell's wall time). Last, ``generate`` n=1 at concurrency 32 over HTTP with
``max_batch_size`` 16 (batching on) and 1 (off), switched on the live app by redeploying the config
(Serve calls ``reconfigure``), for the VAE and for a VQ-VAE-2 (params.yaml's demo size, sampling
through its prior: many small graph calls per request). Writes ``bench/results/serve_latency.json`` and prints one line per cell.

    .venv/bin/python bench/serve_latency.py                 # ~4 min on 2 cores
    .venv/bin/python bench/serve_latency.py --seconds 2     # quicker, noisier
"""

from __future__ import annotations

import argparse
import base64
import copy
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import common  # noqa: E402  (puts the repository root on sys.path)

import numpy as np
import torch

CONCURRENCY = (1, 8, 32)
NAME = "vae-shapes"
VQ_NAME = "vqvae2-shapes"


def measure(call: Callable[[], None], clients: int, seconds: float, warmup: int = 3) -> dict[str, float]:
    """``clients`` threads call ``call`` back to back for ``seconds``; latency p50/p99 (ms) and req/s."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client():
        mine = []
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - counted and reported, not hidden
                errors.append(repr(exc)[:200])
                continue
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "requests": int(len(lat)),
        "errors": len(errors),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "throughput_rps": len(lat) / wall,
        **({"first_error": errors[0]} if errors else {}),
    }


def setup(root: Path) -> tuple[Path, Path, str, dict]:
    """Prepared shapes data, a default-config VAE, its export, registered as champion in a sqlite store."""
    from latentforge.models import MODELS
    from latentforge.pipelines.export import export_model
    from latentforge.pipelines.common.params import load_params
    from latentforge.pipelines.prepare import prepare
    from latentforge.pipelines.registry import promote, register

    params = load_params(common.REPO / "params.yaml")
    params["data"]["shapes"].update(num_images=200)
    params["data"]["output_dir"] = str(root / "prepared")
    prepare(params)
    prepared = root / "prepared" / params["data"]["name"]
    h = params["data"]["shapes"]["image_size"]
    torch.manual_seed(0)
    cls = MODELS["vae"]
    model = cls(cls.config_class.from_dict({"image_size": h, "channels": 3}))
    model_dir = model.save_pretrained(root / "model")
    export_dir = root / "export"
    export_model(model_dir, prepared, export_dir)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    register(export_dir, uri, name=NAME, data_dir=prepared)
    promote(NAME, uri, version=1)
    # VQ-VAE-2 (params.yaml's demo size): its prior samples in a loop of small graph calls, the kind of
    # work batching across requests pays off for.
    vq = MODELS["vqvae2"]
    vq_model = vq(vq.config_class.from_dict({**params["train"]["models"]["vqvae2"], "image_size": h, "channels": 3}))
    vq_dir = vq_model.save_pretrained(root / "vq-model")
    export_model(vq_dir, prepared, root / "vq-export")
    register(root / "vq-export", uri, name=VQ_NAME, data_dir=prepared)
    promote(VQ_NAME, uri, version=1)
    return model_dir, export_dir, uri, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per cell (default 4)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--batching-only", action="store_true",
                        help="only the batching on/off comparison (writes serve_latency_batching.json unless --out)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.out = args.out or common.RESULTS / ("serve_latency_batching.json" if args.batching_only else "serve_latency.json")

    import ray
    import requests
    import yaml
    from ray import serve

    from latentforge.models import PretrainedModel
    from latentforge.serving.codec import encode_png
    from latentforge.serving.launch import deploy
    from latentforge.runtime.images import ModelRuntime

    result: dict[str, Any] = {"environment": common.environment(), "seconds_per_cell": args.seconds, "cells": []}
    root = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    try:
        model_dir, export_dir, uri, params = setup(root)
        model = PretrainedModel.from_pretrained(model_dir).eval()
        runtime = ModelRuntime.from_export(export_dir)
        c, h, w = runtime.image_shape
        image = np.random.default_rng(0).random((1, c, h, w), dtype=np.float32)
        image = np.round(image * 255) / 255  # what a PNG carries
        png = encode_png(image[0])
        latent = runtime.latent_shape

        config = yaml.safe_load((common.REPO / "serving" / "config.yaml").read_text())
        app = config["applications"][0]
        app["args"].update(tracking_uri=uri, models=[{"name": NAME}, {"name": VQ_NAME}], poll_interval_s=0)
        app["deployments"] = [d for d in app["deployments"] if d["name"] in ("ingress", NAME, VQ_NAME)]
        for d in app["deployments"]:
            d.pop("autoscaling_config", None)
            d.update(num_replicas=1, ray_actor_options={"num_cpus": 0})
            if d["name"] != "ingress":  # room for 32 clients: concurrency, not the queue bound, is measured
                d.update(max_ongoing_requests=64, max_queued_requests=256)
        config["http_options"] = {"host": "127.0.0.1", "port": args.port}
        ray.init(num_cpus=2, include_dashboard=False, namespace="serve", _node_ip_address="127.0.0.1")
        url = deploy(config)
        sessions = threading.local()

        def http(op: str, body: dict, name: str = NAME) -> Callable[[], None]:
            def call():
                if not hasattr(sessions, "s"):
                    sessions.s = requests.Session()
                r = sessions.s.post(f"{url}/v1/models/{name}/{op}", json=body, timeout=120)
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code} {r.text[:200]}")
            return call

        noise = {n: torch.randn((n, *latent), generator=torch.Generator().manual_seed(1)) for n in (1, 64)}
        image_t = torch.from_numpy(image)

        def torch_generate(n):
            def call():
                with torch.no_grad():
                    model.sample(n, noise=noise[n])
            return call

        def torch_encode():
            with torch.no_grad():
                model.encode(image_t)

        workloads = {
            "generate_n1": {"http": http("generate", {"n": 1, "seed": 0}),
                            "onnx": lambda: runtime.generate(1, seed=0), "torch": torch_generate(1)},
            "generate_n64": {"http": http("generate", {"n": 64, "seed": 0}),
                             "onnx": lambda: runtime.generate(64, seed=0), "torch": torch_generate(64)},
            "encode_1": {"http": http("encode", {"images": [png]}),
                         "onnx": lambda: runtime.encode(image), "torch": torch_encode},
        }
        for workload, paths in ({} if args.batching_only else workloads).items():
            for path, call in paths.items():
                for clients in CONCURRENCY:
                    cell = {"workload": workload, "path": path, "concurrency": clients,
                            **measure(call, clients, args.seconds)}
                    result["cells"].append(cell)
                    print(f"{workload:13s} {path:5s} c={clients:2d}: p50 {cell['p50_ms']:8.2f} ms  p99 {cell['p99_ms']:8.2f} ms"
                          f"  {cell['throughput_rps']:8.1f} req/s  ({cell['requests']} requests, {cell['errors']} errors)",
                          flush=True)

        # Batching on vs off, same app: max_batch_size switched in place through user_config.
        result["batching"] = {NAME: {}, VQ_NAME: {}}
        for label, size in (("on", 16), ("off", 1)):
            switched = copy.deepcopy(config)
            switched["applications"][0]["args"]["max_batch_size"] = size
            deploy(switched)
            deadline = time.monotonic() + 120
            while {m["runtime"]["max_batch_size"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["models"]} != {size}:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"max_batch_size {size} not applied after 120 s")
                time.sleep(0.5)
            for name in (NAME, VQ_NAME):
                cell = measure(http("generate", {"n": 1, "seed": 0}, name), 32, args.seconds)
                result["batching"][name][label] = {"max_batch_size": size, **cell}
                print(f"batching {label:3s} (max_batch_size {size:2d}) {name} generate n=1 c=32: p50 {cell['p50_ms']:.2f} ms  "
                      f"{cell['throughput_rps']:.1f} req/s", flush=True)

        def figure(workload, path, clients, key):
            return next(c[key] for c in result["cells"]
                        if (c["workload"], c["path"], c["concurrency"]) == (workload, path, clients))

        result["summary"] = {} if args.batching_only else {
            "onnx_vs_torch_speedup_generate_n1_c1": figure("generate_n1", "torch", 1, "p50_ms") / figure("generate_n1", "onnx", 1, "p50_ms"),
            "onnx_vs_torch_speedup_encode_1_c1": figure("encode_1", "torch", 1, "p50_ms") / figure("encode_1", "onnx", 1, "p50_ms"),
            "http_generate_n1_p50_ms_c1": figure("generate_n1", "http", 1, "p50_ms"),
        }
        result["summary"] |= {
            **{f"batching_on_over_off_throughput_c32_{name}": b["on"]["throughput_rps"] / b["off"]["throughput_rps"]
               for name, b in result["batching"].items()},
        }
        result["environment"]["loadavg_at_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
        print("summary: " + ", ".join(f"{k} {v:.2f}" for k, v in result["summary"].items()))
        common.write_json(result, args.out)
        print(f"-> {args.out}")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
