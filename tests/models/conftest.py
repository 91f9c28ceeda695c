"""Shared fixtures for the model tests: one thread, every registered family, small fixed batches."""

from __future__ import annotations

import math

import pytest
import torch

from latentforge.models import MODELS


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The CI and dev machines have 2 cores shared by several jobs: more threads only add contention
    # for models this small.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=sorted(MODELS))
def family(request) -> str:
    """The name of each registered family in turn, so new families are covered automatically."""
    return request.param


def blob_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, channels, size, size) images in [0, 1]: one soft Gaussian blob each on a dark background.

    Structured (unlike uniform noise) so that any model can visibly fit them within a few dozen steps.
    """
    g = torch.Generator().manual_seed(seed)
    centre = size * (0.25 + 0.5 * torch.rand(n, 2, generator=g))
    width = size * (0.12 + 0.12 * torch.rand(n, 1, generator=g))
    amplitude = 0.6 + 0.4 * torch.rand(n, channels, generator=g)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = (coords.view(1, size, 1) - centre[:, 0].view(n, 1, 1)) ** 2
    dx = (coords.view(1, 1, size) - centre[:, 1].view(n, 1, 1)) ** 2
    blob = torch.exp(-(dx + dy) / (2 * width.view(n, 1, 1) ** 2))  # (n, size, size)
    return (amplitude.view(n, channels, 1, 1) * blob.unsqueeze(1)).clamp(0.0, 1.0)


def make_batch(config, n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch as the pipelines produce it, for a config's image size and channels."""
    return {
        "image": blob_images(n, config.channels, config.image_size, seed),
        "label": torch.full((n,), -1, dtype=torch.long),
        "index": torch.arange(n, dtype=torch.long),
    }


@pytest.fixture
def batch_for():
    """``batch_for(config, n=8, seed=0)`` -> a fixed batch for that config."""
    return make_batch


def build(name: str, seed: int = 0, **overrides):
    """The family ``name`` built from its ``tiny()`` preset, in training mode, initialised from ``seed``."""
    cls = MODELS[name]
    torch.manual_seed(seed)
    model = cls(cls.config_class.tiny(**overrides))
    model.train()
    return model


@pytest.fixture
def tiny_model():
    """``tiny_model(name, seed=0, **overrides)`` -> that family built from its ``tiny()`` preset."""
    return build


def _assert_images(images: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert tuple(images.shape) == shape, f"expected images {shape}, got {tuple(images.shape)}"
    assert images.is_floating_point()
    assert torch.isfinite(images).all(), "non-finite pixels"
    lo, hi = float(images.min()), float(images.max())
    assert 0.0 <= lo and hi <= 1.0 and not math.isnan(lo), f"pixels outside [0, 1]: [{lo}, {hi}]"


@pytest.fixture
def assert_images():
    """``assert_images(images, shape)``: float, finite, of that shape, every pixel in [0, 1]."""
    return _assert_images
