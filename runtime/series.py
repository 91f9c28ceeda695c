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
    return errors_to_points(window_errors(sliding_windows(values, window), reconstruct, batch), len(values))


def errors_to_points(errors: np.ndarray, n: int) -> np.ndarray:
    """(W, T) errors of the W = n - T + 1 windows sliding by one over n points -> (n,) per-point means."""
    count, window = errors.shape
    sums = np.zeros(n)
    covers = np.zeros(n)
    for t in range(window):  # offset t of window w is point w + t
        sums[t : t + count] += errors[:, t]
        covers[t : t + count] += 1
    return sums / covers


class SeriesRuntime:
    """An exported time-series model (``latentforge export`` on a time series): raw points in, per-point
    scores and flags out, through the ONNX ``reconstruct`` graph. Served like
    :class:`runtime.images.ModelRuntime` (``name``/``version``/``alias``, ``capabilities``,
    ``run_graph``, ``describe``), with ``anomaly-score`` as its one operation.

    ``score(values)``: (n, F) raw values (or (n,) for one channel) -> ``scores`` (n,), ``flags`` (n,) bool
    (score above the threshold), ``threshold``. ``window_scores(windows)``: (B, T, F) raw windows -> (B,)
    mean squared reconstruction errors. Both raise ValueError on values they cannot score.
    """

    capabilities = ["anomaly-score"]

    def __init__(self, manifest: dict, sessions: dict, name: str = "", version: str = "", alias: str | None = None):
        from latentforge.runtime.images import ExportError

        if manifest.get("kind") != "timeseries" or "reconstruct" not in sessions:
            raise ExportError("not a time-series export (no kind: timeseries and reconstruct graph)")
        if manifest.get("threshold") is None:
            raise ExportError("no threshold in the export's manifest; run `latentforge evaluate` before `export`")
        self.manifest, self.sessions = manifest, sessions
        self.name, self.version, self.alias = name, str(version), alias
        data = manifest["data"]
        self.window, self.channels, self.normalisation = data["window"], data["channels"], data["normalisation"]
        self.threshold = float(manifest["threshold"])

    @classmethod
    def from_export(cls, export_dir, name: str = "", version: str = "", alias: str | None = None,
                    threads: int = 0) -> "SeriesRuntime":
        from latentforge.runtime.images import load_sessions

        manifest, sessions = load_sessions(export_dir, spin=False, threads=threads)
        return cls(manifest, sessions, name, version, alias)

    def run_graph(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph on ``feeds``; returns every output by name."""
        names = list(self.manifest["graphs"][graph]["outputs"])
        return dict(zip(names, self.sessions[graph].run(names, feeds)))

    def reconstruct(self, windows: np.ndarray) -> np.ndarray:
        """(B, T, F) scaled windows -> (B, T, F) reconstructions."""
        return self.run_graph("reconstruct", {"windows": windows})["reconstruction"]

    def check_windows(self, windows) -> np.ndarray:
        """(B, T, F) raw windows as finite float64, or a ValueError naming the expected shape."""
        try:
            array = np.asarray(windows, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"expected (B, {self.window}, {self.channels}) numbers") from None
        if array.ndim != 3 or array.shape[1:] != (self.window, self.channels) or not len(array):
            raise ValueError(f"expected windows of shape (B, {self.window}, {self.channels}), got {list(array.shape)}")
        if not np.isfinite(array).all():
            raise ValueError("NaN or infinite value")
        return array

    def scaled_windows(self, windows) -> np.ndarray:
        """(B, T, F) raw windows -> checked and scaled float32 windows, ready for ``reconstruct``."""
        array = self.check_windows(windows)
        return scale(array.reshape(-1, self.channels), self.normalisation).reshape(array.shape)

    def window_scores(self, windows) -> np.ndarray:
        """(B, T, F) raw windows -> (B,) mean squared reconstruction errors."""
        x = self.scaled_windows(windows)
        return ((self.reconstruct(x).astype(np.float64) - x) ** 2).reshape(len(x), -1).mean(1)

    def score(self, values) -> dict[str, np.ndarray | float]:
        array = check_series(values, self.channels, self.window)
        scores = point_scores(scale(array, self.normalisation), self.window, self.reconstruct)
        return {"scores": scores, "flags": scores > self.threshold, "threshold": self.threshold}

    def describe(self) -> dict:
        """What is served, for ``GET /v1/models``."""
        return {"name": self.name, "version": self.version, "alias": self.alias, "family": self.manifest["family"],
                "kind": "timeseries", "capabilities": self.capabilities, "data": self.manifest["data"],
                "metrics": self.manifest.get("metrics") or {}, "anomaly_threshold": self.threshold}
