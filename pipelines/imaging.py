"""Small image helpers shared by the stages: tensors <-> uint8 arrays, grids and PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def batch_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1], the models' input convention."""
    # np.require copies only when needed: decoded Parquet bytes are read-only, which torch warns about.
    return torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2).float().div_(255.0)


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [0, 1] -> (B, H, W, C) uint8 (values clamped, rounded)."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return arr.transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (B, H, W, C) uint8 images into one (rows*H', cols*W', 3) uint8 image with a pad."""
    b, h, w, c = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=-1)
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol = nrow
    nrows = int(math.ceil(b / ncol))
    grid = np.zeros((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 array as PNG, optionally upscaled (nearest) for viewing."""
    from PIL import Image

    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
