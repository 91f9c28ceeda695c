"""The loop every Ray Train worker runs: f_tau trained on the worker's shard of the aligned set (and of
the pseudo-captioned images) through the frozen decoder, DDP across workers.

ray and mlflow are imported inside the functions: they run on the workers only, and
``pipelines.text.train`` (which imports this module) is also imported for its light helpers.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentforge.models import PretrainedModel
from latentforge.models.text import CaptionScorer, TextMap, TextMapConfig, freeze, state_digest
from latentforge.pipelines.common.cluster import quiet_worker_logging
from latentforge.pipelines.common.progress import progress
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.text.captioner import code_bank, scoring_space
from latentforge.pipelines.text.captions import captioner_from_bytes


def text_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train's per-worker function: f_tau trained on this worker's shard through the frozen decoder.

    ``cfg``: the driver's ``train_loop_config`` (``pipelines.text.train.loop_config``): the arrays of
    :func:`pipelines.text.aligned.prepare_arrays`, the decoder's files, f_tau's config and the settings.
    """
    import ray.train

    quiet_worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"] + rank)
    decoder = load_decoder(cfg["decoder_files"])
    before = state_digest(decoder)
    text_map = TextMap(TextMapConfig.from_dict(cfg["text_map_config"]))
    wrapped, optimizer = _prepare(text_map, decoder, cfg)
    arrays = cfg["arrays"]
    n_aligned = len(arrays["embedding"])
    rows = np.arange(n_aligned)[rank::world]
    # This worker's rows: its shard of the aligned set, then (pseudo_ratio > 0) its shard of the
    # unlabelled images with the captioner's embeddings (the caption-text stage's); an epoch is every
    # aligned row plus a fresh draw of pseudo_ratio times as many pseudo-captioned ones.
    data = {k: v[rows] for k, v in arrays.items() if not k.startswith("pseudo_")}
    logger = _mlflow_client(cfg["tracking_uri"]) if rank == 0 else None
    captioner, pseudo_per_epoch = None, 0
    if cfg["pseudo_ratio"] > 0 and "pseudo_embedding" in arrays:
        captioner, data, pseudo_per_epoch = _add_pseudo_captions(cfg, data, rank, world)
    # Steps from the global counts, so that every DDP rank takes the same number.
    per_epoch = max(1, n_aligned // world + pseudo_per_epoch)
    batch_size = min(cfg["batch_size"], per_epoch)
    steps = max(1, per_epoch // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"] * steps)
    rng = np.random.default_rng(cfg["seed"] + rank)
    losses: list[float] = []
    epochs = range(cfg["epochs"])
    for epoch in progress(epochs, "text map", unit="epochs") if rank == 0 else epochs:
        text_map.train()
        drawn = len(rows) + rng.choice(len(data["embedding"]) - len(rows), size=pseudo_per_epoch, replace=False)
        perm = rng.permutation(np.concatenate([np.arange(len(rows)), drawn]))
        epoch_logs = _train_epoch(wrapped, optimizer, sched, data, perm, batch_size, steps)
        losses.append(epoch_logs["loss"])
        if logger is not None:
            _log_epoch(logger, cfg, epoch, epoch_logs)
    # No ray.train.report per epoch: a worker's result queue holds one report and the controller
    # empties it every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so reporting these sub-second
    # epochs made each one wait for the poll (2-3x the stage's time). The losses go to MLflow
    # above; the one report, with the checkpoint, comes after the last epoch.
    state = {"losses": losses, "decoder_before": before, "steps": cfg["epochs"] * steps}
    _report_final(rank, cfg, text_map, decoder, captioner, state, {"epoch": cfg["epochs"] - 1, **epoch_logs})


def load_decoder(files: dict[str, bytes]):
    """The frozen decoder from its ``save_pretrained`` files (name -> bytes, shipped in the loop config)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in files.items():
            (Path(tmp) / name).write_bytes(blob)
        return freeze(PretrainedModel.from_pretrained(tmp))


def _prepare(text_map: TextMap, decoder, cfg: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(f_tau's loss wrapped for DDP, the Adam optimizer): f_tau's parameters at ``lr`` and, with
    ``finetune_decoder``, the decoder's at ``lr * finetune_lr_scale``."""
    import ray.train.torch

    finetune = cfg["finetune_decoder"]
    if finetune:
        decoder.requires_grad_(True)  # still in eval mode: BatchNorm statistics and EMA copies stay as they are
    objective = _Objective(text_map, decoder, finetune)
    # Fine-tuning: decode() leaves the decoder's encoder (and a GAN's discriminator) without gradients.
    wrapped = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs={"find_unused_parameters": finetune})
    groups = [{"params": list(text_map.parameters()), "lr": text_map.config.lr}]
    if finetune:
        groups.append({"params": [p for p in decoder.parameters() if p.requires_grad],
                       "lr": text_map.config.lr * cfg["finetune_lr_scale"]})
    return wrapped, torch.optim.Adam(groups)


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _log_metrics(logger, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    logger.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


def _add_pseudo_captions(cfg: dict[str, Any], data: dict[str, np.ndarray], rank: int,
                         world: int) -> tuple[Any, dict[str, np.ndarray], int]:
    """This worker's shard of the unlabelled images with their pseudo-captions (the ``caption-text``
    stage's, shipped in ``cfg``): (the captioner, ``data`` with them appended, pseudo-captioned rows to
    draw per epoch)."""
    arrays = cfg["arrays"]
    n_aligned = len(arrays["embedding"])
    shard = np.arange(len(arrays["pseudo_image"]))[rank::world]
    pseudo = {k[len("pseudo_"):]: v[shard] for k, v in arrays.items() if k.startswith("pseudo_")}
    data = {k: np.concatenate([data[k], pseudo[k]]) for k in data}
    pseudo_per_epoch = min(len(shard), int(round(cfg["pseudo_ratio"] * (n_aligned // world))))
    return captioner_from_bytes(cfg["captioner_file"]), data, pseudo_per_epoch


def _train_epoch(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, sched, data: dict[str, np.ndarray],
                 perm: np.ndarray, batch_size: int, steps: int) -> dict[str, float]:
    """``steps`` optimizer steps over the rows ``perm`` of ``data``; the epoch's mean loss and logs."""
    sums: dict[str, float] = {}
    for s in range(steps):
        idx = np.sort(perm[s * batch_size:(s + 1) * batch_size])
        batch = {"embedding": torch.from_numpy(data["embedding"][idx]),
                 "image": batch_to_tensor(data["image"][idx])}
        for key in ("mask", "target_latent", "top", "bottom"):
            if key in data:
                batch[key] = torch.from_numpy(data[key][idx])
        out = wrapped(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        sched.step()
        for k, v in {"loss": out.loss.detach(), **out.logs}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / steps for k, v in sums.items()}


def _log_epoch(logger, cfg: dict[str, Any], epoch: int, epoch_logs: dict[str, float]) -> None:
    _log_metrics(logger, cfg["run_id"], {f"train/{k}": v for k, v in epoch_logs.items()}, epoch)
    print(f"[latentforge] text epoch {epoch + 1}/{cfg['epochs']}  "
          + "  ".join(f"{k} {v:.4g}" for k, v in sorted(epoch_logs.items())), flush=True)


def _report_final(rank: int, cfg: dict[str, Any], text_map: TextMap, decoder, captioner, state: dict[str, Any],
                  metrics: dict[str, Any]) -> None:
    """The one ``ray.train.report``: rank 0 attaches the checkpoint (``text_map/``, ``decoder/``,
    ``captioner.safetensors`` with pseudo-captions (the caption-text stage's captioner and its retrieval
    space: reranking scores with it), ``bank.npz`` with
    ``bank``, ``state.json``: ``state`` and the decoder's digest now)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            text_map.eval().save_pretrained(Path(tmp) / "text_map")
            decoder.save_pretrained(Path(tmp) / "decoder")
            space_of = (None, None)
            if captioner is not None:
                space_of = scoring_space(cfg["arrays"], captioner, cfg["bank_whitening"], cfg["bank_space"])
                CaptionScorer(captioner, *space_of).save(Path(tmp) / "captioner.safetensors")
            if cfg["bank"]:
                code_bank(cfg["arrays"], captioner, cfg["bank_text_weight"], space_of).save(Path(tmp) / "bank.npz")
            (Path(tmp) / "state.json").write_text(json.dumps({**state, "decoder_after": state_digest(decoder)}))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


class _Objective(torch.nn.Module):
    """f_tau's loss as a module for DDP: f_tau is a registered submodule, so DDP syncs its gradients;
    the decoder is one only when it is fine-tuned (``text.finetune_decoder``)."""

    def __init__(self, text_map, decoder, finetune: bool = False):
        super().__init__()
        self.text_map = text_map
        if finetune:
            self.decoder_module = decoder  # a submodule: DDP syncs the decoder's gradients too
        # Frozen: not a submodule, DDP must not see it.
        object.__setattr__(self, "_decoder", decoder)

    def forward(self, batch):
        return self.text_map.loss(self._decoder, batch)
