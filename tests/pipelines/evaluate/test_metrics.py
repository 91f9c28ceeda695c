"""Known answers for the evaluation metrics (pipelines/evaluate/metrics.py)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from latentforge.pipelines.evaluate import metrics as M


def _images(n=6, c=3, h=16, w=16, seed=0):
    return np.random.default_rng(seed).random((n, c, h, w))


# -- reconstruction -----------------------------------------------------------------------------------


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x = _images()
    assert np.all(np.isinf(M.psnr(x, x.copy())))
    np.testing.assert_allclose(M.ssim(x, x.copy()), 1.0, atol=1e-12)
    np.testing.assert_array_equal(M.per_image_mse(x, x), 0.0)


def test_psnr_and_mse_known_values():
    x = np.zeros((2, 1, 8, 8))
    y = np.full((2, 1, 8, 8), 0.1)
    np.testing.assert_allclose(M.per_image_mse(x, y), 0.01)
    np.testing.assert_allclose(M.psnr(x, y), 20.0)  # 10 log10(1 / 0.01)


def test_ssim_matches_a_direct_float64_computation():
    import torch
    import torch.nn.functional as F

    x = _images(n=3)
    y = np.clip(x + np.random.default_rng(1).normal(0, 0.1, x.shape), 0, 1)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    f = lambda t: F.conv2d(t, window, groups=3)  # noqa: E731
    X, Y = torch.tensor(x), torch.tensor(y)
    mx, my = f(X), f(Y)
    sxx, syy, sxy = f(X * X) - mx**2, f(Y * Y) - my**2, f(X * Y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    direct = ((2 * mx * my + c1) * (2 * sxy + c2) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).flatten(1).mean(1)
    np.testing.assert_allclose(M.ssim(x, y), direct.numpy(), atol=1e-5)


def test_ssim_drops_with_noise_and_handles_small_images():
    x = _images(n=4, h=8, w=8)  # smaller than the 11x11 window
    noisy = np.clip(x + np.random.default_rng(1).normal(0, 0.3, x.shape), 0, 1)
    s = M.ssim(x, noisy)
    assert s.shape == (4,) and np.all(s < 0.9) and np.all(s > -1)


def _structured(n, c, h, w, seed):
    """Images with edges, flat areas and gradients: a bright square, a diagonal ramp and stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, c, h, w))
    for i in range(n):
        for ch in range(c):
            a, b = rng.integers(1, h // 2, size=2)
            square = np.zeros((h, w))
            square[a : a + h // 3, b : b + w // 3] = 0.8
            out[i, ch] = np.clip(0.5 * (xx + yy) * rng.random() + square + 0.1 * np.sin(xx * rng.integers(5, 20)), 0, 1)
    return out


@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "colour"])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_agrees_with_scikit_image(channels, kind):
    """The oracle: skimage's structural_similarity with the paper's settings (Gaussian window sigma 1.5,
    11 taps: truncate 3.5; population covariances), cropped to the valid positions as ours, averaged
    over channels. Pairs: noisy, blurred-by-shift and brightened versions. Ours runs in float32:
    agreement to 1e-5. (Images smaller than 11x11 have no oracle: skimage fixes its Gaussian window at
    11 taps, where ours shrinks to the largest that fits.)"""
    from skimage.metrics import structural_similarity

    make = _images if kind == "random" else _structured
    x = make(4, channels, 32, 24, 0)
    rng = np.random.default_rng(1)
    ys = [np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1), 0.5 * (x + np.roll(x, 1, axis=-1)), np.clip(x * 0.8 + 0.15, 0, 1)]
    for y in ys:
        ours = M.ssim(x, y)
        oracle = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=1.0, channel_axis=0) for a, b in zip(x, y)]
        np.testing.assert_allclose(ours, oracle, atol=1e-5)


# -- Frechet distance --------------------------------------------------------------------------------


def test_frechet_distance_zero_for_identical_features():
    f = np.random.default_rng(0).normal(size=(200, 8))
    assert M.frechet_distance_features(f, f.copy()) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_direct_formula():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    direct = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(direct, rel=1e-8)
    # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + |dm|^2 in closed form.
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 3.0**2 + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert M.frechet_distance([0, 0, 0], np.diag(d1), [3, 0, 0], np.diag(d2)) == pytest.approx(expected)


def test_frechet_distance_of_samples_approaches_the_gaussians():
    rng = np.random.default_rng(0)
    f1 = rng.normal(0, 1, size=(20000, 2))
    f2 = rng.normal(0, 2, size=(20000, 2)) + [1, 0]
    expected = 1.0 + 2 * (2 - 1) ** 2  # |dm|^2 + sum (sqrt 4 - sqrt 1)^2
    assert M.frechet_distance_features(f1, f2) == pytest.approx(expected, rel=0.05)


# -- precision / recall ------------------------------------------------------------------------------


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 4))
    assert M.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    far = rng.normal(size=(300, 4)) + 100.0
    p, r = M.precision_recall(real, far, k=3)
    assert p == pytest.approx(0.0, abs=0.01) and r == pytest.approx(0.0, abs=0.01)


def test_precision_high_recall_low_for_a_collapsed_generator():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 2))
    collapsed = rng.normal(scale=0.05, size=(500, 2))  # all samples in one mode at the centre
    p, r = M.precision_recall(real, collapsed, k=3)
    assert p > 0.9 and r < 0.2


# -- anomaly AUROC ------------------------------------------------------------------------------------


def test_anomaly_auroc_perfect_reversed_random_and_ties():
    normal = np.linspace(0, 1, 50)
    assert M.anomaly_auroc(normal, normal + 2) == 1.0
    assert M.anomaly_auroc(normal + 2, normal) == 0.0
    rng = np.random.default_rng(0)
    assert M.anomaly_auroc(rng.random(2000), rng.random(2000)) == pytest.approx(0.5, abs=0.03)
    assert M.anomaly_auroc(np.ones(10), np.ones(5)) == 0.5
    with pytest.raises(ValueError, match="need both classes, got 0 normal and 1 anomalous"):
        M.anomaly_auroc([], [1.0])


def test_anomaly_auroc_is_the_pairwise_probability_ties_counting_half():
    rng = np.random.default_rng(3)
    normal, anomalous = rng.integers(0, 5, 40).astype(float), rng.integers(1, 6, 30).astype(float)
    pairs = anomalous[:, None] - normal[None, :]
    direct = ((pairs > 0) + 0.5 * (pairs == 0)).mean()
    assert M.anomaly_auroc(normal, anomalous) == pytest.approx(direct, abs=1e-12)


# -- representations ----------------------------------------------------------------------------------


def _factors(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, size=n) for k in (5, 8, 3, 3, 3)], axis=1)


def test_mig_high_for_factor_latents_and_near_zero_for_random_ones():
    v = _factors()
    assert M.mutual_info_gap(v.astype(float), v) > 0.8
    # Extra nuisance dimensions do not change the gap.
    noisy = np.concatenate([v + np.random.default_rng(1).normal(0, 0.05, v.shape), np.random.default_rng(2).normal(size=(len(v), 3))], 1)
    assert M.mutual_info_gap(noisy, v) > 0.8
    assert M.mutual_info_gap(np.random.default_rng(3).normal(size=(len(v), 10)), v) < 0.05
    # One latent carrying two factors (entangled): the gap of both collapses for the weaker one.
    entangled = np.stack([v[:, 0] * 8 + v[:, 1], np.random.default_rng(4).normal(size=len(v))], 1)
    per = M.mig_per_factor(entangled, v[:, :2], bins=20)
    assert per.shape == (2,) and per[0] > 0.8


def test_mig_skips_constant_factors():
    v = _factors()
    v[:, 2] = 0
    per = M.mig_per_factor(v.astype(float), v)
    assert np.isnan(per[2]) and np.all(per[[0, 1, 3, 4]] > 0.8)


def test_linear_probe_on_separable_and_random_latents():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=800)
    centres = rng.normal(0, 5, size=(4, 16))
    z = centres[y] + rng.normal(size=(800, 16))
    assert M.linear_probe_accuracy(z[:600], y[:600], z[600:], y[600:]) > 0.95
    assert M.linear_probe_accuracy(rng.normal(size=(600, 16)), y[:600], rng.normal(size=(200, 16)), y[600:]) < 0.45
    # High-dimensional latents go through PCA first and still separate; -1 labels are ignored.
    big = np.concatenate([z, rng.normal(size=(800, 600))], 1)
    y_missing = y.copy()
    y_missing[:50] = -1
    assert M.linear_probe_accuracy(big[:600], y_missing[:600], big[600:], y[600:], max_dims=32) > 0.9


# -- compression ----------------------------------------------------------------------------------------


def test_code_bits_per_image_formula():
    assert M.code_bits_per_image([(8, 8), (16, 16)], 256) == 320 * 8
    assert M.code_bits_per_image([(4, 4)], 16) == 64
    assert M.code_bits_per_image([(2, 2), (4, 4)], [2, 1024]) == 4 * 1 + 16 * 10
    with pytest.raises(ValueError):
        M.code_bits_per_image([(2, 2)], [2, 4])


def test_png_bits_match_pil_and_order_by_content():
    rng = np.random.default_rng(0)
    images = np.zeros((2, 16, 16, 3), np.uint8)
    images[1] = rng.integers(0, 256, size=(16, 16, 3))
    bits = M.png_bits(images)
    buf = io.BytesIO()
    Image.fromarray(images[1]).save(buf, format="PNG", optimize=False)
    assert bits[1] == 8 * len(buf.getvalue())
    assert bits[0] < bits[1]
    assert M.png_bits(images[:, :, :, :1]).shape == (2,)  # grey


def test_codebook_usage_and_perplexity():
    assert M.codebook_usage(np.zeros((10, 4, 4), int), 16) == (1 / 16, 1.0)
    usage, perplexity = M.codebook_usage(np.arange(16).repeat(5), 16)
    assert usage == 1.0 and perplexity == pytest.approx(16.0)


def test_interpolation_confidence():
    probs = np.zeros((2, 3, 4))
    probs[:, :, 0] = 1.0
    assert M.interpolation_confidence(probs) == 1.0
    probs[0, 1] = [0.25, 0.25, 0.25, 0.25]  # one uncertain point on the first path
    assert M.interpolation_confidence(probs) == pytest.approx((0.25 + 1.0) / 2)
    assert math.isclose(M.interpolation_confidence(np.full((1, 2, 4), 0.25)), 0.25)


# -- reading samples (validity, coverage) -------------------------------------------------------------


def _one_hot(labels, k, confidence=1.0):
    p = np.full((len(labels), k), (1 - confidence) / (k - 1))
    p[np.arange(len(labels)), labels] = confidence
    return p


def test_validity_needs_every_head_confident():
    shape = _one_hot([0, 1, 2, 3], 5)
    colour = np.stack([_one_hot([0], 8, 0.95)[0], _one_hot([1], 8, 0.89)[0], _one_hot([2], 8)[0], np.full(8, 1 / 8)])
    valid, readings = M.confident_readings([shape, colour], 0.9)
    assert valid.tolist() == [True, False, True, False]
    assert readings.tolist() == [[0, 0], [1, 1], [2, 2], [3, 0]]
    assert M.validity([shape, colour], 0.9) == 0.5
    assert M.validity([np.full((6, 5), 0.2)], 0.9) == 0.0  # uniform readings: nothing is valid


def test_coverage_counts_distinct_confident_combinations():
    rng = np.random.default_rng(0)
    real = [_one_hot(rng.integers(0, 5, 300), 5), _one_hot(rng.integers(0, 8, 300), 8)]
    combinations = M.combinations_read(real, 0.9)
    assert combinations == len({(a, b) for a, b in zip(real[0].argmax(1), real[1].argmax(1))}) and combinations > 30
    assert M.coverage_ratio(real, real, 0.9) == 1.0
    repeated = [np.repeat(p[:1], 300, axis=0) for p in real]  # one image, 300 times
    assert M.combinations_read(repeated, 0.9) == 1
    assert M.coverage_ratio(repeated, real, 0.9) == pytest.approx(1 / combinations)
    unread = [np.full((300, 5), 0.2), np.full((300, 8), 1 / 8)]
    assert M.coverage_ratio(unread, real, 0.9) == 0.0 and math.isnan(M.coverage_ratio(real, unread, 0.9))
