"""Torch-free time-series anomaly scoring: raw points -> scaled windows -> per-point scores and flags.

The same functions score a series in ``evaluate`` (through the PyTorch model), in the exporter's parity
check and in serving (through the ONNX ``reconstruct`` graph): a point's score is the mean, over every
window of ``window`` points that covers it (windows slide by one point), of the squared reconstruction
error at that point averaged over the channels. A point is flagged when its score exceeds the threshold
that ``evaluate`` chose on validation data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Reconstruct = Callable[[np.ndarray], np.ndarray]  # (B, T, F) float32 windows -> (B, T, F) reconstructions


def scale(values: np.ndarray, normalisation: dict) -> np.ndarray:
    """(n, F) raw values -> (n, F) float32 scaled with the train part's per-channel ``min`` / ``max``
    (a constant channel is only shifted)."""
    low = np.asarray(normalisation["min"], dtype=np.float64)
    span = np.asarray(normalisation["max"], dtype=np.float64) - low
    return ((np.asarray(values, dtype=np.float64) - low) / np.where(span > 0, span, 1.0)).astype(np.float32)


def check_series(values: np.ndarray, channels: int, window: int) -> np.ndarray:
    """(n, F) or, with one channel, (n,) values as a finite (n, F) float64 array, or a ValueError that
    says what is wrong: not numeric, NaN/infinite, another number of channels, fewer points than a window."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("values must be numbers (a list of points, each a number or a list of channel values)") from None
    if array.ndim == 1 and channels == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[1] != channels:
        raise ValueError(f"expected {channels} channel(s) per point, got an array of shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if len(bad):
        raise ValueError(f"NaN or infinite value at point {int(bad[0])}")
    if len(array) < window:
        raise ValueError(f"the series has {len(array)} points, fewer than one window ({window})")
    return array


def sliding_windows(values: np.ndarray, window: int) -> np.ndarray:
    """(n, F) -> (n - window + 1, window, F): every window, one point apart (a read-only view)."""
    return np.lib.stride_tricks.sliding_window_view(values, window, axis=0).transpose(0, 2, 1)


def window_errors(windows: np.ndarray, reconstruct: Reconstruct, batch: int = 512) -> np.ndarray:
    """(W, T, F) windows -> (W, T) squared reconstruction errors averaged over the channels."""
    out = np.empty(windows.shape[:2], dtype=np.float64)
    for i in range(0, len(windows), batch):
        x = np.ascontiguousarray(windows[i : i + batch], dtype=np.float32)
        out[i : i + batch] = ((reconstruct(x).astype(np.float64) - x) ** 2).mean(axis=2)
    return out


def point_scores(values: np.ndarray, window: int, reconstruct: Reconstruct, batch: int = 512) -> np.ndarray:
    """(n, F) scaled values -> (n,) per-point scores: each point's mean error over the windows covering it."""
    errors = window_errors(sliding_windows(values, window), reconstruct, batch)
    n, count = len(values), len(errors)
    sums = np.zeros(n)
    covers = np.zeros(n)
    for t in range(window):  # offset t of window w is point w + t
        sums[t : t + count] += errors[:, t]
        covers[t : t + count] += 1
    return sums / covers


class SeriesRuntime:
    """An exported time-series model (``latentforge export`` on a time series): raw points in, per-point
    scores and flags out, through the ONNX ``reconstruct`` graph.

    ``score(values)``: (n, F) raw values (or (n,) for one channel) -> ``scores`` (n,), ``flags`` (n,) bool
    (score above the threshold), ``threshold``. Raises ValueError on values it cannot score
    (:func:`check_series`).
    """

    def __init__(self, export_dir, providers: list[str] | None = None, threads: int = 0):
        from latentforge.runtime.images import ExportError, load_sessions

        self.manifest, sessions = load_sessions(export_dir, providers, threads=threads)
        if self.manifest.get("kind") != "timeseries" or "reconstruct" not in sessions:
            raise ExportError(f"{export_dir}: not a time-series export (no kind: timeseries and reconstruct graph)")
        if self.manifest.get("threshold") is None:
            raise ExportError(f"{export_dir}: no threshold in the manifest; run `latentforge evaluate` before `export`")
        self.session = sessions["reconstruct"]
        data = self.manifest["data"]
        self.window, self.channels, self.normalisation = data["window"], data["channels"], data["normalisation"]
        self.threshold = float(self.manifest["threshold"])

    def reconstruct(self, windows: np.ndarray) -> np.ndarray:
        """(B, T, F) scaled windows -> (B, T, F) reconstructions."""
        return self.session.run(None, {"windows": windows})[0]

    def score(self, values) -> dict[str, np.ndarray | float]:
        array = check_series(values, self.channels, self.window)
        scores = point_scores(scale(array, self.normalisation), self.window, self.reconstruct)
        return {"scores": scores, "flags": scores > self.threshold, "threshold": self.threshold}
