"""The prepare stage: splits, manifest, byte-identical outputs, atomic writes and the CLI's errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from latentforge.pipelines.common.params import ParamsError, apply_overrides, load_params
from latentforge.pipelines.prepare import load_split, prepare, split_indices

REPO = Path(__file__).resolve().parents[2]


def small_params(out_dir: Path, **shapes) -> dict:
    params = load_params(REPO / "params.yaml")
    params["data"]["output_dir"] = str(out_dir)
    params["data"]["shapes"].update({"num_images": 200, **shapes})
    return params


def test_prepare_writes_splits_and_manifest(tmp_path):
    out, manifest = prepare(small_params(tmp_path))
    assert out == tmp_path / "shapes"
    assert {p.name for p in out.iterdir()} == {"train.parquet", "val.parquet", "test.parquet", "manifest.json"}
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 160, "val": 20, "test": 20}
    assert manifest["image_shape"] == [32, 32, 3] and manifest["dtype"] == "uint8"
    assert manifest["pixel_range"] == [0, 255] and manifest["seed"] == 0
    assert manifest["factor_names"] == ["shape", "colour", "size", "hpos", "vpos"]
    assert len(manifest["class_names"]) >= 24
    table = pq.read_table(out / "train.parquet")
    assert table.column_names[:4] == ["index", "image", "label", "caption"]
    train = load_split(out, "train")
    assert train["images"].shape == (160, 32, 32, 3) and train["factors"].shape == (160, 5)
    assert train["index"].tolist() == list(range(160))
    # The splits partition the data set: no image appears in two splits.
    test = load_split(out, "test")
    seen = {im.tobytes() for im in train["images"]}
    assert not any(im.tobytes() in seen for im in test["images"])


def test_prepare_is_byte_identical(tmp_path):
    a, _ = prepare(small_params(tmp_path / "a"))
    b, _ = prepare(small_params(tmp_path / "b"))
    for name in ["train.parquet", "val.parquet", "test.parquet", "manifest.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c, manifest_c = prepare(small_params(tmp_path / "c", jitter=0))
    assert (c / "train.parquet").read_bytes() != (a / "train.parquet").read_bytes()


def test_prepare_records_raw_input_hashes(tmp_path):
    from tests.pipelines.test_data import write_idx

    x = write_idx(tmp_path / "x.gz", np.arange(30 * 4 * 4, dtype=np.uint8).reshape(30, 4, 4), gz=True)
    y = write_idx(tmp_path / "y.gz", np.arange(30, dtype=np.uint8) % 3, gz=True)
    params = small_params(tmp_path / "out")
    params["data"].update(name="tiny-idx", source="idx", idx={"images": str(x), "labels": str(y), "class_names": None})
    out, manifest = prepare(params)
    import hashlib

    assert manifest["raw_inputs"][str(x)] == hashlib.sha256(x.read_bytes()).hexdigest()
    assert manifest["source"] == "idx" and out.name == "tiny-idx"


def test_split_fractions_checked():
    with pytest.raises(ParamsError, match="sum to 1"):
        split_indices(10, {"train": 0.8, "val": 0.3, "test": 0.1}, seed=0)
    parts = split_indices(10000, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [8000, 1000, 1000]


def test_overrides():
    params = {"data": {"name": "shapes", "shapes": {"num_images": 3}}}
    out = apply_overrides(params, ["data.shapes.num_images=50", "data.name=digits"])
    assert out["data"]["shapes"]["num_images"] == 50 and out["data"]["name"] == "digits"
    assert params["data"]["shapes"]["num_images"] == 3  # the input is not modified
    with pytest.raises(ParamsError, match="unknown key 'nmae'"):
        apply_overrides(params, ["data.nmae=x"])
    with pytest.raises(ParamsError, match="expected key=value"):
        apply_overrides(params, ["data.name"])


# -- the command line: bad input gives one line, exit 2, and no partial output ------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latentforge.pipelines.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def test_cli_prepare_and_bad_inputs(workdir):
    ok = run_cli("prepare", "--set", "data.shapes.num_images=50", cwd=workdir)
    assert ok.returncode == 0, ok.stderr
    assert "train 40, val 5, test 5" in ok.stdout
    good = (workdir / "data/prepared/shapes/train.parquet").read_bytes()

    cases = {
        "unknown data set 'hub'": ["--set", "data.source=hub"],
        "data.shapes.num_images: expected int, got 'lots'": ["--set", "data.shapes.num_images=lots"],
        "unknown key 'colour'": ["--set", "data.colour=red"],
        "IDX file not found": ["--set", "data.source=idx"],
        "image folder not found": ["--set", "data.source=image_folder"],
        "params file not found": ["--params", "nope.yaml"],
    }
    for message, extra in cases.items():
        res = run_cli("prepare", *extra, cwd=workdir)
        assert res.returncode == 2, (extra, res.stdout, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr

    # Failed runs left the earlier output untouched and no temporary directories behind.
    assert (workdir / "data/prepared/shapes/train.parquet").read_bytes() == good
    assert sorted(p.name for p in (workdir / "data/prepared").iterdir()) == ["shapes"]


def test_cli_bad_yaml(workdir):
    (workdir / "params.yaml").write_text("data: [unclosed\n")
    res = run_cli("prepare", cwd=workdir)
    assert res.returncode == 2 and "not valid YAML" in res.stderr
