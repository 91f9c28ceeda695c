"""DCGAN-style GAN (Radford et al. 2016) with a choice of loss and an EMA generator.

Generator: z (B, latent_dim) ~ N(0, I) -> linear -> small feature map -> per stage a 2x upsampling
(``upsample="transposed"``: a stride-2 transposed conv; ``"nearest"``: nearest-neighbour resize then a 3x3
conv, which avoids the transposed conv's checkerboard, plus a last 3x3 conv at full resolution) with
BatchNorm + ReLU -> tanh, mapped to [0, 1] inside the model. Discriminator: stride-2 convs with LeakyReLU,
optionally spectrally normalised (Miyato et al. 2018), and optionally with DCGAN's BatchNorm after every conv
but the first (``disc_batchnorm``; real and generated images go through it in separate batches, as in DCGAN).
BatchNorm couples the samples of a batch, which breaks the per-sample gradient penalties (WGAN-GP, R1), so
it is refused with them.

Losses (``loss``): ``"nonsaturating"`` (the original GAN with the -log D(G(z)) generator loss),
``"hinge"`` (Lim & Ye 2017; Miyato et al. 2018) and ``"wgan-gp"`` (Gulrajani et al. 2017, penalty weight
``gp_weight``). Any of them can add the R1 penalty on real images (Mescheder et al. 2018,
``r1_weight``), which keeps a discriminator from winning outright. Each step is two phases, ``"disc"`` then ``"gen"``, each with its own Adam.

An exponential moving average of the generator's weights (``generator_ema``) is updated in
:meth:`GAN.after_step`; ``decode``/``sample`` use it in eval mode, where it usually gives better samples
than the live generator. It is a frozen submodule, so it is saved and loaded with the rest.

A GAN has no encoder: ``has_encoder = False`` and :meth:`GAN.encode` raises ``NotImplementedError``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from latentforge.models.base import (
    ConfigError,
    DecoderOutput,
    EncoderOutput,
    LossOutput,
    ModelConfig,
    PretrainedModel,
    require_choice,
    require_positive,
)
from latentforge.models.blocks import (
    check_images,
    check_latent,
    check_phase,
    spatial_plan,
    stage_widths,
    standard_normal,
)

LOSSES = ("nonsaturating", "hinge", "wgan-gp")
UPSAMPLES = ("nearest", "transposed")
EMA_STATS_BATCH = 64  # noise draws per step that refresh the EMA generator's BatchNorm statistics


@dataclass
class GANConfig(ModelConfig):
    """DCGAN. ``image_size`` must be b * 2**n with b in 3..7 (16, 28, 32, 64 ...).

    ``gen_channels`` / ``disc_channels``: width of the last generator / first discriminator stage (doubled
    per stage towards the latent end, capped at 8x). ``lr_g`` / ``lr_d``: per-phase learning rates
    (``None`` = ``lr``); both Adams use ``betas=(beta1, beta2)``. ``ema_decay``: decay of the EMA
    generator (0 = a plain copy of the live one). ``upsample``: ``"transposed"`` (DCGAN) or ``"nearest"``
    (resize + 3x3 conv). ``r1_weight``: gamma of the R1 penalty gamma/2 * E||grad_x D(x)||^2 on real
    images (0 = off). ``disc_batchnorm``: BatchNorm after every discriminator conv but the first (DCGAN).
    ``cpu_bf16``: run the training passes (both phases and the EMA statistics refresh) under bfloat16
    autocast when the model is on CPU; weights, optimiser states, losses and sampling stay float32.
    """

    latent_dim: int = 100
    gen_channels: int = 64
    disc_channels: int = 64
    loss: str = "nonsaturating"
    gp_weight: float = 10.0
    spectral_norm: bool = False
    lr_g: float | None = None
    lr_d: float | None = None
    beta1: float = 0.5
    beta2: float = 0.999
    ema_decay: float = 0.999
    upsample: str = "transposed"
    r1_weight: float = 0.0
    disc_batchnorm: bool = False
    cpu_bf16: bool = False

    def validate(self) -> None:
        super().validate()
        require_positive(self, "latent_dim", "gen_channels", "disc_channels")
        require_choice(self, "loss", LOSSES)
        require_choice(self, "upsample", UPSAMPLES)
        for name in ("gp_weight", "r1_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{type(self).__name__}.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.disc_batchnorm and (self.loss == "wgan-gp" or self.r1_weight > 0):
            raise ConfigError(f"{type(self).__name__}.disc_batchnorm couples the samples of a batch, which breaks the "
                              f"per-sample gradient penalty of loss='wgan-gp' and r1_weight > 0; use one or the other")
        for name in ("lr_g", "lr_d"):
            if getattr(self, name) is not None:
                require_positive(self, name)
        for name in ("beta1", "beta2", "ema_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{type(self).__name__}.{name} must be in [0, 1), got {value!r}")
        spatial_plan(self)

    @classmethod
    def tiny(cls, **overrides: Any) -> "GANConfig":
        return cls(
            **{"image_size": 16, "channels": 1, "latent_dim": 8, "gen_channels": 8, "disc_channels": 8, **overrides}
        )


class Generator(nn.Module):
    """(B, latent_dim) -> (B, C, H, W) in [0, 1]."""

    def __init__(self, config: GANConfig):
        super().__init__()
        stages, base = spatial_plan(config)
        widths = stage_widths(config.gen_channels, stages)[::-1]
        self.base, self.top = base, widths[0]
        self.project = nn.Sequential(
            nn.Linear(config.latent_dim, widths[0] * base * base, bias=False),
            nn.Unflatten(1, (widths[0], base, base)),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        if config.upsample == "transposed":
            for w_in, w_out in zip(widths, widths[1:]):
                layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU()]
            layers += [nn.ConvTranspose2d(widths[-1], config.channels, 4, 2, 1)]
        else:
            for w_in, w_out in zip(widths, widths[1:] + widths[-1:]):
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(w_in, w_out, 3, 1, 1, bias=False)]
                layers += [nn.BatchNorm2d(w_out), nn.ReLU()]
            layers += [nn.Conv2d(widths[-1], config.channels, 3, 1, 1)]
        self.convs = nn.Sequential(*layers, nn.Tanh())
        _dcgan_init(self)

    def forward(self, z: Tensor) -> Tensor:
        return (self.convs(self.project(z)) + 1.0) * 0.5


class Discriminator(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B,) real/fake logits (critic scores for WGAN-GP)."""

    def __init__(self, config: GANConfig):
        super().__init__()
        stages, base = spatial_plan(config)
        widths = stage_widths(config.disc_channels, stages)
        sn = _spectral_norm if config.spectral_norm else (lambda m: m)
        layers: list[nn.Module] = []
        in_ch = config.channels
        for i, w in enumerate(widths):
            norm = [nn.BatchNorm2d(w)] if config.disc_batchnorm and i > 0 else []
            layers += [sn(nn.Conv2d(in_ch, w, 4, 2, 1, bias=not norm)), *norm, nn.LeakyReLU(0.2)]
            in_ch = w
        layers += [nn.Flatten(), sn(nn.Linear(in_ch * base * base, 1))]
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2.0 - 1.0).squeeze(1)


def pixel_mmd(a: Tensor, b: Tensor, scales: tuple[float, ...] = (0.01, 0.05, 0.2)) -> Tensor:
    """Biased squared MMD between image sets a (N, C, H, W) and b (M, C, H, W), a scalar >= 0.

    The kernel is a sum of RBFs on the mean squared pixel difference, exp(-msd / s) for s in ``scales``:
    fixed bandwidths (not the median heuristic) so that scores of different checkpoints compare.
    """
    x = torch.cat([a.flatten(1), b.flatten(1)])
    msd = torch.cdist(x, x).square() / x.shape[1]
    k = sum(torch.exp(-msd / s) for s in scales)
    n = a.shape[0]
    return (k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()).clamp(min=0)


def sample_diversity(samples: Tensor, real: Tensor) -> Tensor:
    """Mean pairwise L2 distance within ``samples`` (N, C, H, W) over that within ``real`` (M, C, H, W),
    a scalar >= 0: ~1 when the samples vary as much as real images, 0 for N copies of one image."""
    spread = [torch.pdist(x.flatten(1).float()).mean() if len(x) > 1 else x.new_zeros(()) for x in (samples, real)]
    return spread[0] / spread[1].clamp(min=1e-8)


def _dcgan_init(module: nn.Module) -> None:
    # DCGAN's N(0, 0.02) init; BatchNorm scales N(1, 0.02). Spectral norm wraps the weight, so its
    # "original" tensor is what gets initialised there.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class GAN(PretrainedModel):
    """DCGAN with non-saturating, hinge or WGAN-GP loss and an EMA generator. Latent: (B, latent_dim)."""

    config_class = GANConfig
    phases = ("disc", "gen")
    has_encoder = False
    val_metric = "mmd"

    def __init__(self, config: GANConfig):
        super().__init__(config)
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.latent_dim,)

    def train(self, mode: bool = True) -> "GAN":
        # The EMA generator is never trained: keep its BatchNorm on the running statistics.
        super().train(mode)
        self.generator_ema.eval()
        return self

    # -- stepping ---------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        betas = (c.beta1, c.beta2)
        return {
            "disc": torch.optim.Adam(self.discriminator.parameters(), lr=c.lr_d or c.lr, betas=betas),
            "gen": torch.optim.Adam(self.generator.parameters(), lr=c.lr_g or c.lr, betas=betas),
        }

    def forward(self, batch: dict[str, Tensor], phase: str = "disc", step: int = 0) -> LossOutput:
        """The loss of one phase: ``"disc"`` (discriminator on real vs generated) or ``"gen"``."""
        check_phase(self, phase)
        real = batch["image"]
        check_images(real, self.config, "forward")
        with self._training_autocast(real):
            return self._phase_loss(real, phase)

    def _training_autocast(self, like: Tensor) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on CPU when ``cpu_bf16`` is set (the pipeline's ``train.bf16`` covers GPUs only)."""
        if self.config.cpu_bf16 and like.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _phase_loss(self, real: Tensor, phase: str) -> LossOutput:
        z = torch.randn(real.shape[0], self.config.latent_dim, device=real.device, dtype=real.dtype)
        loss_type = self.config.loss
        if phase == "gen":
            d_fake = self.discriminator(self.generator(z)).float()
            loss = F.softplus(-d_fake).mean() if loss_type == "nonsaturating" else -d_fake.mean()
            return LossOutput(loss=loss, logs={"d_fake": d_fake.mean().detach()})

        with torch.no_grad():
            fake = self.generator(z)
        r1 = self.config.r1_weight > 0
        real = real.detach().requires_grad_(r1)
        with torch.enable_grad() if r1 else contextlib.nullcontext():
            d_real = self.discriminator(real).float()
        d_fake = self.discriminator(fake).float()
        logs: dict[str, Tensor] = {"d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}
        if loss_type == "nonsaturating":
            loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        elif loss_type == "hinge":
            loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        else:
            gp = self.gradient_penalty(real, fake)
            loss = d_fake.mean() - d_real.mean() + self.config.gp_weight * gp
            logs["gp"] = gp.detach()
        if r1:
            penalty = self.r1_penalty(real, d_real)
            loss = loss + 0.5 * self.config.r1_weight * penalty
            logs["r1"] = penalty.detach()
        return LossOutput(loss=loss, logs=logs)

    @staticmethod
    def r1_penalty(real: Tensor, d_real: Tensor) -> Tensor:
        """R1 (Mescheder et al. 2018): E[||grad_x D(x)||^2] on real images x (B, C, H, W), a scalar that
        stays differentiable w.r.t. the discriminator. ``real`` must require grad before ``d_real`` (B,)."""
        (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
        return grad.flatten(1).square().sum(1).mean()

    def gradient_penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        """WGAN-GP: E[(||grad_x D(x_hat)|| - 1)^2] on random interpolates of real and fake, a scalar
        that stays differentiable w.r.t. the discriminator (``create_graph=True``)."""
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
        x_hat = (eps * real + (1.0 - eps) * fake.detach()).requires_grad_(True)
        with torch.enable_grad():
            scores = self.discriminator(x_hat)
            (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
        return (grad.flatten(1).norm(2, dim=1) - 1.0).square().mean()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Move the EMA generator towards the live one, then refresh its BatchNorm statistics.

        The decay ramps up as (1 + step) / (10 + step) early on, so the average does not remember the
        random initialisation for thousands of steps. The running statistics are not copied from the
        live generator: they describe the live weights' activations, not the averaged weights', and
        the mismatch grows with the decay. One forward pass of the EMA copy in train mode on a batch of
        noise seeded by ``step`` (the same on every worker and device) updates its own statistics instead.
        """
        decay = min(self.config.ema_decay, (1.0 + step) / (10.0 + step))
        for ema, live in zip(self.generator_ema.parameters(), self.generator.parameters()):
            ema.lerp_(live, 1.0 - decay)
        like = next(self.generator_ema.parameters())
        seeded = torch.Generator().manual_seed(step)
        z = standard_normal(EMA_STATS_BATCH, self.config.latent_dim, like, seeded, None)
        with self._training_autocast(like):
            self.generator_ema.train()(z)
        self.generator_ema.eval()

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A GAN cannot reconstruct, so it is scored by how far its samples are from held-out images:
        ``mmd``, the squared maximum mean discrepancy in pixel space between the batch and as many EMA
        generator samples (lower is better; 0 when the two sets are identical), and ``mean_gap``, the
        mean squared difference of their mean images. Cheap, batch-level proxies, not an FID.

        ``diversity``: the mean pairwise distance of EMA samples from a fixed noise batch (the same
        every epoch) over that of the real batch: ~1 when the samples vary as much as real images, ~0
        when the generator has collapsed onto one image.
        """
        real = batch["image"].float()
        z = torch.randn(real.shape[0], self.config.latent_dim, device=real.device, dtype=real.dtype)
        fake = self.decode(z, use_ema=True).images.float()  # the EMA copy is always in eval mode
        fixed = torch.Generator().manual_seed(0)
        z_fixed = standard_normal(real.shape[0], self.config.latent_dim, real, fixed, None)
        return {
            "mmd": pixel_mmd(real, fake),
            "mean_gap": (real.mean(0) - fake.mean(0)).square().mean(),
            "diversity": sample_diversity(self.decode(z_fixed, use_ema=True).images.float(), real),
        }

    # -- public surface ---------------------------------------------------------------------------
    def encode(self, x: Tensor) -> EncoderOutput:
        raise NotImplementedError(
            "GAN has no encoder (has_encoder = False): it can decode/sample latents but not map images to them"
        )

    def decode(self, z: Tensor, use_ema: bool | None = None) -> DecoderOutput:
        """z: (B, latent_dim) -> images (B, C, H, W) in [0, 1]. ``use_ema`` defaults to "in eval mode"."""
        check_latent(z, self.latent_shape, "decode")
        use_ema = (not self.training) if use_ema is None else use_ema
        generator = self.generator_ema if use_ema else self.generator
        return DecoderOutput(images=generator(z))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, noise: Tensor | None = None) -> DecoderOutput:
        """Decode n draws z ~ N(0, I) (the EMA generator in eval mode); ``noise`` (n, latent_dim) replaces the draw."""
        like = next(self.generator.parameters())
        return self.decode(standard_normal(n, self.config.latent_dim, like, generator, noise))
