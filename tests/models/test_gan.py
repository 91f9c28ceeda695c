"""GAN specific behaviour: losses, gradient penalty, spectral norm, EMA generator, phases."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import parametrize

from latentforge.models import MODELS, ConfigError, PretrainedModel, train_step
from latentforge.models.gan import GAN, GANConfig

torch.set_num_threads(1)


def make_batch(n: int = 8, size: int = 16, channels: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, channels, size, size, generator=g),
        "label": torch.full((n,), -1),
        "index": torch.arange(n),
    }


def tiny(**overrides) -> GAN:
    torch.manual_seed(0)
    return GAN(GANConfig.tiny(**overrides))


def test_registered_and_has_no_encoder():
    assert MODELS["gan"] is GAN
    assert GAN.has_encoder is False
    with pytest.raises(NotImplementedError, match="GAN has no encoder"):
        tiny().encode(torch.rand(2, 1, 16, 16))


@pytest.mark.parametrize("loss", ["nonsaturating", "hinge", "wgan-gp"])
def test_each_loss_trains_a_few_steps(loss):
    model = tiny(loss=loss)
    opt = model.configure_optimizers()
    batch = make_batch()
    for step in range(3):
        logs = train_step(model, opt, batch, step)
    assert {"disc/loss", "gen/loss", "disc/d_real", "disc/d_fake"} <= set(logs)
    assert all(math.isfinite(v) for v in logs.values()), logs
    assert ("disc/gp" in logs) == (loss == "wgan-gp")


def test_gradient_penalty_is_positive_and_differentiable():
    model = tiny(loss="wgan-gp")
    real = torch.rand(4, 1, 16, 16)
    fake = model.generator(torch.randn(4, 8)).detach()
    gp = model.gradient_penalty(real, fake)
    assert gp.ndim == 0 and float(gp.detach()) > 0
    assert gp.requires_grad
    gp.backward()
    # Every weight gets a gradient (biases need not: the last one does not change grad_x D).
    weights = [p for n, p in model.discriminator.named_parameters() if "weight" in n]
    assert weights and all(p.grad is not None and torch.isfinite(p.grad).all() for p in weights)
    assert all(float(p.grad.abs().sum()) > 0 for p in weights)
    # The penalty works under an outer no_grad too (evaluation code).
    with torch.no_grad():
        assert float(model.gradient_penalty(real, fake)) > 0


def test_gradient_penalty_enters_the_disc_loss():
    batch = make_batch()
    losses = {}
    for w in (0.0, 10.0):
        model = tiny(loss="wgan-gp", gp_weight=w)
        torch.manual_seed(1)
        out = model(batch, phase="disc")
        losses[w] = (float(out.loss.detach()), float(out.logs["gp"]))
    (l0, gp0), (l10, gp10) = losses[0.0], losses[10.0]
    assert gp0 == pytest.approx(gp10)
    assert l10 - l0 == pytest.approx(10.0 * gp10, rel=1e-4)


@pytest.mark.parametrize("enabled", [True, False])
def test_spectral_norm_on_the_discriminator(enabled, tmp_path):
    model = tiny(spectral_norm=enabled)
    layers = [m for m in model.discriminator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert layers and all(parametrize.is_parametrized(m, "weight") == enabled for m in layers)
    assert not any(parametrize.is_parametrized(m) for m in model.generator.modules())
    opt = model.configure_optimizers()
    for step in range(2):
        train_step(model, opt, make_batch(), step)
    if enabled:
        # The normalised weight has spectral norm ~1 (the power iteration has run a few times).
        w = layers[-1].weight.detach()
        assert float(torch.linalg.matrix_norm(w, ord=2)) == pytest.approx(1.0, abs=0.1)
    model.save_pretrained(tmp_path / "gan")
    loaded = PretrainedModel.from_pretrained(tmp_path / "gan")
    model.eval()
    x = torch.rand(3, 1, 16, 16)
    torch.testing.assert_close(loaded.discriminator(x), model.discriminator(x))


def test_ema_generator_follows_the_live_one_and_survives_save_load(tmp_path):
    model = tiny(ema_decay=0.9)
    assert all(not p.requires_grad for p in model.generator_ema.parameters())
    opt = model.configure_optimizers()
    optimised = {id(p) for o in opt.values() for g in o.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in model.generator_ema.parameters()}

    before = [p.clone() for p in model.generator_ema.parameters()]
    for step in range(5):
        train_step(model, opt, make_batch(seed=step), step)
    ema, live = list(model.generator_ema.parameters()), list(model.generator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(ema, before)), "EMA did not move"
    assert any(not torch.equal(a, b) for a, b in zip(ema, live)), "EMA is a plain copy"
    assert int(model.generator_ema.project[2].num_batches_tracked) == 5  # its own statistics, one refresh a step

    z = torch.randn(4, 8)
    model.eval()
    assert not model.generator_ema.training
    torch.testing.assert_close(model.decode(z).images, model.generator_ema(z))
    assert not torch.allclose(model.decode(z).images, model.generator(z))
    torch.testing.assert_close(model.decode(z, use_ema=False).images, model.generator(z))

    model.save_pretrained(tmp_path / "gan")
    loaded = PretrainedModel.from_pretrained(tmp_path / "gan")
    assert isinstance(loaded, GAN)
    for a, b in zip(loaded.generator_ema.state_dict().values(), model.generator_ema.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert all(not p.requires_grad for p in loaded.generator_ema.parameters())
    torch.testing.assert_close(loaded.decode(z).images, model.decode(z).images)
    model.train()
    assert not model.generator_ema.training  # stays on running statistics


def _first_bn_batch_mean(generator, z):
    """The batch mean of what the first BatchNorm of ``generator`` sees for noise z, (channels,)."""
    seen = []
    handle = generator.project[2].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].mean((0, 2, 3))))
    with torch.no_grad():
        generator.eval()(z)
    handle.remove()
    return seen[0]


def test_ema_batchnorm_statistics_describe_the_ema_weights():
    # A slow average of fast-moving weights: the live generator's statistics would not fit it.
    model = tiny(ema_decay=0.95, lr=5e-3)
    opt = model.configure_optimizers()
    for step in range(60):
        train_step(model, opt, make_batch(seed=step), step)
    model.eval()
    actual = _first_bn_batch_mean(model.generator_ema, torch.randn(2048, 8))
    ema_gap = (model.generator_ema.project[2].running_mean - actual).abs().mean()
    live_gap = (model.generator.project[2].running_mean - actual).abs().mean()
    assert ema_gap < 0.5 * live_gap, (ema_gap, live_gap)


def test_ema_statistics_refresh_is_the_same_on_every_replica():
    states = []
    for seed in (0, 1):  # replicas draw different training noise; the refresh noise is seeded by step
        model = tiny()
        opt = model.configure_optimizers()
        torch.manual_seed(seed)
        for name, p in model.generator.named_parameters():
            p.data.fill_(0.01 if "weight" in name else 0.0)
        model.after_step(3)
        states.append([b.clone() for b in model.generator_ema.buffers()])
    for a, b in zip(*states):
        torch.testing.assert_close(a, b)


def test_phases_update_only_their_network():
    model = tiny()
    opt = model.configure_optimizers()
    for name in ("disc", "gen"):
        assert opt[name].defaults["betas"] == (0.5, 0.999)
    batch = make_batch()
    g0 = [p.clone() for p in model.generator.parameters()]
    d0 = [p.clone() for p in model.discriminator.parameters()]
    opt["disc"].zero_grad()
    model(batch, phase="disc").loss.backward()
    opt["disc"].step()
    assert all(torch.equal(a, b) for a, b in zip(g0, model.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, model.discriminator.parameters()))
    d1 = [p.clone() for p in model.discriminator.parameters()]
    opt["gen"].zero_grad()
    model(batch, phase="gen").loss.backward()
    opt["gen"].step()
    assert all(torch.equal(a, b) for a, b in zip(d1, model.discriminator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g0, model.generator.parameters()))
    with pytest.raises(ValueError, match="phase"):
        model(batch, phase="main")


def test_learning_rates():
    opt = tiny(lr=1e-3).configure_optimizers()
    assert opt["disc"].defaults["lr"] == opt["gen"].defaults["lr"] == 1e-3
    opt = tiny(lr=1e-3, lr_g=5e-4, lr_d=2e-3).configure_optimizers()
    assert opt["gen"].defaults["lr"] == 5e-4 and opt["disc"].defaults["lr"] == 2e-3


@pytest.mark.parametrize("size,channels", [(16, 1), (28, 1), (32, 3), (64, 3)])
def test_sizes_follow_image_size(size, channels):
    model = GAN(GANConfig.tiny(image_size=size, channels=channels)).eval()
    images = model.sample(2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, channels, size, size)
    assert images.min() >= 0 and images.max() <= 1
    assert model.discriminator(images).shape == (2,)


@pytest.mark.parametrize(
    "overrides",
    [{"image_size": 30}, {"image_size": 2}, {"loss": "lsgan"}, {"ema_decay": 1.0}, {"gp_weight": -1.0}, {"lr_d": 0.0},
     {"upsample": "bilinear"}, {"r1_weight": -1.0}, {"disc_batchnorm": True, "loss": "wgan-gp"},
     {"disc_batchnorm": True, "r1_weight": 1.0}],
)
def test_bad_config_is_a_config_error(overrides):
    with pytest.raises(ConfigError):
        GANConfig.tiny(**overrides)


def test_from_dict_accepts_yaml_values():
    config = GANConfig.from_dict({"image_size": 28, "channels": 1, "lr_g": 1, "spectral_norm": True, "loss": "hinge"})
    assert config.lr_g == 1.0 and config.spectral_norm


def test_sample_noise_and_generator():
    model = tiny().eval()
    a = model.sample(3, generator=torch.Generator().manual_seed(0)).images
    b = model.sample(3, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(a, b)
    z = torch.randn(3, 8)
    torch.testing.assert_close(model.sample(3, noise=z).images, model.decode(z).images)
    with pytest.raises(ValueError):
        model.decode(torch.randn(3, 7))


def test_pixel_mmd():
    from latentforge.models.gan import pixel_mmd

    g = torch.Generator().manual_seed(0)
    a = torch.rand(16, 1, 8, 8, generator=g)
    assert float(pixel_mmd(a, a)) == pytest.approx(0.0, abs=1e-6)
    near = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    far = torch.zeros_like(a)
    assert 0 < float(pixel_mmd(a, near)) < float(pixel_mmd(a, far))


def test_validation_step_scores_samples_and_leaves_the_state_alone():
    model = tiny()
    assert model.val_metric == "mmd"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figures = model.validation_step(make_batch())  # even in training mode: only the EMA copy runs
    assert set(figures) == {"mmd", "mean_gap", "diversity"} and all(v.dim() == 0 and torch.isfinite(v) for v in figures.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sample_diversity_is_zero_for_a_collapsed_generator_and_one_for_real_images():
    from latentforge.models.gan import sample_diversity

    g = torch.Generator().manual_seed(0)
    real = torch.rand(32, 3, 8, 8, generator=g)
    other = torch.rand(32, 3, 8, 8, generator=g)
    assert float(sample_diversity(real[:1].expand(32, -1, -1, -1), real)) == pytest.approx(0.0, abs=1e-6)
    assert float(sample_diversity(other, real)) == pytest.approx(1.0, abs=0.05)
    assert float(sample_diversity(other * 0.5, real)) == pytest.approx(0.5, abs=0.05)


def test_validation_diversity_uses_a_fixed_noise_batch():
    model = tiny().eval()
    batch = make_batch()
    torch.manual_seed(1)
    a = model.validation_step(batch)
    torch.manual_seed(2)
    b = model.validation_step(batch)
    assert float(a["diversity"]) == float(b["diversity"]) > 0
    assert float(a["mmd"]) != float(b["mmd"])  # the mmd draws fresh noise


@pytest.mark.parametrize("upsample", ["nearest", "transposed"])
def test_generator_upsampling(upsample):
    model = tiny(upsample=upsample, image_size=32, channels=3).eval()
    kinds = {type(m) for m in model.generator.modules()}
    assert (torch.nn.Upsample in kinds) == (upsample == "nearest")
    assert (torch.nn.ConvTranspose2d in kinds) == (upsample == "transposed")
    images = model.sample(2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_r1_penalty_is_the_squared_gradient_norm_on_real_images():
    model = tiny()
    real = torch.rand(4, 1, 16, 16).requires_grad_(True)
    penalty = GAN.r1_penalty(real, model.discriminator(real))
    (grad,) = torch.autograd.grad(model.discriminator(real).sum(), real)
    assert float(penalty) == pytest.approx(float(grad.square().sum((1, 2, 3)).mean()), rel=1e-5)
    assert penalty.requires_grad  # differentiable w.r.t. the discriminator


def test_r1_weight_enters_the_disc_loss_and_trains():
    batch = make_batch()
    losses = {}
    for w in (0.0, 10.0):
        model = tiny(r1_weight=w)
        torch.manual_seed(1)
        out = model(batch, phase="disc")
        losses[w] = (float(out.loss.detach()), out.logs)
    assert "r1" not in losses[0.0][1]
    assert losses[10.0][0] - losses[0.0][0] == pytest.approx(5.0 * float(losses[10.0][1]["r1"]), abs=1e-6)
    model = tiny(r1_weight=10.0)
    opt = model.configure_optimizers()
    for step in range(3):
        logs = train_step(model, opt, make_batch(seed=step), step)
    assert "disc/r1" in logs and all(math.isfinite(v) for v in logs.values())


def test_disc_batchnorm_normalises_every_conv_but_the_first_and_trains():
    model = tiny(disc_batchnorm=True)
    norms = [m for m in model.discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in model.discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(norms) == len(convs) - 1 and convs[0].bias is not None and all(c.bias is None for c in convs[1:])
    opt = model.configure_optimizers()
    for step in range(3):
        logs = train_step(model, opt, make_batch(seed=step), step)
    assert all(math.isfinite(v) for v in logs.values())


def _conv_output_dtypes(module: torch.nn.Module) -> tuple[list[torch.dtype], list]:
    """The dtypes of every conv output of ``module`` from now on, and the hook handles to remove."""
    seen: list[torch.dtype] = []
    handles = [m.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
               for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    return seen, handles


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_cpu_bf16_autocasts_the_training_passes_only(cpu_bf16):
    model = tiny(cpu_bf16=cpu_bf16, upsample="nearest")
    opt = model.configure_optimizers()
    seen, handles = _conv_output_dtypes(model)
    for step in range(3):
        logs = train_step(model, opt, make_batch(seed=step), step)
    trained = list(seen)
    model.eval()
    seen.clear()
    images = model.sample(2, generator=torch.Generator().manual_seed(0)).images
    for h in handles:
        h.remove()
    # Both networks and the EMA copy's statistics refresh ran convs; all in bf16 when asked for.
    assert len(trained) > 0 and set(trained) == {torch.bfloat16 if cpu_bf16 else torch.float32}
    assert all(math.isfinite(v) for v in logs.values()), logs
    assert set(seen) == {torch.float32} and images.dtype == torch.float32  # sampling stays float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for o in opt.values() for s in o.state.values())
