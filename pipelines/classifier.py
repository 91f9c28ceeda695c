"""The project's own domain classifier: the feature extractor and judge of the ``evaluate`` stage.

No pretrained network can be downloaded here, so Inception features (FID) are replaced by the features
of a small CNN trained on the prepared data's train split: one head for the class label and, when the
data has generative factors (``shapes``: shape, colour, size, position), one head per factor, all on
one shared trunk. Its penultimate layer (``feature_dim`` values after a ReLU) is the feature space of
the Frechet distance and of precision/recall; its label head's softmax scores interpolations, and its
factor heads read samples (validity: every factor read with probability >= 0.9; coverage).

A classifier trained on real images alone reads anything confidently: a black square, noise. So that a
confident reading means "this looks like the data", it is trained with outlier exposure (Hendrycks et
al. 2019): beside each batch of real images, synthetic outliers built from them (constant images, noise,
smooth noise, heavy blur, blends of two images, shuffled patches, :func:`synthetic_outliers`) whose
every head is pushed towards the uniform distribution, weighted by ``outlier_weight`` (0: off). The
real images are then mildly blurred, dimmed or noised (:func:`mildly_degraded`, labels kept), so that
a slightly soft sample still reads confidently: the line falls between a soft shape and a blob.

``latentforge classifier`` trains it and writes ``<output_dir>/<data name>/``: ``config.json`` (layout,
heads, the data's name and hash), ``model.safetensors`` and ``metrics.json`` (test-split accuracy of
each head), and logs its own MLflow run (:func:`log_classifier_run`). Features from classifiers trained
on different data (or with different settings) are not comparable: compare evaluation figures only
under one classifier.
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
from latentforge.pipelines.common.progress import progress
from latentforge.pipelines.common.tracking import experiment_id, git_commit, log_data_input, mlflow_client, tracking_uri
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import load_split, read_manifest

CLASSIFIER_SCHEMA: dict[str, Any] = {
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "widths": list,
    "feature_dim": int,
    "outlier_weight": float,
    "seed": int,
    "output_dir": str,
}
# Used when params have no classifier.outlier_weight (params from before outlier exposure).
DEFAULT_OUTLIER_WEIGHT = 0.5
# A reading is confident when the head's top probability reaches this (validity, coverage).
CONFIDENT = 0.9
OUTLIER_KINDS = ("constant", "noise", "smooth_noise", "blur", "blend", "patches")
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
def read_images(classifier: DomainClassifier, images, batch_size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features (N, feature_dim) and every head's probabilities (head -> (N, K_head)), float32 numpy.

    images: (N, C, H, W) float tensor in [0, 1], or (N, H, W, C) uint8 numpy (the prepared layout).
    """
    classifier.eval()
    feats, probs = [], {name: [] for name in classifier.heads}
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        x = batch_to_tensor(chunk) if isinstance(chunk, np.ndarray) else chunk.float()
        f = classifier.features(x)
        feats.append(f.numpy())
        for name, head in classifier.heads.items():
            probs[name].append(F.softmax(head(f), dim=1).numpy())
    return np.concatenate(feats), {name: np.concatenate(p) for name, p in probs.items()}


def embed_images(classifier: DomainClassifier, images, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, feature_dim) and main-head probabilities (N, K) of images, float32 numpy."""
    feats, probs = read_images(classifier, images, batch_size)
    return feats, probs[classifier.main_head]


def reading_heads(heads) -> list[str]:
    """The heads that read what an image shows (validity, coverage): every factor head, or the main
    head when the data has no factors (labels only)."""
    factors = [name for name in heads if name.startswith("factor_")]
    return factors or [LABEL_HEAD if LABEL_HEAD in heads else next(iter(heads))]


def confident_fraction(probs: dict[str, np.ndarray], heads: list[str]) -> float:
    """The fraction of images whose every head in ``heads`` reads with probability >= :data:`CONFIDENT`."""
    top = np.stack([probs[h].max(1) for h in heads], 1)  # (N, heads)
    return float((top >= CONFIDENT).all(1).mean())


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


def synthetic_outliers(x: Tensor, generator: torch.Generator, kinds: tuple[str, ...] = OUTLIER_KINDS) -> Tensor:
    """Images that are not of the data, built from a batch of real ones: (B, C, H, W) in [0, 1] -> the
    same shape; row i is of kind ``kinds[i % len(kinds)]`` (:func:`outlier_of_kind`)."""
    out = torch.empty_like(x)
    for j, kind in enumerate(kinds):
        rows = torch.arange(j, len(x), len(kinds))
        if len(rows):
            out[rows] = outlier_of_kind(kind, x[rows], x, generator)
    return out


def outlier_of_kind(kind: str, x: Tensor, pool: Tensor, generator: torch.Generator) -> Tensor:
    """Outliers of one kind from real images x (b, C, H, W) in [0, 1]; ``pool`` (B, C, H, W) gives the
    second image of a blend. The kinds are the failures of generative models, each far from the data:

    ``constant`` (one random colour, black in a quarter of them: a collapsed generator), ``noise``
    (uniform per pixel), ``smooth_noise`` (noise at 1/4 resolution, upsampled: coloured fragments),
    ``blur`` (a box blur a quarter of the image wide: a blob), ``blend`` (the mean of two images: two
    half-bright objects), ``patches`` (the image's patches, 1/8 of its side, shuffled: fragments).
    """
    b, c, h, w = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    if kind == "constant":
        colour = rand(b, c, 1, 1) * (rand(b, 1, 1, 1) >= 0.25)
        return colour.expand(b, c, h, w).clone()
    if kind == "noise":
        return rand(b, c, h, w)
    if kind == "smooth_noise":
        return F.interpolate(rand(b, c, max(1, h // 4), max(1, w // 4)), size=(h, w), mode="bilinear", align_corners=False)
    if kind == "blur":
        k = max(3, h // 4) | 1  # odd
        return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
    if kind == "blend":
        other = pool[torch.randint(len(pool), (b,), generator=generator)]
        return (x + other) / 2
    if kind == "patches":
        p = max(2, h // 8)
        gh, gw = h // p, w // p
        tiles = x[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)
        order = torch.argsort(rand(b, gh * gw), dim=1)
        tiles = tiles[torch.arange(b)[:, None], order]
        out = x.clone()
        out[:, :, : gh * p, : gw * p] = tiles.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * p, gw * p)
        return out
    raise ValueError(f"unknown outlier kind {kind!r}; choose one of: {', '.join(OUTLIER_KINDS)}")


def mildly_degraded(x: Tensor, generator: torch.Generator) -> Tensor:
    """Real images as a generative model draws them when it draws well: (B, C, H, W) in [0, 1] -> the same
    shape, each image independently Gaussian-blurred (sigma up to 1/32 of its height: 1 pixel at 32 x 32),
    dimmed (x 0.6 to 1) and given Gaussian pixel noise (sigma up to 0.05), each with probability 1/2.
    Trained on with their labels, so that a confident reading tolerates a slightly soft, dim or grainy
    sample; outliers are far beyond (a blur a quarter of the image wide, uniform noise, two half-bright
    objects)."""
    b, h = len(x), x.shape[2]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    sigma = (h / 32) * rand(b) * (rand(b) < 0.5)
    gain = 1 - 0.4 * rand(b, 1, 1, 1) * (rand(b, 1, 1, 1) < 0.5)
    noise = 0.05 * rand(b, 1, 1, 1) * (rand(b, 1, 1, 1) < 0.5)
    return (gain * gaussian_blur(x, sigma) + noise * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 2) -> Tensor:
    """Blur each image of x (B, C, H, W) with its own Gaussian of ``sigma`` (B,) pixels (0: unchanged),
    a (2 radius + 1)-tap kernel, edges replicated."""
    b, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(taps[None, :] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))  # (B, taps)
    k = k / k.sum(1, keepdim=True)
    weight = (k[:, :, None] * k[:, None, :]).repeat_interleave(c, 0)[:, None]  # (B*C, 1, taps, taps)
    padded = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=b * c).reshape(b, c, h, w)


def uniform_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of logits (B, K) against the uniform distribution, batch mean: log K when uniform."""
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean()


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
    outlier_weight: float = 0.0,
) -> DomainClassifier:
    """Train a :class:`DomainClassifier` on (N, H, W, C) uint8 images; targets: head -> (N,) ints, -1
    where unknown (ignored by the loss). The loss is the sum of the heads' cross-entropies, plus
    ``outlier_weight`` times the sum of the heads' cross-entropies to the uniform distribution on half a
    batch of :func:`synthetic_outliers` (outlier exposure; one forward pass for both, so BatchNorm sees
    both); with outlier exposure the real images are :func:`mildly_degraded` (they keep their labels). Adam with a cosine-decayed learning rate. Deterministic given ``seed`` (on CPU)."""
    torch.manual_seed(seed)
    model = DomainClassifier(images.shape[-1], heads, tuple(widths), feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(images)
    steps_per_epoch = max(1, n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    y = {k: torch.from_numpy(v) for k, v in targets.items()}
    model.train()
    for epoch in range(epochs):
        perm = rng.permutation(n)
        total = 0.0
        for s in progress(range(steps_per_epoch), f"classifier epoch {epoch + 1}/{epochs}", unit="steps"):
            idx = np.sort(perm[s * batch_size : (s + 1) * batch_size])
            x = batch_to_tensor(images[idx])
            outliers = synthetic_outliers(x[: max(1, len(x) // 2)], generator) if outlier_weight > 0 else x[:0]
            if outlier_weight > 0:  # the readings must hold for samples slightly softer than the data
                x = mildly_degraded(x, generator)
            logits = model(torch.cat([x, outliers]))
            loss = sum(F.cross_entropy(logits[k][: len(x)], y[k][idx], ignore_index=-1) for k in targets)
            if len(outliers):
                loss = loss + outlier_weight * sum(uniform_loss(logits[k][len(x) :]) for k in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        echo(f"classifier epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}")
    model.eval()
    return model


def reading_figures(model: DomainClassifier, images: np.ndarray, seed: int = 0, limit: int = 1000) -> dict[str, float]:
    """How the classifier reads (N, H, W, C) uint8 test images (the first ``limit``) and synthetic
    outliers built from them: ``test_validity`` (the fraction read confidently by every
    :func:`reading_heads` head; ~1 is right), ``outlier_validity_<kind>`` for each kind and
    ``outlier_validity`` their mean (~0 is right)."""
    heads = reading_heads(model.heads)
    x = batch_to_tensor(images[:limit])
    out = {"test_validity": confident_fraction(read_images(model, x)[1], heads)}
    generator = torch.Generator().manual_seed(seed)
    for kind in OUTLIER_KINDS:
        probs = read_images(model, outlier_of_kind(kind, x, x, generator))[1]
        out[f"outlier_validity_{kind}"] = confident_fraction(probs, heads)
    out["outlier_validity"] = float(np.mean([out[f"outlier_validity_{k}"] for k in OUTLIER_KINDS]))
    return out


def resolve_classifier(params: dict[str, Any]) -> tuple[dict[str, Any], Path, Path]:
    """Check the ``classifier`` section; return (settings, prepared data dir, output dir)."""
    values = {"outlier_weight": DEFAULT_OUTLIER_WEIGHT, **section(params, "classifier")}
    cfg = check_keys(values, CLASSIFIER_SCHEMA, "classifier")
    for key in ("epochs", "batch_size", "feature_dim"):
        if cfg[key] <= 0:
            raise ParamsError(f"params classifier.{key} must be > 0, got {cfg[key]}")
    if not cfg["outlier_weight"] >= 0:
        raise ParamsError(f"params classifier.outlier_weight must be >= 0 (0: no outlier exposure), got {cfg['outlier_weight']}")
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
    uri = tracking_uri(params)
    client = mlflow_client(uri)  # fail fast, before the minutes of training, when the store is unreachable
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
        cfg["feature_dim"], cfg["seed"], echo, cfg["outlier_weight"],
    )
    seconds = time.time() - t0
    accs = head_accuracies(model, test["images"], head_targets(test["labels"], test["factors"], names, len(manifest["class_names"])))
    readings = reading_figures(model, test["images"], cfg["seed"])
    metrics = {
        **{f"test_accuracy_{k}": v for k, v in accs.items()},
        **readings,
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
        "settings": {k: cfg[k] for k in ("epochs", "batch_size", "lr", "outlier_weight", "seed")},
    }
    with atomic_directory(out) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        save_model(model, str(tmp / WEIGHTS_NAME))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    run_id = log_classifier_run(client, uri, section(params, "mlflow").get("experiment") or "latentforge", cfg, manifest,
                                data_dir, metrics, out)
    accs_line = ", ".join(f"{k} {v:.3f}" for k, v in accs.items())
    echo(f"classifier for {manifest['name']}: test accuracy {accs_line}; confident on {readings['test_validity']:.3f} "
         f"of test images, {readings['outlier_validity']:.3f} of outliers ({seconds:.1f}s) -> {out}; MLflow run {run_id}")
    return out, metrics


def log_classifier_run(client, uri: str, experiment: str, cfg: dict[str, Any], manifest: dict[str, Any], data_dir: Path,
                       metrics: dict[str, Any], out: Path) -> str:
    """The classifier stage's own MLflow run, in the training's experiment: ``classifier-<data name>``,
    tagged as training runs are (data name and hash, git commit), with the settings as params, the
    figures of ``metrics.json`` as metrics, the prepared data as its dataset input and the saved
    ``config.json`` / ``metrics.json`` as artifacts. Returns the run id."""
    from mlflow.entities import Metric, Param

    tags = {"latentforge.stage": "classifier", "latentforge.data_name": str(manifest["name"]),
            "latentforge.data_hash": str(manifest["data_hash"]), "mlflow.source.git.commit": git_commit()}
    run_id = client.create_run(experiment_id(client, experiment, uri), run_name=f"classifier-{manifest['name']}",
                               tags=tags).info.run_id
    now = int(time.time() * 1000)
    figures = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())
               if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)]
    settings = [Param(f"classifier.{k}", str(cfg[k])) for k in sorted(cfg) if k != "output_dir"]
    client.log_batch(run_id, metrics=figures, params=settings)
    log_data_input(client, run_id, manifest, data_dir, "training")
    for name in (CONFIG_NAME, "metrics.json"):
        client.log_artifact(run_id, str(out / name))
    client.set_terminated(run_id, status="FINISHED")
    return run_id
