"""Evaluation metrics as pure functions over numpy arrays / torch tensors (no I/O, no MLflow, no models).

Conventions: images are (N, C, H, W) float in [0, 1] (numpy or torch) unless a function says uint8 HWC;
features and latents are (N, D) float arrays; per-image results are (N,) float64 arrays. Every function
is deterministic given its inputs (and ``seed`` where it takes one).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Reconstruction


def _as_tensor(x) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).detach().double().cpu()


def per_image_mse(x, y) -> np.ndarray:
    """Mean squared error of each image pair: x, y (N, C, H, W) in [0, 1] -> (N,) float64."""
    x, y = _as_tensor(x), _as_tensor(y)
    if x.shape != y.shape:
        raise ValueError(f"per_image_mse: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    return (x - y).square().flatten(1).mean(1).numpy()


def psnr(x, y, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image pair, (N,): ``10 log10(range^2 / mse)``.

    x, y: (N, C, H, W). Identical images give ``inf`` (the MSE is 0), as the definition says.
    """
    mse = per_image_mse(x, y)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x, y, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) of each image pair, (N,), in [-1, 1]; 1 for identical images.

    x, y: (N, C, H, W). Gaussian window ``window`` x ``window`` (sigma 1.5, the paper's choice), valid
    positions only, constants K1 = 0.01, K2 = 0.03; the SSIM map is averaged over positions and
    channels. Images smaller than the window use the largest odd window that fits. Computed in float32
    with a separable window (a 2-D float64 convolution is ~50x slower on CPU for the same figure).
    """
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    x, y = x.detach().float().cpu(), y.detach().float().cpu()
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two (N, C, H, W) arrays of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, c, h, w = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd
    g = _gaussian_1d(size, sigma)
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (N, 5C, H, W): one grouped conv for all five
    kh, kw = g.view(1, 1, size, 1).expand(5 * c, 1, size, 1), g.view(1, 1, 1, size).expand(5 * c, 1, 1, size)
    f = F.conv2d(F.conv2d(maps, kh.contiguous(), groups=5 * c), kw.contiguous(), groups=5 * c)
    mu_x, mu_y, exx, eyy, exy = f.split(c, dim=1)
    sxx, syy, sxy = exx - mu_x**2, eyy - mu_y**2, exy - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim_map.flatten(1).mean(1).double().numpy()


# ----------------------------------------------------------------------------------------------------
# Sample quality in a feature space


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (unbiased, float64) of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics: need (N >= 2, D) features, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula, Heusel et al. 2017):

    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.

    mu: (D,), sigma: (D, D) symmetric PSD. ``tr (sigma1 sigma2)^(1/2)`` is computed as the sum of the
    square roots of the eigenvalues of the symmetric PSD matrix ``sigma1^(1/2) sigma2 sigma1^(1/2)``
    (same spectrum), which stays real and stable where ``scipy.linalg.sqrtm`` of a singular product can
    return complex noise. Clamped at 0 (round-off can give -1e-12 for identical inputs).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    evals, evecs = np.linalg.eigh((s1 + s1.T) / 2)
    s1_half = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    m = s1_half @ s2 @ s1_half
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def frechet_distance_features(features1, features2) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i : i + chunk], b) for i in range(0, len(a), chunk)], 0)


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of fake vs real features, (N, D), (M, D).

    Each set's manifold is the union of balls around its points, each ball's radius the distance to the
    point's k-th nearest neighbour in its own set. Precision: the fraction of fake points inside the real
    manifold (sample fidelity). Recall: the fraction of real points inside the fake manifold (coverage).
    Returns ``(precision, recall)``, both in [0, 1].
    """
    real = torch.as_tensor(np.asarray(real_features, np.float64))
    fake = torch.as_tensor(np.asarray(fake_features, np.float64))
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: need (N, D) and (M, D) features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall: each set needs more than k={k} points, got {len(real)} and {len(fake)}")

    def radii(x: torch.Tensor) -> torch.Tensor:
        # Column 0 of the sorted row is the point itself (distance 0): the k-th neighbour is column k.
        return _pairwise_distances(x, x).kthvalue(k + 1, dim=1).values

    r_real, r_fake = radii(real), radii(fake)
    d = _pairwise_distances(fake, real)  # (M, N)
    precision = (d <= r_real[None, :]).any(dim=1).double().mean().item()
    recall = (d.T <= r_fake[None, :]).any(dim=1).double().mean().item()
    return precision, recall


# ----------------------------------------------------------------------------------------------------
# Reading samples with an attribute classifier (data with factors)


def confident_readings(probs: Sequence, threshold: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Which images an attribute classifier reads confidently, and what it reads.

    probs: one (N, K_f) array of class probabilities per factor head. Returns ``valid`` (N,) bool: every
    head's top probability is >= ``threshold``; and ``readings`` (N, F) int: each head's argmax.
    """
    probs = [np.asarray(p, np.float64) for p in probs]
    if not probs or any(p.ndim != 2 or len(p) != len(probs[0]) for p in probs):
        raise ValueError(f"confident_readings: need one (N, K) array per head, got {[np.shape(p) for p in probs]}")
    valid = np.stack([p.max(1) >= threshold for p in probs], 1).all(1)
    return valid, np.stack([p.argmax(1) for p in probs], 1)


def validity(probs: Sequence, threshold: float = 0.9) -> float:
    """The fraction of images whose every factor is read with probability >= ``threshold``, in [0, 1]."""
    return float(confident_readings(probs, threshold)[0].mean())


def combinations_read(probs: Sequence, threshold: float = 0.9) -> int:
    """How many distinct factor combinations the confidently read images show (0 when none is)."""
    valid, readings = confident_readings(probs, threshold)
    return len({tuple(r) for r in readings[valid]})


def coverage_ratio(sample_probs: Sequence, real_probs: Sequence, threshold: float = 0.9) -> float:
    """Coverage of the factor combinations: the distinct combinations among confidently read samples,
    divided by the same count for as many real images (the fraction of all combinations each set
    reaches, relative to what real data reaches at that count). ~1 for a model that covers the data, 1/R
    for one that draws a single combination (R: the real set's count); NaN when no real image is read."""
    real = combinations_read(real_probs, threshold)
    return combinations_read(sample_probs, threshold) / real if real else float("nan")


# ----------------------------------------------------------------------------------------------------
# Anomaly detection


def anomaly_auroc(errors_normal, errors_anomalous) -> float:
    """Area under the ROC curve of an anomaly score (``sklearn.metrics.roc_auc_score``): the probability
    that a random anomalous example scores higher than a random normal one (ties count one half).

    errors_normal: (N,), errors_anomalous: (M,) scores (higher = more anomalous). 1: perfect,
    0.5: chance, 0: perfectly reversed. Raises ``ValueError`` naming the counts when a class is empty.
    """
    from sklearn.metrics import roc_auc_score

    normal = np.asarray(errors_normal, np.float64).ravel()
    anomalous = np.asarray(errors_anomalous, np.float64).ravel()
    if len(normal) == 0 or len(anomalous) == 0:
        raise ValueError(f"anomaly_auroc: need both classes, got {len(normal)} normal and {len(anomalous)} anomalous")
    labels = np.concatenate([np.zeros(len(normal)), np.ones(len(anomalous))])
    return float(roc_auc_score(labels, np.concatenate([normal, anomalous])))


# ----------------------------------------------------------------------------------------------------
# Representations


def linear_probe_accuracy(
    train_latents, train_labels, test_latents, test_labels, max_dims: int | None = 256, seed: int = 0, max_iter: int = 500
) -> float:
    """Accuracy on the test set of a logistic regression fitted on the train set's latents.

    latents: (N, ...) (flattened to (N, D)); labels: (N,) ints, -1 (unknown) rows are dropped.
    Features are standardised; when D > ``max_dims`` they are first projected on their top ``max_dims``
    principal components fitted on the train latents (still a linear probe; keeps a 32k-dimensional
    VQ latent affordable).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr = np.asarray(train_latents, np.float64).reshape(len(train_latents), -1)
    xte = np.asarray(test_latents, np.float64).reshape(len(test_latents), -1)
    ytr, yte = np.asarray(train_labels), np.asarray(test_labels)
    xtr, ytr = xtr[ytr >= 0], ytr[ytr >= 0]
    xte, yte = xte[yte >= 0], yte[yte >= 0]
    if len(np.unique(ytr)) < 2 or len(yte) == 0:
        raise ValueError("linear_probe_accuracy: need at least two train classes and one labelled test row")
    steps = []
    if max_dims is not None and xtr.shape[1] > max_dims:
        steps.append(PCA(n_components=min(max_dims, len(xtr)), svd_solver="randomized", random_state=seed))
    steps += [StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed)]
    probe = make_pipeline(*steps)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The number of unique classes")  # tiny probes in tests
        probe.fit(xtr, ytr)
    return float((probe.predict(xte) == yte).mean())


def _discretize(latents: np.ndarray, bins: int) -> np.ndarray:
    """(N, D) float -> (N, D) ints in [0, bins): equal-width bins per dimension over its own range."""
    out = np.zeros(latents.shape, dtype=np.int64)
    for j in range(latents.shape[1]):
        edges = np.histogram_bin_edges(latents[:, j], bins=bins)
        out[:, j] = np.digitize(latents[:, j], edges[1:-1])
    return out


def mig_per_factor(latents, factors, bins: int = 20) -> np.ndarray:
    """Mutual information gap of each factor, (F,) (Chen et al. 2018; the disentanglement_lib recipe).

    latents: (N, D) float, discretised into ``bins`` equal-width bins per dimension; factors: (N, F)
    ints. For factor k: ``(I(z_a; v_k) - I(z_b; v_k)) / H(v_k)`` with z_a, z_b the two latent dimensions
    sharing the most information with v_k (with one dimension, ``I(z_a; v_k) / H(v_k)``). A factor
    with a single value (zero entropy) gives NaN.
    """
    from sklearn.metrics import mutual_info_score

    z = np.asarray(latents, np.float64).reshape(len(latents), -1)
    v = np.asarray(factors).reshape(len(factors), -1)
    if len(z) != len(v):
        raise ValueError(f"mig: {len(z)} latents but {len(v)} factor rows")
    zd = _discretize(z, bins)
    scores = np.full(v.shape[1], np.nan)
    for k in range(v.shape[1]):
        entropy = mutual_info_score(v[:, k], v[:, k])
        if entropy <= 0:
            continue
        mi = np.sort([mutual_info_score(v[:, k], zd[:, j]) for j in range(zd.shape[1])])[::-1]
        gap = mi[0] - (mi[1] if len(mi) > 1 else 0.0)
        scores[k] = gap / entropy
    return scores


def mutual_info_gap(latents, factors, bins: int = 20) -> float:
    """MIG: the mean over factors (with more than one value) of :func:`mig_per_factor`, in [0, 1]."""
    scores = mig_per_factor(latents, factors, bins)
    if np.all(np.isnan(scores)):
        raise ValueError("mutual_info_gap: every factor is constant")
    return float(np.nanmean(scores))


# ----------------------------------------------------------------------------------------------------
# Compression (discrete codes vs PNG)


def code_bits_per_image(code_shapes: Sequence[Sequence[int]], num_codes: int | Sequence[int]) -> float:
    """Bits to store one image's codes with a fixed-length code: ``sum over levels of h * w * log2(K)``.

    code_shapes: one (h, w) per level; num_codes: the codebook size K, one for all levels or one per level.
    """
    ks = [num_codes] * len(code_shapes) if isinstance(num_codes, (int, np.integer)) else list(num_codes)
    if len(ks) != len(code_shapes):
        raise ValueError(f"code_bits_per_image: {len(code_shapes)} levels but {len(ks)} codebook sizes")
    return float(sum(math.prod(shape) * math.log2(k) for shape, k in zip(code_shapes, ks)))


def png_bits(images: np.ndarray) -> np.ndarray:
    """Size in bits of each image saved as PNG by PIL (``optimize=False``), (N,).

    images: (N, H, W, C) uint8 with C in {1, 3, 4}.
    """
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"png_bits: expected (N, H, W, C) uint8 images, got {images.dtype} {images.shape}")
    out = np.zeros(len(images))
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG", optimize=False)
        out[i] = 8 * buf.tell()
    return out


def codebook_usage(indices, num_codes: int) -> tuple[float, float]:
    """``(usage, perplexity)`` of code indices (any shape, ints in [0, num_codes)): the fraction of codes
    used at least once, and exp of the entropy (nats) of the code histogram (1 .. num_codes)."""
    idx = np.asarray(indices).ravel()
    counts = np.bincount(idx, minlength=num_codes).astype(np.float64)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return float((counts > 0).mean()), float(np.exp(-(nz * np.log(nz)).sum()))


# ----------------------------------------------------------------------------------------------------
# Interpolation


def interpolation_confidence(probs) -> float:
    """How recognisable the images along latent paths stay: the mean over paths of the minimum over the
    path of the classifier's max-softmax. probs: (P, T, K), class probabilities of T images along each
    of P paths. In [1/K, 1]; 1 when every image on every path is classified with certainty."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 3:
        raise ValueError(f"interpolation_confidence: expected (P, T, K) probabilities, got {p.shape}")
    return float(p.max(axis=2).min(axis=1).mean())


# ----------------------------------------------------------------------------------------------------
# Time-series anomaly detection (per point)


def anomaly_ranges(flags) -> list[tuple[int, int]]:
    """(n,) 0/1 flags -> the [start, end) ranges of consecutive ones."""
    f = np.concatenate([[0], np.asarray(flags, np.int64).ravel() != 0, [0]]).astype(np.int64)
    edges = np.flatnonzero(np.diff(f))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def range_f1(labels, flags) -> tuple[float, float, float]:
    """Range-based (precision, recall, F1) of predicted anomaly ``flags`` against true point ``labels``,
    both (n,) 0/1 (Tatbul et al., NeurIPS 2018, with no existence reward, flat positional bias and no
    cardinality penalty): recall is the mean over true ranges of the fraction of the range flagged,
    precision the mean over predicted ranges of the fraction that is truly anomalous. No predicted
    range gives precision 0; F1 is 0 when both are 0."""
    labels, flags = np.asarray(labels).ravel() != 0, np.asarray(flags).ravel() != 0
    real, predicted = anomaly_ranges(labels), anomaly_ranges(flags)
    recall = float(np.mean([flags[s:e].mean() for s, e in real])) if real else 0.0
    precision = float(np.mean([labels[s:e].mean() for s, e in predicted])) if predicted else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def point_detection_figures(scores, labels, threshold: float) -> dict[str, float]:
    """Point-wise ``auroc`` and ``auprc`` (average precision) of (n,) ``scores`` against (n,) 0/1
    ``labels``, and the range-based ``range_precision`` / ``range_recall`` / ``range_f1`` of the points
    scoring above ``threshold``; ``flagged_fraction``: the share of points above it."""
    from sklearn.metrics import average_precision_score

    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels).ravel().astype(np.int64)
    flags = scores > threshold
    precision, recall, f1 = range_f1(labels, flags)
    return {
        "auroc": anomaly_auroc(scores[labels == 0], scores[labels == 1]),
        "auprc": float(average_precision_score(labels, scores)),
        "range_precision": precision,
        "range_recall": recall,
        "range_f1": f1,
        "flagged_fraction": float(flags.mean()),
    }


def best_f1_threshold(scores, labels) -> float:
    """The threshold (one of the scores) that maximises point-wise F1 of ``scores > threshold``
    against (n,) 0/1 ``labels`` that hold at least one anomaly."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(np.asarray(labels).ravel(), np.asarray(scores).ravel())
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    # precision_recall_curve flags scores >= t; step just below t so that `>` flags the same points
    return float(np.nextafter(thresholds[int(np.argmax(f1))], -np.inf))
