"""Data sets: each loads into one in-memory :class:`ImageSet` of uint8 images, labels and captions.

Loaders:

* ``shapes``: procedurally rendered 32x32 RGB shapes with five independent factors (shape, colour,
  size, horizontal and vertical position), deterministic given a seed, each image captioned.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download).
* ``idx``: MNIST-format IDX files, gzipped or not (MNIST, Fashion-MNIST, KMNIST).
* ``image_folder``: PNG/JPEG files, the class from the sub-folder, optional ``captions.jsonl``.

Labelled sets without captions get captions from templates over their class names, so every data set
can feed text conditioning. Every error a user can cause raises :class:`DataError` naming the file or
parameter and the problem.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from latentforge.pipelines.common.errors import DataError
from latentforge.pipelines.common.files import sha256_file
from latentforge.pipelines.common.params import ParamsError, check_keys
from latentforge.pipelines.common.progress import progress


@dataclass
class ImageSet:
    """A whole data set in memory.

    ``images``: (N, H, W, C) uint8 in [0, 255]. ``labels``: (N,) int64, -1 where unknown.
    ``factors``: (N, F) int64 indices into ``factor_values`` (empty (N, 0) when the set has none).
    ``raw_inputs``: path -> sha256 of every raw file read (empty for generated sets).
    """

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]
    class_names: list[str] = field(default_factory=list)
    factor_names: list[str] = field(default_factory=list)
    factor_values: dict[str, list[str]] = field(default_factory=dict)
    factors: np.ndarray | None = None
    raw_inputs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.factors is None:
            self.factors = np.zeros((n, 0), dtype=np.int64)
        if not (len(self.labels) == len(self.captions) == len(self.factors) == n):
            raise DataError(
                f"inconsistent data set: {n} images, {len(self.labels)} labels, "
                f"{len(self.captions)} captions, {len(self.factors)} factor rows"
            )
        if n == 0:
            raise DataError("the data set is empty: no images were found")


# ----------------------------------------------------------------------------------------------------
# Captions over class names

_DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_TEMPLATES = [
    "the digit {word}",
    "a handwritten {digit}",
    "the number {word}, written by hand",
    "a handwritten digit {word}",
    "{word}",
]
_CLASS_TEMPLATES = [
    "{a} {name}",
    "an image of {a} {name}",
    "a photo of {a} {name}",
    "a picture showing {a} {name}",
    "{name}",
]


def class_captions(labels: np.ndarray, class_names: list[str], seed: int) -> list[str]:
    """One caption per label from templates over its class name; -1 (no label) gets ``""``.

    Digit class names ("0".."9") use digit templates ("the digit seven", "a handwritten 7").
    """
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(_CLASS_TEMPLATES), size=len(labels))
    digits = all(name in "0123456789" and len(name) == 1 for name in class_names)
    out = []
    for label, t in zip(labels.tolist(), choice.tolist()):
        if label < 0:
            out.append("")
        elif digits:
            d = class_names[label]
            out.append(_DIGIT_TEMPLATES[t % len(_DIGIT_TEMPLATES)].format(digit=d, word=_DIGIT_WORDS[int(d)]))
        else:
            name = class_names[label]
            article = "an" if name[:1].lower() in "aeiou" else "a"
            out.append(_CLASS_TEMPLATES[t].format(a=article, name=name))
    return out


# ----------------------------------------------------------------------------------------------------
# shapes

SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 210, 220),
    "orange": (250, 140, 30),
    "white": (235, 235, 235),
}
SIZES = ["small", "medium", "large"]
HPOS = ["left", "center", "right"]
VPOS = ["top", "middle", "bottom"]
SHAPE_FACTORS = {
    "shape": SHAPES,
    "colour": list(COLOURS),
    "size": SIZES,
    "hpos": HPOS,
    "vpos": VPOS,
}

_SIZE_RADIUS = {"small": 0.09, "medium": 0.14, "large": 0.2}  # fraction of the image side
_SHAPE_WORDS = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box"],
    "triangle": ["triangle"],
    "diamond": ["diamond", "rhombus"],
    "cross": ["cross", "plus sign"],
}
_SIZE_WORDS = {"small": ["small", "tiny", "little"], "medium": ["medium", "mid-sized"], "large": ["large", "big"]}
_SHAPE_TEMPLATES = [
    "a {size} {colour} {shape} in the {pos}",
    "{pos_dash}: {size_syn} {colour} {shape_syn}",
    "there is a {size_syn} {colour} {shape_syn} at the {pos}",
    "{colour} {shape}, {size}, {pos}",
    "a {size_syn} {shape_syn} coloured {colour}, placed in the {pos}",
    "{size_syn} {colour} {shape_syn} located in the {pos}",
]


def _position_phrase(v: str, h: str, sep: str = " ") -> str:
    if v == "middle" and h == "center":
        return "center"
    return f"{v}{sep}{h}"


def shape_caption(values: dict[str, str], rng: np.random.Generator) -> str:
    """A natural-language caption of one shapes image from one of several templates and synonyms."""
    template = _SHAPE_TEMPLATES[rng.integers(len(_SHAPE_TEMPLATES))]
    shape_words, size_words = _SHAPE_WORDS[values["shape"]], _SIZE_WORDS[values["size"]]
    return template.format(
        size=values["size"],
        colour=values["colour"],
        shape=values["shape"],
        pos=_position_phrase(values["vpos"], values["hpos"]),
        pos_dash=_position_phrase(values["vpos"], values["hpos"], "-"),
        size_syn=size_words[rng.integers(len(size_words))],
        shape_syn=shape_words[rng.integers(len(shape_words))],
    )


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` with radius ``r`` over offsets (dx, dy) from its centre (y grows down)."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    if shape == "triangle":  # apex up, base at 0.75 r below the centre
        return (dy <= 0.75 * r) & (abs(dx) <= (dy + r) * 0.55)
    if shape == "diamond":
        return abs(dx) + abs(dy) <= 1.1 * r
    if shape == "cross":
        arm = 0.35 * r
        return ((abs(dx) <= arm) & (abs(dy) <= r)) | ((abs(dy) <= arm) & (abs(dx) <= r))
    raise DataError(f"unknown shape {shape!r}")


def render_shape(values: dict[str, str], image_size: int, offset: tuple[float, float], supersample: int = 4) -> np.ndarray:
    """Render one anti-aliased shape on black: (image_size, image_size, 3) uint8."""
    n = image_size * supersample
    coords = (np.arange(n) + 0.5) / supersample  # pixel centres in output-pixel units
    xs, ys = np.meshgrid(coords, coords)
    cx = (HPOS.index(values["hpos"]) + 1) * image_size / 4 + offset[0]
    cy = (VPOS.index(values["vpos"]) + 1) * image_size / 4 + offset[1]
    mask = _shape_mask(values["shape"], xs - cx, ys - cy, _SIZE_RADIUS[values["size"]] * image_size)
    coverage = mask.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))
    colour = np.asarray(COLOURS[values["colour"]], dtype=np.float64)
    return np.round(coverage[..., None] * colour).astype(np.uint8)


def load_shapes(num_images: int, seed: int, image_size: int = 32, jitter: int = 1) -> ImageSet:
    """``num_images`` shapes with factors drawn uniformly and independently, deterministic given ``seed``.

    ``jitter``: the centre moves by up to this many pixels, so that positions are classes, not points.
    """
    if num_images <= 0:
        raise DataError(f"shapes: num_images must be > 0, got {num_images}")
    if image_size < 16:
        raise DataError(f"shapes: image_size must be >= 16, got {image_size}")
    rng = np.random.default_rng(seed)
    names = list(SHAPE_FACTORS)
    factors = np.stack([rng.integers(0, len(SHAPE_FACTORS[k]), size=num_images) for k in names], axis=1)
    offsets = rng.integers(-jitter, jitter + 1, size=(num_images, 2)) if jitter > 0 else np.zeros((num_images, 2))
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    captions = []
    for i in progress(range(num_images), "render shapes", unit="images"):
        values = {k: SHAPE_FACTORS[k][factors[i, j]] for j, k in enumerate(names)}
        images[i] = render_shape(values, image_size, (float(offsets[i, 0]), float(offsets[i, 1])))
        captions.append(shape_caption(values, rng))
    # The label is the (shape, colour) pair: the class that text conditioning has to get right.
    labels = factors[:, 0] * len(COLOURS) + factors[:, 1]
    class_names = [f"{c} {s}" for s in SHAPES for c in COLOURS]
    return ImageSet(
        images=images,
        labels=labels.astype(np.int64),
        captions=captions,
        class_names=class_names,
        factor_names=names,
        factor_values={k: list(v) for k, v in SHAPE_FACTORS.items()},
        factors=factors.astype(np.int64),
    )


# ----------------------------------------------------------------------------------------------------
# digits


def load_digits(image_size: int = 8, seed: int = 0) -> ImageSet:
    """scikit-learn's 1,797 8x8 digits, scaled from 0..16 to 0..255, optionally resized (bilinear)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    if image_size != 8:
        images = _resize_gray(images, image_size)
    labels = bunch.target.astype(np.int64)
    class_names = [str(i) for i in range(10)]
    return ImageSet(
        images=images[..., None],
        labels=labels,
        captions=class_captions(labels, class_names, seed),
        class_names=class_names,
    )


def _resize_gray(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


# ----------------------------------------------------------------------------------------------------
# idx

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in .gz or it starts with the gzip magic)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: IDX file not found")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says {dims} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def load_idx(images: str, labels: str | None = None, class_names: list[str] | None = None, seed: int = 0) -> ImageSet:
    """An IDX image file (N, H, W) or (N, H, W, C) uint8, with an optional IDX label file (N,)."""
    image_path = Path(images)
    x = read_idx(image_path)
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise DataError(f"{image_path}: expected uint8 images of shape (N, H, W[, C]), got {x.dtype} {x.shape}")
    if x.ndim == 3:
        x = x[..., None]
    raw = {str(image_path): sha256_file(image_path)}
    if labels is None:
        y = np.full(len(x), -1, dtype=np.int64)
        names: list[str] = list(class_names or [])
    else:
        label_path = Path(labels)
        y = read_idx(label_path)
        raw[str(label_path)] = sha256_file(label_path)
        if y.ndim != 1:
            raise DataError(f"{label_path}: expected a 1-d label file, got shape {y.shape}")
        if len(y) != len(x):
            raise DataError(f"{label_path}: {len(y)} labels but {image_path} has {len(x)} images")
        y = y.astype(np.int64)
        if y.min() < 0:
            raise DataError(f"{label_path}: negative label {int(y.min())}")
        names = list(class_names) if class_names else [str(i) for i in range(int(y.max()) + 1)]
        if int(y.max()) >= len(names):
            raise DataError(f"{label_path}: label {int(y.max())} but only {len(names)} class names")
    return ImageSet(
        images=np.ascontiguousarray(x),
        labels=y,
        captions=class_captions(y, names, seed) if names else [""] * len(x),
        class_names=names,
        raw_inputs=raw,
    )


# ----------------------------------------------------------------------------------------------------
# image_folder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def load_image_folder(path: str, image_size: int = 32, channels: int = 3, seed: int = 0) -> ImageSet:
    """Every PNG/JPEG under ``path`` (sorted), resized to ``image_size`` square, grayscale or RGB.

    A file in a sub-folder gets that sub-folder's name as its class; files at the top have no label.
    ``captions.jsonl`` at the top, lines ``{"file": "<relative path>", "text": "..."}``, gives captions;
    other labelled images get template captions over their class name.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    if channels not in (1, 3):
        raise DataError(f"image_folder: channels must be 1 or 3, got {channels}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{root}: no PNG or JPEG files found")
    rel = [p.relative_to(root).as_posix() for p in files]
    class_names = sorted({r.split("/")[0] for r in rel if "/" in r})
    labels = np.array([class_names.index(r.split("/")[0]) if "/" in r else -1 for r in rel], dtype=np.int64)
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    raw = {}
    for i, p in enumerate(progress(files, f"read {root}", unit="images")):
        try:
            with Image.open(p) as im:
                im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                images[i] = np.asarray(im).reshape(image_size, image_size, channels)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{p}: unreadable image ({exc})") from None
        raw[str(p)] = sha256_file(p)
    captions = class_captions(labels, class_names, seed) if class_names else [""] * len(files)
    captions_file = root / "captions.jsonl"
    if captions_file.is_file():
        raw[str(captions_file)] = sha256_file(captions_file)
        index = {r: i for i, r in enumerate(rel)}
        for lineno, line in enumerate(captions_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, text = entry["file"], entry["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f'{captions_file}:{lineno}: expected {{"file": ..., "text": ...}}') from None
            if name not in index:
                raise DataError(f"{captions_file}:{lineno}: no image {name!r} in {root}")
            if not isinstance(text, str):
                raise DataError(f"{captions_file}:{lineno}: text must be a string")
            captions[index[name]] = text
    return ImageSet(images=images, labels=labels, captions=captions, class_names=class_names, raw_inputs=raw)


# ----------------------------------------------------------------------------------------------------
# Dispatch from params

# Each source: its loader and the schema of its params section (key -> accepted types).
SOURCES: dict[str, tuple[Callable[..., ImageSet], dict[str, Any]]] = {
    "shapes": (load_shapes, {"num_images": int, "image_size": int, "jitter": int}),
    "digits": (load_digits, {"image_size": int}),
    "idx": (load_idx, {"images": str, "labels": (str, type(None)), "class_names": (list, type(None))}),
    "image_folder": (load_image_folder, {"path": str, "image_size": int, "channels": int}),
}


def load_source(source: str, options: dict[str, Any], seed: int) -> ImageSet:
    """Load data set ``source`` with its params section ``options`` (checked: keys and types)."""
    if source not in SOURCES:
        raise ParamsError(f"params data.source: unknown data set {source!r}; choose one of: {', '.join(SOURCES)}")
    loader, schema = SOURCES[source]
    if not isinstance(options, dict):
        raise ParamsError(f"params data.{source}: expected a mapping, got {options!r}")
    kwargs = check_keys(options, schema, f"data.{source}")
    names = kwargs.get("class_names")
    if names is not None and not all(isinstance(n, (str, int)) for n in names):
        raise ParamsError(f"params data.{source}.class_names: expected a list of names, got {names!r}")
    if names is not None:
        kwargs["class_names"] = [str(n) for n in names]
    return loader(seed=seed, **kwargs)
