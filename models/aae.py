"""Adversarial autoencoder (Makhzani et al. 2016).

A deterministic conv autoencoder whose code distribution is matched to a prior N(0, I) by adversarial
training in latent space: a small MLP discriminator tells encoder codes from prior draws, and the encoder,
acting as the generator, learns to fool it. Three phases per step, each with its own optimiser:

* ``"recon"``: encoder + decoder minimise the reconstruction loss;
* ``"disc"``:  the discriminator separates prior samples (label 1) from codes (label 0, detached);
* ``"gen"``:   the encoder minimises -log D(code) (the non-saturating generator loss).

Because the codes then follow the prior, ``sample`` decodes prior draws; ``sample(sampler="gmm")`` decodes
draws from a mixture fitted to the codes after training (models/samplers.py), closer to where they lie
when the match is loose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.models.base import (
    DecoderOutput,
    EncoderOutput,
    FlatLatentModel,
    LossOutput,
    ModelConfig,
    require_choice,
    require_positive,
)
from latentforge.models.blocks import (
    ConvDecoder,
    ConvEncoder,
    check_images,
    check_latent,
    check_phase,
    spatial_plan,
    standard_normal,
)

RECON_LOSSES = ("bce", "mse")


@dataclass
class AAEConfig(ModelConfig):
    """Adversarial autoencoder with a Gaussian prior N(0, prior_std^2 I) over (B, latent_dim) codes.

    ``lr``: reconstruction phase (encoder + decoder); ``lr_d`` / ``lr_g``: discriminator / encoder-as-
    generator phases (Adam with ``betas=(0.5, 0.999)``, as usual for adversarial steps). ``recon_loss``:
    ``"bce"`` (binary cross-entropy with logits) or ``"mse"``, summed over pixels, mean over the batch.
    """

    lr: float = 1e-3
    latent_dim: int = 16
    hidden_channels: int = 32
    hidden_dim: int = 512
    disc_hidden: int = 512
    prior_std: float = 1.0
    recon_loss: str = "bce"
    lr_d: float = 2e-4
    lr_g: float = 2e-4

    def validate(self) -> None:
        super().validate()
        require_positive(self, "latent_dim", "hidden_channels", "hidden_dim", "disc_hidden", "prior_std", "lr_d", "lr_g")
        require_choice(self, "recon_loss", RECON_LOSSES)
        spatial_plan(self)

    @classmethod
    def tiny(cls, **overrides: Any) -> "AAEConfig":
        return cls(
            **{
                "image_size": 16,
                "channels": 1,
                "latent_dim": 4,
                "hidden_channels": 8,
                "hidden_dim": 32,
                "disc_hidden": 32,
                **overrides,
            }
        )


class AAE(FlatLatentModel):
    """Adversarial autoencoder. Latent: (B, latent_dim), matched to N(0, prior_std^2 I)."""

    config_class = AAEConfig
    phases = ("recon", "disc", "gen")

    def __init__(self, config: AAEConfig):
        super().__init__(config)
        self.encoder = ConvEncoder(config, config.hidden_channels, config.hidden_dim, config.latent_dim)
        self.decoder = ConvDecoder(config, config.hidden_channels, config.hidden_dim, config.latent_dim)
        h = config.disc_hidden
        self.discriminator = nn.Sequential(
            nn.Linear(config.latent_dim, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, 1)
        )

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.latent_dim,)

    # -- stepping ---------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        autoencoder = list(self.encoder.parameters()) + list(self.decoder.parameters())
        return {
            "recon": torch.optim.Adam(autoencoder, lr=c.lr),
            "disc": torch.optim.Adam(self.discriminator.parameters(), lr=c.lr_d, betas=(0.5, 0.999)),
            "gen": torch.optim.Adam(self.encoder.parameters(), lr=c.lr_g, betas=(0.5, 0.999)),
        }

    def forward(self, batch: dict[str, Tensor], phase: str = "recon", step: int = 0) -> LossOutput:
        """The loss of one phase (``"recon"``, ``"disc"`` or ``"gen"``) on ``batch["image"]``."""
        check_phase(self, phase)
        x = batch["image"]
        check_images(x, self.config, "forward")
        if phase == "recon":
            recon = self.reconstruction_loss(self.decoder(self.encoder(x)), x)
            return LossOutput(loss=recon, logs={"recon": recon.detach()})
        if phase == "disc":
            with torch.no_grad():
                codes = self.encoder(x)
            prior = torch.randn_like(codes) * self.config.prior_std
            d_prior, d_codes = self.discriminator(prior).float(), self.discriminator(codes).float()
            loss = F.softplus(-d_prior).mean() + F.softplus(d_codes).mean()
            acc = ((d_prior > 0).float().mean() + (d_codes < 0).float().mean()) / 2
            return LossOutput(loss=loss, logs={"d_accuracy": acc.detach()})
        d_codes = self.discriminator(self.encoder(x)).float()
        loss = F.softplus(-d_codes).mean()
        return LossOutput(loss=loss, logs={"d_codes": d_codes.mean().detach()})

    def reconstruction_loss(self, logits: Tensor, x: Tensor) -> Tensor:
        """Scalar: per-image loss summed over pixels, averaged over the batch."""
        logits, x = logits.float(), x.float()  # float32 even under bf16 autocast
        if self.config.recon_loss == "bce":
            per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        else:
            per_pixel = (torch.sigmoid(logits) - x).square()
        return per_pixel.flatten(1).sum(1).mean()

    # -- public surface ---------------------------------------------------------------------------
    def encode(self, x: Tensor) -> EncoderOutput:
        """x: (B, C, H, W) in [0, 1] -> codes (B, latent_dim)."""
        check_images(x, self.config, "encode")
        return EncoderOutput(latent=self.encoder(x))

    def decode(self, z: Tensor) -> DecoderOutput:
        """z: (B, latent_dim) -> images (B, C, H, W) in [0, 1]."""
        check_latent(z, self.latent_shape, "decode")
        return DecoderOutput(images=torch.sigmoid(self.decoder(z)))

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None, noise: Tensor | None = None) -> DecoderOutput:
        """n images decoded from z ~ prior_std * N(0, I); ``noise`` (n, latent_dim), standard normal, replaces the draw."""
        like = next(self.parameters())
        z = standard_normal(n, self.config.latent_dim, like, generator, noise) * self.config.prior_std
        return self.decode(z)
