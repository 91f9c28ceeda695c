"""Text-conditioned decoding: the aligned set, f_tau trained on a real local Ray runtime with a real
MLflow store, the frozen decoder, export parity and the torch-free runtime. Hashed encoder throughout
(MiniLM has its own small test in test_text_minilm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import MODELS, PretrainedModel, train_step
from pipelines.imaging import batch_to_tensor
from pipelines.prepare import load_split
from tests.pipelines.conftest import tiny_section


def tiny_decoder(family: str, prepared: Path, out: Path, steps: int = 30) -> Path:
    """A tiny model of ``family`` after a few training steps, saved with save_pretrained."""
    h, w, c = json.loads((prepared / "manifest.json").read_text())["image_shape"]
    cls = MODELS[family]
    torch.manual_seed(0)
    model = cls(cls.config_class.from_dict({**tiny_section(family), "image_size": h, "channels": c}))
    optimizers = model.configure_optimizers()
    images = batch_to_tensor(load_split(prepared, "train")["images"][:64])
    for step in range(steps):
        idx = torch.randint(0, 64, (16,))
        batch = {"image": images[idx], "label": torch.zeros(16, dtype=torch.int64), "index": idx}
        train_step(model, optimizers, batch, step)
    return model.save_pretrained(out / family / "model")


@pytest.fixture(scope="module")
def text_params(project):
    root, params = project
    params = json.loads(json.dumps(params))
    params["text"].update(encoder="hashed", hashed_dim=256, aligned_fraction=0.5, epochs=4, batch_size=16,
                          hidden_dim=32, num_workers=1, cpus_per_worker=1, output_dir=str(root / "text"))
    return root, params


@pytest.fixture(scope="module")
def trained(text_params, local_ray):
    """f_tau trained for a tiny vae and vqvae2 decoder: {family: (job, summary)}."""
    from pipelines.text import resolve_text_job, run_text_training

    root, params = text_params
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    out = {}
    for family in ("vae", "vqvae2"):
        model_dir = tiny_decoder(family, prepared, root / "decoders")
        job = resolve_text_job(params, str(model_dir))
        out[family] = (job, run_text_training(job, echo=lambda s: None))
    return out


@pytest.mark.parametrize("family", ["vae", "vqvae2"])
def test_train_text_freezes_decoder_and_lowers_loss(trained, family):
    job, summary = trained[family]
    assert summary["loss_last_epoch"] < summary["loss_first_epoch"]
    original = PretrainedModel.from_pretrained(job.decoder_dir).state_dict()
    after = PretrainedModel.from_pretrained(Path(summary["output_dir"]) / "decoder").state_dict()
    assert original.keys() == after.keys()
    assert all(torch.equal(original[k], after[k]) for k in original)
    assert summary["decoder_frozen"]
