"""Images and arrays in and out of JSON, checked against what a model takes.

Images travel as base64 PNG strings by default, or as nested lists (C, H, W) of floats in [0, 1] on
request. Everything here raises :class:`BadInput` naming the request field (``images[2]``) and the
reason; the app turns it into a 4xx JSON body. numpy and Pillow only.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np

# PNG's 8-byte signature: anything else is refused before Pillow guesses at other formats.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODES = {1: "L", 3: "RGB"}
PIXEL_RANGE = (0.0, 1.0)  # the values of an image given as an array  # channels -> the PNG mode a model of that many channels takes


class BadInput(ValueError):
    """A request the app will not run: ``field`` (a JSON path such as ``images[0]``), ``reason``, ``status``."""

    def __init__(self, field: str, reason: str, status: int = 422):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.status = field, reason, status

    def body(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "reason": self.reason, "status": self.status}}


def decode_png(text: Any, field: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A base64 PNG string -> (C, H, W) float32 in [0, 1]; ``shape`` (C, H, W) is what the model takes."""
    if not isinstance(text, str):
        raise BadInput(field, f"expected a base64 PNG string or a (C, H, W) array, got {type(text).__name__}")
    if text.startswith("data:"):  # a data URL, as a browser's FileReader gives it
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(field, "not valid base64") from None
    if not raw.startswith(PNG_SIGNATURE):
        raise BadInput(field, "not a PNG image (no PNG signature after base64 decoding)")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
            img.load()
            mode, size = img.mode, img.size
            c, h, w = shape
            if size != (w, h):
                raise BadInput(field, f"image is {size[0]}x{size[1]}, the model takes {w}x{h}")
            if mode != MODES[c]:
                raise BadInput(field, f"image mode {mode} ({len(img.getbands())} channels); the model takes "
                                      f"{c}-channel images (PNG mode {MODES[c]})")
            pixels = np.asarray(img, dtype=np.uint8)
    except BadInput:
        raise
    except Exception as exc:  # a truncated or corrupt PNG: Pillow's message says what is wrong
        raise BadInput(field, f"not a readable PNG ({exc})") from None
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return (pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0))


def as_array(value: Any, field: str, shape: tuple[int, ...], dtype=np.float32, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """A nested list -> an array of exactly ``shape`` and ``dtype``; floats must be finite and, with
    ``bounds``, within them; integers (code indices) within ``bounds`` = [low, high)."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise BadInput(field, f"expected a numeric array of shape {list(shape)} (nested lists of numbers)") from None
    if arr.shape != tuple(shape):
        raise BadInput(field, f"shape {list(arr.shape)}, expected {list(shape)}")
    if not np.all(np.isfinite(arr)):
        raise BadInput(field, "contains NaN or infinite values")
    if np.issubdtype(np.dtype(dtype), np.integer):
        if np.any(arr != np.round(arr)):
            raise BadInput(field, "code indices must be integers")
        if bounds and arr.size and (arr.min() < bounds[0] or arr.max() >= bounds[1]):
            raise BadInput(field, f"code indices must lie in [{bounds[0]:g}, {bounds[1]:g})")
    elif bounds and arr.size and (arr.min() < bounds[0] or arr.max() > bounds[1]):
        raise BadInput(field, f"values must lie in [{bounds[0]:g}, {bounds[1]:g}], got [{arr.min():.3g}, {arr.max():.3g}]")
    return arr.astype(dtype)


def decode_image(value: Any, field: str, shape: tuple[int, int, int]) -> np.ndarray:
    """One image of a request: a base64 PNG string or a (C, H, W) array in [0, 1] -> (C, H, W) float32."""
    if isinstance(value, str):
        return decode_png(value, field, shape)
    return as_array(value, field, shape, bounds=PIXEL_RANGE)


def decode_images(values: Any, field: str, shape: tuple[int, int, int], limit: int) -> np.ndarray:
    """A request's list of images -> (B, C, H, W) float32; at least one, at most ``limit``."""
    if not isinstance(values, list) or not values:
        raise BadInput(field, "expected a non-empty list of images")
    if len(values) > limit:
        raise BadInput(field, f"{len(values)} images, the limit is {limit}")
    return np.stack([decode_image(v, f"{field}[{i}]", shape) for i, v in enumerate(values)])


def encode_png(image: np.ndarray) -> str:
    """(C, H, W) float in [0, 1] -> a base64 PNG string (pixels rounded to uint8)."""
    from PIL import Image

    pixels = np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    img = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)  # uint8: mode L or RGB
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_images(images: np.ndarray, fmt: str) -> list:
    """(B, C, H, W) float32 -> a list of base64 PNG strings (``png``) or nested lists (``array``)."""
    if fmt == "array":
        return images.astype(np.float32).tolist()
    return [encode_png(img) for img in images]
