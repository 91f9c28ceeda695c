"""The classic autoencoder family: vanilla, multilayer, convolutional, sparse, denoising, tied-weight,
LSTM sequence and linear (= PCA) autoencoders.

Each variant is a short class with its own config dataclass. :class:`CodeAutoEncoder` holds what they
share (``encode`` / ``decode`` / ``sample`` / ``forward``); a variant builds its networks and overrides
only the steps that differ.

Shared behaviour, stated once here:

* Images are (B, C, H, W) in [0, 1]. Decoders produce logits; ``decode`` applies the sigmoid, the loss
  uses the logits (``loss="bce"``: binary cross-entropy with logits, ``"mse"``: squared error of the
  sigmoid). The linear AE is the exception: it has no non-linearity at all (see its docstring).
* Latents are flat vectors, (B, latent_dim). ``latent_dim`` larger than C*H*W (overcomplete) is allowed;
  it only makes sense with a regulariser (sparse, denoising), which is the user's call.
* Plain autoencoders have no prior, so ``sample`` cannot be principled. Each model keeps the running
  mean and variance of the codes it sees in training (:class:`~models.blocks.RunningGaussian`, updated
  in ``forward`` while ``self.training``) and samples codes from that diagonal Gaussian, clipped to the
  range of the code's activation (a ReLU code is never negative). Expect blurry, average-looking
  samples: useful as a baseline and for the serving contract, not as a generative model.
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
    FlatLatentModel,
    LossOutput,
    ModelConfig,
    require_choice,
    require_divisible,
    require_positive,
)
from latentforge.models.blocks import (
    ACTIVATIONS,
    RunningGaussian,
    activation,
    check_images,
    check_latent,
    check_phase,
    conv_down,
    conv_up,
    flat_dim,
    image_shape,
    mlp,
    reconstruction_loss,
)

LOSSES = ("bce", "mse")

# The set of values each code activation can produce; sampled codes are clipped to it.
_CODE_RANGE: dict[str, tuple[float | None, float | None]] = {
    "relu": (0.0, None),
    "sigmoid": (0.0, 1.0),
    "tanh": (-1.0, 1.0),
}


def _clip_codes(codes: Tensor, act: str) -> Tensor:
    low, high = _CODE_RANGE.get(act, (None, None))
    return codes if low is None and high is None else codes.clamp(low, high)


def _check_dims(config: ModelConfig, name: str) -> None:
    """Every entry of the tuple field ``name`` is a positive layer size."""
    for i, size in enumerate(getattr(config, name)):
        if size <= 0:
            raise ConfigError(f"{type(config).__name__}.{name}[{i}] must be > 0, got {size!r}")


def _validate_fc(config: ModelConfig) -> None:
    """Checks shared by the fully-connected variants' configs."""
    require_positive(config, "latent_dim")
    require_choice(config, "activation", ACTIVATIONS)
    if hasattr(config, "loss"):
        require_choice(config, "loss", LOSSES)


# ----------------------------------------------------------------------------------------------------
# The shared surface


class CodeAutoEncoder(FlatLatentModel):
    """What every autoencoder here shares: a flat code, a sigmoid output and sampling from ``self.codes``.

    A subclass builds its networks and ``self.codes`` (a :class:`~models.blocks.RunningGaussian` over
    (latent_dim,)), and overrides only what differs: :meth:`codes_of` (default: ``self.encoder``),
    :meth:`logits_of` (default: ``self.decoder``), :meth:`images_of` (default: the sigmoid) and
    :meth:`training_loss` (default: ``config.loss`` between the logits and the images).

    encode: (B, C, H, W) -> latent (B, latent_dim); decode: (B, latent_dim) -> images (B, C, H, W).
    """

    def codes_of(self, images: Tensor) -> Tensor:
        """Unchecked (B, C, H, W) images -> (B, latent_dim) codes."""
        return self.encoder(images)

    def logits_of(self, codes: Tensor) -> Tensor:
        """Unchecked (B, latent_dim) codes -> (B, C, H, W) decoder output (logits)."""
        return self.decoder(codes)

    def images_of(self, logits: Tensor) -> Tensor:
        """(B, C, H, W) decoder output -> images in [0, 1]."""
        return torch.sigmoid(logits)

    def encode(self, images: Tensor) -> EncoderOutput:
        """(B, C, H, W) images in [0, 1] -> latent (B, latent_dim)."""
        check_images(images, self.config, "encode")
        return EncoderOutput(latent=self.codes_of(images))

    def decode(self, latent: Tensor) -> DecoderOutput:
        """(B, latent_dim) latent -> images (B, C, H, W) in [0, 1]."""
        check_latent(latent, (self.config.latent_dim,), "decode")
        return DecoderOutput(images=self.images_of(self.logits_of(latent)))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.latent_dim,)

    def sample_prior(self, n: int, generator: torch.Generator | None = None, noise: Tensor | None = None) -> DecoderOutput:
        """n images decoded from codes drawn from the running Gaussian of training codes (module doc);
        ``noise``: (n, latent_dim) standard normal, else drawn from ``generator``."""
        codes = self.codes.sample(n, generator, noise)
        # Variants without a code activation (conv, LSTM, linear) have unbounded codes: nothing to clip.
        return self.decode(_clip_codes(codes, getattr(self.config, "activation", "identity")))

    def forward(self, batch: dict[str, Tensor], phase: str = "main", step: int = 0) -> LossOutput:
        """The training loss of ``batch["image"]`` (B, C, H, W): :meth:`training_loss` after the checks."""
        check_phase(self, phase)
        images = batch["image"]
        check_images(images, self.config, "forward")
        return self.training_loss(images)

    def observe(self, codes: Tensor) -> Tensor:
        """Fold (B, latent_dim) codes into ``self.codes`` while training; returns ``codes``."""
        if self.training:
            self.codes.update(codes)
        return codes

    def training_loss(self, images: Tensor) -> LossOutput:
        """Reconstruction loss (``config.loss``) of checked (B, C, H, W) images, logged as ``recon``."""
        codes = self.observe(self.codes_of(images))
        recon = reconstruction_loss(self.logits_of(codes), images, self.config.loss)
        return LossOutput(recon, {"recon": recon.detach()})


# ----------------------------------------------------------------------------------------------------
# Vanilla: one hidden layer, which is the code.


@dataclass
class AEConfig(ModelConfig):
    """Vanilla autoencoder: ``x -> act(W x + b) = code -> sigmoid(W' code + b')``."""

    lr: float = 1e-3
    latent_dim: int = 32
    activation: str = "relu"
    loss: str = "bce"

    def validate(self) -> None:
        super().validate()
        _validate_fc(self)

    @classmethod
    def tiny(cls, **overrides):
        return super().tiny(**{"latent_dim": 8, **overrides})


class AutoEncoder(CodeAutoEncoder):
    """The vanilla autoencoder: a single fully-connected hidden layer is the code.

    encode: (B, C, H, W) -> latent (B, latent_dim); decode: (B, latent_dim) -> images (B, C, H, W).
    """

    config_class = AEConfig

    def __init__(self, config: AEConfig):
        super().__init__(config)
        d = flat_dim(config)
        self.encoder = nn.Sequential(nn.Flatten(), mlp([d, config.latent_dim], config.activation, config.activation))
        self.decoder = nn.Sequential(mlp([config.latent_dim, d]), nn.Unflatten(1, image_shape(config)))
        self.codes = RunningGaussian((config.latent_dim,))


# ----------------------------------------------------------------------------------------------------
# Multilayer: a deep MLP each way, mirrored.


@dataclass
class MLPAEConfig(ModelConfig):
    """Deep fully-connected autoencoder: ``hidden_dims`` then ``latent_dim``, mirrored in the decoder."""

    lr: float = 1e-3
    hidden_dims: tuple[int, ...] = (128, 64)
    latent_dim: int = 32
    activation: str = "relu"
    loss: str = "bce"

    def validate(self) -> None:
        super().validate()
        _validate_fc(self)
        if not self.hidden_dims:
            raise ConfigError(
                f"{type(self).__name__}.hidden_dims must name at least one hidden layer (use 'ae' for none)"
            )
        _check_dims(self, "hidden_dims")

    @classmethod
    def tiny(cls, **overrides):
        return super().tiny(**{"hidden_dims": (32, 16), "latent_dim": 8, **overrides})


class MLPAutoEncoder(CodeAutoEncoder):
    """Multilayer (deep) autoencoder: D -> hidden_dims -> latent_dim -> reversed(hidden_dims) -> D.

    encode: (B, C, H, W) -> latent (B, latent_dim); decode: (B, latent_dim) -> images (B, C, H, W).
    """

    config_class = MLPAEConfig

    def __init__(self, config: MLPAEConfig):
        super().__init__(config)
        sizes = [flat_dim(config), *config.hidden_dims, config.latent_dim]
        self.encoder = nn.Sequential(nn.Flatten(), mlp(sizes, config.activation, config.activation))
        self.decoder = nn.Sequential(mlp(sizes[::-1], config.activation), nn.Unflatten(1, image_shape(config)))
        self.codes = RunningGaussian((config.latent_dim,))


# ----------------------------------------------------------------------------------------------------
# Convolutional: stride-2 conv stack, a linear bottleneck to a flat code, and the mirror.


@dataclass
class ConvAEConfig(ModelConfig):
    """Convolutional autoencoder. ``widths``: channels of each stride-2 level (each halves the side, so
    ``image_size`` must be divisible by 2**len(widths): two levels fit 16, 28 and 32)."""

    lr: float = 1e-3
    widths: tuple[int, ...] = (32, 64)
    res_blocks: int = 1
    latent_dim: int = 64
    loss: str = "bce"

    def validate(self) -> None:
        super().validate()
        require_positive(self, "latent_dim")
        require_choice(self, "loss", LOSSES)
        if not self.widths:
            raise ConfigError(f"{type(self).__name__}.widths must name at least one level")
        _check_dims(self, "widths")
        if self.res_blocks < 0:
            raise ConfigError(f"{type(self).__name__}.res_blocks must be >= 0, got {self.res_blocks!r}")
        require_divisible(self, self.image_size, 2 ** len(self.widths), f"2**len(widths) = 2**{len(self.widths)}")

    @classmethod
    def tiny(cls, **overrides):
        return super().tiny(**{"widths": (8, 16), "res_blocks": 1, "latent_dim": 8, **overrides})


class ConvAutoEncoder(CodeAutoEncoder):
    """Convolutional autoencoder with a flat, linear code (so codes can be sampled and interpolated).

    encode: (B, C, H, W) -> latent (B, latent_dim); decode: (B, latent_dim) -> images (B, C, H, W).
    """

    config_class = ConvAEConfig

    def __init__(self, config: ConvAEConfig):
        super().__init__(config)
        side = config.image_size // 2 ** len(config.widths)
        inner = (config.widths[-1], side, side)
        n_inner = inner[0] * side * side
        self.encoder = nn.Sequential(
            conv_down(config.channels, config.widths, config.res_blocks),
            nn.Flatten(),
            nn.Linear(n_inner, config.latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(config.latent_dim, n_inner),
            nn.ReLU(),
            nn.Unflatten(1, inner),
            conv_up(config.widths, config.channels, config.res_blocks),
        )
        self.codes = RunningGaussian((config.latent_dim,))


# ----------------------------------------------------------------------------------------------------
# Sparse: the vanilla architecture plus an L1 penalty on the code, usually overcomplete.


@dataclass
class SparseAEConfig(ModelConfig):
    """Sparse autoencoder: one hidden code layer, loss = recon + ``sparsity_weight`` * mean_b ||code_b||_1.

    The default code (1024) is overcomplete for 28x28 inputs: the L1 penalty, not the bottleneck, is what
    stops it from learning the identity.
    """

    lr: float = 1e-3
    latent_dim: int = 1024
    activation: str = "relu"
    loss: str = "bce"
    sparsity_weight: float = 1e-4

    def validate(self) -> None:
        super().validate()
        _validate_fc(self)
        if self.sparsity_weight < 0:
            raise ConfigError(f"{type(self).__name__}.sparsity_weight must be >= 0, got {self.sparsity_weight!r}")

    @classmethod
    def tiny(cls, **overrides):
        return super().tiny(**{"latent_dim": 64, "sparsity_weight": 1e-3, **overrides})


class SparseAutoEncoder(AutoEncoder):
    """Sparse autoencoder (L1 activity penalty on the code; ReLU codes make the zeros exact): the vanilla
    architecture, built by :class:`AutoEncoder`, with another loss.

    ``sample`` draws from a Gaussian, which ignores the sparsity pattern, so samples are poor by construction.

    encode: (B, C, H, W) -> latent (B, latent_dim); decode: (B, latent_dim) -> images (B, C, H, W).
    """

    config_class = SparseAEConfig

    def training_loss(self, images: Tensor) -> LossOutput:
        """Reconstruction loss plus ``sparsity_weight`` times the batch-mean L1 norm of the codes."""
        codes = self.observe(self.encoder(images))
        recon = reconstruction_loss(self.decoder(codes), images, self.config.loss)
        l1 = codes.float().abs().sum(dim=1).mean()
        loss = recon + self.config.sparsity_weight * l1
        active = (codes.detach() != 0).float().mean()
        return LossOutput(loss, {"recon": recon.detach(), "l1": l1.detach(), "active": active})


# ----------------------------------------------------------------------------------------------------
# Denoising: corrupt the input in training, reconstruct the clean image.

CORRUPTIONS = ("gaussian", "masking")


@dataclass
class DenoisingAEConfig(ModelConfig):
    """Denoising autoencoder (Vincent et al. 2008), fully connected.

    ``corruption="gaussian"``: x + ``noise_level`` * N(0, 1), clipped to [0, 1];
    ``"masking"``: each value set to 0 with probability ``noise_level`` (in (0, 1)).
    """

    lr: float = 1e-3
    hidden_dims: tuple[int, ...] = (512,)
    latent_dim: int = 128
    activation: str = "relu"
    loss: str = "bce"
    corruption: str = "gaussian"
    noise_level: float = 0.5

    def validate(self) -> None:
        super().validate()
        _validate_fc(self)
        _check_dims(self, "hidden_dims")
        require_choice(self, "corruption", CORRUPTIONS)
        require_positive(self, "noise_level")
        if self.corruption == "masking" and self.noise_level >= 1:
            raise ConfigError(
                f"{type(self).__name__}.noise_level is a masking probability and must be < 1, got {self.noise_level!r}"
            )

    @classmethod
    def tiny(cls, **overrides):
        return super().tiny(**{"hidden_dims": (32,), "latent_dim": 8, **overrides})


class DenoisingAutoEncoder(MLPAutoEncoder):
    """Denoising autoencoder: in training, ``forward`` encodes ``corrupt(x)`` and is scored against the
    clean ``x``. ``encode``, ``decode`` and ``forward`` in eval mode never corrupt. The networks are
    those of :class:`MLPAutoEncoder`.

    encode: (B, C, H, W) -> latent (B, latent_dim); decode: (B, latent_dim) -> images (B, C, H, W).
    """

    config_class = DenoisingAEConfig

    def corrupt(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A corrupted copy of (B, C, H, W) ``images`` per the config, still in [0, 1]."""
        level = self.config.noise_level
        if self.config.corruption == "gaussian":
            noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            return (images + level * noise).clamp(0.0, 1.0)
        keep = torch.rand(images.shape, generator=generator, device=images.device) >= level
        return images * keep

    def training_loss(self, images: Tensor) -> LossOutput:
        """Reconstruction loss of the clean images from the codes of their corrupted copies (in training)."""
        inputs = self.corrupt(images) if self.training else images
        codes = self.observe(self.encoder(inputs))
        recon = reconstruction_loss(self.decoder(codes), images, self.config.loss)  # the clean target
        return LossOutput(recon, {"recon": recon.detach()})


# ----------------------------------------------------------------------------------------------------
# Tied weights: the decoder reuses the encoder's weight matrices, transposed.


@dataclass
class TiedAEConfig(ModelConfig):
    """Tied-weight autoencoder: encoder D -> hidden_dims -> latent_dim; the decoder runs the same
    layers backwards with the transposed weights and its own biases."""

    lr: float = 1e-3
    hidden_dims: tuple[int, ...] = (256,)
    latent_dim: int = 64
    activation: str = "relu"
    loss: str = "bce"

    def validate(self) -> None:
        super().validate()
        _validate_fc(self)
        _check_dims(self, "hidden_dims")

    @classmethod
    def tiny(cls, **overrides):
        return super().tiny(**{"hidden_dims": (32,), "latent_dim": 8, **overrides})


class TiedAutoEncoder(CodeAutoEncoder):
    """Tied-weight autoencoder: decoder layer i computes ``W_i^T h + c_i`` with the encoder's ``W_i``.

    Halves the parameters and acts as a regulariser. The only decoder parameters are the biases
    ``decoder_biases`` (one per layer); there are no decoder weight tensors.
    encode: (B, C, H, W) -> latent (B, latent_dim); decode: (B, latent_dim) -> images (B, C, H, W).
    """

    config_class = TiedAEConfig

    def __init__(self, config: TiedAEConfig):
        super().__init__(config)
        sizes = [flat_dim(config), *config.hidden_dims, config.latent_dim]
        self.encoder = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:]))
        # Decoder layer i (from the code outwards) maps sizes[-1-i] -> sizes[-2-i]; bias of the output size.
        self.decoder_biases = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in sizes[-2::-1])
        self.act = activation(config.activation)
        self.codes = RunningGaussian((config.latent_dim,))

    def codes_of(self, images: Tensor) -> Tensor:
        """Unchecked (B, C, H, W) images -> (B, latent_dim) codes through the encoder layers."""
        h = images.flatten(1)
        for layer in self.encoder:
            h = self.act(layer(h))
        return h

    def logits_of(self, codes: Tensor) -> Tensor:
        """Unchecked (B, latent_dim) codes -> (B, C, H, W) logits through the transposed encoder weights."""
        h = codes
        last = len(self.encoder) - 1
        for i, (layer, bias) in enumerate(zip(reversed(self.encoder), self.decoder_biases)):
            h = F.linear(h, layer.weight.t(), bias)
            if i < last:
                h = self.act(h)
        return h.unflatten(1, image_shape(self.config))


# ----------------------------------------------------------------------------------------------------
# LSTM sequence autoencoder: (T, F) windows of a series, or images read as sequences of rows.


@dataclass
class LSTMAEConfig(ModelConfig):
    """LSTM sequence autoencoder over (T, F) sequences. ``seq_len`` = 0 (the default): images, read as
    T = image_size rows of F = channels * image_size features. ``seq_len`` > 0: windows of a series,
    T = seq_len steps of F = ``features`` channels scaled to [0, 1] (``image_size`` and ``channels``
    then play no part)."""

    lr: float = 1e-3
    hidden_dim: int = 128
    num_layers: int = 1
    latent_dim: int = 32
    loss: str = "bce"
    seq_len: int = 0
    features: int = 0

    def validate(self) -> None:
        super().validate()
        require_positive(self, "hidden_dim", "num_layers", "latent_dim")
        require_choice(self, "loss", LOSSES)
        if self.seq_len < 0 or self.features < 0 or (self.seq_len > 0) != (self.features > 0):
            raise ConfigError(
                f"LSTMAEConfig: seq_len and features are both 0 (images) or both > 0 (series), "
                f"got seq_len={self.seq_len}, features={self.features}"
            )

    @classmethod
    def tiny(cls, **overrides):
        return super().tiny(**{"hidden_dim": 16, "latent_dim": 8, **overrides})


class LSTMAutoEncoder(CodeAutoEncoder):
    """Sequence-to-sequence autoencoder (the "RepeatVector" design).

    Encoder LSTM over the T steps -> its last hidden state -> linear -> one code vector; the code is
    repeated T times and fed to a decoder LSTM whose every step is mapped linearly to F outputs.

    Images (``seq_len`` = 0): encode (B, C, H, W) -> latent (B, latent_dim), decode back to images, and a
    training batch's ``"image"``. Series (``seq_len`` > 0): a training batch's ``"series"`` (B, T, F) in
    [0, 1], :meth:`reconstruct_series` (B, T, F) -> (B, T, F); ``encode`` / ``decode`` take and give
    (B, T, F) windows too. :meth:`encode_sequence` / :meth:`decode_sequence` take any length T.
    """

    config_class = LSTMAEConfig

    def __init__(self, config: LSTMAEConfig):
        super().__init__(config)
        self.is_series = config.seq_len > 0
        self.steps = config.seq_len if self.is_series else config.image_size
        self.features = config.features if self.is_series else config.channels * config.image_size
        self.encoder_lstm = nn.LSTM(self.features, config.hidden_dim, config.num_layers, batch_first=True)
        self.encoder_proj = nn.Linear(config.hidden_dim, config.latent_dim)
        self.decoder_lstm = nn.LSTM(config.latent_dim, config.hidden_dim, config.num_layers, batch_first=True)
        self.decoder_proj = nn.Linear(config.hidden_dim, self.features)
        self.codes = RunningGaussian((config.latent_dim,))

    # -- images <-> sequences of rows -------------------------------------------------------------
    def _to_rows(self, images: Tensor) -> Tensor:
        if self.is_series:
            return images
        b, c, h, w = images.shape
        return images.permute(0, 2, 1, 3).reshape(b, h, c * w)  # (B, T=H, F=C*W)

    def _from_rows(self, rows: Tensor) -> Tensor:
        if self.is_series:
            return rows
        b, h, _ = rows.shape
        return rows.reshape(b, h, self.config.channels, -1).permute(0, 2, 1, 3)

    def _encode_rows(self, series: Tensor) -> Tensor:
        _, (hidden, _) = self.encoder_lstm(series)
        return self.encoder_proj(hidden[-1])  # last step's hidden state of the top layer

    def _decode_rows(self, codes: Tensor, steps: int) -> Tensor:
        repeated = codes.unsqueeze(1).expand(-1, steps, -1).contiguous()
        out, _ = self.decoder_lstm(repeated)
        return self.decoder_proj(out)  # (B, steps, F) logits

    def _check_input(self, x: Tensor, who: str) -> None:
        if not self.is_series:
            check_images(x, self.config, who)
        elif x.dim() != 3 or tuple(x.shape[1:]) != (self.steps, self.features) or not x.is_floating_point():
            raise ValueError(f"{who}: expected float windows of shape (B, {self.steps}, {self.features}), got {x.dtype} {tuple(x.shape)}")

    # -- public ------------------------------------------------------------------------------------
    def encode(self, images: Tensor) -> EncoderOutput:
        """(B, C, H, W) images, or (B, T, F) windows for a series config, -> latent (B, latent_dim)."""
        self._check_input(images, "encode")
        return EncoderOutput(latent=self.codes_of(images))

    def reconstruct_series(self, windows: Tensor) -> Tensor:
        """(B, T, F) windows in [0, 1] -> their (B, T, F) reconstructions in [0, 1] (series configs)."""
        if not self.is_series:
            raise ValueError("reconstruct_series: this model reads images (config seq_len = 0)")
        self._check_input(windows, "reconstruct_series")
        return torch.sigmoid(self._decode_rows(self._encode_rows(windows), self.steps))

    def encode_sequence(self, series: Tensor) -> EncoderOutput:
        """Encode a (B, T, F) series, any T >= 1, F = the model's features, into (B, latent_dim)."""
        if series.dim() != 3 or series.shape[2] != self.features or series.shape[1] < 1:
            raise ValueError(f"encode_sequence: expected a (B, T, {self.features}) series, got {tuple(series.shape)}")
        return EncoderOutput(latent=self._encode_rows(series))

    def decode_sequence(self, latent: Tensor, steps: int) -> Tensor:
        """Decode (B, latent_dim) codes into a (B, steps, F) series with values in [0, 1] (the model is
        trained on [0, 1] data, so scale series to [0, 1] to make the reconstruction meaningful)."""
        check_latent(latent, (self.config.latent_dim,), "decode_sequence")
        if steps < 1:
            raise ValueError(f"decode_sequence: steps must be >= 1, got {steps}")
        return torch.sigmoid(self._decode_rows(latent, steps))

    def codes_of(self, images: Tensor) -> Tensor:
        """Unchecked (B, C, H, W) images (or (B, T, F) windows) -> (B, latent_dim) codes."""
        return self._encode_rows(self._to_rows(images))

    def logits_of(self, codes: Tensor) -> Tensor:
        """Unchecked (B, latent_dim) codes -> (B, C, H, W) logits, one row per decoder step (series: (B, T, F))."""
        return self._from_rows(self._decode_rows(codes, self.steps))

    def forward(self, batch: dict[str, Tensor], phase: str = "main", step: int = 0) -> LossOutput:
        """The training loss of ``batch["image"]`` (B, C, H, W) or, for a series config, of
        ``batch["series"]`` (B, T, F)."""
        check_phase(self, phase)
        x = batch["series"] if self.is_series else batch["image"]
        self._check_input(x, "forward")
        return self.training_loss(x)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Reconstruction MSE of the batch's images or (series config) windows."""
        x = batch["series"] if self.is_series else batch["image"]
        recon = self.images_of(self.logits_of(self.codes_of(x)))
        return {"recon_mse": torch.mean((recon.float() - x.float()) ** 2)}

    def training_loss(self, images: Tensor) -> LossOutput:
        """Reconstruction loss (``config.loss``) of the rows of the images (or of the windows), logged as ``recon``."""
        rows = self._to_rows(images)
        codes = self.observe(self._encode_rows(rows))
        recon = reconstruction_loss(self._decode_rows(codes, rows.shape[1]), rows, self.config.loss)
        return LossOutput(recon, {"recon": recon.detach()})


# ----------------------------------------------------------------------------------------------------
# Linear: no non-linearity anywhere, MSE. Its optimum spans the top principal subspace of the centred data
# (Baldi & Hornik 1989).


@dataclass
class LinearAEConfig(ModelConfig):
    """Linear autoencoder: ``code = W (x - mu) + b``, ``x_hat = W' code + b' + mu``, mean squared error,
    with ``mu`` the running mean of the training images."""

    lr: float = 1e-3
    latent_dim: int = 32

    def validate(self) -> None:
        super().validate()
        require_positive(self, "latent_dim")

    @classmethod
    def tiny(cls, **overrides):
        return super().tiny(**{"latent_dim": 8, **overrides})


class LinearAutoEncoder(CodeAutoEncoder):
    """Linear autoencoder: learns the span of the top ``latent_dim`` principal components.

    It does not learn the components themselves (any invertible mix of them is as good), only their
    subspace: :meth:`principal_subspace` gives an orthonormal basis of it.

    The input is centred by the running mean of the training images (a buffer, updated in ``forward``
    while training), as PCA centres its data. The model stays affine, and biases alone could in
    principle learn the mean, but images are far from zero-mean and the uncentred problem is badly
    conditioned: gradient descent then spends thousands of steps on the mean direction before the
    subspace converges. Biases start at zero for the same reason.

    ``decode`` clips to [0, 1] for the image contract; the loss uses the unclipped, fully linear
    reconstruction. ``sample`` draws a Gaussian confined to the learned subspace, like probabilistic PCA.
    encode: (B, C, H, W) -> latent (B, latent_dim); decode: (B, latent_dim) -> images.
    """

    config_class = LinearAEConfig

    def __init__(self, config: LinearAEConfig):
        super().__init__(config)
        d = flat_dim(config)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, config.latent_dim))
        self.decoder = nn.Sequential(nn.Linear(config.latent_dim, d), nn.Unflatten(1, image_shape(config)))
        nn.init.zeros_(self.encoder[1].bias)
        nn.init.zeros_(self.decoder[0].bias)
        self.inputs = RunningGaussian(image_shape(config))  # only its mean is used
        self.codes = RunningGaussian((config.latent_dim,))

    @torch.no_grad()
    def principal_subspace(self) -> Tensor:
        """(C*H*W, latent_dim) orthonormal basis of the decoder's column space (the learned subspace)."""
        q, _ = torch.linalg.qr(self.decoder[0].weight.float())
        return q

    def codes_of(self, images: Tensor) -> Tensor:
        """Unchecked (B, C, H, W) images -> (B, latent_dim) codes of the centred images."""
        return self.encoder(images - self.inputs.mean)

    def logits_of(self, codes: Tensor) -> Tensor:
        """Unchecked (B, latent_dim) codes -> the (B, C, H, W) linear reconstruction (no logits here)."""
        return self.decoder(codes) + self.inputs.mean

    def images_of(self, logits: Tensor) -> Tensor:
        """The linear reconstruction clipped to [0, 1]."""
        return logits.clamp(0.0, 1.0)

    def training_loss(self, images: Tensor) -> LossOutput:
        """Mean squared error of the unclipped linear reconstruction, logged as ``recon``."""
        if self.training:
            self.inputs.update(images)
        codes = self.observe(self.codes_of(images))
        recon = F.mse_loss(self.logits_of(codes).float(), images.float())
        return LossOutput(recon, {"recon": recon.detach()})
