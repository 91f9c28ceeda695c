"""The ``timeseries`` data source: one univariate or multivariate series -> windows for the sequence models.

``prepare`` with ``data.source: timeseries`` reads one series from a CSV file or a ``.ts`` file, cuts it
in time into contiguous train / val / test parts (``data.splits`` fractions of the points, in that
order: no window straddles two parts), scales every channel to [0, 1] with the minimum and maximum of
the train part only, and writes to ``data/prepared/<name>/``:

* ``<split>.parquet``: one row per window of ``window`` points taken every ``stride`` points inside the
  part: ``index`` (row within the split), ``start`` (the window's first point in the whole series),
  ``window`` (raw float32 bytes of (T, F) = (window, channels)) and ``label`` (1 when any point of the
  window is a labelled anomaly, 0 when none is, -1 when the file has no labels);
* ``series.parquet``: every point once: ``point``, ``split``, ``values`` (F normalised float32) and
  ``label`` (the point label, -1 where unknown), for scoring every point;
* ``manifest.json``: ``kind: timeseries``, window, stride, channels and their names, the train-part
  normalisation statistics, points and windows per split, the sha256 of every file read and written.

A path ``aeon:<folder>/<file>`` names a file inside the installed ``aeon`` wheel's bundled data
(``aeon/datasets/data``), read with :mod:`importlib.resources`: it works offline and imports no aeon
code. Every error a user can cause raises :class:`DataError` naming the file or parameter and the
problem (NaN or non-numeric values, a missing column, windows longer than a part).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from latentforge.pipelines.common.errors import DataError, ParamsError
from latentforge.pipelines.common.files import atomic_directory, sha256_file
from latentforge.pipelines.common.params import check_keys

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
AEON_PREFIX = "aeon:"
SERIES_FILE = "series.parquet"

# data.timeseries: path; value columns (null: every column but the time and label ones); label and time
# column names (null: none); window length and stride in points.
SERIES_SCHEMA: dict[str, Any] = {
    "path": str,
    "columns": (list, type(None)),
    "label_column": (str, type(None)),
    "time_column": (str, type(None)),
    "window": int,
    "stride": int,
}


@dataclass
class Series:
    """One series in memory. ``values``: (N, F) float64; ``labels``: (N,) int64 0/1, or None when the
    file has none; ``raw_inputs``: path -> sha256 of the file read."""

    values: np.ndarray
    labels: np.ndarray | None
    channel_names: list[str]
    raw_inputs: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Reading


def resolve_path(path: str) -> Path:
    """A file path, or ``aeon:<folder>/<file>`` -> that file inside the installed aeon wheel's data."""
    if not path.startswith(AEON_PREFIX):
        return Path(path)
    try:
        root = resources.files("aeon") / "datasets" / "data"
    except ModuleNotFoundError:
        raise DataError(f"{path}: the aeon package is not installed (`pip install aeon`)") from None
    return Path(str(root / path[len(AEON_PREFIX):]))


def _numeric_column(path: Path, name: str, column: pa.ChunkedArray) -> np.ndarray:
    """A CSV column as float64, or a DataError naming the file, the column and the first bad row."""
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        values = column.to_pylist()
        row = next((i for i, v in enumerate(values) if not _is_number(v)), 0)
        raise DataError(f"{path}: column {name!r} is not numeric (row {row + 1}: {values[row]!r})")
    out = column.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        raise DataError(f"{path}: column {name!r} has NaN, missing or infinite values (first at row {bad[0] + 1})")
    return out


def _is_number(value: Any) -> bool:
    try:
        return value is not None and np.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def read_csv_series(path: Path, columns: list[str] | None, label_column: str | None, time_column: str | None) -> Series:
    """A CSV file with a header row: the value ``columns`` (default: all but the time and label
    columns) as (N, F) values and ``label_column`` (0/1) as point labels."""
    try:
        table = pacsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({str(exc).splitlines()[0]})") from None
    names = table.column_names
    for what, name in (("label_column", label_column), ("time_column", time_column)):
        if name is not None and name not in names:
            raise DataError(f"{path}: no column {name!r} (data.timeseries.{what}); columns: {', '.join(names)}")
    value_names = columns if columns is not None else [n for n in names if n not in (label_column, time_column)]
    missing = [n for n in value_names if n not in names]
    if missing or not value_names:
        raise DataError(f"{path}: no value column(s) {', '.join(map(str, missing)) or '(none left)'}; columns: {', '.join(names)}")
    values = np.stack([_numeric_column(path, n, table.column(n)) for n in value_names], axis=1)
    labels = None
    if label_column is not None:
        labels = _numeric_column(path, label_column, table.column(label_column))
        if not np.isin(labels, (0, 1)).all():
            raise DataError(f"{path}: column {label_column!r} must hold 0 (normal) or 1 (anomaly)")
        labels = labels.astype(np.int64)
    return Series(values, labels, [str(n) for n in value_names])


def read_ts_series(path: Path) -> Series:
    """A ``.ts`` file (the sktime/aeon format) holding one series: header lines start with ``@`` or
    ``#``; after ``@data`` one line of channels separated by ``:``, values by ``,``. No point labels."""
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    try:
        start = next(i for i, ln in enumerate(lines) if ln.lower().startswith("@data")) + 1
    except StopIteration:
        raise DataError(f"{path}: no @data line; not a .ts file") from None
    class_label = any(ln.lower().startswith("@classlabel true") for ln in lines[:start])
    rows = [ln for ln in lines[start:] if ln and not ln.startswith("#")]
    if len(rows) != 1:
        raise DataError(f"{path}: expected one series after @data, found {len(rows)}")
    channels = rows[0].split(":")
    if class_label:
        channels = channels[:-1]
    parsed = []
    for c, text in enumerate(channels):
        try:
            parsed.append(np.array([float(v) for v in text.split(",")], dtype=np.float64))
        except ValueError as exc:
            raise DataError(f"{path}: channel {c} has a non-numeric value ({exc})") from None
    if len({len(p) for p in parsed}) != 1:
        raise DataError(f"{path}: channels have different lengths {[len(p) for p in parsed]}")
    values = np.stack(parsed, axis=1)
    if not np.isfinite(values).all():
        raise DataError(f"{path}: NaN or missing values (first at point {int(np.flatnonzero(~np.isfinite(values).all(1))[0]) + 1})")
    return Series(values, None, [f"dim_{c}" for c in range(len(parsed))])


def load_series(path: str, columns: list | None = None, label_column: str | None = None, time_column: str | None = None) -> Series:
    """Read one series from ``path`` (``.csv`` or ``.ts``; ``aeon:`` paths, see the module doc)."""
    file = resolve_path(path)
    if not file.is_file():
        raise DataError(f"{file}: time-series file not found")
    if file.suffix.lower() == ".ts":
        if label_column is not None or columns is not None:
            raise ParamsError(f"params data.timeseries: a .ts file ({file.name}) has no named columns; set columns and label_column to null")
        series = read_ts_series(file)
    else:
        series = read_csv_series(file, columns, label_column, time_column)
    series.raw_inputs = {path: sha256_file(file)}
    return series


# ----------------------------------------------------------------------------------------------------
# Splitting, scaling, windowing


def split_bounds(n: int, fractions: dict[str, float]) -> dict[str, tuple[int, int]]:
    """Contiguous [start, end) point ranges of train, val and test, in that order, from ``fractions``."""
    total = sum(fractions.values())
    if any(f < 0 for f in fractions.values()) or abs(total - 1.0) > 1e-6:
        raise ParamsError(f"params data.splits: fractions must be >= 0 and sum to 1, got {fractions}")
    n_train = int(round(n * fractions["train"]))
    n_val = int(round(n * fractions["val"]))
    return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}


def minmax_stats(values: np.ndarray) -> dict[str, list[float]]:
    """Per-channel ``min`` and ``max`` of (N, F) values: the scaling statistics."""
    return {"min": values.min(axis=0).tolist(), "max": values.max(axis=0).tolist()}


def window_starts(length: int, window: int, stride: int) -> np.ndarray:
    """First points of the windows of ``window`` points every ``stride`` points in ``length`` points."""
    return np.arange(0, length - window + 1, stride, dtype=np.int64)


def check_windowing(bounds: dict[str, tuple[int, int]], window: int, stride: int) -> None:
    """Every non-empty part must hold at least one window; the train part must not be empty."""
    if window < 2 or stride < 1:
        raise ParamsError(f"params data.timeseries: window must be >= 2 and stride >= 1, got window={window}, stride={stride}")
    for split, (start, end) in bounds.items():
        if (end > start or split == "train") and end - start < window:
            raise DataError(f"data.timeseries.window ({window}) is longer than the {split} part ({end - start} points)")


def _windows_table(values: np.ndarray, labels: np.ndarray | None, offset: int, window: int, stride: int) -> pa.Table:
    starts = window_starts(len(values), window, stride)
    blobs = [values[s : s + window].astype(np.float32).tobytes() for s in starts]
    if labels is None:
        window_labels = np.full(len(starts), -1, dtype=np.int64)
    else:
        window_labels = np.array([labels[s : s + window].max() for s in starts], dtype=np.int64)
    return pa.table({
        "index": pa.array(np.arange(len(starts), dtype=np.int64)),
        "start": pa.array(starts + offset),
        "window": pa.array(blobs, type=pa.binary()),
        "label": pa.array(window_labels),
    })


def _series_table(scaled: np.ndarray, labels: np.ndarray | None, bounds: dict[str, tuple[int, int]]) -> pa.Table:
    n, f = scaled.shape
    split = np.empty(n, dtype=object)
    for name, (start, end) in bounds.items():
        split[start:end] = name
    flat = pa.array(scaled.astype(np.float32).reshape(-1))
    return pa.table({
        "point": pa.array(np.arange(n, dtype=np.int64)),
        "split": pa.array(split.tolist(), type=pa.string()),
        "values": pa.FixedSizeListArray.from_arrays(flat, f),
        "label": pa.array(labels if labels is not None else np.full(n, -1, dtype=np.int64)),
    })


def write_prepared_series(series: Series, out_dir: Path, name: str, options: dict, seed: int, fractions: dict) -> dict:
    """Scale with train-part statistics, window every part and write splits, series and manifest to
    ``out_dir`` atomically (temp dir, then rename). Returns the manifest."""
    n = len(series.values)
    bounds = split_bounds(n, fractions)
    window, stride = options["window"], options["stride"]
    check_windowing(bounds, window, stride)
    train_start, train_end = bounds["train"]
    stats = minmax_stats(series.values[train_start:train_end])
    span = np.asarray(stats["max"]) - np.asarray(stats["min"])
    scaled = (series.values - np.asarray(stats["min"])) / np.where(span > 0, span, 1.0)
    with atomic_directory(out_dir) as tmp:
        splits = {}
        for split, (start, end) in bounds.items():
            labels = None if series.labels is None else series.labels[start:end]
            table = _windows_table(scaled[start:end], labels, start, window, stride) if end - start >= window else \
                _windows_table(np.zeros((0, scaled.shape[1])), None, start, window, stride)
            path = tmp / f"{split}.parquet"
            pq.write_table(table, path, compression="zstd", write_statistics=["index", "start", "label"])
            splits[split] = {
                "file": path.name, "count": table.num_rows, "points": [start, end], "sha256": sha256_file(path),
                "anomalous_points": None if labels is None else int(labels.sum()),
            }
        series_path = tmp / SERIES_FILE
        pq.write_table(_series_table(scaled, series.labels, bounds), series_path, compression="zstd")
        series_hash = sha256_file(series_path)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "timeseries",
            "name": name,
            "source": "timeseries",
            "params": options,
            "seed": seed,
            "split_fractions": fractions,
            "splits": splits,
            "series": {"file": SERIES_FILE, "sha256": series_hash},
            "count": n,
            "window": window,
            "stride": stride,
            "channels": int(scaled.shape[1]),
            "channel_names": series.channel_names,
            "window_shape": [window, int(scaled.shape[1])],
            "dtype": "float32",
            "labelled": series.labels is not None,
            "normalisation": {"kind": "minmax", "part": "train", **stats},
            "raw_inputs": series.raw_inputs,
            "data_hash": hashlib.sha256("".join([*(splits[s]["sha256"] for s in SPLITS), series_hash]).encode()).hexdigest(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def prepare_series(options: dict[str, Any], out_dir: Path, name: str, seed: int, fractions: dict) -> dict:
    """The prepare stage for ``data.source: timeseries`` (its section ``options``, checked). Returns the manifest."""
    if not isinstance(options, dict):
        raise ParamsError(f"params data.timeseries: expected a mapping, got {options!r}")
    opts = check_keys(options, SERIES_SCHEMA, "data.timeseries")
    if opts["columns"] is not None and not all(isinstance(c, str) for c in opts["columns"]):
        raise ParamsError(f"params data.timeseries.columns: expected a list of column names, got {opts['columns']!r}")
    series = load_series(opts["path"], opts["columns"], opts["label_column"], opts["time_column"])
    return write_prepared_series(series, out_dir, name, opts, seed, fractions)


# ----------------------------------------------------------------------------------------------------
# Reading back


def load_windows(prepared_dir: str | Path, manifest: dict[str, Any], split: str) -> dict[str, np.ndarray]:
    """One split's windows: ``windows`` (W, T, F) float32, ``start`` and ``label`` (W,) int64."""
    table = pq.read_table(Path(prepared_dir) / manifest["splits"][split]["file"])
    blob = b"".join(table.column("window").to_pylist())
    windows = np.frombuffer(blob, dtype=np.float32).reshape((table.num_rows, *manifest["window_shape"]))
    return {"windows": windows, "start": table.column("start").to_numpy(), "label": table.column("label").to_numpy()}


def load_series_part(prepared_dir: str | Path, manifest: dict[str, Any], split: str) -> dict[str, np.ndarray]:
    """The normalised points of one part: ``values`` (n, F) float32, ``labels`` (n,) int64 (-1 unknown)
    and ``points`` (n,) int64, their places in the whole series."""
    table = pq.read_table(Path(prepared_dir) / manifest["series"]["file"])
    start, end = manifest["splits"][split]["points"]
    part = table.slice(start, end - start)
    flat = part.column("values").combine_chunks().flatten().to_numpy()
    return {
        "values": flat.reshape(part.num_rows, manifest["channels"]).astype(np.float32),
        "labels": part.column("label").to_numpy(),
        "points": part.column("point").to_numpy(),
    }
