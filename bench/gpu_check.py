"""The GPU path, checked in one short run: each demo family trained for a few hundred steps on CUDA with
bf16 autocast off and on, its samples/s against the CPU, and the ONNX export parity of the GPU-trained
model (exported on the CPU, as the export stage does).

    python bench/gpu_check.py [--steps 300] [--families vae,vqvae2,gan]

Writes bench/results/gpu_check.json. Without a CUDA device it says so and exits 0 (CI has none): the GPU
path is never needed for the tests to pass. The data is the demo's `shapes` at 32x32, generated in
memory; the model configs are params.yaml's `train.models` sections, as `dvc repro` trains them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import common
from latentforge.models import MODELS, train_step
from latentforge.pipelines.common.params import load_params, section
from latentforge.pipelines.data import load_shapes
from latentforge.pipelines.export import export_model
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import write_prepared

BATCH = 64


def build(family: str, params: dict, num_samples: int):
    """A fresh model of ``family`` with the demo's config for 32x32 RGB shapes."""
    cls = MODELS[family]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    data_fields = {"image_size": 32, "channels": 3, "num_samples": num_samples}
    overrides = dict(section(params, "train.models").get(family) or {})
    return cls(cls.config_class.from_dict({**{k: v for k, v in data_fields.items() if k in fields}, **overrides}))


def train(model, images: np.ndarray, steps: int, device: str, bf16: bool) -> float:
    """``steps`` generic training steps on ``device``; returns samples/s (after 10 warm-up steps)."""
    torch.manual_seed(0)
    model.to(device).train()
    optimizers = model.configure_optimizers()

    def forward(batch, phase, step):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            return model(batch, phase=phase, step=step)

    rng = np.random.default_rng(0)
    start = None
    for step in range(steps + 10):
        if step == 10:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
        rows = rng.integers(0, len(images), BATCH)
        batch = {"image": batch_to_tensor(images[rows]).to(device), "label": torch.zeros(BATCH, dtype=torch.int64, device=device),
                 "index": torch.as_tensor(rows, device=device)}
        train_step(model, optimizers, batch, step, forward=forward)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * BATCH / (time.perf_counter() - start)


def check_family(family: str, params: dict, data, prepared: Path, steps: int, out: Path) -> dict:
    """CPU, CUDA fp32 and CUDA bf16 throughput of one family, and the bf16 model's export parity."""
    row: dict = {}
    for name, device, bf16 in (("cpu", "cpu", False), ("cuda_fp32", "cuda", False), ("cuda_bf16", "cuda", True)):
        model = build(family, params, len(data.images))
        cpu_steps = max(20, steps // 10) if device == "cpu" else steps  # the CPU rate settles within a few steps
        row[f"{name}_samples_per_s"] = round(train(model, data.images, cpu_steps, device, bf16), 1)
        print(f"  {family} {name}: {row[f'{name}_samples_per_s']} samples/s", flush=True)
    row["speedup_bf16_vs_cpu"] = round(row["cuda_bf16_samples_per_s"] / row["cpu_samples_per_s"], 1)
    model.to("cpu").eval()
    model.save_pretrained(out / family / "model")
    try:
        manifest = export_model(out / family / "model", prepared, out / family / "export")
        row["export_parity"] = "ok"
        row["export_graphs"] = sorted(manifest["graphs"])
    except Exception as exc:  # the figure to report is the failure itself
        row["export_parity"] = f"failed: {exc}"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--families", default="vae,vqvae2,gan")
    args = parser.parse_args(argv)
    families = common.parse_names("gpu_check.py", "family", args.families, sorted(MODELS))
    if families is None:
        return 2
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device here; nothing to check (run it on a GPU machine)")
        return 0
    params = load_params(common.REPO / "params.yaml")
    data = load_shapes(2000, seed=0, image_size=32)
    results = {"environment": {**common.environment(), "gpu": torch.cuda.get_device_name(0)}, "steps": args.steps, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        write_prepared(data, prepared, "shapes", "shapes", {}, 0, {"train": 0.8, "val": 0.1, "test": 0.1})
        for family in families:
            results["families"][family] = check_family(family, params, data, prepared, args.steps, Path(tmp))
    path = common.write_json(results, common.RESULTS / "gpu_check.json")
    print(f"-> {common.rel(path)}")
    failed = [f for f, row in results["families"].items() if row["export_parity"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
