"""evaluate-text's decoder ceiling for a decoder without an encoder (the GAN): a latent fitted to each
image by restarts and Adam steps on the pixel loss (pipelines/text/evaluate.py: fit_latents)."""

from __future__ import annotations

import numpy as np
import torch

from latentforge.models import MODELS
from latentforge.models.text import freeze, state_digest
from latentforge.pipelines.text.evaluate import fit_latents, reconstructions


def _tiny_gan():
    cls = MODELS["gan"]
    torch.manual_seed(0)
    return freeze(cls(cls.config_class.tiny()))


def test_fit_latents_finds_the_latent_of_an_image_the_generator_can_draw():
    gan = _tiny_gan()
    before = state_digest(gan)
    target = torch.randn(4, *gan.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        images = gan.decode(target).images
        random_error = float(((gan.decode(torch.randn_like(target)).images - images) ** 2).mean())
    z = fit_latents(gan, images, steps=100, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fitted_error = float(((gan.decode(z).images - images) ** 2).mean())
    assert z.shape == target.shape and not z.requires_grad
    assert fitted_error < 0.2 * random_error, (fitted_error, random_error)
    assert state_digest(gan) == before and all(p.grad is None for p in gan.parameters())  # only z was trained


def test_ceiling_of_an_encoderless_decoder_is_a_latent_fit_and_reproducible():
    gan = _tiny_gan()
    c = gan.config
    rng = np.random.default_rng(0)
    train = {"images": rng.integers(0, 256, size=(6, c.image_size, c.image_size, c.channels), dtype=np.uint8)}
    rows = np.arange(6)
    with torch.no_grad():
        a, method = reconstructions(gan, train, rows, seed=3)
        b, _ = reconstructions(gan, train, rows, seed=3)
    assert method == "latent_fit" and a.shape == (6, c.channels, c.image_size, c.image_size)
    assert torch.equal(a, b)


def test_ceiling_of_glo_uses_its_own_optimising_encoder():
    cls = MODELS["glo"]
    torch.manual_seed(0)
    glo = freeze(cls(cls.config_class.tiny()))
    c = glo.config
    train = {"images": np.random.default_rng(0).integers(0, 256, size=(4, c.image_size, c.image_size, c.channels), dtype=np.uint8)}
    with torch.no_grad():
        images, method = reconstructions(glo, train, np.arange(4), seed=0)
    assert method == "latent_fit" and images.shape == (4, c.channels, c.image_size, c.image_size)
