"""Model-zoo quality: every family trained on MNIST in a plain PyTorch loop, scored on a held-out test split.

Data: the MNIST test set (10,000 IDX images, 28x28x1) from ``../shared/data/mnist`` (``--mnist`` or
``LATENTFORGE_MNIST`` to point elsewhere; absent: a skip message and exit 0), split 8,000 / 1,000 / 1,000
with ``split_indices(10000, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)`` as the prepare stage
would. Each family is built from its DEFAULT config (``image_size=28, channels=1``; GLO also
``num_samples=8000``), trained on CPU with ``models.train_step`` for a fixed per-family step budget at
batch 64, then measured on the TEST split:

* every family with an encoder: reconstruction MSE and PSNR (per-image PSNR, data range 1.0, averaged;
  GLO through its optimisation-based ``encode``), next to the PSNR of predicting the train mean image;
* VAE (trained with dynamic binarisation: each batch re-drawn as Bernoulli(x)): the importance-weighted
  NLL with k=100 on the test set binarised once with a fixed seed. Target <= 95 nats;
* VQ-VAE-2: reconstruction PSNR (target >= 28 dB) and codebook usage per level over the whole test
  set (fraction of codes used at least once; target >= 80% each);
* GAN (no encoder): the family's validation MMD on the test split, with the MMD of real-vs-real
  batches (val vs test) as the floor it is compared with;
* every family: its own ``validation_step`` figures on the test split, training time, training samples
  per second, steps, sampling throughput; a sample grid and (with an encoder) a reconstruction grid PNG
  under ``bench/results/model_quality/``.

Writes ``bench/results/model_quality.json`` and prints one line per family. Smoke runs
(``--budget-scale`` < 1 or ``--test-count``) write ``model_quality_smoke.json`` instead, so they never
overwrite the real figures. A run of some ``--families`` merges into the existing file.

    .venv/bin/python bench/model_quality.py                          # all 13 families, ~30 min on 2 cores
    .venv/bin/python bench/model_quality.py --families vae,vqvae2
    .venv/bin/python bench/model_quality.py --budget-scale 0.02 --test-count 200   # smoke run, ~2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import common  # noqa: E402  (puts the repository root on sys.path)

import numpy as np
import torch

from latentforge.models import MODELS, train_step
from latentforge.pipelines.data import load_idx
from latentforge.pipelines.imaging import save_png, tensor_to_uint8
from latentforge.pipelines.prepare import split_indices
from latentforge.runtime.grid import make_grid

DEFAULT_MNIST = common.REPO.parent / "shared" / "data" / "mnist"
FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SPLIT_SEED = 0
BATCH_SIZE = 64

# Training steps at batch 64, chosen to meet the targets (VAE, VQ-VAE-2) or to get a converged-looking
# baseline for the families without one, at a total well under 45 minutes on 2 CPU cores. Measured
# cost per step (2 threads, 28x28): vqvae2 ~1.2 s (vq ~0.3 s + prior ~0.9 s), gan ~95 ms, aae ~60 ms,
# conv_ae ~40 ms, vae ~37 ms, lstm_ae ~28 ms, glo ~22 ms, the fully-connected AEs 1-12 ms.
STEPS: dict[str, int] = {
    "ae": 3000,
    "mlp_ae": 3000,
    "conv_ae": 1500,
    "sparse_ae": 2000,
    "denoising_ae": 2000,
    "tied_ae": 3000,
    "lstm_ae": 1500,
    "linear_ae": 3000,
    "vae": 4000,
    "gan": 2000,
    "aae": 2000,
    "glo": 3000,
    "vqvae2": 750,
}

TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    # figure -> (comparison, threshold)
    "vae": {"iwae_nll_k100": ("<=", 95.0)},
    "vqvae2": {"recon_psnr": (">=", 28.0), "usage_top": (">=", 0.8), "usage_bottom": (">=", 0.8)},
}

IWAE_K = 100
TEST_BINARISE_SEED = 1234  # the fixed seed of the one binarisation of the VAE's test set
EVAL_BATCH = 250


# ----------------------------------------------------------------------------------------------------
# Data


def find_mnist(path: str | None) -> tuple[Path, Path] | None:
    """(images, labels) IDX files of the MNIST test set under ``path``, gzipped or not; None if absent."""
    root = Path(path or os.environ.get("LATENTFORGE_MNIST") or DEFAULT_MNIST)
    for suffix in (".gz", ""):
        images, labels = root / f"t10k-images-idx3-ubyte{suffix}", root / f"t10k-labels-idx1-ubyte{suffix}"
        if images.is_file() and labels.is_file():
            return images, labels
    return None


def load_mnist_splits(images: Path, labels: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The three splits as float tensors: ``image`` (N, 1, 28, 28) in [0, 1], ``label`` (N,), and
    ``index`` (N,), the row within the split (what GLO's codes are looked up by)."""
    data = load_idx(str(images), str(labels))
    if len(data.images) != 10000:
        raise SystemExit(f"model_quality: expected the 10,000-image MNIST test set in {images}, got {len(data.images)} images")
    parts = split_indices(len(data.images), FRACTIONS, seed=SPLIT_SEED)
    out = {}
    for split, rows in parts.items():
        x = torch.from_numpy(data.images[rows]).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        out[split] = {
            "image": x,
            "label": torch.from_numpy(data.labels[rows]),
            "index": torch.arange(len(rows), dtype=torch.int64),
        }
    return out


# ----------------------------------------------------------------------------------------------------
# Training


def build(family: str, n_train: int):
    cls = MODELS[family]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    values: dict[str, Any] = {"image_size": 28, "channels": 1}
    if "num_samples" in fields:
        values["num_samples"] = n_train
    return cls(cls.config_class(**values))


def train(model, family: str, train_split: dict[str, torch.Tensor], steps: int, seed: int) -> dict[str, Any]:
    """A plain loop over shuffled epochs (last partial batch dropped), ``train_step`` per batch."""
    optimizers = model.configure_optimizers()
    model.train()
    n = len(train_split["image"])
    rng = np.random.default_rng(seed)
    bern = torch.Generator().manual_seed(seed + 1)
    binarise = family == "vae"  # dynamic binarisation: the IWAE NLL is a likelihood of binary images
    perm, pos = rng.permutation(n), 0
    tail: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + BATCH_SIZE > n:
            perm, pos = rng.permutation(n), 0
        rows = torch.from_numpy(perm[pos : pos + BATCH_SIZE])
        pos += BATCH_SIZE
        x = train_split["image"][rows]
        if binarise:
            x = torch.bernoulli(x, generator=bern)
        batch = {"image": x, "label": train_split["label"][rows], "index": train_split["index"][rows]}
        logs = train_step(model, optimizers, batch, step)
        tail = (tail + [logs])[-50:]
        if not all(math.isfinite(v) for v in logs.values()):
            raise RuntimeError(f"{family}: non-finite training loss at step {step}: {logs}")
    seconds = time.perf_counter() - t0
    model.eval()
    last = {k: float(np.mean([t[k] for t in tail])) for k in tail[-1]} if tail else {}
    return {
        "steps": steps,
        "train_seconds": round(seconds, 2),
        "train_samples_per_sec": round(steps * BATCH_SIZE / max(seconds, 1e-9), 1),
        "train_logs_last50": {k: round(v, 5) for k, v in last.items()},
    }


# ----------------------------------------------------------------------------------------------------
# Evaluation


def psnr_figures(recon: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """MSE over all pixels and per-image PSNR (data range 1.0) averaged over images."""
    per_image = (recon.float() - x.float()).square().flatten(1).mean(1)
    psnr = 10.0 * torch.log10(1.0 / per_image.clamp_min(1e-10))
    return {"recon_mse": float(per_image.mean()), "recon_psnr": float(psnr.mean())}


@torch.no_grad()
def reconstruct(model, family: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    out = []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(x), EVAL_BATCH):
        chunk = x[start : start + EVAL_BATCH]
        if family == "glo":
            latent = model.encode(chunk, generator=gen).latent  # optimisation-based, config defaults
        else:
            latent = model.encode(chunk).latent
        out.append(model.decode(latent).images.float())
    return torch.cat(out)


@torch.no_grad()
def validation_figures(model, split: dict[str, torch.Tensor], image: torch.Tensor | None = None) -> dict[str, float]:
    """The family's own ``validation_step`` on a split, batch-size-weighted over batches of 64
    (the batch size the training job validates with)."""
    x = split["image"] if image is None else image
    sums: dict[str, float] = {}
    for start in range(0, len(x), BATCH_SIZE):
        sl = slice(start, start + BATCH_SIZE)
        batch = {"image": x[sl], "label": split["label"][sl], "index": split["index"][sl]}
        for k, v in model.validation_step(batch).items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(batch["image"])
    return {k: round(v / len(x), 6) for k, v in sums.items()}


@torch.no_grad()
def sample_throughput(model, n: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.sample(n, generator=gen)
    seconds = time.perf_counter() - t0
    return {"sample_count": n, "sample_seconds": round(seconds, 3), "samples_per_sec": round(n / max(seconds, 1e-9), 1)}


@torch.no_grad()
def vae_figures(model, test: dict[str, torch.Tensor], seed: int) -> dict[str, Any]:
    binary = torch.bernoulli(test["image"], generator=torch.Generator().manual_seed(TEST_BINARISE_SEED))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    nll = torch.cat([model.iwae_nll(binary[s : s + 100], k=IWAE_K, generator=gen) for s in range(0, len(binary), 100)])
    seconds = time.perf_counter() - t0
    return {
        "iwae_nll_k100": round(float(nll.mean()), 3),
        "iwae_nll_k100_std_err": round(float(nll.std() / math.sqrt(len(nll))), 3),
        "iwae_seconds": round(seconds, 2),
        "binarised_test_validation": validation_figures(model, test, image=binary),  # its nelbo is the k=1 bound
    }


@torch.no_grad()
def vqvae2_figures(model, test: dict[str, torch.Tensor]) -> dict[str, Any]:
    tops, bottoms = [], []
    for start in range(0, len(test["image"]), EVAL_BATCH):
        top, bottom = model.encode(test["image"][start : start + EVAL_BATCH]).indices
        tops.append(top.flatten())
        bottoms.append(bottom.flatten())
    figures: dict[str, Any] = {"num_codes": model.config.num_codes}
    for level, idx in (("top", torch.cat(tops)), ("bottom", torch.cat(bottoms))):
        counts = torch.bincount(idx, minlength=model.config.num_codes).float()
        p = counts / counts.sum()
        figures[f"usage_{level}"] = round(float((counts > 0).float().mean()), 4)
        figures[f"codes_used_{level}"] = int((counts > 0).sum())
        figures[f"perplexity_{level}"] = round(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())), 2)
    return figures


@torch.no_grad()
def real_mmd_floor(val: torch.Tensor, test: torch.Tensor) -> float:
    """The GAN's batch MMD between two sets of REAL images (val vs test), batches of 64: what a
    generator indistinguishable from the data would score with the same estimator."""
    from latentforge.models.gan import pixel_mmd

    n = min(len(val), len(test))
    sums, count = 0.0, 0
    for start in range(0, n, BATCH_SIZE):
        a, b = val[start : start + BATCH_SIZE], test[start : start + BATCH_SIZE]
        m = min(len(a), len(b))
        sums += float(pixel_mmd(a[:m], b[:m])) * m
        count += m
    return round(sums / count, 6)


def pca_reference(train_x: torch.Tensor, test_x: torch.Tensor, k: int) -> dict[str, float]:
    """Test reconstruction of PCA with ``k`` components fitted on the train split: the linear AE's optimum."""
    a = train_x.flatten(1).double()
    mean = a.mean(0)
    _, _, vh = torch.linalg.svd(a - mean, full_matrices=False)
    basis = vh[:k].T
    t = test_x.flatten(1).double() - mean
    recon = (t @ basis @ basis.T + mean).clamp(0, 1).view_as(test_x)
    return {f"pca{k}_{key}": round(v, 5) for key, v in psnr_figures(recon, test_x).items()}


def save_grids(model, family: str, test_x: torch.Tensor, recon: torch.Tensor | None, out_dir: Path, seed: int) -> dict[str, str]:
    paths = {}
    with torch.no_grad():
        samples = model.sample(64, generator=torch.Generator().manual_seed(seed)).images
    paths["samples_png"] = common.rel(save_png(make_grid(tensor_to_uint8(samples), nrow=8), out_dir / f"{family}_samples.png", scale=2))
    if recon is not None:
        pairs = torch.stack([test_x[:32], recon[:32].to(test_x.dtype)], dim=1).flatten(0, 1)  # original, recon, ...
        paths["recon_png"] = common.rel(save_png(make_grid(tensor_to_uint8(pairs), nrow=8), out_dir / f"{family}_recon.png", scale=2))
    return paths


def check_targets(family: str, figures: dict[str, Any]) -> dict[str, Any]:
    results = {}
    for key, (op, threshold) in TARGETS.get(family, {}).items():
        value = figures.get(key)
        ok = value is not None and (value <= threshold if op == "<=" else value >= threshold)
        results[key] = {"target": f"{op} {threshold:g}", "value": value, "pass": bool(ok)}
    return results


def run_family(family: str, splits, steps: int, seed: int, grid_dir: Path, mean_psnr: float) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build(family, len(splits["train"]["image"]))
    record: dict[str, Any] = {
        "class": type(model).__name__,
        "config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": BATCH_SIZE,
        "phases": list(model.phases),
    }
    record.update(train(model, family, splits["train"], steps, seed))
    test = splits["test"]
    figures: dict[str, Any] = {}
    recon = None
    t0 = time.perf_counter()
    if model.has_encoder:
        recon = reconstruct(model, family, test["image"], seed)
        figures.update({k: round(v, 6) for k, v in psnr_figures(recon, test["image"]).items()})
        figures["mean_image_psnr"] = round(mean_psnr, 3)
    figures["recon_seconds"] = round(time.perf_counter() - t0, 2)
    if family == "vae":
        figures.update(vae_figures(model, test, seed))
    if family == "vqvae2":
        figures.update(vqvae2_figures(model, test))
    if family == "linear_ae":
        figures.update(pca_reference(splits["train"]["image"], test["image"], model.config.latent_dim))
    torch.manual_seed(seed)  # validation_step may draw noise (VAE posterior sample, GAN latents)
    figures["test_validation"] = validation_figures(model, test)
    if family == "gan":
        figures["mmd"] = figures["test_validation"]["mmd"]
        figures["mmd_real_vs_real"] = real_mmd_floor(splits["val"]["image"], test["image"])
    record["figures"] = figures
    record["grids"] = save_grids(model, family, test["image"], recon, grid_dir, seed)  # also warms up sample()
    record["sampling"] = sample_throughput(model, 64 if family == "vqvae2" else 1000, seed)
    record["targets"] = check_targets(family, {**figures, **record})
    return record


def summary_line(family: str, r: dict[str, Any]) -> str:
    f = r["figures"]
    parts = [f"{family:<13}", f"{r['steps']:>5} steps", f"{r['train_seconds']:>7.1f}s", f"{r['train_samples_per_sec']:>8.0f} samples/s"]
    if "recon_psnr" in f:
        parts.append(f"MSE {f['recon_mse']:.4f}  PSNR {f['recon_psnr']:5.2f} dB")
    if "iwae_nll_k100" in f:
        parts.append(f"IWAE NLL(k=100) {f['iwae_nll_k100']:.2f} nats")
    if "usage_top" in f:
        parts.append(f"usage top {f['usage_top']:.0%} bottom {f['usage_bottom']:.0%}")
    if "mmd" in f:
        parts.append(f"MMD {f['mmd']:.4f} (real-vs-real {f['mmd_real_vs_real']:.4f})")
    parts.append(f"sample {r['sampling']['samples_per_sec']:.0f}/s")
    targets = r["targets"]
    if targets:
        verdict = "PASS" if all(t["pass"] for t in targets.values()) else "FAIL"
        parts.append(verdict + " (" + ", ".join(f"{k} {t['target']}" for k, t in targets.items()) + ")")
    else:
        parts.append("no target")
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", help=f"folder with t10k-images-idx3-ubyte[.gz] and labels (default: $LATENTFORGE_MNIST or {DEFAULT_MNIST})")
    parser.add_argument("--families", help=f"comma-separated subset of: {','.join(MODELS)} (default: all)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step budget (e.g. 0.02 for a smoke run)")
    parser.add_argument("--test-count", type=int, help="score on the first N test images only (smoke runs)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2: this machine's cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/model_quality.json, or _smoke.json for smoke runs)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed (default: report only)")
    args = parser.parse_args(argv)

    families = list(MODELS) if not args.families else common.parse_names("model_quality", "families", args.families, MODELS)
    if families is None:
        return 2
    if args.budget_scale <= 0:
        print("model_quality: --budget-scale must be > 0", file=sys.stderr)
        return 2
    files = find_mnist(args.mnist)
    if files is None:
        where = args.mnist or os.environ.get("LATENTFORGE_MNIST") or DEFAULT_MNIST
        print(f"model_quality: SKIPPED: no MNIST IDX files (t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) "
              f"in {where}; pass --mnist DIR or set LATENTFORGE_MNIST")
        return 0

    smoke = args.budget_scale != 1.0 or args.test_count is not None
    out = args.out or common.RESULTS / ("model_quality_smoke.json" if smoke else "model_quality.json")
    grid_dir = out.with_suffix("")  # bench/results/model_quality/ next to model_quality.json
    torch.set_num_threads(args.threads)

    splits = load_mnist_splits(*files)
    if args.test_count is not None:
        splits["test"] = {k: v[: args.test_count] for k, v in splits["test"].items()}
    mean_image = splits["train"]["image"].mean(0, keepdim=True).expand_as(splits["test"]["image"])
    mean_psnr = psnr_figures(mean_image, splits["test"]["image"])["recon_psnr"]

    previous = {}
    if out.is_file() and set(families) != set(MODELS):
        try:
            previous = json.loads(out.read_text()).get("families", {})
        except (OSError, ValueError):
            previous = {}
    result: dict[str, Any] = {
        "benchmark": "model_quality",
        "environment": common.environment(),
        "data": {
            "source": "MNIST test set (IDX), 10,000 images 28x28x1",
            "path": str(files[0].parent),
            "split": "split_indices(10000, {'train': 0.8, 'val': 0.1, 'test': 0.1}, seed=0): train for training, test for every figure",
            "counts": {k: int(len(v["image"])) for k, v in splits.items()},
            "vae_binarisation": f"training batches re-drawn as Bernoulli(x) each step; test set binarised once with torch seed {TEST_BINARISE_SEED}",
        },
        "batch_size": BATCH_SIZE,
        "torch_threads": torch.get_num_threads(),
        "budget_scale": args.budget_scale,
        "seed": args.seed,
        "targets": {f: {k: f"{op} {v:g}" for k, (op, v) in t.items()} for f, t in TARGETS.items()},
        "families": dict(previous),
    }
    print(f"model_quality: {len(families)} families on MNIST {result['data']['counts']}, batch {BATCH_SIZE}, "
          f"{torch.get_num_threads()} threads, budget x{args.budget_scale:g}; mean-image baseline PSNR {mean_psnr:.2f} dB", flush=True)
    t_all = time.perf_counter()
    failed = []
    for family in families:
        steps = max(1, int(round(STEPS[family] * args.budget_scale)))
        t0 = time.perf_counter()
        try:
            record = run_family(family, splits, steps, args.seed, grid_dir, mean_psnr)
        except Exception as exc:  # one broken family must not hide the others' figures
            record = {"error": f"{type(exc).__name__}: {exc}", "steps": steps}
            print(f"{family:<13}  ERROR {record['error']}", flush=True)
            failed.append(family)
        else:
            print(summary_line(family, record), flush=True)
            if not all(t["pass"] for t in record["targets"].values()):
                failed.append(family)
        record["wall_seconds"] = round(time.perf_counter() - t0, 1)
        record["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        result["families"][family] = record
        result["total_seconds"] = round(time.perf_counter() - t_all, 1)
        common.write_json(result, out)  # after every family: a crash keeps what was measured
    result["all_targets_met"] = not failed
    result["environment"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    common.write_json(result, out)
    print(f"model_quality: {'all targets met' if not failed else 'FAILED: ' + ', '.join(failed)}; "
          f"{result['total_seconds']:.0f}s in all; figures -> {common.rel(out)}, grids -> {common.rel(grid_dir)}/")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
