"""Small image helpers shared by the stages: tensors <-> uint8 arrays and PNG files (the grid of images is
``latentforge.runtime.grid.make_grid``, which serving draws too)."""

from __future__ import annotations

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
