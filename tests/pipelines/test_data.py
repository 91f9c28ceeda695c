"""Every loader, on real files: generated shapes, sklearn digits, IDX files (written here and the shared
MNIST test set), image folders; and every bad input a user can hand them."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentforge.pipelines.data import (
    COLOURS,
    SHAPES,
    DataError,
    class_captions,
    load_digits,
    load_idx,
    load_image_folder,
    load_shapes,
    load_source,
    read_idx,
)
from latentforge.pipelines.common.params import ParamsError

SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` (uint8) in IDX format: magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


# -- shapes ----------------------------------------------------------------------------------------


def test_shapes_deterministic_and_factored():
    a = load_shapes(num_images=300, seed=7)
    b = load_shapes(num_images=300, seed=7)
    c = load_shapes(num_images=300, seed=8)
    assert a.images.shape == (300, 32, 32, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert not np.array_equal(a.images, c.images)
    assert a.factor_names == ["shape", "colour", "size", "hpos", "vpos"]
    sizes = {k: len(v) for k, v in a.factor_values.items()}
    assert sizes["shape"] >= 4 and sizes["colour"] >= 6
    assert sizes["size"] == sizes["hpos"] == sizes["vpos"] == 3
    # 300 uniform draws hit every value of every factor.
    for j, name in enumerate(a.factor_names):
        assert set(a.factors[:, j]) == set(range(sizes[name]))


def test_shapes_pixels_follow_factors():
    data = load_shapes(num_images=200, seed=0, jitter=0)
    names = data.factor_names
    for i in range(50):
        f = dict(zip(names, data.factors[i]))
        img = data.images[i].astype(int)
        lit = img.sum(-1) > 0
        ys, xs = np.nonzero(lit)
        # Colour: the brightest pixel has the factor's colour.
        brightest = img.reshape(-1, 3)[img.reshape(-1, 3).sum(1).argmax()]
        assert np.abs(brightest - np.array(COLOURS[data.factor_values["colour"][f["colour"]]])).max() <= 1
        # Position: the centre of mass falls in the factor's third of the image.
        assert abs(xs.mean() - (f["hpos"] + 1) * 8) < 3 and abs(ys.mean() - (f["vpos"] + 1) * 8) < 3.5
    # Size: mean lit area grows with the size factor.
    area = (data.images.sum(-1) > 0).sum((1, 2))
    means = [area[data.factors[:, 2] == s].mean() for s in range(3)]
    assert means[0] < means[1] < means[2]


def test_shapes_captions_name_the_factors():
    data = load_shapes(num_images=400, seed=1)
    templates_seen = set()
    for caption, f in zip(data.captions, data.factors):
        colour = data.factor_values["colour"][f[1]]
        assert colour in caption
        templates_seen.add(caption.split(" ")[0].rstrip(":"))
    assert len(set(data.captions)) > 100
    assert len(templates_seen) >= 5, templates_seen
    assert data.class_names[data.labels[0]] == (
        f"{data.factor_values['colour'][data.factors[0, 1]]} {SHAPES[data.factors[0, 0]]}"
    )


# -- digits and captions over class names ----------------------------------------------------------


def test_digits():
    data = load_digits()
    assert data.images.shape == (1797, 8, 8, 1) and data.images.max() == 255
    assert data.class_names == [str(i) for i in range(10)]
    word = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for label, caption in zip(data.labels[:50], data.captions[:50]):
        assert word[label] in caption or str(label) in caption
    assert load_digits(image_size=16).images.shape == (1797, 16, 16, 1)


def test_class_captions_generic_names():
    caps = class_captions(np.array([0, 1, -1]), ["apple", "boot"], seed=0)
    assert "apple" in caps[0] and "boot" in caps[1] and caps[2] == ""


# -- idx -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 5, 6), dtype=np.uint8)
    y = rng.integers(0, 3, size=20, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    data = load_idx(
        str(write_idx(tmp_path / f"x{suffix}", x, gz)),
        str(write_idx(tmp_path / f"y{suffix}", y, gz)),
        class_names=["cat", "dog", "eel"],
    )
    assert np.array_equal(data.images[..., 0], x) and np.array_equal(data.labels, y)
    assert all(data.class_names[l] in c for l, c in zip(data.labels, data.captions))
    assert len(data.raw_inputs) == 2


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="../shared/data/mnist is not beside this checkout")
def test_idx_on_shared_mnist():
    data = load_idx(str(SHARED_MNIST / "t10k-images-idx3-ubyte.gz"), str(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz"))
    assert data.images.shape == (10000, 28, 28, 1)
    assert np.bincount(data.labels).tolist()[:3] == [980, 1135, 1032]
    assert "seven" in data.captions[0] or "7" in data.captions[0]  # the first test digit is a 7


def test_idx_bad_inputs(tmp_path):
    x = write_idx(tmp_path / "x", np.zeros((4, 3, 3), np.uint8))
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing")
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x12\x34\x08\x03" + x.read_bytes()[4:])
    with pytest.raises(DataError, match="magic"):
        read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(x.read_bytes()[:-5])
    with pytest.raises(DataError, match="bytes"):
        read_idx(short)
    gz = write_idx(tmp_path / "x.gz", np.zeros((40, 8, 8), np.uint8), gz=True)
    truncated = tmp_path / "trunc.gz"
    truncated.write_bytes(gz.read_bytes()[:-12])
    with pytest.raises(DataError, match="gzip"):
        read_idx(truncated)
    corrupt = tmp_path / "corrupt.gz"
    raw = bytearray(gz.read_bytes())
    raw[15:25] = b"\xff" * 10
    corrupt.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="gzip"):
        read_idx(corrupt)
    y = write_idx(tmp_path / "y", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="5 labels but .* 4 images"):
        load_idx(str(x), str(y))


# -- image_folder ----------------------------------------------------------------------------------


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ["cats", "dogs"]:
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(root / "loose.jpg")
    (root / "captions.jsonl").write_text(json.dumps({"file": "cats/1.png", "text": "a sleepy cat"}) + "\n")
    return root


def test_image_folder(tmp_path):
    root = make_folder(tmp_path / "imgs")
    data = load_image_folder(str(root), image_size=16, channels=3)
    assert data.images.shape == (7, 16, 16, 3)
    assert data.class_names == ["cats", "dogs"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, -1]
    assert data.captions[1] == "a sleepy cat" and "dogs" in data.captions[3] and data.captions[6] == ""
    gray = load_image_folder(str(root), image_size=8, channels=1)
    assert gray.images.shape == (7, 8, 8, 1)


def test_image_folder_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image_folder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG"):
        load_image_folder(str(tmp_path / "empty"))
    root = make_folder(tmp_path / "imgs")
    (root / "dogs" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        load_image_folder(str(root))
    (root / "dogs" / "broken.png").unlink()
    (root / "captions.jsonl").write_text('{"file": "cats/9.png", "text": "x"}\n')
    with pytest.raises(DataError, match="captions.jsonl:1: no image"):
        load_image_folder(str(root))
    (root / "captions.jsonl").write_text("not json\n")
    with pytest.raises(DataError, match="captions.jsonl:1"):
        load_image_folder(str(root))


# -- dispatch from params ----------------------------------------------------------------------------


def test_load_source_checks_params():
    with pytest.raises(ParamsError, match="unknown data set 'mnist_hub'"):
        load_source("mnist_hub", {}, seed=0)
    with pytest.raises(ParamsError, match=r"data.shapes.num_images: expected int, got 'many'"):
        load_source("shapes", {"num_images": "many", "image_size": 32, "jitter": 1}, seed=0)
    with pytest.raises(ParamsError, match="unknown key.*colours"):
        load_source("shapes", {"num_images": 5, "image_size": 32, "jitter": 1, "colours": 3}, seed=0)
    with pytest.raises(ParamsError, match="missing key.*jitter"):
        load_source("shapes", {"num_images": 5, "image_size": 32}, seed=0)
    assert len(load_source("shapes", {"num_images": 5, "image_size": 32, "jitter": 0}, seed=0).images) == 5
