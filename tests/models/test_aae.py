"""Adversarial autoencoder specific behaviour: which phase moves which network, losses, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from latentforge.models import MODELS, ConfigError, PretrainedModel, train_step
from latentforge.models.aae import AAE, AAEConfig
from latentforge.models.samplers import GaussianMixtureConfig, fit_latent_sampler

torch.set_num_threads(1)


def make_batch(n: int = 8, size: int = 16, channels: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, channels, size, size, generator=g),
        "label": torch.full((n,), -1),
        "index": torch.arange(n),
    }


def tiny(**overrides) -> AAE:
    torch.manual_seed(0)
    return AAE(AAEConfig.tiny(**overrides))


def snapshot(model: AAE) -> dict[str, dict[str, torch.Tensor]]:
    return {
        part: {n: p.detach().clone() for n, p in getattr(model, part).named_parameters()}
        for part in ("encoder", "decoder", "discriminator")
    }


def changed(before, model: AAE) -> set[str]:
    after = snapshot(model)
    return {part for part in before if any(not torch.equal(before[part][n], after[part][n]) for n in before[part])}


@pytest.mark.parametrize(
    "phase,moves",
    [("recon", {"encoder", "decoder"}), ("disc", {"discriminator"}), ("gen", {"encoder"})],
)
def test_each_phase_changes_only_its_networks(phase, moves):
    model = tiny()
    opt = model.configure_optimizers()
    batch = make_batch()
    # Gradients left over by earlier phases must not leak into this one's step.
    model(batch, phase="gen").loss.backward()
    before = snapshot(model)
    opt[phase].zero_grad(set_to_none=True)
    model(batch, phase=phase).loss.backward()
    opt[phase].step()
    assert changed(before, model) == moves


def test_disc_phase_gives_no_gradient_to_the_autoencoder():
    model = tiny()
    model(make_batch(), phase="disc").loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())
    assert any(p.grad is not None for p in model.discriminator.parameters())


@pytest.mark.parametrize("recon_loss", ["bce", "mse"])
def test_train_step_runs_all_phases(recon_loss):
    model = tiny(recon_loss=recon_loss)
    assert model.phases == ("recon", "disc", "gen")
    opt = model.configure_optimizers()
    batch = make_batch()
    first = train_step(model, opt, batch, 0)
    for step in range(1, 15):
        logs = train_step(model, opt, batch, step)
    assert {"recon/loss", "recon/recon", "disc/loss", "disc/d_accuracy", "gen/loss"} <= set(logs)
    assert all(math.isfinite(v) for v in logs.values()), logs
    assert logs["recon/loss"] < first["recon/loss"]


def test_discriminator_learns_to_tell_codes_from_the_prior():
    # Codes of an untrained encoder are far from N(0, I) (tiny scale): the discriminator picks that up fast.
    model = tiny(lr_d=1e-2)
    opt = model.configure_optimizers()
    batch = make_batch(n=32)
    for _ in range(30):
        opt["disc"].zero_grad()
        out = model(batch, phase="disc")
        out.loss.backward()
        opt["disc"].step()
    assert float(out.logs["d_accuracy"]) > 0.8
    assert float(out.loss.detach()) < 2 * math.log(2)


def test_encode_decode_sample_and_roundtrip(tmp_path):
    model = tiny(prior_std=2.0).eval()
    x = make_batch(n=4)["image"]
    enc = model.encode(x)
    assert enc.latent.shape == (4, 4) and enc.mean is None
    images = model.decode(enc.latent).images
    assert images.shape == x.shape and images.min() >= 0 and images.max() <= 1
    a = model.sample(3, generator=torch.Generator().manual_seed(0)).images
    b = model.sample(3, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (3, 1, 16, 16)
    torch.testing.assert_close(a, b)
    noise = torch.randn(3, 4)
    torch.testing.assert_close(model.sample(3, noise=noise).images, model.decode(2.0 * noise).images)

    model.save_pretrained(tmp_path / "aae")
    loaded = PretrainedModel.from_pretrained(tmp_path / "aae")
    assert isinstance(loaded, AAE) and loaded.config == model.config
    torch.testing.assert_close(loaded.encode(x).latent, enc.latent)


def test_sample_from_a_fitted_latent_sampler(tmp_path):
    model = tiny(prior_std=2.0).eval()
    with pytest.raises(ValueError, match="no such fitted latent sampler"):
        model.sample(2, sampler="gmm")
    with pytest.raises(ValueError, match="uniform is only used"):
        model.sample(2, sampler="prior", uniform=torch.rand(2))
    x = make_batch(n=16)["image"]
    model.latent_sampler = fit_latent_sampler(model, x, GaussianMixtureConfig(components=2, restarts=1))
    noise, uniform = torch.randn(3, 4), torch.rand(3)
    # sampler="gmm": the mixture's transform of (noise, uniform), decoded; a generator reproduces a draw.
    expected = model.decode(model.latent_sampler.transform(noise, uniform)).images
    torch.testing.assert_close(model.sample(3, noise=noise, uniform=uniform, sampler="gmm").images, expected)
    a = model.sample(4, generator=torch.Generator().manual_seed(1), sampler="gmm").images
    torch.testing.assert_close(a, model.sample(4, generator=torch.Generator().manual_seed(1), sampler="gmm").images)
    assert a.shape == (4, 1, 16, 16)
    model.save_pretrained(tmp_path / "aae")
    loaded = PretrainedModel.from_pretrained(tmp_path / "aae")
    torch.testing.assert_close(loaded.sample(3, noise=noise, uniform=uniform, sampler="gmm").images, expected)


@pytest.mark.parametrize("overrides", [{"recon_loss": "l1"}, {"prior_std": 0.0}, {"latent_dim": 0}, {"image_size": 30}])
def test_bad_config_is_a_config_error(overrides):
    with pytest.raises(ConfigError):
        AAEConfig.tiny(**overrides)


def test_registered():
    assert MODELS["aae"] is AAE
    model = AAE(AAEConfig(image_size=28, channels=1))
    assert model.decode(torch.zeros(1, 16)).images.shape == (1, 1, 28, 28)
