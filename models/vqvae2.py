"""VQ-VAE-2 (Razavi, van den Oord, Vinyals 2019): a two-level hierarchy of discrete codes with an
autoregressive prior over each level.

    x ──enc_b──> h_b ──enc_t──> h_t ──vq_t──> q_t (top, image/top_factor)
                  │                            │
                  └──── concat(h_b, dec_t(q_t)) ──vq_b──> q_b (bottom, image/bottom_factor)
    decoder(concat(q_b, up_t(q_t))) ──> x̂

The top codes carry global structure, the bottom codes local detail; the bottom codes are computed
given the decoded top map, and the decoder sees both, as in the paper. Codebooks are EMA-updated
(:class:`~models.quantize.VectorQuantizerEMA`). One training phase, ``"main"``, whose loss has two parts
on disjoint parameters (the codes the priors read carry no gradient), each with its own learning rate:

* the autoencoder (encoders, decoders; codebooks by EMA): reconstruction MSE + commitment;
* the top prior p(top) and the bottom prior p(bottom | top) (:class:`~models.priors.CodePrior`):
  cross-entropy on the codes of the current batch.

``vq_steps`` schedules them. 0: both at every step, so the priors chase codes that still move, and
spend half of their training on codes the final encoder no longer produces. N > 0: two stages, as in
the paper: the autoencoder alone for N steps, then the priors alone on the codes of the frozen
autoencoder (an encoder forward without gradient per step: much cheaper than a joint step). The
frozen autoencoder's parameters get no gradient at all, so Adam leaves them exactly as they are.

**The latent.** ``encode(x).latent`` is one tensor (B, 2 * code_dim, hb, wb): channels ``[:code_dim]``
are the quantised bottom map, channels ``[code_dim:]`` the quantised top map repeated (nearest) up to
the bottom grid, so ``decode`` takes a single tensor (interpolating two latents interpolates both
levels). ``encode(x).indices`` is ``(top (B, ht, wt), bottom (B, hb, wb))``, and ``decode_indices``
decodes them: that is what serving uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.models.base import (
    ConfigError,
    DecoderOutput,
    EncoderOutput,
    LossOutput,
    ModelConfig,
    PretrainedModel,
    require_divisible,
    require_positive,
)
from latentforge.models.blocks import check_phase
from latentforge.models.priors import CodePrior
from latentforge.models.quantize import VectorQuantizerEMA, is_exporting


@dataclass
class VQVAE2Config(ModelConfig):
    """VQ-VAE-2 hyper-parameters. Defaults are for 28x28 MNIST: bottom codes 14x14, top codes 7x7.

    ``bottom_factor``/``top_factor``: downsampling of the bottom/top code maps relative to the input;
    powers of two dividing ``image_size``, ``top_factor`` a larger power of two than ``bottom_factor``.
    ``dead_threshold``: a code whose EMA count of uses per batch falls below it is restarted (0: never).
    ``vq_steps``: 0 trains the autoencoder and the priors together at every step; N > 0 trains the
    autoencoder alone for the first N steps, then only the priors, on its frozen codes (see the module
    docstring).
    ``bottom_dropout``: the fraction of training images whose bottom codes the decoder does not see (zeros
    instead), so that the top codes must carry the image's global content (see ``forward``).
    """

    image_size: int = 28
    channels: int = 1
    lr: float = 3e-4
    hidden_channels: int = 128
    res_blocks: int = 2
    res_channels: int = 32
    bottom_factor: int = 2
    top_factor: int = 4
    num_codes: int = 256
    code_dim: int = 64
    decay: float = 0.99
    commitment: float = 0.25
    dead_threshold: float = 1.0
    prior_dim: int = 128
    prior_layers: int = 4
    prior_heads: int = 4
    prior_lr: float = 3e-4
    vq_steps: int = 0
    bottom_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        require_positive(
            self, "hidden_channels", "res_channels", "bottom_factor", "top_factor", "num_codes",
            "code_dim", "prior_dim", "prior_layers", "prior_heads", "prior_lr", "commitment",
        )
        if self.res_blocks < 0:
            raise ConfigError(f"VQVAE2Config.res_blocks must be >= 0, got {self.res_blocks}")
        if self.hidden_channels < 2:
            raise ConfigError(f"VQVAE2Config.hidden_channels must be >= 2, got {self.hidden_channels}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"VQVAE2Config.decay must be in [0, 1), got {self.decay}")
        if self.dead_threshold < 0:
            raise ConfigError(f"VQVAE2Config.dead_threshold must be >= 0, got {self.dead_threshold}")
        if not 0.0 <= self.bottom_dropout < 1.0:
            raise ConfigError(f"VQVAE2Config.bottom_dropout must be in [0, 1), got {self.bottom_dropout}")
        if self.vq_steps < 0:
            raise ConfigError(f"VQVAE2Config.vq_steps must be >= 0, got {self.vq_steps}")
        for name in ("bottom_factor", "top_factor"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ConfigError(f"VQVAE2Config.{name} must be a power of two, got {value}")
        if self.top_factor <= self.bottom_factor:
            raise ConfigError(
                f"VQVAE2Config.top_factor ({self.top_factor}) must be larger than bottom_factor ({self.bottom_factor})"
            )
        require_divisible(self, self.image_size, self.bottom_factor, "bottom_factor")
        require_divisible(self, self.image_size, self.top_factor, "top_factor")
        if self.prior_dim % self.prior_heads:
            raise ConfigError(
                f"VQVAE2Config.prior_dim ({self.prior_dim}) must be a multiple of prior_heads ({self.prior_heads})"
            )

    @classmethod
    def tiny(cls, **overrides) -> "VQVAE2Config":
        values = dict(
            image_size=16, channels=1, hidden_channels=16, res_blocks=1, res_channels=8, num_codes=16,
            code_dim=8, prior_dim=32, prior_layers=1, prior_heads=2,
        )
        return cls(**{**values, **overrides})

    @property
    def bottom_size(self) -> int:
        return self.image_size // self.bottom_factor

    @property
    def top_size(self) -> int:
        return self.image_size // self.top_factor


# ----------------------------------------------------------------------------------------------------
# Convolutional stacks (the paper's encoder/decoder: strided convs and residual blocks)


class _ResBlock(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def _log2(factor: int) -> int:
    return factor.bit_length() - 1


def _encoder(c_in: int, channels: int, res_blocks: int, res_channels: int, factor: int) -> nn.Sequential:
    """(B, c_in, H, W) -> (B, channels, H/factor, W/factor): 4x4 stride-2 convs, a 3x3 conv, res blocks."""
    layers: list[nn.Module] = []
    n = _log2(factor)
    for i in range(n):
        c_out = channels // 2 if i < n - 1 else channels
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, channels, 3, padding=1))
    layers += [_ResBlock(channels, res_channels) for _ in range(res_blocks)]
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _decoder(c_in: int, c_out: int, channels: int, res_blocks: int, res_channels: int, factor: int) -> nn.Sequential:
    """(B, c_in, h, w) -> (B, c_out, h*factor, w*factor): a 3x3 conv, res blocks, 4x4 stride-2 transposed convs."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, channels, 3, padding=1)]
    layers += [_ResBlock(channels, res_channels) for _ in range(res_blocks)]
    layers.append(nn.ReLU())
    n = _log2(factor)
    c = channels
    for i in range(n):
        last = i == n - 1
        nxt = c_out if last else max(channels // 2, 1)
        layers.append(nn.ConvTranspose2d(c, nxt, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU())
        c = nxt
    if n == 0:
        layers.append(nn.Conv2d(c, c_out, 3, padding=1))
    return nn.Sequential(*layers)


def _upsampler(channels: int, factor: int) -> nn.Sequential:
    """Learned upsampling of the top codes to the bottom grid: 4x4 stride-2 transposed convs."""
    layers: list[nn.Module] = []
    for i in range(_log2(factor)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------


class VQVAE2(PretrainedModel):
    """Two-level VQ-VAE with EMA codebooks and transformer priors over both code maps."""

    config_class = VQVAE2Config
    phases = ("main",)
    # The checkpoint score: samples come from the priors, so the best checkpoint must be ranked by them too.
    # Ranked by recon_mse alone, a staged run (vq_steps) ties on every prior-only epoch (the autoencoder is
    # frozen) and could keep a checkpoint whose priors never trained.
    val_metric = "checkpoint_score"

    def __init__(self, config: VQVAE2Config):
        super().__init__(config)
        c = config
        ch, d = c.hidden_channels, c.code_dim
        ratio = c.top_factor // c.bottom_factor
        self.enc_b = _encoder(c.channels, ch, c.res_blocks, c.res_channels, c.bottom_factor)
        self.enc_t = _encoder(ch, ch, c.res_blocks, c.res_channels, ratio)
        self.pre_t = nn.Conv2d(ch, d, 1)
        self.dec_t = _decoder(d, d, ch, c.res_blocks, c.res_channels, ratio)
        self.pre_b = nn.Conv2d(ch + d, d, 1)
        self.up_t = _upsampler(d, ratio)
        self.dec = _decoder(2 * d, c.channels, ch, c.res_blocks, c.res_channels, c.bottom_factor)
        vq = dict(decay=c.decay, commitment=c.commitment, dead_threshold=c.dead_threshold)
        self.vq_t = VectorQuantizerEMA(c.num_codes, d, **vq)
        self.vq_b = VectorQuantizerEMA(c.num_codes, d, **vq)
        ht, hb = c.top_size, c.bottom_size
        prior = dict(dim=c.prior_dim, layers=c.prior_layers, heads=c.prior_heads)
        self.prior_top = CodePrior(c.num_codes, ht, ht, **prior)
        self.prior_bottom = CodePrior(c.num_codes, hb, hb, cond_codes=c.num_codes, cond_size=(ht, ht), **prior)

    # -- shapes ----------------------------------------------------------------------------------
    @property
    def top_shape(self) -> tuple[int, int]:
        """(ht, wt) of the top code map."""
        return (self.config.top_size, self.config.top_size)

    @property
    def bottom_shape(self) -> tuple[int, int]:
        """(hb, wb) of the bottom code map."""
        return (self.config.bottom_size, self.config.bottom_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(2 * code_dim, hb, wb): the shape of one ``encode(x).latent``."""
        return (2 * self.config.code_dim, *self.bottom_shape)

    # -- the network -----------------------------------------------------------------------------
    def _check_images(self, x: Tensor) -> None:
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(
                f"images must have shape (B, {c.channels}, {c.image_size}, {c.image_size}), got {tuple(x.shape)}"
            )

    def _quantize(self, x: Tensor, update: bool) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """x (B, C, H, W) in [0, 1] -> ((q_t, idx_t, loss_t), (q_b, idx_b, loss_b))."""
        self._check_images(x)
        h_b = self.enc_b(x * 2 - 1)  # centred input trains faster than [0, 1]
        h_t = self.enc_t(h_b)
        top = self.vq_t(self.pre_t(h_t), update=update)
        bottom = self.vq_b(self.pre_b(torch.cat([h_b, self.dec_t(top[0])], dim=1)), update=update)
        return top, bottom

    def _decode_raw(self, q_t: Tensor, q_b: Tensor) -> Tensor:
        """Unclamped reconstruction in image units from the quantised maps (the training target's scale)."""
        return (self.dec(torch.cat([q_b, self.up_t(q_t)], dim=1)) + 1) / 2

    def _latent(self, q_t: Tensor, q_b: Tensor) -> Tensor:
        ratio = self.config.top_factor // self.config.bottom_factor
        return torch.cat([q_b, q_t.repeat_interleave(ratio, 2).repeat_interleave(ratio, 3)], dim=1)

    # -- training --------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """``"main"``: one Adam with two parameter groups, the autoencoder at ``lr`` and both priors at
        ``prior_lr`` (Adam is per parameter: the same as two optimisers). The codebooks are buffers,
        updated by EMA, not by an optimiser."""
        prior = [p for n, p in self.named_parameters() if n.startswith("prior_")]
        vq = [p for n, p in self.named_parameters() if not n.startswith("prior_")]
        return {
            "main": torch.optim.Adam(
                [{"params": vq, "lr": self.config.lr}, {"params": prior, "lr": self.config.prior_lr}]
            )
        }

    def stages(self, step: int) -> tuple[bool, bool]:
        """(autoencoder trains, priors train) at ``step``, by ``vq_steps`` (see the module docstring)."""
        n = self.config.vq_steps
        if n == 0:
            return True, True
        return step < n, step >= n

    def _drop_bottom(self, q_b: Tensor) -> Tensor:
        """q_b (B, code_dim, hb, wb) with the maps of a random ``bottom_dropout`` fraction of the images
        zeroed (training only). Without it the 16x16 bottom map alone reconstructs the image and the
        decoder ignores the top codes, so the top prior and the bottom prior's condition carry nothing
        and the bottom prior must draw the whole image; images that must be decoded from their top codes
        alone force the top level to hold the global content (shape, colour, size, position)."""
        p = self.config.bottom_dropout
        if not (self.training and p > 0):
            return q_b
        keep = (torch.rand(q_b.shape[0], 1, 1, 1, device=q_b.device) >= p).to(q_b.dtype)
        return q_b * keep

    def forward(self, batch: dict[str, Tensor], phase: str = "main", step: int = 0) -> LossOutput:
        """The loss of ``step``'s stages (:meth:`stages`): recon MSE + commitments (with the EMA codebook
        update in training mode) and/or top CE + bottom CE of the batch's codes (nats per code)."""
        check_phase(self, phase)
        x = batch["image"]
        train_vq, train_prior = self.stages(step)
        loss = x.new_zeros(())
        logs: dict[str, Tensor] = {}
        if train_vq:
            (q_t, idx_t, commit_t), (q_b, idx_b, commit_b) = self._quantize(x, update=self.training)
            recon = F.mse_loss(self._decode_raw(q_t, self._drop_bottom(q_b)), x)
            loss = loss + recon + commit_t + commit_b
            logs.update({"recon": recon.detach(), "commit_top": commit_t.detach(), "commit_bottom": commit_b.detach()})
            for level, vq in (("top", self.vq_t), ("bottom", self.vq_b)):
                logs.update({f"{k}_{level}": v for k, v in vq.stats().items()})
        else:
            with torch.no_grad():  # the frozen autoencoder: its codes, no codebook update, no decoder
                (_, idx_t, _), (_, idx_b, _) = self._quantize(x, update=False)
        if train_prior:
            # The indices carry no gradient: the priors' loss never reaches the autoencoder.
            ce_t = self.prior_top.loss(idx_t)
            ce_b = self.prior_bottom.loss(idx_b, cond=idx_t)
            loss = loss + ce_t + ce_b
            logs.update({"prior_ce_top": ce_t.detach(), "prior_ce_bottom": ce_b.detach()})
        return LossOutput(loss, logs)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Held-out ``recon_mse``, each prior's cross-entropy (nats per code), their sum (the checkpoint score),
        and each level's code usage and perplexity on this batch. Never updates the codebooks."""
        x = batch["image"]
        (q_t, idx_t, _), (q_b, idx_b, _) = self._quantize(x, update=False)
        recon = self._decode_raw(q_t, q_b).clamp(0, 1)
        figures = {
            "recon_mse": torch.mean((recon.float() - x.float()) ** 2),
            "prior_ce_top": self.prior_top.loss(idx_t),
            "prior_ce_bottom": self.prior_bottom.loss(idx_b, cond=idx_t),
        }
        # nats per code of the two priors plus the reconstruction MSE (which breaks ties among equal priors)
        figures["checkpoint_score"] = figures["prior_ce_top"] + figures["prior_ce_bottom"] + figures["recon_mse"]
        for level, vq in (("top", self.vq_t), ("bottom", self.vq_b)):
            figures[f"usage_{level}"] = vq.last_usage
            figures[f"perplexity_{level}"] = vq.last_perplexity
        return figures

    # -- public surface --------------------------------------------------------------------------
    def encode(self, x: Tensor) -> EncoderOutput:
        """x (B, C, H, W) in [0, 1] -> latent (B, 2 * code_dim, hb, wb) (see the module docstring) and
        indices ``(top (B, ht, wt), bottom (B, hb, wb))`` int64. Never updates the codebooks."""
        (q_t, idx_t, _), (q_b, idx_b, _) = self._quantize(x, update=False)
        return EncoderOutput(latent=self._latent(q_t, q_b), indices=(idx_t, idx_b))

    def decode(self, latent: Tensor) -> DecoderOutput:
        """latent (B, 2 * code_dim, hb, wb) as from ``encode`` -> images (B, C, H, W) in [0, 1]."""
        if latent.dim() != 4 or tuple(latent.shape[1:]) != self.latent_shape:
            raise ValueError(f"latent must have shape (B, {', '.join(map(str, self.latent_shape))}), got {tuple(latent.shape)}")
        d = self.config.code_dim
        ratio = self.config.top_factor // self.config.bottom_factor
        q_b, q_t = latent[:, :d], latent[:, d:, ::ratio, ::ratio]
        return DecoderOutput(self._decode_raw(q_t, q_b).clamp(0, 1))

    def decode_indices(self, top: Tensor, bottom: Tensor) -> DecoderOutput:
        """Code maps ``top`` (B, ht, wt) and ``bottom`` (B, hb, wb) int64 -> images (B, C, H, W) in [0, 1]."""
        for name, idx, shape in (("top", top, self.top_shape), ("bottom", bottom, self.bottom_shape)):
            if idx.dim() != 3 or tuple(idx.shape[1:]) != shape:
                raise ValueError(f"{name} indices must have shape (B, {shape[0]}, {shape[1]}), got {tuple(idx.shape)}")
            if idx.dtype.is_floating_point or idx.dtype == torch.bool:
                raise ValueError(f"{name} indices must be integers, got {idx.dtype}")
            # A data-dependent check: skipped while an exporter traces us (the graph stays static).
            if not is_exporting() and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.num_codes):
                raise ValueError(f"{name} indices must lie in [0, {self.config.num_codes}), got [{int(idx.min())}, {int(idx.max())}]")
        if top.shape[0] != bottom.shape[0]:
            raise ValueError(f"top and bottom indices disagree on the batch size: {top.shape[0]} vs {bottom.shape[0]}")
        q_t = self.vq_t.codes_from_indices(top)
        q_b = self.vq_b.codes_from_indices(bottom)
        return DecoderOutput(self._decode_raw(q_t, q_b).clamp(0, 1))

    @torch.no_grad()
    def sample_indices(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` code maps: top (n, ht, wt) from the top prior, then bottom (n, hb, wb) given top."""
        top = self.prior_top.sample(n, generator=generator, temperature=temperature, top_k=top_k)
        bottom = self.prior_bottom.sample(n, cond=top, generator=generator, temperature=temperature, top_k=top_k)
        return top, bottom

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0, top_k: int | None = None
    ) -> DecoderOutput:
        """``n`` images (n, C, H, W) in [0, 1] decoded from codes drawn from the priors.

        ``generator`` (on any device) makes it reproducible; ``temperature`` < 1 and ``top_k``
        trade diversity for fidelity.
        """
        return self.decode_indices(*self.sample_indices(n, generator, temperature, top_k))
