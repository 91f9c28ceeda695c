"""The evaluation's figures: image grids (samples, samples beside their nearest training images,
reconstructions, interpolations, edits), the t-SNE of test latents, the training-loss curves and the
edit figures against the number of labels, each one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latentforge.pipelines.imaging import save_png
from latentforge.runtime.grid import make_grid


def grid_png(images: np.ndarray, path: Path, nrow: int | None = None) -> None:
    """(B, H, W, C) uint8 images as one grid PNG, upscaled (nearest) to about 128 pixels a tile."""
    save_png(make_grid(images, nrow=nrow), path, scale=max(1, 128 // images.shape[1]))


def pair_grid_png(left: np.ndarray, right: np.ndarray, path: Path, gap: int = 4) -> None:
    """Two grids of (B, H, W, C) uint8 images side by side (``left`` | ``right``, tile i of one beside
    tile i of the other), a grey band between them, upscaled as :func:`grid_png`. Each tile gets a dark
    grey frame: on data with black backgrounds the grid's black padding would not show where tiles end."""
    framed = lambda x: np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=64)  # noqa: E731
    a, b = make_grid(framed(left)), make_grid(framed(right))
    band = np.full((a.shape[0], gap, 3), 128, dtype=np.uint8)
    save_png(np.concatenate([a, band, b], axis=1), path, scale=max(1, 128 // left.shape[1]))


def _pyplot():
    # matplotlib is imported here, not at the top: the headless Agg backend must be chosen before
    # pyplot is imported, and only the plots need it.
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def tsne_png(latents: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int, path: Path) -> None:
    """t-SNE of (N, D) latents (PCA to 50 dims first when D > 50), coloured by (N,) labels (-1: none)."""
    from sklearn.decomposition import PCA  # sklearn is slow to import; only this plot needs it
    from sklearn.manifold import TSNE

    plt = _pyplot()
    x = latents.astype(np.float64)
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    if len(x) >= 5:
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed).fit_transform(x)
        known = labels >= 0
        ax.scatter(xy[~known, 0], xy[~known, 1], s=6, c="lightgrey")
        sc = ax.scatter(xy[known, 0], xy[known, 1], s=6, c=labels[known], cmap="nipy_spectral",
                        vmin=0, vmax=max(len(class_names) - 1, 1))
        if 1 < len(class_names) <= 12:
            handles = [plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(i))) for i in range(len(class_names))]
            ax.legend(handles, class_names, fontsize=7, loc="best")
        elif class_names:
            fig.colorbar(sc, ax=ax, label="class index")
    else:
        ax.text(0.5, 0.5, "too few points for t-SNE", ha="center", va="center")
    ax.set_title(f"t-SNE of {len(x)} test latents, coloured by label")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def label_efficiency_png(points: list[tuple[int, float, float]], classes: int, family: str, path: Path) -> None:
    """Test accuracy of the linear probe on latents and on pixels against the labels it was fitted on,
    from ``[(labels, latent_accuracy, pixel_accuracy), ...]``, above the chance level of ``classes``."""
    plt = _pyplot()
    n, latent, pixel = zip(*sorted(points))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(n, latent, marker="o", label=f"{family} latents")
    ax.plot(n, pixel, marker="s", label="pixels")
    ax.axhline(1 / classes, color="grey", ls="--", lw=1, label=f"chance (1/{classes})")
    ax.set_xscale("log")
    ax.set_xlabel("labelled train images")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{family}: linear probe with few labels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def loss_png(history: dict[str, list[tuple[int, float]]], family: str, path: Path) -> None:
    """Training losses (left) and the validation score (right) from ``key -> [(step, value), ...]``."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, points in history.items():
        if key == "epoch/val_score" or not points:
            continue
        steps, values = zip(*points)
        left.plot(steps, values, label=key, lw=1)
    left.set_title(f"{family}: training loss")
    left.set_xlabel("step")
    if any(k != "epoch/val_score" for k in history):
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no train/*loss history in the MLflow run", ha="center", va="center", transform=left.transAxes)
    val = history.get("epoch/val_score", [])
    if val:
        steps, values = zip(*val)
        right.plot(steps, values, marker="o", lw=1)
    else:
        right.text(0.5, 0.5, "no epoch/val_score history", ha="center", va="center", transform=right.transAxes)
    right.set_title(f"{family}: validation score (checkpoint metric)")
    right.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def edit_labels_png(series: dict[str, list[tuple[int, float | None, float | None]]], path: Path) -> None:
    """Edit success (left) and preservation (right) per factor against the labelled images per value,
    from ``factor -> [(labels per value, success, preservation), ...]`` (None: not measured)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for column, (ax, title) in enumerate(zip(axes, ("edit success", "preservation of the other factors"))):
        for factor, points in series.items():
            xy = [(n, v[column]) for n, *v in points if v[column] is not None and np.isfinite(v[column])]
            if xy:
                ax.plot(*zip(*xy), marker="o", lw=1, label=factor)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("labelled images per value")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def series_scores_png(points: np.ndarray, values: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                      threshold: float, title: str, path: Path) -> None:
    """The scaled series (top; (n, F), true anomalies shaded) above its per-point scores (bottom, with the
    threshold); ``points``: (n,) positions in the whole series, ``labels``: (n,) 0/1 or -1 (unknown)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 5), dpi=100, sharex=True)
    top.plot(points, values, lw=0.6)
    bottom.plot(points, scores, lw=0.7, color="tab:purple", label="score")
    bottom.axhline(threshold, color="tab:red", lw=0.8, ls="--", label=f"threshold {threshold:.3g}")
    for start, end in _label_ranges(labels):
        for ax in (top, bottom):
            ax.axvspan(points[start], points[end - 1], color="tab:red", alpha=0.25, lw=0)
    top.set_title(title)
    top.set_ylabel("scaled value")
    bottom.set_ylabel("score")
    bottom.set_xlabel("point")
    bottom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _label_ranges(labels: np.ndarray) -> list[tuple[int, int]]:
    from latentforge.pipelines.evaluate.metrics import anomaly_ranges

    return anomaly_ranges(np.asarray(labels) == 1)
