"""The ``train-text`` stage output ``<text.output_dir>/<family>/``: written from the final checkpoint
(``text_map/``, ``decoder/``, ``captioner.safetensors``, ``bank.npz``, ``text.json``, ``metrics.json``),
loaded back, and its prompt grid (``prompts.png``, ``prompts.json``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from latentforge.models import PretrainedModel
from latentforge.models.text import CaptionScorer, CodeBank, TextMap, freeze
from latentforge.pipelines.common.files import atomic_directory
from latentforge.pipelines.data import SHAPE_FACTORS
from latentforge.pipelines.imaging import save_png, tensor_to_uint8
from latentforge.pipelines.text.encoders import text_tensors
from latentforge.pipelines.text.job import TextJob
from latentforge.runtime.grid import make_grid


def write_outputs(job: TextJob, ckpt: Path, info: dict, state: dict, run_id: str, seconds: float) -> dict[str, Any]:
    """``<output_dir>/<family>/`` from the final checkpoint directory ``ckpt``, written to a temp sibling
    and renamed (:func:`pipelines.common.files.atomic_directory`); return the run's summary.
    ``info``: what :func:`pipelines.text.aligned.prepare_arrays` recorded; ``state``: the checkpoint's
    ``state.json`` (losses, the decoder's digests before and after)."""
    out = job.output_dir
    with atomic_directory(out) as tmp:
        shutil.copytree(ckpt / "text_map", tmp / "text_map")
        shutil.copytree(ckpt / "decoder", tmp / "decoder")
        bank = None
        if (ckpt / "bank.npz").is_file():
            shutil.copy2(ckpt / "bank.npz", tmp / "bank.npz")
            bank = _bank_record(CodeBank.load(tmp / "bank.npz"), job.text["bank_space"])
        scorer = None
        if (ckpt / "captioner.safetensors").is_file():
            shutil.copy2(ckpt / "captioner.safetensors", tmp / "captioner.safetensors")
            scorer = {"file": "captioner.safetensors", "whitened": CaptionScorer.load(tmp / "captioner.safetensors").whiten is not None}
        record = {
            "family": job.family,
            "data": {"name": job.manifest["name"], "data_hash": job.manifest["data_hash"], "image_shape": job.manifest["image_shape"]},
            # Fine-tuned: the decoder/ here (and in the export) is no longer the referenced version's weights.
            "decoder": {**job.decoder_ref, "state_sha256": state["decoder_after"], "finetuned": job.text["finetune_decoder"]},
            "text_encoder": info["text_encoder"],
            "aligned": {k: info[k] for k in ("aligned_size", "pseudo_count", "train_count", "holdout", "holdout_strict",
                                             "sample_captions", "aligned_rows", "unlabelled_rows")},
            "settings": job.text,
            "bank": bank,
            "captioner": scorer,
            "run_name": job.run_name,
            "mlflow_run_id": run_id,
        }
        (tmp / "text.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        summary = {
            "family": job.family, "run_name": job.run_name, "mlflow_run_id": run_id, "aligned_size": info["aligned_size"],
            "loss_first_epoch": state["losses"][0], "loss_last_epoch": state["losses"][-1], "losses": state["losses"],
            "decoder_frozen": state["decoder_before"] == state["decoder_after"], "seconds": round(seconds, 2),
        }
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    summary["output_dir"] = str(out)
    return summary


def _bank_record(bank: CodeBank, space: str) -> dict[str, Any]:
    """What ``text.json`` says about the code bank (``bank.npz``)."""
    return {"file": "bank.npz", "size": len(bank), "text_weight": bank.text_weight, "captioned": bank.embedding is not None,
            "whitened": bank.whiten is not None, "space": space if bank.whiten is not None else None,
            "rows": bank.rows is not None}


def load_text_model(directory: str | Path) -> tuple[TextMap, PretrainedModel, dict[str, Any]]:
    """(text_map, frozen decoder, text.json) of a train-text output directory."""
    directory = Path(directory)
    if not (directory / "text.json").is_file():
        raise FileNotFoundError(f"{directory}: no text.json; run `latentforge train-text` first")
    record = json.loads((directory / "text.json").read_text())
    text_map = TextMap.from_pretrained(directory / "text_map").eval()
    if (record.get("bank") or {}).get("file"):
        text_map.bank = CodeBank.load(directory / record["bank"]["file"])
    decoder = freeze(PretrainedModel.from_pretrained(directory / "decoder"))
    return text_map, decoder, record


def load_scorer(directory: str | Path, record: dict[str, Any]) -> CaptionScorer | None:
    """The text model's :class:`models.text.CaptionScorer` (what reranking scores with), or None for a
    text model trained without a captioner (``text.pseudo_ratio`` 0)."""
    scorer = record.get("captioner") or {}
    return CaptionScorer.load(Path(directory) / scorer["file"]) if scorer.get("file") else None


def text_modes(record: dict[str, Any]) -> list[str]:
    """The decoding modes a train-text output offers: ``generate`` always; ``retrieve`` with a code bank
    that records its training rows; ``rerank`` (generate, then keep the best by the captioner's cosine)
    with a captioner and one embedding per text (word attention has none to score)."""
    modes = ["generate"]
    if (record.get("bank") or {}).get("rows"):
        modes.append("retrieve")
    if (record.get("captioner") or {}).get("file") and record["text_encoder"].get("pooling") != "attention":
        modes.append("rerank")
    return modes


def grid_prompts(manifest: dict[str, Any], info: dict[str, Any], count: int = 8) -> list[str]:
    """Prompts for the MLflow grid: on ``shapes``, one per colour with varied shapes (held-out combinations
    first); elsewhere one caption per class."""
    if manifest.get("factor_names") == list(SHAPE_FACTORS):
        pairs = [tuple(p) for p in info["holdout"][:2]]
        shapes, colours = SHAPE_FACTORS["shape"], SHAPE_FACTORS["colour"]
        pairs += [p for p in ((shapes[i % len(shapes)], colours[(i + 1) % len(colours)]) for i in range(2 * count)) if p not in pairs]
        return [f"a large {c} {s} in the center" for s, c in pairs[:count]]
    names = manifest.get("class_names") or []
    return [f"a {n}" for n in names[:count]] or ["an image"]


def prompt_grid(out_dir: Path, manifest: dict[str, Any], info: dict[str, Any], n: int = 6) -> Path:
    """``prompts.png`` (one row per prompt: the mode, then ``n - 1`` samples) and ``prompts.json``."""
    text_map, decoder, record = load_text_model(out_dir)
    prompts = grid_prompts(manifest, info)
    inputs = text_tensors(record["text_encoder"], prompts)
    gen = torch.Generator().manual_seed(0)
    mode = text_map.generate(decoder, inputs["embedding"], 1, 0.0, mask=inputs.get("mask"))
    samples = text_map.generate(decoder, inputs["embedding"], n - 1, 1.0, gen, mask=inputs.get("mask"))
    images = torch.cat([mode, samples], 1).flatten(0, 1)
    path = save_png(make_grid(tensor_to_uint8(images), nrow=n), out_dir / "prompts.png", scale=3)
    (out_dir / "prompts.json").write_text(json.dumps({"rows": prompts, "columns": ["mode"] + [f"sample {i}" for i in range(1, n)]}, indent=2) + "\n")
    return path
