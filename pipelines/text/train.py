"""The ``train-text`` stage: learn f_tau (text -> latent space) on a small aligned set, decoder frozen.

``latentforge train-text --model <decoder>`` where ``<decoder>`` is a ``save_pretrained`` directory, a
family name (its ``<train.output_dir>/<family>/model``) or a registered model (``vae-shapes``,
``vae-shapes@champion``, ``vae-shapes/3``). :func:`resolve_text_job` (:mod:`.job`) checks everything a
user can get wrong before Ray starts; :func:`run_text_training` then

1. builds the aligned set (:mod:`.aligned`): ``text.aligned_fraction`` of the captioned train images,
   with every image of the ``text.holdout`` (shape, colour) combinations left out (they test
   composition in ``evaluate-text``), and reads the other images' pseudo-captions, which the
   ``caption-text`` stage made once for every family (:mod:`.captions`);
2. embeds the captions (:mod:`.encoders`: MiniLM through sentence-transformers offline, or the hashed
   n-gram encoder) and computes the targets with the frozen model: the encoder's mean (flat latents) or
   the codes (VQ-VAE-2);
3. trains f_tau on a Ray Train ``TorchTrainer`` (DDP across workers, :mod:`.loop`), logging to MLflow;
   the decoder's weights are hashed before and after, and a difference fails the run;
4. writes ``<text.output_dir>/<family>/`` (:mod:`.outputs`): ``text_map/`` (f_tau), ``decoder/`` (the
   frozen decoder), ``text.json`` (encoder, decoder reference, aligned set), ``metrics.json`` and
   ``prompts.png``.

ray and mlflow are imported inside the functions that run them: the names re-exported below are
imported by export-text, evaluate-text and the benchmarks, which must not load ray to get them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from latentforge.models import PretrainedModel
from latentforge.models.text import TextMap, text_map_for
from latentforge.pipelines.common.cluster import connect_ray, train_logging_config
from latentforge.pipelines.common.errors import TrainingError
from latentforge.pipelines.common.tracking import experiment_id, git_commit, mlflow_client
from latentforge.pipelines.text.aligned import prepare_arrays
from latentforge.pipelines.text.captions import load_captions
from latentforge.pipelines.text.job import TextJob
from latentforge.pipelines.text.loop import text_loop_per_worker
from latentforge.pipelines.text.outputs import prompt_grid, write_outputs
from latentforge.pipelines.train import root_cause

WORD_ATTENTION_QUERIES = 8


def run_text_training(job: TextJob, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train f_tau for ``job`` on Ray Train; write the stage output; return a summary."""
    client = mlflow_client(job.tracking_uri)
    arrays, info = prepare_arrays(job, echo)
    captioner_file, captions = add_pseudo_captions(job, arrays, echo)
    decoder = PretrainedModel.from_pretrained(job.decoder_dir)
    text_map = build_text_map(decoder, arrays, job.text)
    run_id = start_run(client, job, text_map, info, captions)
    t = job.text
    echo(f"starting {job.run_name}: f_tau ({text_map.config.kind}) for {job.family} on {info['aligned_size']} aligned pairs, "
         f"{t['num_workers']} worker(s); MLflow run {run_id}")

    decoder_files = {name: (Path(job.decoder_dir) / name).read_bytes() for name in ("config.json", "model.safetensors")}
    connect_ray()
    t0 = time.time()
    result = _fit(job, client, run_id, loop_config(job, arrays, decoder_files, captioner_file, text_map, run_id))
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / "state.json").read_text())
        if state["decoder_before"] != state["decoder_after"] and not t["finetune_decoder"]:
            client.set_terminated(run_id, status="FAILED")
            raise TrainingError("the decoder's weights changed while training f_tau; it must stay frozen")
        summary = write_outputs(job, Path(ckpt), info, state, run_id, time.time() - t0)
    grid = prompt_grid(job.output_dir, job.manifest, info)
    client.log_artifact(run_id, str(grid), artifact_path="images")
    client.log_artifacts(run_id, str(job.output_dir), artifact_path="text")
    client.set_terminated(run_id, status="FINISHED")
    echo(f"done {job.run_name}: loss {state['losses'][0]:.4g} -> {state['losses'][-1]:.4g}; -> {job.output_dir}; MLflow run {run_id}")
    return summary


def add_pseudo_captions(job: TextJob, arrays: dict[str, np.ndarray],
                        echo: Callable[[str], None] = print) -> tuple[bytes | None, dict[str, Any] | None]:
    """With ``text.pseudo_ratio`` > 0: add the ``caption-text`` stage's pseudo-captions of the unlabelled
    images to ``arrays`` (``pseudo_embedding``, rows as ``pseudo_row``); return (its captioner file's
    bytes, its ``captions.json`` record); else (None, None)."""
    if job.text["pseudo_ratio"] <= 0:
        return None, None
    arrays["pseudo_embedding"], blob, record = load_captions(job.text, job.manifest, arrays["pseudo_row"])
    echo(f"pseudo-captions from {job.text['captions_dir']} (captioner cosine {record['cosine']:.3f} to the aligned captions)")
    return blob, record


def build_text_map(decoder: PretrainedModel, arrays: dict[str, np.ndarray], text: dict[str, Any]) -> TextMap:
    """f_tau for ``decoder`` from the ``text`` settings: over codes for a code-map decoder, with word
    attention when the arrays carry a word ``mask``; its input width is the embeddings' last axis."""
    codes = {"code_rank": text["code_rank"]} if hasattr(decoder, "decode_indices") else {}
    if "mask" in arrays:
        codes["word_attention"] = WORD_ATTENTION_QUERIES
    return text_map_for(decoder, arrays["embedding"].shape[-1], hidden_dim=text["hidden_dim"], layers=text["layers"], **codes,
                        dropout=float(text["dropout"]), sample_std=float(text["sample_std"]),
                        latent_weight=float(text["latent_weight"]), lr=float(text["lr"]), seed=text["seed"])


def start_run(client, job: TextJob, text_map: TextMap, info: dict[str, Any], captions: dict[str, Any] | None = None) -> str:
    """Create the MLflow run of ``job`` (tagged with the data and the decoder it trains against), log
    its settings, the aligned set's size and, with pseudo-captions (``captions``: their ``captions.json``),
    the captioner's cosine to the aligned captions; return its id."""
    from mlflow.entities import Metric, Param

    exp_id = experiment_id(client, job.experiment, job.tracking_uri)
    run = client.create_run(exp_id, run_name=job.run_name, tags={
        "mlflow.runName": job.run_name, "latentforge.run_name": job.run_name, "latentforge.family": job.family,
        "latentforge.kind": "text", "latentforge.data_name": job.manifest["name"],
        "latentforge.data_hash": job.manifest["data_hash"], "mlflow.source.git.commit": git_commit(),
        "decoder_source": job.decoder_ref["source"], "decoder_name": str(job.decoder_ref.get("name")),
        "decoder_version": str(job.decoder_ref.get("version")), "decoder_sha256": job.decoder_ref["sha256"],
    })
    run_id = run.info.run_id
    flat = {f"text.{k}": v for k, v in job.text.items()}
    flat.update({f"text_map.{k}": v for k, v in text_map.config.to_dict().items()})
    flat.update({"family": job.family, "encoder": info["text_encoder"]["kind"], "aligned_size": info["aligned_size"],
                 "pseudo_count": info["pseudo_count"],
                 "holdout": info["holdout"], "decoder": job.decoder_ref.get("name") or job.decoder_ref["path"]})
    now = int(time.time() * 1000)
    metrics = [Metric("aligned_size", info["aligned_size"], now, 0)]
    if captions is not None:
        metrics.append(Metric("captioner/cosine", captions["cosine"], now, 0))
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()], metrics=metrics)
    return run_id


def loop_config(job: TextJob, arrays: dict[str, np.ndarray], decoder_files: dict[str, bytes], captioner_file: bytes | None,
                text_map: TextMap, run_id: str) -> dict[str, Any]:
    """The ``train_loop_config`` of :func:`pipelines.text.loop.text_loop_per_worker`."""
    t = job.text
    return {
        "arrays": arrays, "decoder_files": decoder_files, "captioner_file": captioner_file, "text_map_config": text_map.config.to_dict(),
        "epochs": t["epochs"], "batch_size": t["batch_size"], "seed": t["seed"],
        "pseudo_ratio": float(t["pseudo_ratio"]),
        "bank": bool(t["bank"]) and text_map.config.kind == "codes", "bank_text_weight": float(t["bank_text_weight"]),
        "bank_whitening": None if t["bank_whitening"] is None else float(t["bank_whitening"]), "bank_space": t["bank_space"],
        "finetune_decoder": t["finetune_decoder"], "finetune_lr_scale": float(t["finetune_lr_scale"]),
        "tracking_uri": job.tracking_uri, "run_id": run_id,
    }


def _fit(job: TextJob, client, run_id: str, config: dict[str, Any]):
    """Run the TorchTrainer; its Result, or a TrainingError naming the root cause (the run marked FAILED)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = job.text
    trainer = TorchTrainer(
        text_loop_per_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=t["num_workers"], use_gpu=False,
                                               resources_per_worker={"CPU": t["cpus_per_worker"]}),
        # A fresh Ray run each time: the loop does not resume, so a same-named finished run must not be restored.
        run_config=ray.train.RunConfig(name=f"{job.run_name}-{run_id[:8]}", storage_path=str(Path(t["output_dir"]).resolve() / ".ray"),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                                       logging_config=train_logging_config()),
    )
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as exc:
        client.set_terminated(run_id, status="FAILED")
        raise TrainingError(f"train-text {job.run_name} failed: {root_cause(exc)}") from exc
    return result
