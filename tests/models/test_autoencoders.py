"""Behaviour specific to the classic autoencoders (models/autoencoders.py); the shared contract is in
test_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA
from torch import nn

from latentforge.models import MODELS, ConfigError, train_step
from latentforge.models.autoencoders import (
    AEConfig,
    ConvAEConfig,
    ConvAutoEncoder,
    DenoisingAEConfig,
    DenoisingAutoEncoder,
    LinearAEConfig,
    LinearAutoEncoder,
    LSTMAEConfig,
    LSTMAutoEncoder,
    MLPAEConfig,
    TiedAEConfig,
    TiedAutoEncoder,
)
from latentforge.models.blocks import RunningGaussian, reconstruction_loss
from latentforge.models.samplers import GaussianMixtureConfig, fit_latent_sampler

AUTOENCODERS = ["ae", "mlp_ae", "conv_ae", "sparse_ae", "denoising_ae", "tied_ae", "lstm_ae", "linear_ae"]


def fit(model, batch, steps: int, seed: int = 0) -> list[dict[str, float]]:
    optimizers = model.configure_optimizers()
    torch.manual_seed(seed)
    return [train_step(model, optimizers, batch, step) for step in range(steps)]


def as_batch(images: torch.Tensor) -> dict[str, torch.Tensor]:
    n = images.shape[0]
    return {"image": images, "label": torch.full((n,), -1), "index": torch.arange(n)}


def test_all_registered():
    for name in AUTOENCODERS:
        assert name in MODELS


@pytest.mark.parametrize("name", AUTOENCODERS)
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_default_configs_fit_mnist_and_cifar_sizes(name, size, channels):
    cls = MODELS[name]
    model = cls(cls.config_class(image_size=size, channels=channels)).eval()
    images = torch.rand(2, channels, size, size)
    with torch.no_grad():
        latent = model.encode(images).latent
        assert model.decode(latent).images.shape == images.shape


# ----------------------------------------------------------------------------------------------------
# Linear AE = PCA


def test_linear_ae_learns_the_pca_subspace():
    # 16-dim "images" (4x4, in [0, 1]) with a clear spectrum: three strong directions, weak isotropic noise.
    g = torch.Generator().manual_seed(0)
    d, k, n = 16, 3, 512
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    scales = 0.15 * torch.tensor([1.0, 0.6, 0.4] + [0.03] * (d - k))
    data = 0.5 + (torch.randn(n, d, generator=g) * scales) @ basis.T
    assert 0.0 <= float(data.min()) and float(data.max()) <= 1.0

    torch.manual_seed(0)
    model = LinearAutoEncoder(LinearAEConfig(image_size=4, channels=1, latent_dim=k, lr=1e-2))
    logs = fit(model, as_batch(data.view(n, 1, 4, 4)), steps=400)  # Adam, full batch

    pca = PCA(n_components=k).fit(data.numpy())
    learned = model.principal_subspace().double().numpy()
    angles = subspace_angles(learned, pca.components_.T.astype(np.float64))
    assert angles.max() < 0.05, f"principal angles {angles}"
    pca_mse = float(((pca.inverse_transform(pca.transform(data.numpy())) - data.numpy()) ** 2).mean())
    assert logs[-1]["loss"] < 1.5 * pca_mse


def test_linear_ae_is_affine():
    model = MODELS["linear_ae"](LinearAEConfig.tiny())
    kinds = {type(m) for m in model.modules()} - {LinearAutoEncoder, RunningGaussian, nn.Sequential}
    assert kinds == {nn.Linear, nn.Flatten, nn.Unflatten}
    fit(model, as_batch(torch.rand(8, 1, 16, 16)), steps=2)  # a non-zero input mean
    model.eval()
    x, y = torch.rand(2, 4, 1, 16, 16)
    with torch.no_grad():
        mix = model.encode(0.3 * x + 0.7 * y).latent
        assert torch.allclose(mix, 0.3 * model.encode(x).latent + 0.7 * model.encode(y).latent, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Tied weights


def test_tied_ae_has_no_decoder_weights():
    config = TiedAEConfig.tiny(hidden_dims=(32, 16), latent_dim=8)
    model = TiedAutoEncoder(config)
    names = [n for n, _ in model.named_parameters()]
    matrices = [n for n, p in model.named_parameters() if p.dim() > 1]
    assert all(n.startswith("encoder.") for n in matrices), matrices
    assert not any(n.startswith("decoder") and "weight" in n for n in names), names
    # Half the matrices of the untied twin; the decoder only adds one bias vector per layer.
    untied = MODELS["mlp_ae"](MLPAEConfig.tiny(hidden_dims=(32, 16), latent_dim=8))
    sizes = [256, 32, 16, 8]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in untied.parameters()) - sum(
        a * b for a, b in zip(sizes[:-1], sizes[1:])
    )


def test_tied_ae_decodes_with_transposed_encoder_weights():
    model = TiedAutoEncoder(TiedAEConfig.tiny(hidden_dims=(32,), latent_dim=8))
    z = torch.rand(3, 8)
    (w1, w2), (c1, c2) = [layer.weight for layer in model.encoder], list(model.decoder_biases)
    expected = torch.sigmoid(F.linear(torch.relu(F.linear(z, w2.t(), c1)), w1.t(), c2)).view(3, 1, 16, 16)
    assert torch.allclose(model.decode(z).images, expected, atol=1e-6)
    model.decode(z).images.sum().backward()  # the decoder path trains the encoder's matrices
    assert model.encoder[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# Sparse


def test_sparse_penalty_makes_codes_sparser(tiny_model, batch_for):
    batch = batch_for(MODELS["sparse_ae"].config_class.tiny(), n=16)
    stats = {}
    for weight in (0.0, 2e-3):
        model = tiny_model("sparse_ae", sparsity_weight=weight)
        logs = fit(model, batch, steps=100)
        model.eval()
        with torch.no_grad():
            codes = model.encode(batch["image"]).latent
        stats[weight] = (float((codes > 0).float().mean()), float(codes.abs().sum(1).mean()), logs[-1]["recon"])
    (active0, l1_0, recon0), (active1, l1_1, recon1) = stats[0.0], stats[2e-3]
    assert active1 < 0.8 * active0 and l1_1 < 0.8 * l1_0, stats
    assert active1 > 0 and recon1 < 1.2 * recon0, stats  # sparser, not dead


def test_sparse_loss_adds_the_weighted_l1(tiny_model, batch_for):
    model = tiny_model("sparse_ae", sparsity_weight=0.5).eval()
    out = model(batch_for(model.config))
    assert torch.allclose(out.loss, out.logs["recon"] + 0.5 * out.logs["l1"])


# ----------------------------------------------------------------------------------------------------
# Denoising


@pytest.mark.parametrize("corruption,level", [("gaussian", 0.5), ("masking", 0.3)])
def test_denoising_corrupts_only_in_training(corruption, level, batch_for):
    torch.manual_seed(0)
    model = DenoisingAutoEncoder(DenoisingAEConfig.tiny(corruption=corruption, noise_level=level))
    batch = batch_for(model.config)
    x = batch["image"]
    clean = reconstruction_loss(model.decoder(model.encoder(x)), x, "bce")

    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(batch).loss
        torch.manual_seed(2)
        b = model(batch).loss
        assert torch.equal(a, b) and torch.allclose(a, clean)
        assert torch.equal(model.encode(x).latent, model.encoder(x))

    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        train_loss = model(batch).loss
        torch.manual_seed(1)
        corrupted = model.corrupt(x)
        # The corrupted input is encoded, the clean image is the target.
        expected = reconstruction_loss(model.decoder(model.encoder(corrupted)), x, "bce")
        assert torch.allclose(train_loss, expected) and not torch.allclose(train_loss, clean)
        torch.manual_seed(2)
        assert not torch.equal(model(batch).loss, train_loss)
        assert torch.equal(model.encode(x).latent, model.encoder(x))  # encode never corrupts


def test_corruption_kinds():
    model = DenoisingAutoEncoder(DenoisingAEConfig.tiny(corruption="masking", noise_level=0.3))
    x = torch.full((64, 1, 16, 16), 0.5)
    masked = model.corrupt(x, generator=torch.Generator().manual_seed(0))
    assert set(masked.unique().tolist()) == {0.0, 0.5}
    assert abs(float((masked == 0).float().mean()) - 0.3) < 0.02

    model = DenoisingAutoEncoder(DenoisingAEConfig.tiny(corruption="gaussian", noise_level=0.2))
    noisy = model.corrupt(x, generator=torch.Generator().manual_seed(0))
    assert 0.0 <= float(noisy.min()) and float(noisy.max()) <= 1.0
    assert abs(float((noisy - x).std()) - 0.2) < 0.02


# ----------------------------------------------------------------------------------------------------
# LSTM sequence AE


def test_lstm_ae_encodes_any_series():
    torch.manual_seed(0)
    model = LSTMAutoEncoder(LSTMAEConfig.tiny()).eval()  # F = 1 * 16
    for steps in (1, 10, 40):
        series = torch.rand(4, steps, 16)
        with torch.no_grad():
            latent = model.encode_sequence(series).latent
            out = model.decode_sequence(latent, steps)
        assert latent.shape == (4, 8)
        assert out.shape == (4, steps, 16) and 0 <= float(out.min()) and float(out.max()) <= 1
    with pytest.raises(ValueError, match="series"):
        model.encode_sequence(torch.rand(4, 10, 15))


def test_lstm_ae_reads_images_as_rows():
    torch.manual_seed(0)
    model = LSTMAutoEncoder(LSTMAEConfig.tiny(channels=2)).eval()  # T = 16 rows of F = 2 * 16
    images = torch.rand(3, 2, 16, 16)
    rows = torch.cat([images[:, 0], images[:, 1]], dim=2)  # row h = channel 0's row h, then channel 1's
    with torch.no_grad():
        latent = model.encode(images).latent
        assert torch.allclose(latent, model.encode_sequence(rows).latent)
        decoded = model.decode_sequence(latent, 16)
        assert torch.allclose(model.decode(latent).images, torch.stack(decoded.split(16, dim=2), dim=1))


def test_lstm_ae_trains_on_a_series():
    # The sequence path is differentiable end to end: fit six (T=12, F=4) curves that differ by their
    # amplitude, until the model clearly beats the best constant prediction (the series' variance). An
    # LSTM autoencoder first sits a few dozen steps on that constant: hence 150 steps.
    torch.manual_seed(0)
    model = LSTMAutoEncoder(LSTMAEConfig.tiny(image_size=4, channels=1))
    t = torch.linspace(0, 1, 12).view(1, 12, 1)
    amplitude = torch.linspace(-0.4, 0.4, 6).view(6, 1, 1)
    series = 0.5 + amplitude * torch.sin(6.28 * t * torch.arange(1, 5).view(1, 1, 4))  # (6, 12, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        loss = F.mse_loss(model.decode_sequence(model.encode_sequence(series).latent, 12), series)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * float(series.var()), losses[::10]


# ----------------------------------------------------------------------------------------------------
# Overcomplete codes, sampling, configs


@pytest.mark.parametrize("name", ["ae", "sparse_ae", "denoising_ae", "tied_ae"])
def test_overcomplete_builds_and_trains(name, tiny_model, batch_for):
    model = tiny_model(name, latent_dim=400)  # > 16 * 16 inputs
    batch = batch_for(model.config)
    losses = [logs["recon"] for logs in fit(model, batch, steps=30)]
    assert model.encode(batch["image"]).latent.shape == (8, 400)
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_sample_draws_from_the_training_codes(name, tiny_model, batch_for):
    model = tiny_model(name)
    batch = batch_for(model.config)
    assert int(model.codes.batches) == 0
    fit(model, batch, steps=3)
    assert int(model.codes.batches) == 3
    model.eval()
    with torch.no_grad():
        model(batch)  # eval forward leaves the statistics alone
        assert int(model.codes.batches) == 3
        mean = model.codes.mean.clone().unsqueeze(0)
        # Zero noise decodes the mean code (clipped to the code activation's range); noise is (n, latent_dim).
        zero = model.sample(1, noise=torch.zeros(2, *model.codes.shape)).images
        act = getattr(model.config, "activation", "identity")
        expected = model.decode(mean.clamp_min(0) if act == "relu" else mean).images
        assert zero.shape[0] == 2 and torch.allclose(zero, expected.expand_as(zero), atol=1e-6)
        with pytest.raises(ValueError, match="noise"):
            model.sample(2, noise=torch.zeros(2, 3))


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_sample_from_a_fitted_latent_sampler(name, tiny_model, batch_for):
    model = tiny_model(name)
    batch = batch_for(model.config)
    fit(model, batch, steps=2)
    model.eval()
    assert model.latent_shape == (model.config.latent_dim,)
    with pytest.raises(ValueError, match="no such fitted latent sampler"):
        model.sample(2, sampler="gmm")
    model.latent_sampler = fit_latent_sampler(model, batch["image"], GaussianMixtureConfig(components=2, restarts=1))
    d = model.config.latent_dim
    noise, uniform = torch.randn(3, d), torch.rand(3)
    with torch.no_grad():
        expected = model.decode(model.latent_sampler.transform(noise, uniform)).images
    torch.testing.assert_close(model.sample(3, noise=noise, uniform=uniform, sampler="gmm").images, expected)
    draw = model.sample(2, generator=torch.Generator().manual_seed(0), sampler="gmm").images
    assert draw.shape == (2, *batch["image"].shape[1:])
    with pytest.raises(ValueError, match="uniform is only used"):
        model.sample(2, uniform=torch.rand(2))


def test_running_code_statistics():
    stats = RunningGaussian((2,), momentum=0.1)
    a, b = torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.tensor([[4.0, 5.0], [6.0, 7.0]])
    stats.update(a)
    assert torch.allclose(stats.mean, torch.tensor([1.0, 2.0])) and torch.allclose(stats.var, torch.ones(2))
    stats.update(b)  # the second batch still averages exactly (1/2 > momentum)
    assert torch.allclose(stats.mean, torch.tensor([3.0, 4.0]))
    g = torch.Generator().manual_seed(0)
    draws = stats.sample(20000, generator=g)
    assert torch.allclose(draws.mean(0), stats.mean, atol=0.05) and torch.allclose(draws.var(0), stats.var, atol=0.05)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConvAEConfig(image_size=28, widths=(8, 16, 32)),  # 28 is not divisible by 8
        lambda: DenoisingAEConfig(corruption="masking", noise_level=1.0),
        lambda: DenoisingAEConfig(corruption="salt"),
        lambda: AEConfig(loss="l1"),
        lambda: AEConfig(activation="swish"),
        lambda: MLPAEConfig(hidden_dims=()),
        lambda: MLPAEConfig(hidden_dims=(64, 0)),
        lambda: ConvAEConfig(res_blocks=-1),
        lambda: AEConfig.from_dict({"latent_dim": "32"}),
        lambda: AEConfig.from_dict({"latent_dims": 32}),
    ],
)
def test_family_specific_bad_configs(make):
    with pytest.raises(ConfigError):
        make()


def test_bad_inputs_are_refused_with_a_clear_message():
    model = ConvAutoEncoder(ConvAEConfig.tiny()).eval()
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        model.encode(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        model.decode(torch.rand(2, 9))
    with pytest.raises(ValueError, match="phases"):
        model(as_batch(torch.rand(2, 1, 16, 16)), phase="disc")


def test_lstm_ae_takes_series_windows():
    # seq_len > 0: (B, T, F) windows in, through forward (a batch's "series"), validation and reconstruct_series.
    model = LSTMAutoEncoder(LSTMAEConfig.tiny(seq_len=10, features=3)).eval()
    windows = torch.rand(4, 10, 3)
    assert model.reconstruct_series(windows).shape == (4, 10, 3)
    assert model.encode(windows).latent.shape == (4, 8) and model.decode(torch.zeros(2, 8)).images.shape == (2, 10, 3)
    assert float(model({"series": windows}).loss.detach()) > 0 and set(model.validation_step({"series": windows})) == {"recon_mse"}
    with pytest.raises(ValueError, match=r"expected float windows of shape \(B, 10, 3\)"):
        model.reconstruct_series(torch.rand(4, 10, 2))
    with pytest.raises(ConfigError, match="seq_len and features"):
        LSTMAEConfig.tiny(seq_len=10)
    with pytest.raises(ValueError, match="reads images"):
        LSTMAutoEncoder(LSTMAEConfig.tiny()).reconstruct_series(windows)
