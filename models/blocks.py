"""Small layers and helpers shared by the model families.

Kept deliberately small: a family that needs something exotic writes it in its own file. Everything
here is plain ``nn.Module`` / function composition, no registries, no base classes to inherit from.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.models.base import ConfigError, ModelConfig, PretrainedModel

# ----------------------------------------------------------------------------------------------------
# Activations and shapes

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def image_shape(config) -> tuple[int, int, int]:
    """(C, H, W) of the images a config describes (square images)."""
    return (config.channels, config.image_size, config.image_size)


def flat_dim(config) -> int:
    """Number of values in one image, C * H * W: the input width of fully-connected models."""
    c, h, w = image_shape(config)
    return c * h * w


def check_images(images: Tensor, config, who: str) -> None:
    """Raise a concise ``ValueError`` unless ``images`` is a (B, C, H, W) float batch matching ``config``."""
    expected = image_shape(config)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or not images.is_floating_point():
        raise ValueError(
            f"{who}: expected float images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
            f"got {images.dtype} {tuple(images.shape)}"
        )


def check_latent(latent: Tensor, shape: Sequence[int], who: str) -> None:
    """Raise a concise ``ValueError`` unless ``latent`` is a (B, *shape) float tensor."""
    if latent.dim() != len(shape) + 1 or tuple(latent.shape[1:]) != tuple(shape) or not latent.is_floating_point():
        dims = ", ".join(str(s) for s in shape)
        raise ValueError(
            f"{who}: expected a float latent of shape (B, {dims}), got {latent.dtype} {tuple(latent.shape)}"
        )


# ----------------------------------------------------------------------------------------------------
# Fully-connected stacks


def mlp(sizes: Sequence[int], act: str = "relu", last_act: str | None = None) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` with ``act`` between them.

    ``last_act`` is the activation after the final layer (``None``: none, the output stays linear, as
    decoders that produce logits want). Input (B, sizes[0]) -> output (B, sizes[-1]).
    """
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        last = i == len(sizes) - 2
        name = last_act if last else act
        if name is not None:
            layers.append(activation(name))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------
# Small conv stacks with an MLP head (VAE, AAE, GLO; the GAN uses the same spatial plan and widths)


def spatial_plan(config: ModelConfig) -> tuple[int, int]:
    """How an ``image_size`` x ``image_size`` image is downsampled: ``(stages, base)``.

    Each stage halves the side with a stride-2 convolution (kernel 4, padding 1, which maps 2s -> s
    exactly) until the side is at most 7 or odd, so 16 -> 4, 28 -> 7, 32 -> 4, 64 -> 4, 48 -> 6.
    A size that ends on a base side above 7 (a large odd factor) or that cannot be halved at all is a
    :class:`ConfigError`: the decoder could not produce it with the mirrored transposed convolutions.
    """
    size = config.image_size
    stages, base = 0, size
    while base % 2 == 0 and base > 7:
        base //= 2
        stages += 1
    if stages == 0 or base < 3 or base > 7:
        raise ConfigError(
            f"{type(config).__name__}.image_size={size} is not supported: it must be b * 2**n with n >= 1 "
            f"and b in 3..7 (for example 16, 28, 32, 64)"
        )
    return stages, base


def stage_widths(hidden_channels: int, stages: int) -> list[int]:
    """Channels of each downsampling stage, input side first: doubled per stage, capped at 8x
    ``hidden_channels`` (the usual DCGAN-like progression)."""
    return [hidden_channels * min(2**i, 8) for i in range(stages)]


class ConvEncoder(nn.Module):
    """(B, C, H, W) in [0, 1] -> (B, out_dim): stride-2 convs, then a two-layer MLP head."""

    def __init__(self, config: ModelConfig, hidden_channels: int, hidden_dim: int, out_dim: int):
        super().__init__()
        stages, base = spatial_plan(config)
        widths = stage_widths(hidden_channels, stages)
        layers: list[nn.Module] = []
        in_ch = config.channels
        for w in widths:
            layers += [nn.Conv2d(in_ch, w, 4, stride=2, padding=1), nn.SiLU()]
            in_ch = w
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(in_ch * base * base, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        # Centre the input: [0, 1] -> [-1, 1] conditions the first layer better than raw pixels.
        return self.head(self.convs(x * 2.0 - 1.0))


class ConvDecoder(nn.Module):
    """(B, in_dim) -> (B, C, H, W) logits: an MLP to a small feature map, then stride-2 transposed convs."""

    def __init__(self, config: ModelConfig, hidden_channels: int, hidden_dim: int, in_dim: int):
        super().__init__()
        stages, base = spatial_plan(config)
        widths = stage_widths(hidden_channels, stages)[::-1]
        self.base = base
        self.top = widths[0]
        self.head = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, widths[0] * base * base), nn.SiLU()
        )
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.ConvTranspose2d(widths[-1], config.channels, 4, stride=2, padding=1))
        self.convs = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = self.head(z).view(z.shape[0], self.top, self.base, self.base)
        return self.convs(h)


# ----------------------------------------------------------------------------------------------------
# Noise draws and phase checks


def standard_normal(
    n: int, dim: int, like: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> Tensor:
    """(n, dim) standard normal noise on ``like``'s device and dtype.

    ``noise`` (B, dim), when given, is used instead (after a shape check) and ``n`` is ignored. Otherwise
    the draw is made where ``generator`` lives and then moved, so a CPU generator gives the same noise
    whatever the model's device.
    """
    if noise is not None:
        check_latent(noise, (dim,), "sample(noise=...)")
        return noise.to(device=like.device, dtype=like.dtype)
    if n <= 0:
        raise ValueError(f"sample: n must be > 0, got {n}")
    return randn((n, dim), like, generator)


def randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal of ``shape`` drawn on ``generator``'s device (or ``like``'s), moved to ``like``'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def check_phase(model: PretrainedModel, phase: str) -> None:
    """Raise a ``ValueError`` unless ``phase`` is one of ``model.phases``."""
    if phase not in model.phases:
        raise ValueError(f"{type(model).__name__} has phases {model.phases}, got phase={phase!r}")


# ----------------------------------------------------------------------------------------------------
# Convolutional stacks. Kernel 4, stride 2, padding 1 halves (and its transpose doubles) an even side
# exactly, so two levels take 16 -> 4, 28 -> 7, 32 -> 8 and back without any cropping.


class ResBlock(nn.Module):
    """Pre-activation residual block, ``x + conv1x1(relu(conv3x3(relu(x))))`` (as in VQ-VAE).

    (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def conv_down(in_channels: int, widths: Sequence[int], res_blocks: int = 0) -> nn.Sequential:
    """One stride-2 conv + ReLU per entry of ``widths``, then ``res_blocks`` residual blocks.

    (B, in_channels, H, W) -> (B, widths[-1], H / 2**len(widths), W / 2**len(widths)).
    The caller checks that H is divisible by 2**len(widths).
    """
    layers: list[nn.Module] = []
    prev = in_channels
    for width in widths:
        layers += [nn.Conv2d(prev, width, 4, stride=2, padding=1), nn.ReLU()]
        prev = width
    layers += [ResBlock(prev) for _ in range(res_blocks)]
    if res_blocks:
        layers.append(nn.ReLU())  # the residual blocks end without an activation
    return nn.Sequential(*layers)


def conv_up(widths: Sequence[int], out_channels: int, res_blocks: int = 0) -> nn.Sequential:
    """The mirror of :func:`conv_down`: ``widths`` as given to it, ``out_channels`` at the end.

    (B, widths[-1], h, w) -> (B, out_channels, h * 2**len(widths), w * 2**len(widths)), linear output
    (logits), so the caller picks the output non-linearity and the loss.
    """
    widths = list(widths)
    layers: list[nn.Module] = [ResBlock(widths[-1]) for _ in range(res_blocks)]
    if res_blocks:
        layers.append(nn.ReLU())
    chans = widths[::-1] + [out_channels]
    for i, (n_in, n_out) in enumerate(zip(chans[:-1], chans[1:])):
        layers.append(nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1))
        if i < len(chans) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------
# Losses


def reconstruction_loss(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean per-value reconstruction loss of decoder ``logits`` against ``target`` in [0, 1].

    ``"bce"``: binary cross-entropy on the logits (numerically stable, the classic choice for [0, 1]
    pixels); ``"mse"``: squared error of ``sigmoid(logits)``. Computed in float32 so it is safe under
    bf16 autocast.
    """
    logits, target = logits.float(), target.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "mse":
        return F.mse_loss(torch.sigmoid(logits), target)
    raise ValueError(f"unknown reconstruction loss {kind!r}; choose bce or mse")


# ----------------------------------------------------------------------------------------------------
# A prior for models that have none


class RunningGaussian(nn.Module):
    """Running per-dimension mean and variance of the codes seen in training, to sample from.

    Plain autoencoders have no prior, so ``sample`` draws codes from the diagonal Gaussian fitted to
    the training codes. The statistics are buffers (saved with the model, broadcast by DDP) and are
    updated like BatchNorm's with ``momentum=None`` at first: an exact cumulative average over the first
    ``1 / momentum`` batches, then an exponential moving average, so a short run already has the right
    statistics and a long one follows the codes as the encoder changes.
    """

    def __init__(self, shape: Sequence[int], momentum: float = 0.01):
        super().__init__()
        self.shape = tuple(shape)
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(self.shape))
        self.register_buffer("var", torch.ones(self.shape))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, codes: Tensor) -> None:
        """Fold a (B, *shape) batch of codes into the statistics."""
        codes = codes.detach().float()  # statistics in float32 even under bf16 autocast
        m = max(1.0 / float(self.batches + 1), self.momentum)
        batch_var = codes.var(dim=0, unbiased=False) if codes.shape[0] > 1 else torch.zeros_like(codes[0])
        self.mean.lerp_(codes.mean(dim=0).to(self.mean.dtype), m)
        self.var.lerp_(batch_var.to(self.var.dtype), m)
        self.batches += 1

    def sample(self, n: int, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """(n, *shape) codes ``mean + std * noise``.

        ``noise`` is standard normal, drawn from ``generator`` (or the global RNG) unless passed in, in
        which case ``n`` is ignored and taken from ``noise``.
        """
        if noise is None:
            if n <= 0:
                raise ValueError(f"sample: n must be > 0, got {n}")
            # Drawn where the generator lives, then moved: a CPU generator gives the same codes on any device.
            device = generator.device if generator is not None else self.mean.device
            noise = torch.randn((n, *self.shape), generator=generator, device=device).to(self.mean)
        else:
            check_latent(noise, self.shape, "sample(noise=...)")
            noise = noise.to(self.mean)
        return self.mean + self.var.clamp_min(0).sqrt() * noise
