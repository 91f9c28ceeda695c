"""Generative Latent Optimization (Bojanowski et al. 2018).

No encoder network: every training image i owns a learnable code z_i (a row of ``codes``, an
``nn.Embedding(num_samples, latent_dim)`` looked up with ``batch["index"]``), kept on the unit sphere.
Decoder and codes are trained jointly to reconstruct the images (binary cross-entropy by default; the
paper's Laplacian-pyramid L1 loss, which weighs coarse structure as much as fine detail, is an option).

New images are encoded by optimisation (:meth:`GLO.encode`): the decoder stays fixed and only the code is
fitted. To sample, a full-covariance Gaussian is fitted to the learned codes, drawn from and projected
back onto the sphere (the paper's generation recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.models.base import (
    ConfigError,
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
    check_images,
    check_latent,
    check_phase,
    randn,
    spatial_plan,
    standard_normal,
)

LOSSES = ("laplacian", "mse", "bce")


@dataclass
class GLOConfig(ModelConfig):
    """GLO. ``num_samples`` must be the size of the training split: ``batch["index"]`` selects the code.

    ``lr`` / ``code_lr``: Adam learning rates of the decoder / the codes (a code only gets a gradient
    when its image is in the batch, so it needs the larger rate). ``loss``: ``"bce"`` (binary
    cross-entropy with logits), ``"mse"`` or ``"laplacian"`` (the paper's Laplacian-pyramid L1 over
    ``pyramid_levels`` levels; like any L1 loss it can settle on the per-pixel median, a blank image,
    on sparse images such as small shapes on a black background). ``encode_steps``, ``encode_lr``,
    ``encode_restarts``: defaults of :meth:`GLO.encode`. ``val_encode_steps``: the (fewer) steps that
    :meth:`GLO.validation_step` fits held-out codes with, so that validation stays cheap.
    """

    lr: float = 1e-3
    num_samples: int = 60000
    latent_dim: int = 32
    hidden_channels: int = 32
    hidden_dim: int = 512
    code_lr: float = 1e-2
    loss: str = "bce"
    pyramid_levels: int = 3
    encode_steps: int = 200
    encode_lr: float = 0.05
    encode_restarts: int = 8
    val_encode_steps: int = 25

    def validate(self) -> None:
        super().validate()
        require_positive(
            self, "num_samples", "latent_dim", "hidden_channels", "hidden_dim", "code_lr", "pyramid_levels",
            "encode_lr", "encode_restarts",
        )
        require_choice(self, "loss", LOSSES)
        for name in ("encode_steps", "val_encode_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{type(self).__name__}.{name} must be >= 0, got {getattr(self, name)!r}")
        spatial_plan(self)

    @classmethod
    def tiny(cls, **overrides: Any) -> "GLOConfig":
        return cls(
            **{
                "image_size": 16,
                "channels": 1,
                "num_samples": 16,
                "latent_dim": 4,
                "hidden_channels": 8,
                "hidden_dim": 32,
                "encode_steps": 50,
                "val_encode_steps": 10,
                **overrides,
            }
        )


def laplacian_l1(pred: Tensor, target: Tensor, levels: int) -> Tensor:
    """Laplacian-pyramid L1 distance per image, (B,), between (B, C, H, W) images.

    Level j is the band-pass ``a - up(down(a))`` at 1/2^j resolution, the last level the remaining
    low-pass image; level j is weighted 4^j so that every level counts as much in total as the first,
    although it has 4^j times fewer pixels.
    """
    total = pred.new_zeros(pred.shape[0])
    a, b = pred, target
    for j in range(levels):
        last = j == levels - 1 or min(a.shape[-2:]) < 2
        if last:
            total = total + 4.0**j * (a - b).abs().flatten(1).sum(1)
            break
        a_low, b_low = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        size = a.shape[-2:]
        a_band = a - F.interpolate(a_low, size=size, mode="bilinear", align_corners=False)
        b_band = b - F.interpolate(b_low, size=size, mode="bilinear", align_corners=False)
        total = total + 4.0**j * (a_band - b_band).abs().flatten(1).sum(1)
        a, b = a_low, b_low
    return total


class GLO(FlatLatentModel):
    """Generative Latent Optimization: a decoder and one unit-norm code per training image.
    Latent: (B, latent_dim) on the unit sphere."""

    config_class = GLOConfig
    phases = ("main",)

    def __init__(self, config: GLOConfig):
        super().__init__(config)
        self.decoder = ConvDecoder(config, config.hidden_channels, config.hidden_dim, config.latent_dim)
        self.codes = nn.Embedding(config.num_samples, config.latent_dim)
        with torch.no_grad():
            self.codes.weight.copy_(F.normalize(torch.randn_like(self.codes.weight), dim=1))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.latent_dim,)

    # -- stepping ---------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        groups = [{"params": list(self.decoder.parameters()), "lr": c.lr}, {"params": [self.codes.weight], "lr": c.code_lr}]
        return {"main": torch.optim.Adam(groups)}

    def forward(self, batch: dict[str, Tensor], phase: str = "main", step: int = 0) -> LossOutput:
        """Reconstruction loss of ``batch["image"]`` from the codes of ``batch["index"]`` (mean over the batch)."""
        check_phase(self, phase)
        x, index = batch["image"], batch["index"]
        check_images(x, self.config, "forward")
        if bool(((index < 0) | (index >= self.config.num_samples)).any()):
            raise ValueError(
                f"GLO: batch['index'] holds values outside [0, num_samples={self.config.num_samples}); "
                f"set num_samples to the size of the training split (got min {int(index.min())}, max {int(index.max())})"
            )
        z = F.normalize(self.codes(index), dim=1)
        loss = self.reconstruction_loss(self.decoder(z), x).mean()
        return LossOutput(loss=loss, logs={"recon": loss.detach()})

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Project the codes back onto the unit sphere after the optimiser moved them."""
        self.codes.weight.copy_(F.normalize(self.codes.weight, dim=1))

    def reconstruction_loss(self, logits: Tensor, x: Tensor) -> Tensor:
        """Per-image loss, (B,), from decoder logits and target images in [0, 1]."""
        logits, x = logits.float(), x.float()  # float32 even under bf16 autocast
        if self.config.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        images = torch.sigmoid(logits)
        if self.config.loss == "mse":
            return (images - x).square().flatten(1).sum(1)
        return laplacian_l1(images, x, self.config.pyramid_levels)

    # -- public surface ---------------------------------------------------------------------------
    @torch.no_grad()
    def code_distribution(self) -> tuple[Tensor, Tensor]:
        """Mean (latent_dim,) and Cholesky factor (latent_dim, latent_dim) of a Gaussian fitted to the codes."""
        codes = F.normalize(self.codes.weight.detach().double(), dim=1)
        mean = codes.mean(0)
        centred = codes - mean
        cov = centred.T @ centred / max(codes.shape[0] - 1, 1)
        cov = cov + 1e-6 * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        scale_tril = torch.linalg.cholesky(cov)
        dtype = self.codes.weight.dtype
        return mean.to(dtype), scale_tril.to(dtype)

    def latent_from_noise(self, noise: Tensor) -> Tensor:
        """Standard normal noise (B, latent_dim) -> codes: through the fitted Gaussian, onto the sphere."""
        mean, scale_tril = self.code_distribution()
        return F.normalize(mean + noise @ scale_tril.T, dim=1)

    def encode(
        self,
        x: Tensor,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        lr: float | None = None,
        restarts: int | None = None,
    ) -> EncoderOutput:
        """Fit a code to each image of x (B, C, H, W) with the decoder fixed; returns (B, latent_dim) codes.

        ``restarts`` candidate codes per image are drawn from the fitted code distribution (with
        ``generator``), the best one is refined by ``steps`` Adam steps of learning rate ``lr``, projected
        to the sphere after each. Runs under an outer ``torch.no_grad``; leaves the model's parameters
        and their ``.grad`` untouched. Defaults come from the config (``encode_*``).
        """
        check_images(x, self.config, "encode")
        c = self.config
        steps = c.encode_steps if steps is None else steps
        lr = c.encode_lr if lr is None else lr
        restarts = c.encode_restarts if restarts is None else restarts
        b, d = x.shape[0], c.latent_dim
        like = self.codes.weight
        with torch.no_grad():
            noise = randn((restarts * b, d), like, generator)
            candidates = self.latent_from_noise(noise).view(restarts, b, d)
            xs = x.unsqueeze(0).expand(restarts, *x.shape).reshape(restarts * b, *x.shape[1:])
            losses = self.reconstruction_loss(self.decoder(candidates.view(-1, d)), xs).view(restarts, b)
            best = losses.argmin(0)
            z = candidates[best, torch.arange(b, device=like.device)].clone()
        z.requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                loss = self.reconstruction_loss(self.decoder(F.normalize(z, dim=1)), x).sum()
                # autograd.grad, not backward: only z gets a gradient, the decoder's .grad stay as they are.
                (z.grad,) = torch.autograd.grad(loss, z)
                optimizer.step()
                with torch.no_grad():
                    z.copy_(F.normalize(z, dim=1))
        return EncoderOutput(latent=z.detach())

    def validation_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``recon_mse`` of held-out images through codes fitted by :meth:`encode` with
        ``val_encode_steps`` steps, restarts drawn from a generator seeded with ``config.seed`` so that
        checkpoints are scored alike. Changes no parameter."""
        x = batch["image"]
        generator = torch.Generator().manual_seed(self.config.seed)
        z = self.encode(x, steps=self.config.val_encode_steps, generator=generator).latent
        with torch.no_grad():
            images = self.decode(z).images
        return {"recon_mse": torch.mean((images.float() - x.float()) ** 2)}

    def decode(self, z: Tensor) -> DecoderOutput:
        """z: (B, latent_dim) -> images (B, C, H, W) in [0, 1]. z is projected to the sphere first, so
        interpolated codes decode like the codes the decoder was trained on."""
        check_latent(z, self.latent_shape, "decode")
        return DecoderOutput(images=torch.sigmoid(self.decoder(F.normalize(z, dim=1))))

    @torch.no_grad()
    def learned_codes(self) -> Tensor:
        """The training images' codes on the unit sphere, (num_samples, latent_dim): what an ex-post latent
        sampler is fitted to (GLO has no amortised encoder to encode images with)."""
        return F.normalize(self.codes.weight.detach(), dim=1)

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None, noise: Tensor | None = None) -> DecoderOutput:
        """n images decoded from the Gaussian fitted to the learned codes; ``noise`` (n, latent_dim), standard
        normal, replaces the draw. Decode projects z onto the sphere (a gmm sample's too)."""
        noise = standard_normal(n, self.config.latent_dim, self.codes.weight, generator, noise)
        return self.decode(self.latent_from_noise(noise))
