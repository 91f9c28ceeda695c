"""Ray Train overhead: samples/s of the training job against a plain PyTorch loop, and the job's start-up.

For each family (vae, vqvae2, gan by default; default configs, image size and channels from the data as
``resolve_job`` sets them), in ONE run of this script on one machine:

* **plain loop**: the same model, optimisers, batch size and ``train_step``, fed by the same
  ``pipelines.train.decode_batch`` from the train Parquet split read into memory (numpy batches of raw
  image bytes, as Ray Data hands them to the workers), the same number of steps per epoch
  (``train_count // batch_size``, last partial batch dropped). Timed over whole epochs after a 3-step
  warm-up. Run twice: with the torch thread count a Ray worker gets (measured inside a Ray Train worker
  with ``cpus_per_worker=1``, see the probe below) and with this process's default thread count.
* **Ray Train, 1 worker and 2 workers**: ``resolve_job`` + ``run_training`` (the real job: Ray Data
  shards, DDP, MLflow logging every ``log_every_steps``, per-epoch validation and checkpoints). The
  figure is the MLflow metric ``epoch/epoch_samples_per_sec`` (the loop's own ``n_steps * batch_size *
  world / epoch_seconds``, validation and checkpointing excluded), averaged over every epoch but the
  first (warm-up: first allocations, the dataset iterator starting).
* **ratio** ray 1 worker / plain loop at the matched thread count: target >= 0.9.
* **start-up overhead** of the 1-worker job (Ray itself already running: its start is ``ray_init_s``,
  measured once; the MLflow sqlite store already created: ``mlflow_store_init_s``). With ``t0`` the wall
  clock just before ``run_training`` is called, and the MLflow metric ``samples_per_sec``, which rank 0
  logs at local step ``L = log_every_steps`` (timestamp ``ts``, value ``r`` = samples of the first ``L``
  steps over the seconds since the epoch loop started):

  - ``startup_to_first_logged_step_s = ts - t0``: the literal "train to first logged step" (it
    includes L training steps);
  - ``startup_to_loop_start_s = ts - L*B*world/r - t0``: driver checks, MLflow run, Ray Data
    materialisation, worker group and process group start, model build; exact from the logged rate;
  - ``startup_to_first_step_s = ts - (L-1)*B*world/r_steady - t0``: to the end of the first step,
    estimating the L-1 later steps at the steady (epochs 2..) rate.

* **probe**: separate small TorchTrainer runs (1 and 2 workers, ``cpus_per_worker=1``) record each worker's
  ``torch.get_num_threads()``, ``OMP_NUM_THREADS`` and the time the loop's exact data path takes with
  no model: waiting on ``iter_batches`` (same arguments as the job) and ``decode_batch`` per batch.

A temporary project holds everything (prepared shapes data, sqlite MLflow store, Ray storage); it is
deleted at the end (``--keep`` keeps it). Writes ``bench/results/train_throughput.json`` (smoke runs with
other ``--num-images``/``--epochs``: ``train_throughput_smoke.json``) and prints one line per family.

    .venv/bin/python bench/train_throughput.py                    # vae, vqvae2, gan; ~20 min on 2 cores
    .venv/bin/python bench/train_throughput.py --families vae --num-images 960 --epochs 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # noqa: E402  (puts the repository root on sys.path)

import numpy as np
import torch

DEFAULT_FAMILIES = ("vae", "vqvae2", "gan")
NUM_IMAGES = 4800
IMAGE_SIZE = 32
# Epochs of each Ray run; the first is warm-up and excluded. VQ-VAE-2 is ~25x slower per step than
# the others on a CPU, so it gets one measured epoch.
EPOCHS = {"vae": 3, "gan": 3, "vqvae2": 2}
TARGET_RATIO = 0.9
# Steps per epoch of the profiling run (only made when a ratio misses the target, or with --profile).
PROFILE_MAX_STEPS = {"vqvae2": 15}
WARMUP_STEPS = 3


def log(msg: str) -> None:
    print(f"  [train_throughput] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# The project


def make_project(root: Path, num_images: int, families: list[str]) -> dict[str, Any]:
    """params.yaml of this checkout, pointed at ``root``: shapes data, sqlite MLflow, Ray storage."""
    from latentforge.pipelines.common.params import load_params
    from latentforge.pipelines.prepare import prepare

    params = load_params(common.REPO / "params.yaml")
    data = params["data"]
    data.update(name="shapes", source="shapes", output_dir=str(root / "data" / "prepared"))
    data["shapes"].update(num_images=num_images, image_size=IMAGE_SIZE)
    params["train"].update(
        storage_path=str(root / "ray_results"),
        output_dir=str(root / "artifacts"),
        images_every=10_000,  # grids only after the last epoch (sampling VQ-VAE-2's prior takes a while)
        num_workers=1,
        cpus_per_worker=1,
        use_gpu=False,
    )
    params["train"]["models"] = {f: {} for f in families}  # default configs
    params["mlflow"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    t0 = time.perf_counter()
    prepare(params)
    params["_prepare_seconds"] = round(time.perf_counter() - t0, 2)
    return params


# ----------------------------------------------------------------------------------------------------
# Probe: threads and the data path inside a Ray Train worker


def probe_loop(cfg: dict[str, Any]) -> None:
    """Per worker: thread settings, then ``cfg['epochs']`` passes over the train shard with the job's
    exact ``iter_batches`` arguments, timing the wait for each batch and its ``decode_batch``."""
    import os
    import time

    import ray.train
    import torch

    from latentforge.pipelines.train import decode_batch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    record: dict[str, Any] = {
        "rank": rank,
        "world": ctx.get_world_size(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "os_cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "epochs": [],
    }
    batch_size = cfg["batch_size"]
    for epoch in range(cfg["epochs"]):
        wait = decode = 0.0
        n = 0
        t_epoch = time.perf_counter()
        iterator = iter(shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=cfg["seed"] + 1000 * epoch + rank,
        ))
        while True:
            a = time.perf_counter()
            try:
                raw = next(iterator)
            except StopIteration:
                break
            b = time.perf_counter()
            decode_batch(raw, cfg["image_shape"])
            decode += time.perf_counter() - b
            wait += b - a
            n += 1
        record["epochs"].append({
            "batches": n, "seconds": round(time.perf_counter() - t_epoch, 4),
            "iter_wait_ms_per_batch": round(1000 * wait / max(n, 1), 3),
            "decode_ms_per_batch": round(1000 * decode / max(n, 1), 3),
        })
    Path(cfg["out_dir"], f"rank{rank}.json").write_text(json.dumps(record))
    ray.train.report({"done": 1})


def run_probe(params: dict[str, Any], root: Path, workers: int) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    data_dir = Path(params["data"]["output_dir"]) / params["data"]["name"]
    manifest = json.loads((data_dir / "manifest.json").read_text())
    out_dir = root / f"probe{workers}"
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = {"train": ray.data.read_parquet(str(data_dir / "train.parquet")).materialize()}
    trainer = TorchTrainer(
        probe_loop,
        train_loop_config={"batch_size": params["train"]["batch_size"], "epochs": 2, "seed": params["train"]["seed"],
                           "image_shape": manifest["image_shape"], "out_dir": str(out_dir)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": params["train"]["cpus_per_worker"]}),
        run_config=ray.train.RunConfig(name=f"probe-{workers}w-{int(time.time())}", storage_path=str(root / "ray_results")),
        datasets=datasets,
    )
    t0 = time.perf_counter()
    trainer.fit()
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(workers)]
    return {"workers": workers, "cpus_per_worker": params["train"]["cpus_per_worker"], "fit_seconds": round(time.perf_counter() - t0, 2), "ranks": ranks}


def profile_loop(cfg: dict[str, Any]) -> None:
    """One Ray Train worker doing what ``train_loop_per_worker`` does per step (same ``iter_batches``
    arguments, ``decode_batch``, ``prepare_model``, ``train_step`` through the autocast forward), with
    each part timed and no MLflow; then ``train_step`` repeated on one fixed batch (no data path), which
    compares the worker's compute speed with the plain loop's."""
    import time

    import ray.train
    import ray.train.torch
    import torch

    from latentforge.models import MODELS, train_step
    from latentforge.pipelines.train import decode_batch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg["seed"] + rank)
    device = ray.train.torch.get_device()
    cls = MODELS[cfg["family"]]
    model = cls(cls.config_class.from_dict(cfg["model_config"]))
    model.train()
    wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    core = wrapped.module if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else wrapped
    optimizers = core.configure_optimizers()

    def forward(batch, phase, step):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=False):
            return wrapped(batch, phase=phase, step=step)

    shard = ray.train.get_dataset_shard("train")
    b = cfg["batch_size"]
    record: dict[str, Any] = {"rank": rank, "torch_threads": torch.get_num_threads(), "epochs": []}
    step = 0
    last = None
    for epoch in range(2):  # the first is warm-up
        wait = dec = comp = 0.0
        n = 0
        t_epoch = time.perf_counter()
        iterator = iter(shard.iter_batches(
            batch_size=b, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=4 * b, local_shuffle_seed=cfg["seed"] + 1000 * epoch + rank,
        ))
        while n < cfg["max_steps"]:
            t0 = time.perf_counter()
            try:
                raw = next(iterator)
            except StopIteration:
                break
            t1 = time.perf_counter()
            batch = {k: v.to(device) for k, v in decode_batch(raw, cfg["image_shape"]).items()}
            t2 = time.perf_counter()
            train_step(core, optimizers, batch, step, forward=forward)
            t3 = time.perf_counter()
            wait, dec, comp, n, step, last = wait + t1 - t0, dec + t2 - t1, comp + t3 - t2, n + 1, step + 1, batch
        record["epochs"].append({
            "steps": n, "seconds": round(time.perf_counter() - t_epoch, 3),
            "samples_per_sec": round(n * b / (time.perf_counter() - t_epoch), 1),
            "iter_wait_ms_per_step": round(1000 * wait / max(n, 1), 3),
            "decode_ms_per_step": round(1000 * dec / max(n, 1), 3),
            "train_step_ms": round(1000 * comp / max(n, 1), 2),
        })
    del iterator  # stop the epoch's iterator before the fixed-batch timing
    reps = min(cfg["max_steps"], 20)
    t0 = time.perf_counter()
    for _ in range(reps):
        train_step(core, optimizers, last, step, forward=forward)
        step += 1
    record["fixed_batch_train_step_ms"] = round(1000 * (time.perf_counter() - t0) / reps, 2)
    Path(cfg["out_dir"], f"rank{rank}.json").write_text(json.dumps(record))
    ray.train.report({"done": 1})


def run_profile(params: dict[str, Any], root: Path, job, max_steps: int) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    out_dir = root / f"profile-{job.family}"
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = {"train": ray.data.read_parquet(str(Path(job.data_dir) / "train.parquet")).materialize()}
    trainer = TorchTrainer(
        profile_loop,
        train_loop_config={"family": job.family, "model_config": job.model_config, "batch_size": job.train["batch_size"],
                           "seed": job.train["seed"], "image_shape": job.manifest["image_shape"], "max_steps": max_steps,
                           "out_dir": str(out_dir)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": job.train["cpus_per_worker"]}),
        run_config=ray.train.RunConfig(name=f"profile-{job.family}-{int(time.time())}", storage_path=str(root / "ray_results")),
        datasets=datasets,
    )
    trainer.fit()
    return json.loads((out_dir / "rank0.json").read_text())


# ----------------------------------------------------------------------------------------------------
# The plain loop


def load_train_split(data_dir: str) -> dict[str, np.ndarray]:
    """The train Parquet split in memory as Ray Data's numpy batches hold it: ``image`` an object array
    of raw HWC bytes, ``label`` and ``index`` int64."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(data_dir) / "train.parquet", columns=["image", "label", "index"])
    return {
        "image": np.array(table.column("image").to_pylist(), dtype=object),
        "label": table.column("label").to_numpy(),
        "index": table.column("index").to_numpy(),
    }


def plain_loop(job, split: dict[str, np.ndarray], threads: int, epochs: int, seed: int) -> dict[str, Any]:
    """``epochs`` timed epochs (after a short warm-up) of the family's ``train_step`` on decoded batches."""
    from latentforge.models import MODELS, train_step
    from latentforge.pipelines.train import decode_batch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        cls = MODELS[job.family]
        model = cls(cls.config_class.from_dict(job.model_config))
        model.train()
        optimizers = model.configure_optimizers()
        batch_size = job.train["batch_size"]
        n = len(split["image"])
        steps_per_epoch = n // batch_size
        shape = job.manifest["image_shape"]
        rng = np.random.default_rng(seed)

        def raw_batch(rows):
            return {"image": split["image"][rows], "label": split["label"][rows], "index": split["index"][rows]}

        step = 0
        for _ in range(WARMUP_STEPS):
            train_step(model, optimizers, decode_batch(raw_batch(rng.choice(n, batch_size, replace=False)), shape), step)
            step += 1
        per_epoch = []
        decode_s = step_s = 0.0
        for _ in range(epochs):
            perm = rng.permutation(n)
            t0 = time.perf_counter()
            for i in range(steps_per_epoch):
                a = time.perf_counter()
                batch = decode_batch(raw_batch(perm[i * batch_size : (i + 1) * batch_size]), shape)
                b = time.perf_counter()
                train_step(model, optimizers, batch, step)
                step += 1
                decode_s += b - a
                step_s += time.perf_counter() - b
            per_epoch.append(steps_per_epoch * batch_size / (time.perf_counter() - t0))
        total_steps = steps_per_epoch * epochs
        return {
            "threads": torch.get_num_threads(),
            "steps_per_epoch": steps_per_epoch,
            "epochs_timed": epochs,
            "epoch_samples_per_sec": [round(r, 1) for r in per_epoch],
            "samples_per_sec": round(float(np.mean(per_epoch)), 1),
            "decode_ms_per_batch": round(1000 * decode_s / total_steps, 3),
            "train_step_ms": round(1000 * step_s / total_steps, 2),
        }
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------------
# The Ray Train job


def ray_run(params: dict[str, Any], family: str, workers: int, epochs: int) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from latentforge.pipelines.train import resolve_job, run_training

    # A fresh run name: the default name does not depend on num_workers or epochs, so a second job
    # would resume the first one's finished run instead of training.
    run_name = f"bench-{family}-{workers}w-{time.strftime('%H%M%S')}"
    job = resolve_job(params, family, overrides=[f"epochs={epochs}"], num_workers=workers, run_name=run_name)
    lines: list[str] = []
    t_call = time.time()
    summary = run_training(job, echo=lines.append)
    fit_wall = time.time() - t_call

    client = MlflowClient(job.tracking_uri)
    run_id = summary["mlflow_run_id"]
    epoch_hist = sorted(client.get_metric_history(run_id, "epoch/epoch_samples_per_sec"), key=lambda m: m.step)
    epoch_secs = sorted(client.get_metric_history(run_id, "epoch/epoch_seconds"), key=lambda m: m.step)
    rates = [m.value for m in epoch_hist]
    steady = rates[1:] if len(rates) > 1 else rates
    steady_rate = float(np.mean(steady))
    batch_size, world = job.train["batch_size"], workers
    logged = client.get_metric_history(run_id, "samples_per_sec")
    startup: dict[str, Any] = {"log_every_steps": job.train["log_every_steps"]}
    if logged:
        first = min(logged, key=lambda m: m.step)
        ts = first.timestamp / 1000.0
        window = first.step * batch_size * world / first.value  # seconds of the first logged window
        startup.update({
            "first_logged_step": first.step,
            "startup_to_first_logged_step_s": round(ts - t_call, 2),
            "startup_to_loop_start_s": round(ts - window - t_call, 2),
            "startup_to_first_step_s": round(ts - (first.step - 1) * batch_size * world / steady_rate - t_call, 2),
            "first_window_samples_per_sec": round(first.value, 1),
        })
    else:  # fewer steps than log_every_steps in the whole run
        startup["note"] = "no samples_per_sec logged: the run had fewer steps than log_every_steps"
    last = summary.get("last_epoch_metrics", {})
    return {
        "run_name": run_name,
        "mlflow_run_id": run_id,
        "workers": workers,
        "epochs": epochs,
        "epoch_samples_per_sec": [round(r, 1) for r in rates],
        "epoch_seconds": [round(m.value, 2) for m in epoch_secs],
        "samples_per_sec": round(steady_rate, 1),
        "samples_per_sec_source": "mean of MLflow epoch/epoch_samples_per_sec over epochs 2.." if len(rates) > 1 else "the only epoch",
        "metrics_json_last_epoch_samples_per_sec": round(float(last.get("epoch_samples_per_sec", float("nan"))), 1),
        "startup": startup,
        "fit_wall_seconds": round(fit_wall, 2),
        # Wall time of the job outside the timed epoch loops: start-up, validation, checkpoints, grids.
        "outside_epochs_seconds": round(fit_wall - sum(m.value for m in epoch_secs), 2),
        "val_score": summary.get("val_score"),
    }


def start_ray() -> float:
    """A local Ray runtime as ``connect_ray()`` starts it, minus the worker logs on our stdout (every
    epoch line of every run). Returns the seconds it took."""
    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return time.perf_counter() - t0


def with_ray_retry(what: str, fn, *args):
    """Run ``fn``; if the local Ray runtime died under it (another process on this shared machine ran
    ``ray stop``, which stops every Ray instance of the user), restart Ray and try once more."""
    import ray

    try:
        return fn(*args), None
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        alive = True
        try:
            alive = ray.is_initialized() and bool(ray.nodes()) and all(n.get("Alive") for n in ray.nodes())
        except Exception:
            alive = False
        if alive and not any(k in text for k in ("Raylet", "node has crashed", "Owner's node", "ActorDiedError", "RaySystemError")):
            raise
        log(f"{what}: the Ray runtime died under the run ({text.splitlines()[0][:160]}); restarting Ray and retrying once")
        ray.shutdown()
        start_ray()
        return fn(*args), text.splitlines()[0][:300]


def measure_family(params: dict[str, Any], root: Path, family: str, epochs: int, worker_threads: int, default_threads: int,
                   always_profile: bool = False) -> dict[str, Any]:
    """Plain loop (matched threads), plain loop (default threads), Ray 1 worker, Ray 2 workers, plain
    loop (matched threads) again: the two matched plain runs bracket the Ray runs in time, so that a
    change of load on this shared machine shows up as their spread instead of silently in the ratio."""
    from latentforge.pipelines.train import resolve_job

    job = resolve_job(params, family)
    split = load_train_split(job.data_dir)
    record: dict[str, Any] = {"config": job.model_config, "epochs": epochs, "batch_size": job.train["batch_size"]}
    measured = max(epochs - 1, 1)
    seed = job.train["seed"]

    def plain(key: str, threads: int) -> None:
        record[key] = plain_loop(job, split, threads, measured, seed)
        log(f"{family}: plain loop, {threads} thread(s): {record[key]['samples_per_sec']:.1f} samples/s "
            f"(step {record[key]['train_step_ms']:.1f} ms + decode {record[key]['decode_ms_per_batch']:.2f} ms per batch)")

    plain("plain_matched_before", worker_threads)
    plain("plain_default", default_threads)
    for workers in (1, 2):
        key = f"ray_{workers}"
        try:
            record[key], retried = with_ray_retry(f"{family} {workers}w", ray_run, params, family, workers, epochs)
            if retried:
                record[key]["retried_after"] = retried
            log(f"{family}: Ray Train, {workers} worker(s): epochs {record[key]['epoch_samples_per_sec']} samples/s")
        except Exception as exc:  # report it and go on with the other measurements
            record[key] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            log(f"{family}: Ray Train, {workers} worker(s): ERROR {record[key]['error']}")
    plain("plain_matched_after", worker_threads)

    before, after = record["plain_matched_before"], record["plain_matched_after"]
    record["plain_matched"] = {
        "threads": before["threads"],
        "samples_per_sec": round((before["samples_per_sec"] + after["samples_per_sec"]) / 2, 1),
        "spread_before_after": round(abs(before["samples_per_sec"] - after["samples_per_sec"]) / max(before["samples_per_sec"], after["samples_per_sec"]), 3),
        "train_step_ms": round((before["train_step_ms"] + after["train_step_ms"]) / 2, 2),
        "decode_ms_per_batch": round((before["decode_ms_per_batch"] + after["decode_ms_per_batch"]) / 2, 3),
    }
    plain_rate = record["plain_matched"]["samples_per_sec"]
    r1, r2 = record["ray_1"], record["ray_2"]
    b = job.train["batch_size"]
    if "samples_per_sec" in r1:
        record["ratio_ray1_vs_plain"] = round(r1["samples_per_sec"] / plain_rate, 3)
        record["ratio_ray1_vs_plain_default_threads"] = round(r1["samples_per_sec"] / record["plain_default"]["samples_per_sec"], 3)
        record["pass"] = record["ratio_ray1_vs_plain"] >= TARGET_RATIO
        # Milliseconds per step that the 1-worker job spends beyond the plain loop (negative: faster).
        record["extra_ms_per_step_ray1"] = round(1000 * (b / r1["samples_per_sec"] - b / plain_rate), 2)
        if not record["pass"] or always_profile:
            # Where the time goes: the job's per-step work inside a Ray worker, each part timed.
            steps = len(split["image"]) // b
            try:
                prof, _ = with_ray_retry(f"{family} profile", run_profile, params, root, job,
                                         min(steps, PROFILE_MAX_STEPS.get(family, steps)))
                record["profile_ray1"] = prof
                e = prof["epochs"][-1]
                log(f"{family}: profile in a Ray worker (epoch 2, {e['steps']} steps): {e['samples_per_sec']:.1f} samples/s = "
                    f"wait {e['iter_wait_ms_per_step']:.2f} + decode {e['decode_ms_per_step']:.2f} + train_step {e['train_step_ms']:.1f} ms/step; "
                    f"fixed batch {prof['fixed_batch_train_step_ms']:.1f} ms/step (plain loop {record['plain_matched']['train_step_ms']:.1f})")
            except Exception as exc:
                record["profile_ray1"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    if "samples_per_sec" in r1 and "samples_per_sec" in r2:
        record["scaling_2w_vs_1w"] = round(r2["samples_per_sec"] / r1["samples_per_sec"], 3)
        record["ratio_ray2_vs_plain_default_threads"] = round(r2["samples_per_sec"] / record["plain_default"]["samples_per_sec"], 3)
    return record


# ----------------------------------------------------------------------------------------------------


def summary_line(family: str, r: dict[str, Any]) -> str:
    parts = [f"{family:<7}"]
    p1, p2 = r.get("plain_matched"), r.get("plain_default")
    if p1:
        parts.append(f"plain({p1['threads']} thr) {p1['samples_per_sec']:7.1f}/s")
    if p2:
        parts.append(f"plain({p2['threads']} thr) {p2['samples_per_sec']:7.1f}/s")
    r1, r2 = r.get("ray_1"), r.get("ray_2")
    if r1 and "samples_per_sec" in r1:
        parts.append(f"ray 1w {r1['samples_per_sec']:7.1f}/s")
        if "ratio_ray1_vs_plain" in r:
            parts.append(f"ratio {r['ratio_ray1_vs_plain']:.3f} {'PASS' if r['pass'] else 'FAIL'} (>= {TARGET_RATIO})")
    elif r1:
        parts.append(f"ray 1w ERROR {r1.get('error')}")
    if r2 and "samples_per_sec" in r2:
        parts.append(f"ray 2w {r2['samples_per_sec']:7.1f}/s (x{r['scaling_2w_vs_1w']:.2f} vs 1w)")
    elif r2:
        parts.append(f"ray 2w ERROR {r2.get('error')}")
    if r1 and "startup_to_first_step_s" in r1.get("startup", {}):
        s = r1["startup"]
        parts.append(f"start-up {s['startup_to_first_step_s']:.1f}s to 1st step ({s['startup_to_first_logged_step_s']:.1f}s to logged step {s['first_logged_step']})")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES), help="comma-separated (default: vae,vqvae2,gan)")
    parser.add_argument("--num-images", type=int, default=NUM_IMAGES, help=f"shapes images to prepare (default {NUM_IMAGES}: 80%% train)")
    parser.add_argument("--epochs", type=int, help="epochs of every Ray run (default: vae/gan 3, vqvae2 2; the first is excluded)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project folder")
    parser.add_argument("--profile", action="store_true", help="profile the Ray worker's step even when the ratio meets the target")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/train_throughput.json)")
    args = parser.parse_args(argv)

    from latentforge.models import MODELS

    families = common.parse_names("train_throughput", "families", args.families, MODELS)
    if families is None:
        return 2
    smoke = args.num_images != NUM_IMAGES or args.epochs is not None
    out = args.out or common.RESULTS / ("train_throughput_smoke.json" if smoke else "train_throughput.json")
    os.environ.pop("RAY_ADDRESS", None)  # always a local runtime: figures of this machine
    default_threads = torch.get_num_threads()

    root = Path(tempfile.mkdtemp(prefix="latentforge-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"  # resolve_job prefers it to params
    result: dict[str, Any] = {"benchmark": "train_throughput", "environment": common.environment(), "project_dir": str(root)}
    t_all = time.perf_counter()
    try:
        import ray

        from latentforge.pipelines.common.tracking import mlflow_client

        params = make_project(root, args.num_images, families)
        manifest = json.loads((Path(params["data"]["output_dir"]) / "shapes" / "manifest.json").read_text())
        t0 = time.perf_counter()
        mlflow_client(os.environ["MLFLOW_TRACKING_URI"])  # creates the sqlite store (schema migrations)
        mlflow_init = time.perf_counter() - t0
        ray_init = start_ray()
        result.update({
            "data": {"source": "shapes", "num_images": args.num_images, "image_shape": manifest["image_shape"],
                     "counts": {k: v["count"] for k, v in manifest["splits"].items()}, "prepare_seconds": params.pop("_prepare_seconds")},
            "batch_size": params["train"]["batch_size"],
            "cpus_per_worker": params["train"]["cpus_per_worker"],
            "log_every_steps": params["train"]["log_every_steps"],
            "default_torch_threads": default_threads,
            "ray_cluster_cpus": ray.cluster_resources().get("CPU"),
            "ray_init_s": round(ray_init, 2),
            "mlflow_store_init_s": round(mlflow_init, 2),
            "target_ratio": TARGET_RATIO,
            "families": {},
        })
        print(f"train_throughput: shapes {manifest['image_shape']} x {manifest['splits']['train']['count']} train images, batch "
              f"{params['train']['batch_size']}; Ray up in {ray_init:.1f}s ({result['ray_cluster_cpus']:g} CPUs)", flush=True)

        result["probe"] = {}
        for workers in (1, 2):
            probe, retried = with_ray_retry("probe", run_probe, params, root, workers)
            result["probe"][f"{workers}_worker"] = {**probe, **({"retried_after": retried} if retried else {})}
            log(f"probe, {workers} worker(s): torch threads {[r['torch_threads'] for r in probe['ranks']]} "
                f"(OMP_NUM_THREADS={probe['ranks'][0]['OMP_NUM_THREADS']}); data path per batch, epoch 2: "
                + ", ".join(f"rank {r['rank']} wait {r['epochs'][-1]['iter_wait_ms_per_batch']:.2f} ms + decode "
                            f"{r['epochs'][-1]['decode_ms_per_batch']:.2f} ms" for r in probe["ranks"]))
        worker_threads = result["probe"]["1_worker"]["ranks"][0]["torch_threads"]
        result["worker_torch_threads"] = worker_threads

        for family in families:
            result["families"][family] = measure_family(params, root, family, args.epochs or EPOCHS.get(family, 3), worker_threads,
                                                        default_threads, always_profile=args.profile)
            print(summary_line(family, result["families"][family]), flush=True)
            result["total_seconds"] = round(time.perf_counter() - t_all, 1)
            common.write_json(result, out)
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    result["environment"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    ratios = {f: r.get("ratio_ray1_vs_plain") for f, r in result["families"].items()}
    result["all_pass"] = all(r.get("pass", False) for r in result["families"].values())
    common.write_json(result, out)
    print(f"train_throughput: ratio ray(1 worker)/plain {ratios}; {'all >= ' if result['all_pass'] else 'NOT all >= '}{TARGET_RATIO}; "
          f"{result['total_seconds']:.0f}s in all; figures -> {common.rel(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
