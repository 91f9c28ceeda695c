"""The ``prepare`` stage: a configured data set -> ``data/prepared/<name>/`` with train/val/test splits.

Each split is one Parquet file (Ray Data reads it natively with ``ray.data.read_parquet``) with columns
``index`` (row within the split), ``image`` (raw HWC uint8 bytes; the shape is in the manifest),
``label`` (-1 where unknown), ``caption`` and one ``factor_<name>`` column per known factor.
``manifest.json`` beside them records counts, image shape, dtype, pixel range, class and factor names,
the sha256 of every raw input and of every split file, and the seed. Same params, same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latentforge.pipelines.common.errors import DataError, ParamsError
from latentforge.pipelines.common.files import atomic_directory, sha256_file
from latentforge.pipelines.common.params import check_keys
from latentforge.pipelines.data import SOURCES, ImageSet, load_source
from latentforge.pipelines.series import prepare_series

SERIES_SOURCE = "timeseries"  # pipelines/series.py: windows of one series instead of images

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


def split_indices(n: int, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """A seeded permutation of ``range(n)`` cut into train/val/test by ``fractions`` (summing to 1)."""
    total = sum(fractions.values())
    if any(f < 0 for f in fractions.values()) or abs(total - 1.0) > 1e-6:
        raise ParamsError(f"params data.splits: fractions must be >= 0 and sum to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(n * fractions["train"]))
    n_val = int(round(n * fractions["val"]))
    if n_train == 0:
        raise DataError(f"only {n} images: the train split would be empty")
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


def split_table(data: ImageSet, rows: np.ndarray) -> pa.Table:
    columns: dict[str, Any] = {
        "index": pa.array(np.arange(len(rows), dtype=np.int64)),
        "image": pa.array([data.images[i].tobytes() for i in rows], type=pa.binary()),
        "label": pa.array(data.labels[rows]),
        "caption": pa.array([data.captions[i] for i in rows], type=pa.string()),
    }
    for j, name in enumerate(data.factor_names):
        columns[f"factor_{name}"] = pa.array(data.factors[rows, j])
    return pa.table(columns)


def write_prepared(data: ImageSet, out_dir: Path, name: str, source: str, options: dict, seed: int, fractions: dict) -> dict:
    """Write splits and manifest to ``out_dir`` atomically (temp dir, then rename). Returns the manifest."""
    indices = split_indices(len(data.images), fractions, seed)
    with atomic_directory(out_dir) as tmp:
        splits = {}
        for split in SPLITS:
            path = tmp / f"{split}.parquet"
            # No statistics on the image bytes: useless for them, and they would bloat the footer.
            pq.write_table(split_table(data, indices[split]), path, compression="zstd", write_statistics=["index", "label"])
            splits[split] = {"file": path.name, "count": int(len(indices[split])), "sha256": sha256_file(path)}
        h, w, c = data.images.shape[1:]
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "source": source,
            "params": options,
            "seed": seed,
            "split_fractions": fractions,
            "splits": splits,
            "count": int(len(data.images)),
            "image_shape": [int(h), int(w), int(c)],
            "layout": "HWC",
            "dtype": "uint8",
            "pixel_range": [0, 255],
            "class_names": data.class_names,
            "factor_names": data.factor_names,
            "factor_values": data.factor_values,
            "raw_inputs": data.raw_inputs,
            "data_hash": hashlib.sha256("".join(splits[s]["sha256"] for s in SPLITS).encode()).hexdigest(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


DATA_SCHEMA = {"name": str, "source": str, "seed": int, "splits": dict, "output_dir": str}


def prepare(params: dict) -> tuple[Path, dict]:
    """Run the stage from the ``data`` section of ``params``: load, split, write. Returns (dir, manifest)."""
    if "data" not in params or not isinstance(params["data"], dict):
        raise ParamsError("params: missing section 'data'")
    data_params = params["data"]
    sources = {k: v for k, v in data_params.items() if k not in DATA_SCHEMA}
    base = check_keys({k: v for k, v in data_params.items() if k in DATA_SCHEMA}, DATA_SCHEMA, "data")
    name, source, seed = base["name"], base["source"], base["seed"]
    if not name or "/" in name or name.startswith("."):
        raise ParamsError(f"params data.name: {name!r} is not a valid folder name")
    fractions = check_keys(base["splits"], {s: float for s in SPLITS}, "data.splits")
    known = [*SOURCES, SERIES_SOURCE]
    if source not in known:
        raise ParamsError(f"params data.source: unknown data set {source!r}; choose one of: {', '.join(known)}")
    stray = sorted(set(sources) - set(known))
    if stray:
        raise ParamsError(f"params data: unknown key(s) {', '.join(stray)}; known: {', '.join(sorted([*DATA_SCHEMA, *known]))}")
    if source not in sources:
        raise ParamsError(f"params data.{source}: missing the section for data set {source!r}")
    out_dir = Path(base["output_dir"]) / name
    if source == SERIES_SOURCE:
        return out_dir, prepare_series(sources[source], out_dir, name, seed, fractions)
    data = load_source(source, sources[source], seed)
    manifest = write_prepared(data, out_dir, name, source, sources[source], seed, fractions)
    return out_dir, manifest


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a prepared data set, or a DataError that says which stage makes it."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"no prepared data at {prepared_dir}; run `latentforge prepare` (or `dvc repro prepare`) first")
    return json.loads(path.read_text())


def load_split(prepared_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """Read one prepared split into memory: ``images`` (N, H, W, C) uint8, ``labels``, ``captions``,
    ``index`` and ``factors`` (N, F). For plain loops and benchmarks; Ray jobs read the Parquet directly."""
    prepared_dir = Path(prepared_dir)
    manifest = read_manifest(prepared_dir)
    if manifest.get("kind") == SERIES_SOURCE:
        raise DataError(f"{prepared_dir}: prepared time-series windows, not images; this step needs an image data set")
    if split not in manifest["splits"]:
        raise DataError(f"{prepared_dir}: no split {split!r}; have {', '.join(manifest['splits'])}")
    table = pq.read_table(prepared_dir / manifest["splits"][split]["file"])
    shape = tuple(manifest["image_shape"])
    blob = b"".join(table.column("image").to_pylist())
    images = np.frombuffer(blob, dtype=np.uint8).reshape((table.num_rows, *shape))
    factor_cols = [f"factor_{n}" for n in manifest["factor_names"]]
    factors = np.stack([table.column(c).to_numpy() for c in factor_cols], axis=1) if factor_cols else np.zeros((table.num_rows, 0), np.int64)
    return {
        "images": images,
        "labels": table.column("label").to_numpy(),
        "captions": np.array(table.column("caption").to_pylist(), dtype=object),
        "index": table.column("index").to_numpy(),
        "factors": factors,
    }
