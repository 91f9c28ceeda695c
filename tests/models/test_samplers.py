"""The ex-post Gaussian-mixture latent sampler (models/samplers.py) and the model hook that carries it."""

from __future__ import annotations

import math

import pytest
import torch

from latentforge.models import ConfigError, PretrainedModel
from latentforge.models.samplers import GaussianMixtureConfig, GaussianMixtureSampler, fit_latent_sampler
from latentforge.models.vae import VAE, VAEConfig

torch.set_num_threads(1)

# A well-separated 2-D mixture: three components with distinct weights, means and (full) covariances.
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
MEANS = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
SCALE_TRIL = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.5, 0.0], [0.0, 1.5]], [[1.0, 0.0], [-0.8, 0.6]]])


def constructed(config: GaussianMixtureConfig | None = None) -> GaussianMixtureSampler:
    """The mixture above, set by hand (not fitted)."""
    sampler = GaussianMixtureSampler(config or GaussianMixtureConfig(components=3), dim=2)
    sampler.weights.copy_(WEIGHTS)
    sampler.means.copy_(MEANS)
    sampler.scale_tril.copy_(SCALE_TRIL)
    return sampler


def draws(n: int, seed: int = 0) -> torch.Tensor:
    return constructed().sample(n, torch.Generator().manual_seed(seed))


def nearest_component(z: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z, MEANS).argmin(1)


def test_sample_follows_the_constructed_mixture():
    z = draws(20000)
    assert z.shape == (20000, 2)
    which = nearest_component(z)
    freq = torch.bincount(which, minlength=3).float() / len(z)
    assert torch.allclose(freq, WEIGHTS, atol=0.02)
    for k in range(3):
        members = z[which == k]
        assert torch.allclose(members.mean(0), MEANS[k], atol=0.1)
        cov = torch.cov(members.T)
        assert torch.allclose(cov, SCALE_TRIL[k] @ SCALE_TRIL[k].T, atol=0.15)


def test_transform_matches_sample():
    sampler = constructed()
    g = torch.Generator().manual_seed(3)
    # The same noise and uniform that sample() draws give the same latents through transform().
    noise, uniform = torch.randn(500, 2, generator=g), torch.rand(500, generator=g)
    assert torch.equal(sampler.transform(noise, uniform), sampler.sample(500, torch.Generator().manual_seed(3)))
    # Independent noise through transform follows the same distribution as sample's draws.
    g = torch.Generator().manual_seed(11)
    z = sampler.transform(torch.randn(20000, 2, generator=g), torch.rand(20000, generator=g))
    freq = torch.bincount(nearest_component(z), minlength=3).float() / len(z)
    assert torch.allclose(freq, WEIGHTS, atol=0.02)
    assert torch.allclose(z.mean(0), draws(20000, seed=5).mean(0), atol=0.15)


def test_transform_picks_components_by_cumulative_weight():
    sampler = constructed()
    zero = torch.zeros(6, 2)
    uniform = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.8, 0.999999])
    z = sampler.transform(zero, uniform)  # zero noise: each latent is its component's mean
    assert torch.equal(z, MEANS[torch.tensor([0, 0, 1, 1, 2, 2])])


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_fit_recovers_the_mixture_and_is_deterministic(covariance):
    data = draws(3000, seed=1)
    config = GaussianMixtureConfig(components=3, covariance=covariance, seed=7)
    fitted = GaussianMixtureSampler.fit(data, config)
    order = nearest_component(fitted.means)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(fitted.weights, WEIGHTS[order], atol=0.03)
    assert torch.allclose(fitted.means, MEANS[order], atol=0.15)
    if covariance == "diag":
        assert torch.equal(fitted.scale_tril, torch.diag_embed(torch.diagonal(fitted.scale_tril, dim1=1, dim2=2)))
    else:
        covs = fitted.scale_tril @ fitted.scale_tril.transpose(1, 2)
        truth = SCALE_TRIL[order] @ SCALE_TRIL[order].transpose(1, 2)
        assert torch.allclose(covs, truth, rtol=0.1, atol=0.1)
    # The fit beats a single Gaussian on the data it saw.
    single = GaussianMixtureSampler.fit(data, GaussianMixtureConfig(components=1, covariance=covariance))
    assert fitted.log_prob(data).mean() > single.log_prob(data).mean() + 0.5

    again = GaussianMixtureSampler.fit(data, config)
    assert torch.equal(again.means, fitted.means) and torch.equal(again.scale_tril, fitted.scale_tril)
    a = fitted.sample(64, torch.Generator().manual_seed(0))
    b = again.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert not torch.equal(a, again.sample(64, torch.Generator().manual_seed(1)))


def test_log_prob_matches_torch_distributions():
    sampler = constructed()
    z = draws(50, seed=2)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=WEIGHTS),
        torch.distributions.MultivariateNormal(MEANS, scale_tril=SCALE_TRIL),
    )
    assert torch.allclose(sampler.log_prob(z), mix.log_prob(z), atol=1e-4)


def test_regularised_covariance_on_collinear_latents():
    # Latents on a line in 3-D: the sample covariance is singular; the regularised one is not.
    t = torch.linspace(-1, 1, 200).unsqueeze(1)
    data = torch.cat([t, 2 * t, -t], 1)
    fitted = GaussianMixtureSampler.fit(data, GaussianMixtureConfig(components=2))
    assert torch.isfinite(fitted.scale_tril).all()
    assert bool((torch.diagonal(fitted.scale_tril, dim1=1, dim2=2) > 0).all())
    assert torch.isfinite(fitted.sample(10, torch.Generator().manual_seed(0))).all()


def test_save_load_round_trip(tmp_path):
    fitted = GaussianMixtureSampler.fit(draws(600), GaussianMixtureConfig(components=3, covariance="diag", restarts=2))
    fitted.save(tmp_path / "gmm")
    loaded = GaussianMixtureSampler.load(tmp_path / "gmm")
    assert loaded.config == fitted.config and loaded.dim == 2
    for name in ("weights", "means", "scale_tril"):
        assert torch.equal(getattr(loaded, name), getattr(fitted, name))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(loaded.sample(32, g1), fitted.sample(32, g2))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"components": 0}, "components must be >= 1"),
        ({"restarts": 0}, "restarts must be >= 1"),
        ({"covariance": "spherical"}, "covariance must be one of full, diag"),
        ({"reg_covar": 0.0}, "reg_covar must be > 0"),
        ({"components": "ten"}, "components must be of type int"),
    ],
)
def test_bad_config_raises(fields, message):
    with pytest.raises(ConfigError, match=message):
        GaussianMixtureConfig(**fields)


def test_unknown_config_field_raises():
    with pytest.raises(ConfigError, match="unknown field"):
        GaussianMixtureConfig.from_dict({"n_components": 3})


def test_bad_shapes_raise():
    sampler = constructed()
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        GaussianMixtureSampler.fit(torch.zeros(10), GaussianMixtureConfig(components=2))
    with pytest.raises(ValueError, match="need N >= components"):
        GaussianMixtureSampler.fit(torch.zeros(2, 3), GaussianMixtureConfig(components=5))
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixtureSampler.fit(torch.full((10, 2), math.nan), GaussianMixtureConfig(components=2))
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        sampler.transform(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="uniform must be a float"):
        sampler.transform(torch.zeros(4, 2), torch.zeros(5))
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        sampler.sample(0)


# ----------------------------------------------------------------------------------------------------
# The model hook: model.latent_sampler, sample(sampler="gmm"), the sampler/ folder


def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig.tiny()).eval()


def fitted_vae() -> VAE:
    model = tiny_vae()
    images = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model.latent_sampler = fit_latent_sampler(model, images, GaussianMixtureConfig(components=3, restarts=1))
    return model


def test_model_samples_from_the_fitted_sampler():
    model = fitted_vae()
    assert model.latent_sampler.dim == model.config.latent_dim
    images = model.sample(6, torch.Generator().manual_seed(0), sampler="gmm").images
    assert images.shape == (6, 1, 16, 16)
    again = model.sample(6, torch.Generator().manual_seed(0), sampler="gmm").images
    assert torch.equal(images, again)
    # noise and uniform as inputs (what an exported graph takes) give transform's latents, decoded.
    noise, uniform = torch.randn(3, 4), torch.tensor([0.1, 0.5, 0.9])
    expected = model.decode(model.latent_sampler.transform(noise, uniform)).images
    assert torch.equal(model.sample(3, noise=noise, uniform=uniform, sampler="gmm").images, expected)
    # The latent sampler is not part of the state dict: the weights file is the same with or without one.
    assert not any(k.startswith("latent_sampler") for k in model.state_dict())


def test_model_without_sampler_refuses_gmm():
    model = tiny_vae()
    assert model.latent_sampler is None
    with pytest.raises(ValueError, match="no such fitted latent sampler"):
        model.sample(2, sampler="gmm")
    with pytest.raises(ValueError, match="no such fitted latent sampler"):
        fitted_vae().sample(2, sampler="flow")


def test_sampler_of_the_wrong_dim_is_refused():
    model = tiny_vae()
    with pytest.raises(ValueError, match="does not fit this model's latent shape"):
        model.latent_sampler = constructed()  # dim 2, the tiny VAE's latent is 4
    with pytest.raises(ValueError, match="must be a fitted sampler"):
        model.latent_sampler = torch.nn.Linear(4, 4)


def test_save_pretrained_carries_the_sampler(tmp_path):
    model = fitted_vae()
    model.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "sampler" / "config.json").is_file()
    loaded = PretrainedModel.from_pretrained(tmp_path / "vae")
    assert isinstance(loaded.latent_sampler, GaussianMixtureSampler)
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert torch.equal(loaded.sample(4, g1, sampler="gmm").images, model.sample(4, g2, sampler="gmm").images)

    tiny_vae().save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "sampler").exists()
    assert PretrainedModel.from_pretrained(tmp_path / "plain").latent_sampler is None
