"""The project's own domain classifier: the feature extractor and judge of the ``evaluate`` stage.

No pretrained network can be downloaded here, so Inception features (FID) are replaced by the features
of a small CNN trained on the prepared data's train split: one head for the class label and, when the
data has generative factors (``shapes``: shape, colour, size, position), one head per factor, all on
one shared trunk. Its penultimate layer (``feature_dim`` values after a ReLU) is the feature space of
the Frechet distance and of precision/recall; its label head's softmax scores interpolations.

``latentforge classifier`` trains it and writes ``<output_dir>/<data name>/``: ``config.json`` (layout,
heads, the data's name and hash), ``model.safetensors`` and ``metrics.json`` (test-split accuracy of
each head). Features from classifiers trained on different data (or with different settings) are not
comparable: compare evaluation figures only under one classifier.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from latentforge.pipelines.common.errors import DataError
from latentforge.pipelines.common.files import atomic_directory
from latentforge.pipelines.common.params import ParamsError, check_keys, section
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import load_split, read_manifest

CLASSIFIER_SCHEMA: dict[str, Any] = {
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "widths": list,
    "feature_dim": int,
    "seed": int,
    "output_dir": str,
}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LABEL_HEAD = "label"


class DomainClassifier(nn.Module):
    """A small CNN with several classification heads on one trunk.

    Trunk: per width, two 3x3 conv + BatchNorm + ReLU, with a 2x2 max-pool between stages; then an
    adaptive average pool to 4x4 (coarse position survives: the ``hpos``/``vpos`` factors need it),
    flatten and a linear layer to ``feature_dim`` + ReLU: the features. Heads: one linear layer each.
    Input: (B, C, H, W) float in [0, 1], any H, W >= 4.
    """

    def __init__(self, channels: int, heads: dict[str, int], widths: tuple[int, ...] = (16, 32, 64), feature_dim: int = 128):
        super().__init__()
        if not heads:
            raise ValueError("DomainClassifier needs at least one head")
        layers: list[nn.Module] = []
        c = channels
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
        layers.append(nn.AdaptiveAvgPool2d(4))
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c * 16, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in heads.items()})
        self.main_head = LABEL_HEAD if LABEL_HEAD in heads else next(iter(heads))

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> penultimate features (B, feature_dim)."""
        return self.embed(self.trunk(x * 2.0 - 1.0))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(B, C, H, W) in [0, 1] -> logits per head, each (B, classes of that head)."""
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}


# ----------------------------------------------------------------------------------------------------
# Using it


@torch.no_grad()
def embed_images(classifier: DomainClassifier, images, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, feature_dim) and main-head probabilities (N, K) of images, float32 numpy.

    images: (N, C, H, W) float tensor in [0, 1], or (N, H, W, C) uint8 numpy (the prepared layout).
    """
    classifier.eval()
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        x = batch_to_tensor(chunk) if isinstance(chunk, np.ndarray) else chunk.float()
        f = classifier.features(x)
        feats.append(f.numpy())
        probs.append(F.softmax(classifier.heads[classifier.main_head](f), dim=1).numpy())
    return np.concatenate(feats), np.concatenate(probs)


@torch.no_grad()
def head_accuracies(classifier: DomainClassifier, images: np.ndarray, targets: dict[str, np.ndarray], batch_size: int = 256) -> dict[str, float]:
    """Accuracy of each head on (N, H, W, C) uint8 images; targets: head -> (N,) ints (-1 rows skipped)."""
    classifier.eval()
    preds: dict[str, list[np.ndarray]] = {k: [] for k in targets}
    for i in range(0, len(images), batch_size):
        logits = classifier(batch_to_tensor(images[i : i + batch_size]))
        for k in targets:
            preds[k].append(logits[k].argmax(1).numpy())
    out = {}
    for k, y in targets.items():
        p = np.concatenate(preds[k])
        mask = y >= 0
        out[k] = float((p[mask] == y[mask]).mean()) if mask.any() else float("nan")
    return out


def load_classifier(directory: str | Path) -> tuple[DomainClassifier, dict[str, Any]]:
    """Rebuild a saved classifier (eval mode) and return it with its ``config.json``."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no domain classifier at {directory}; run `latentforge classifier` (or `dvc repro classifier`) first")
    meta = json.loads((directory / CONFIG_NAME).read_text())
    model = DomainClassifier(meta["channels"], meta["heads"], tuple(meta["widths"]), meta["feature_dim"])
    load_model(model, str(directory / WEIGHTS_NAME), strict=True)
    model.eval()
    return model, meta


# ----------------------------------------------------------------------------------------------------
# Training


def head_targets(labels: np.ndarray, factors: np.ndarray, factor_names: list[str], num_classes: int) -> dict[str, np.ndarray]:
    """The targets of each head: ``label`` (when any row is labelled) and ``factor_<name>`` per factor."""
    targets: dict[str, np.ndarray] = {}
    if num_classes > 1 and (labels >= 0).any():
        targets[LABEL_HEAD] = labels.astype(np.int64)
    for j, name in enumerate(factor_names):
        targets[f"factor_{name}"] = factors[:, j].astype(np.int64)
    return targets


def train_classifier(
    images: np.ndarray,
    targets: dict[str, np.ndarray],
    heads: dict[str, int],
    epochs: int = 6,
    batch_size: int = 128,
    lr: float = 1.5e-3,
    widths: tuple[int, ...] = (16, 32, 64),
    feature_dim: int = 128,
    seed: int = 0,
    echo: Callable[[str], None] = lambda s: None,
) -> DomainClassifier:
    """Train a :class:`DomainClassifier` on (N, H, W, C) uint8 images; targets: head -> (N,) ints, -1
    where unknown (ignored by the loss). The loss is the sum of the heads' cross-entropies; Adam with a
    cosine-decayed learning rate. Deterministic given ``seed`` (on CPU)."""
    torch.manual_seed(seed)
    model = DomainClassifier(images.shape[-1], heads, tuple(widths), feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(images)
    steps_per_epoch = max(1, n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    rng = np.random.default_rng(seed)
    y = {k: torch.from_numpy(v) for k, v in targets.items()}
    model.train()
    for epoch in range(epochs):
        perm = rng.permutation(n)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = np.sort(perm[s * batch_size : (s + 1) * batch_size])
            logits = model(batch_to_tensor(images[idx]))
            loss = sum(F.cross_entropy(logits[k], y[k][idx], ignore_index=-1) for k in targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        echo(f"classifier epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}")
    model.eval()
    return model


def resolve_classifier(params: dict[str, Any]) -> tuple[dict[str, Any], Path, Path]:
    """Check the ``classifier`` section; return (settings, prepared data dir, output dir)."""
    cfg = check_keys(section(params, "classifier"), CLASSIFIER_SCHEMA, "classifier")
    for key in ("epochs", "batch_size", "feature_dim"):
        if cfg[key] <= 0:
            raise ParamsError(f"params classifier.{key} must be > 0, got {cfg[key]}")
    if not cfg["widths"] or not all(isinstance(w, int) and w > 0 for w in cfg["widths"]):
        raise ParamsError(f"params classifier.widths must be a non-empty list of positive ints, got {cfg['widths']!r}")
    data = section(params, "data")
    data_dir = Path(data["output_dir"]) / data["name"]
    return cfg, data_dir, Path(cfg["output_dir"]) / data["name"]


def run_classifier(params: dict[str, Any], echo: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """The ``classifier`` stage: train on the train split, score on the test split, save atomically.

    Returns (output dir, metrics). Raises :class:`DataError` when the data is not prepared or has
    neither labels nor factors.
    """
    cfg, data_dir, out = resolve_classifier(params)
    manifest = read_manifest(data_dir)
    # Writable copies: load_split's arrays are read-only views of the Parquet buffers.
    train, test = ({k: np.array(v) for k, v in load_split(data_dir, split).items()} for split in ("train", "test"))
    names = manifest["factor_names"]
    targets = head_targets(train["labels"], train["factors"], names, len(manifest["class_names"]))
    if not targets:
        raise DataError(f"{data_dir}: the data has neither class labels nor factors; the domain classifier needs one of them")
    heads = {k: (len(manifest["class_names"]) if k == LABEL_HEAD else len(manifest["factor_values"][k[len("factor_"):]])) for k in targets}
    t0 = time.time()
    model = train_classifier(
        train["images"], targets, heads, cfg["epochs"], cfg["batch_size"], cfg["lr"], tuple(cfg["widths"]),
        cfg["feature_dim"], cfg["seed"], echo,
    )
    seconds = time.time() - t0
    accs = head_accuracies(model, test["images"], head_targets(test["labels"], test["factors"], names, len(manifest["class_names"])))
    metrics = {
        **{f"test_accuracy_{k}": v for k, v in accs.items()},
        "test_count": int(len(test["images"])),
        "train_count": int(len(train["images"])),
        "train_seconds": round(seconds, 2),
        "data_hash": manifest["data_hash"],
    }
    h, w, c = manifest["image_shape"]
    meta = {
        "channels": c,
        "image_shape": [h, w, c],
        "heads": heads,
        "main_head": model.main_head,
        "widths": list(cfg["widths"]),
        "feature_dim": cfg["feature_dim"],
        "class_names": manifest["class_names"],
        "factor_names": names,
        "data_name": manifest["name"],
        "data_hash": manifest["data_hash"],
        "settings": {k: cfg[k] for k in ("epochs", "batch_size", "lr", "seed")},
    }
    with atomic_directory(out) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        save_model(model, str(tmp / WEIGHTS_NAME))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    accs_line = ", ".join(f"{k} {v:.3f}" for k, v in accs.items())
    echo(f"classifier for {manifest['name']}: test accuracy {accs_line} ({seconds:.1f}s) -> {out}")
    return out, metrics
