"""VAE / beta-VAE specific behaviour (the shared contract is in test_contract.py)."""

from __future__ import annotations

import math

import pytest
import torch

from latentforge.models import MODELS, ConfigError, PretrainedModel, train_step
from latentforge.models.vae import VAE, VAEConfig

torch.set_num_threads(1)


def make_batch(n: int = 8, size: int = 16, channels: int = 1, binary: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, channels, size, size, generator=g)
    if binary:
        image = (image > 0.7).float()
    return {"image": image, "label": torch.full((n,), -1), "index": torch.arange(n)}


def tiny(**overrides) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig.tiny(**overrides))


def test_registered():
    assert MODELS["vae"] is VAE


def test_gradients_reach_encoder_through_reparameterisation():
    # beta = 0 leaves only the reconstruction term: any encoder gradient must come through z = mu + sigma * eps.
    model = tiny(beta=0.0)
    out = model(make_batch(), step=0)
    out.loss.backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # ... and both heads (mean and log-variance) get a gradient.
    last = model.encoder.head[-1].weight.grad
    d = model.config.latent_dim
    assert last[:d].abs().sum() > 0 and last[d:].abs().sum() > 0


@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_kl_warmup_scales_the_kl_term(beta):
    model = tiny(kl_warmup_steps=10, beta=beta)
    batch = make_batch()
    for step, expected in [(0, 0.0), (5, 0.5), (10, 1.0), (1000, 1.0)]:
        out = model(batch, step=step)
        assert float(out.logs["kl_weight"]) == pytest.approx(beta * expected)
        kl_part = float(out.loss.detach()) - float(out.logs["recon"])
        assert kl_part == pytest.approx(beta * expected * float(out.logs["kl"]), rel=1e-4, abs=1e-5)
    assert float(out.logs["kl"]) > 0


def test_no_warmup_means_full_weight_from_step_zero():
    model = tiny()
    assert model.kl_weight(0) == 1.0


def test_free_bits_floor():
    batch = make_batch()
    floor = 5.0  # far above the per-dimension KL of a fresh model
    model = tiny(free_bits=floor)
    torch.manual_seed(1)
    out = model(batch)
    assert float(out.logs["kl"]) < floor * model.config.latent_dim
    assert float(out.logs["kl_loss"]) == pytest.approx(floor * model.config.latent_dim)
    assert float(out.loss.detach()) == pytest.approx(float(out.logs["recon"]) + floor * model.config.latent_dim, rel=1e-5)
    out.loss.backward()

    # Below the floor the KL contributes no gradient: the encoder gradients equal those of recon alone.
    reference = tiny(beta=0.0)
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    reference(batch).loss.backward()
    for p, q in zip(model.encoder.parameters(), reference.encoder.parameters()):
        torch.testing.assert_close(p.grad, q.grad)

    # A small floor only lifts the dimensions below it.
    out = tiny(free_bits=1e-3)(batch)
    assert float(out.logs["kl_loss"]) >= float(out.logs["kl"]) - 1e-6


@pytest.mark.parametrize(
    "overrides",
    [{"likelihood": "poisson"}, {"beta": -1.0}, {"free_bits": -0.1}, {"kl_warmup_steps": -1}, {"image_size": 30}],
)
def test_bad_config_is_a_config_error(overrides):
    with pytest.raises(ConfigError):
        VAEConfig.tiny(**overrides)


def test_unknown_likelihood_message_names_the_field():
    with pytest.raises(ConfigError, match="likelihood"):
        VAEConfig.from_dict({"likelihood": "laplace"})


def test_gaussian_likelihood_is_a_full_negative_log_density():
    model = tiny(likelihood="gaussian", decoder_std=0.5)
    x = torch.rand(3, 1, 16, 16)
    nll = model.reconstruction_nll(x.clone(), x)  # the Gaussian's decoder output is its mean
    dims = 16 * 16
    expected = dims * (math.log(0.5) + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(nll, torch.full((3,), expected), atol=1e-2, rtol=1e-4)
    out = model(make_batch(binary=False))
    assert torch.isfinite(out.loss)


def test_iwae_bound_is_tighter_than_the_elbo():
    model = tiny(lr=1e-2)
    x = make_batch(n=6)["image"]
    # Fit the batch a little so q(z|x) is not the prior: makes the gap between the bounds visible.
    opt = model.configure_optimizers()
    batch = {"image": x, "label": torch.zeros(6), "index": torch.arange(6)}
    for step in range(50):
        train_step(model, opt, batch, step)
    g = torch.Generator().manual_seed(0)
    nll_1 = torch.stack([model.iwae_nll(x, k=1, generator=g) for _ in range(200)]).mean(0)  # -ELBO estimate
    nll_k = model.iwae_nll(x, k=200, generator=g)
    assert nll_k.shape == (6,)
    assert torch.isfinite(nll_k).all() and (nll_k > 0).all()
    assert (nll_k <= nll_1 + 0.05).all(), (nll_k, nll_1)
    assert float(nll_k.mean()) < float(nll_1.mean())

    # k = 1 averages to the ELBO computed with the analytic KL in forward().
    torch.manual_seed(0)
    with torch.no_grad():
        elbos = torch.stack([model(batch).logs["elbo"] for _ in range(200)])
    assert float(nll_1.mean()) == pytest.approx(-float(elbos.mean()), rel=0.02)


def test_iwae_chunking_and_generator():
    model = tiny()
    x = make_batch(n=4)["image"]
    a = model.iwae_nll(x, k=20, generator=torch.Generator().manual_seed(3))
    b = model.iwae_nll(x, k=20, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    c = model.iwae_nll(x, k=20, generator=torch.Generator().manual_seed(3), max_batch=4 * 3)  # chunks of 3
    assert c.shape == (4,) and torch.isfinite(c).all()
    torch.testing.assert_close(a, c, atol=2.0, rtol=0.05)  # a different split of the same estimator
    with pytest.raises(ValueError):
        model.iwae_nll(x, k=0)


def test_encode_decode_sample_shapes_and_outputs():
    model = tiny().eval()
    x = make_batch(n=5)["image"]
    enc = model.encode(x)
    assert enc.latent.shape == enc.mean.shape == enc.logvar.shape == (5, 4)
    torch.testing.assert_close(enc.latent, enc.mean)
    noisy = model.encode(x, noise=torch.ones(5, 4))
    torch.testing.assert_close(noisy.latent, enc.mean + torch.exp(0.5 * enc.logvar))
    images = model.decode(enc.latent).images
    assert images.shape == x.shape and images.min() >= 0 and images.max() <= 1
    s1 = model.sample(3, generator=torch.Generator().manual_seed(0)).images
    s2 = model.sample(3, generator=torch.Generator().manual_seed(0)).images
    assert s1.shape == (3, 1, 16, 16)
    torch.testing.assert_close(s1, s2)
    z = torch.randn(3, 4)
    torch.testing.assert_close(model.sample(3, noise=z).images, model.decode(z).images)
    with pytest.raises(ValueError):
        model.sample(3, noise=torch.randn(3, 5))
    with pytest.raises(ValueError):
        model.encode(torch.rand(2, 3, 16, 16))


def test_training_lowers_the_loss_and_roundtrips(tmp_path):
    model = tiny(lr=3e-3)
    batch = make_batch(n=16)
    opt = model.configure_optimizers()
    first = train_step(model, opt, batch, 0)
    for step in range(1, 40):
        last = train_step(model, opt, batch, step)
    assert last["loss"] < first["loss"]
    assert {"loss", "recon", "kl", "elbo", "kl_weight"} <= set(last)

    model.save_pretrained(tmp_path / "vae")
    loaded = PretrainedModel.from_pretrained(tmp_path / "vae")
    assert isinstance(loaded, VAE) and loaded.config == model.config
    model.eval()
    torch.testing.assert_close(loaded.encode(batch["image"]).mean, model.encode(batch["image"]).mean)


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_default_sizes_build(size, channels):
    model = VAE(VAEConfig(image_size=size, channels=channels))
    x = torch.rand(2, channels, size, size)
    out = model({"image": x, "label": torch.zeros(2), "index": torch.arange(2)})
    assert torch.isfinite(out.loss)
    assert model.decode(model.encode(x).latent).images.shape == x.shape


def test_validation_step_scores_the_negative_elbo():
    model = tiny().eval()
    assert model.val_metric == "nelbo"
    batch = make_batch(n=16)
    torch.manual_seed(0)
    figures = model.validation_step(batch)
    assert {"nelbo", "recon", "kl", "recon_mse"} <= set(figures)
    assert float(figures["nelbo"]) == pytest.approx(float(figures["recon"] + figures["kl"]))
    torch.manual_seed(0)
    assert float(figures["nelbo"]) == pytest.approx(-float(model(batch).logs["elbo"]), rel=1e-5)


def test_gaussian_mean_is_the_decoder_output_so_dark_outputs_still_learn():
    # A decoder output far below 0 where the image is bright: a sigmoid mean would pass (almost) no gradient.
    model = tiny(likelihood="gaussian", decoder_std=0.1)
    x = torch.ones(2, 1, 16, 16)
    out = torch.full((2, 1, 16, 16), -8.0, requires_grad=True)
    model.reconstruction_nll(out, x).sum().backward()
    assert float(out.grad.abs().min()) > 1.0
    # decode clamps the unbounded mean into the image range.
    model.eval()
    images = model.decode(torch.randn(4, 4) * 100).images
    assert images.min() >= 0 and images.max() <= 1
