"""GLO specific behaviour: per-sample codes on the sphere, encoding by optimisation, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentforge.models import MODELS, ConfigError, PretrainedModel, train_step
from latentforge.models.glo import GLO, GLOConfig, laplacian_l1
from latentforge.models.samplers import GaussianMixtureConfig, GaussianMixtureSampler

torch.set_num_threads(1)

N = 16


def shapes(n: int = N, size: int = 16, seed: int = 0) -> torch.Tensor:
    """n images of one white square each (random position and side) on black: (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, size, size)
    for i in range(n):
        r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
        s = int(torch.randint(3, 7, (1,), generator=g))
        images[i, 0, r : r + s, c : c + s] = 1.0
    return images


def batch_of(images: torch.Tensor, index: torch.Tensor) -> dict:
    return {"image": images[index], "label": torch.full((len(index),), -1), "index": index}


def tiny(**overrides) -> GLO:
    torch.manual_seed(0)
    return GLO(GLOConfig.tiny(**overrides))


@pytest.fixture(scope="module")
def trained() -> tuple[GLO, torch.Tensor]:
    """A GLO fitted to N shapes (~0.5 s)."""
    model = tiny(num_samples=N, lr=3e-3, code_lr=3e-2, latent_dim=8, hidden_dim=64)
    images = shapes()
    opt = model.configure_optimizers()
    for step in range(200):
        train_step(model, opt, batch_of(images, torch.arange(N)), step)
    return model.eval(), images


def sphere_norms(model: GLO) -> torch.Tensor:
    return model.codes.weight.detach().norm(dim=1)


def test_registered():
    assert MODELS["glo"] is GLO
    assert not any(isinstance(m, torch.nn.Conv2d) for m in GLO(GLOConfig.tiny()).modules())  # no encoder network


def test_codes_stay_on_the_unit_sphere():
    model = tiny()
    torch.testing.assert_close(sphere_norms(model), torch.ones(model.config.num_samples))
    images = shapes()
    opt = model.configure_optimizers()
    before = model.codes.weight.detach().clone()
    for step in range(5):
        train_step(model, opt, batch_of(images, torch.arange(step, step + 4)), step)
    assert not torch.equal(before, model.codes.weight)
    torch.testing.assert_close(sphere_norms(model), torch.ones(model.config.num_samples))


def test_forward_uses_the_codes_of_the_batch_index():
    model = tiny()
    index = torch.tensor([1, 5, 5, 9])
    model(batch_of(shapes(), index)).loss.backward()
    rows_with_grad = model.codes.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    assert rows_with_grad == [1, 5, 9]


def test_index_out_of_range_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="num_samples"):
        model(batch_of(torch.zeros(20, 1, 16, 16), torch.tensor([0, 19])))


@pytest.mark.parametrize("overrides", [{"num_samples": 0}, {"num_samples": -3}, {"loss": "l1"}, {"encode_restarts": 0}])
def test_bad_config_is_a_config_error(overrides):
    with pytest.raises(ConfigError):
        GLOConfig.tiny(**overrides)


def test_encode_recovers_a_training_code(trained):
    model, images = trained
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    x = images[:4]
    with torch.no_grad():  # encode optimises inside, even under an outer no_grad
        enc = model.encode(x, generator=torch.Generator().manual_seed(0))
    assert enc.latent.shape == (4, 8) and not enc.latent.requires_grad
    torch.testing.assert_close(enc.latent.norm(dim=1), torch.ones(4))

    # Nothing in the model moved, and no gradient was left behind.
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n]), n

    with torch.no_grad():
        err_enc = (model.decode(enc.latent).images - x).square().flatten(1).sum(1)
        random = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=1)
        err_random = (model.decode(random).images - x).square().flatten(1).sum(1)
    assert (err_enc < 0.5 * err_random).all(), (err_enc, err_random)
    # The fitted code points where the learned code of that image does.
    cos = (enc.latent * model.codes.weight[:4]).sum(1)
    assert (cos > 0.7).all(), cos


def test_encode_with_no_steps_picks_the_best_restart(trained):
    model, images = trained
    x = images[:4]
    one = model.encode(x, steps=0, restarts=1, generator=torch.Generator().manual_seed(0)).latent
    many = model.encode(x, steps=0, restarts=32, generator=torch.Generator().manual_seed(0)).latent
    loss = lambda z: model.reconstruction_loss(model.decoder(z), x)  # noqa: E731
    with torch.no_grad():
        assert (loss(many) <= loss(one) + 1e-5).all()


def test_sample_draws_from_the_fitted_code_gaussian(trained, tmp_path):
    model, _ = trained
    a = model.sample(5, generator=torch.Generator().manual_seed(0)).images
    b = model.sample(5, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (5, 1, 16, 16) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)
    mean, scale_tril = model.code_distribution()
    codes = model.codes.weight.detach()
    torch.testing.assert_close(mean, codes.mean(0))
    torch.testing.assert_close(scale_tril @ scale_tril.T, torch.cov(codes.T), atol=1e-4, rtol=1e-3)
    z = model.latent_from_noise(torch.zeros(2, 8))
    torch.testing.assert_close(z[0], F.normalize(mean, dim=0))
    noise = torch.randn(2, 8)
    torch.testing.assert_close(model.sample(2, noise=noise).images, model.decode(model.latent_from_noise(noise)).images)

    model.save_pretrained(tmp_path / "glo")
    loaded = PretrainedModel.from_pretrained(tmp_path / "glo")
    assert isinstance(loaded, GLO)
    torch.testing.assert_close(loaded.codes.weight, model.codes.weight)
    torch.testing.assert_close(loaded.sample(5, generator=torch.Generator().manual_seed(0)).images, a)


def test_sample_from_a_mixture_fitted_to_the_learned_codes(trained, tmp_path):
    model, _ = trained
    codes = model.learned_codes()
    assert codes.shape == (N, 8)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(N))
    with pytest.raises(ValueError, match="no such fitted latent sampler"):
        model.sample(2, sampler="gmm")
    model.latent_sampler = GaussianMixtureSampler.fit(codes, GaussianMixtureConfig(components=2, restarts=1))
    try:
        noise, uniform = torch.randn(3, 8), torch.rand(3)
        # Decoded on the sphere like the training codes: decode normalises the mixture's draw.
        expected = model.decode(F.normalize(model.latent_sampler.transform(noise, uniform), dim=1)).images
        torch.testing.assert_close(model.sample(3, noise=noise, uniform=uniform, sampler="gmm").images, expected)
        model.save_pretrained(tmp_path / "glo")
        loaded = PretrainedModel.from_pretrained(tmp_path / "glo")
        torch.testing.assert_close(loaded.sample(3, noise=noise, uniform=uniform, sampler="gmm").images, expected)
        # The prior is still the default.
        torch.testing.assert_close(loaded.sample(2, noise=noise[:2]).images, model.sample(2, noise=noise[:2]).images)
    finally:
        model.latent_sampler = None  # the module fixture is shared


def test_decode_projects_to_the_sphere():
    model = tiny().eval()
    z = torch.randn(3, 4)
    torch.testing.assert_close(model.decode(z).images, model.decode(5 * z).images)


def test_laplacian_loss():
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(laplacian_l1(x, x, 3), torch.zeros(2))
    y = x + 0.1
    # A constant shift lives only in the low-pass level (weight 4^2 on 1/16 of the pixels): the L1 sum.
    torch.testing.assert_close(laplacian_l1(y, x, 3), torch.full((2,), 0.1 * 256), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(laplacian_l1(y, x, 1), (y - x).abs().flatten(1).sum(1))
    model = tiny(loss="laplacian", image_size=28)
    out = model(batch_of(torch.rand(4, 1, 28, 28), torch.arange(4)))
    assert torch.isfinite(out.loss)


def test_validation_step_is_deterministic_and_fits_codes(trained):
    model, images = trained
    batch = batch_of(images, torch.arange(8))
    with torch.no_grad():  # as the training loop calls it
        a = model.validation_step(batch)["recon_mse"]
        b = model.validation_step(batch)["recon_mse"]
        assert torch.equal(a, b)
        random = F.normalize(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)), dim=1)
        baseline = torch.mean((model.decode(random).images - images[:8]) ** 2)
    assert float(a) < float(baseline)
