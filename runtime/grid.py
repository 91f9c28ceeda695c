"""Tiling images into one picture: the one grid of the figures that the stages and the benchmarks write.
numpy only, in runtime, so that every layer (serving included) may draw it."""

from __future__ import annotations

import math

import numpy as np


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, fill: int = 0) -> np.ndarray:
    """Tile (B, H, W, C) uint8 images, C 1 or 3, into one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8
    image: ``nrow`` tiles a row (default about sqrt(B); never more than B), row by row, ``pad`` pixels of
    grey level ``fill`` around and between them."""
    b, h, w, c = images.shape
    if c not in (1, 3):
        raise ValueError(f"make_grid: expected 1 or 3 channels, got images of shape {images.shape}")
    if c == 1:
        images = np.repeat(images, 3, axis=-1)
    ncol = min(nrow or int(math.ceil(math.sqrt(b))), b)
    nrows = int(math.ceil(b / ncol))
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), fill, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid
