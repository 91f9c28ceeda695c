"""f_tau: a small network from a sentence embedding to the latent space of a frozen, pretrained decoder.

Text-conditioned generation is ``decoder(f_tau(embed(text)))``: the decoder learned the image manifold
from all the unlabelled images; f_tau is learned on a small aligned set of (image, caption) pairs with
the decoder frozen. What f_tau outputs depends on the decoder's latent space:

* ``kind="latent"`` (VAE, the autoencoders, GAN, AAE, GLO: a flat latent ``(B, *latent_shape)``): an
  MLP regressing z. It is trained through the frozen decoder on the pixel loss, plus (where the family
  has an encoder) a regression to the encoder's mean of the image, which keeps z on the region of the
  latent space the decoder was trained on. ``n`` images per prompt: ``z + temperature * sample_std * eps``.
* ``kind="codes"`` (VQ-VAE-2): per level and per position, logits over that level's codebook,
  ``top (B, ht, wt, K)`` and ``bottom (B, hb, wb, K)``, trained by cross-entropy to the codes of the
  image. Decoded by argmax (``temperature=0``) or by sampling each position for variety, or (``text.bank``)
  by picking whole code maps of train images from a :class:`CodeBank`.

With ``word_attention`` = q > 0, f_tau reads one embedding per word instead of one per text: ``embedding``
(B, L, E) and ``mask`` (B, L) (1 for a word, 0 for padding); q learned queries attend over the words and
their outputs feed the MLP. The queries can learn to read the words that carry attributes and pass over
the rest (a paraphrase's "please draw me"), which a mean over words or the sentence embedding cannot.

Inputs are embeddings, not strings: the text encoders (a hashed n-gram encoder, MiniLM) live outside
this package so that serving can run them without PyTorch (``runtime/text.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentforge.models.base import ConfigError, LossOutput, ModelConfig, PretrainedModel, require_choice, require_positive


@dataclass
class TextMapConfig(ModelConfig):
    """f_tau's layout. ``image_size``/``channels`` are the decoder's (for the record only)."""

    embed_dim: int = 384
    kind: str = "latent"                 # "latent" | "codes"
    latent_shape: tuple[int, ...] = ()   # kind latent: the decoder's latent shape without the batch
    num_codes: int = 0                   # kind codes: codebook size K (both levels)
    top_shape: tuple[int, ...] = ()      # kind codes: (ht, wt)
    bottom_shape: tuple[int, ...] = ()   # kind codes: (hb, wb)
    code_rank: int = 0                   # kind codes: 0: one linear head per level; r > 0: an r-dim vector per
                                         # position, then one (r -> K) map shared by the level's positions
    word_attention: int = 0              # q > 0: inputs are word embeddings (B, L, E) + mask (B, L), pooled by q queries
    attention_dim: int = 64              # per query: the size of what it reads from the words
    hidden_dim: int = 256
    layers: int = 2
    dropout: float = 0.1
    sample_std: float = 0.5              # kind latent: the spread of z around f_tau(y) at temperature 1
    latent_weight: float = 1.0           # kind latent: weight of the regression to the encoder's mean
    lr: float = 1e-3

    def validate(self) -> None:
        super().validate()
        require_positive(self, "embed_dim", "hidden_dim", "layers")
        require_choice(self, "kind", ("latent", "codes"))
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"TextMapConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.word_attention < 0 or self.attention_dim <= 0:
            raise ConfigError(f"TextMapConfig.word_attention must be >= 0 and attention_dim > 0, got {self.word_attention}, {self.attention_dim}")
        if self.code_rank < 0:
            raise ConfigError(f"TextMapConfig.code_rank must be >= 0, got {self.code_rank}")
        if self.sample_std < 0 or self.latent_weight < 0:
            raise ConfigError("TextMapConfig.sample_std and latent_weight must be >= 0")
        if self.kind == "latent" and (not self.latent_shape or min(self.latent_shape) <= 0):
            raise ConfigError(f"TextMapConfig.latent_shape must be non-empty and positive for kind latent, got {self.latent_shape}")
        if self.kind == "codes":
            if self.num_codes <= 0:
                raise ConfigError(f"TextMapConfig.num_codes must be > 0 for kind codes, got {self.num_codes}")
            for name in ("top_shape", "bottom_shape"):
                shape = getattr(self, name)
                if len(shape) != 2 or min(shape) <= 0:
                    raise ConfigError(f"TextMapConfig.{name} must be (h, w) > 0 for kind codes, got {shape}")


class TextMap(PretrainedModel):
    """f_tau: embeddings (B, embed_dim) -> a latent (kind latent) or per-level code logits (kind codes)."""

    config_class = TextMapConfig
    has_encoder = False
    val_metric = "loss"

    def __init__(self, config: TextMapConfig):
        super().__init__(config)
        c = config
        # Kind codes: a CodeBank to decode from, set by whoever loads a text model that has one (it is
        # data, not weights: saved next to the model as bank.npz, not in model.safetensors).
        self.bank: CodeBank | None = None
        blocks: list[nn.Module] = []
        width = c.embed_dim
        if c.word_attention:
            self.pool = WordAttention(c.embed_dim, c.word_attention, c.attention_dim)
            width = c.word_attention * c.attention_dim
        for _ in range(c.layers):
            # LayerNorm first: hashed embeddings are sparse and MiniLM's are unit-norm; both feed in stably.
            blocks += [nn.Linear(width, c.hidden_dim), nn.LayerNorm(c.hidden_dim), nn.SiLU(), nn.Dropout(c.dropout)]
            width = c.hidden_dim
        self.trunk = nn.Sequential(*blocks)
        if c.kind == "latent":
            self.head = nn.Linear(width, _numel(c.latent_shape))
        elif c.code_rank == 0:
            self.top_head = nn.Linear(width, _numel(c.top_shape) * c.num_codes)
            self.bottom_head = nn.Linear(width, _numel(c.bottom_shape) * c.num_codes)
        else:
            # Low rank: the full head is hidden x (positions * K), 21M weights for a 16x16 + 8x8 map of 128
            # codes, and dominated training time; this one is hidden x (positions * r) + r x K.
            self.top_head = nn.Linear(width, _numel(c.top_shape) * c.code_rank)
            self.bottom_head = nn.Linear(width, _numel(c.bottom_shape) * c.code_rank)
            self.top_codes = nn.Linear(c.code_rank, c.num_codes)
            self.bottom_codes = nn.Linear(c.code_rank, c.num_codes)

    def forward(self, embedding: Tensor, mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:  # type: ignore[override]
        """embedding (B, E) (or, with word_attention, (B, L, E) and mask (B, L)) -> latent (B, *latent_shape),
        or (top (B, ht, wt, K), bottom (B, hb, wb, K)) logits."""
        c = self.config
        if c.word_attention:
            if embedding.dim() != 3 or embedding.shape[2] != c.embed_dim or mask is None or mask.shape != embedding.shape[:2]:
                raise ValueError(f"word attention needs embedding (B, L, {c.embed_dim}) and mask (B, L), got "
                                 f"{tuple(embedding.shape)} and {None if mask is None else tuple(mask.shape)}")
            embedding = self.pool(embedding, mask)
        elif embedding.dim() != 2 or embedding.shape[1] != c.embed_dim:
            raise ValueError(f"embedding must have shape (B, {c.embed_dim}), got {tuple(embedding.shape)}")
        h = self.trunk(embedding)
        if c.kind == "latent":
            return self.head(h).view(-1, *c.latent_shape)
        if c.code_rank == 0:
            top = self.top_head(h).view(-1, *c.top_shape, c.num_codes)
            bottom = self.bottom_head(h).view(-1, *c.bottom_shape, c.num_codes)
        else:
            top = self.top_codes(self.top_head(h).view(-1, *c.top_shape, c.code_rank))
            bottom = self.bottom_codes(self.bottom_head(h).view(-1, *c.bottom_shape, c.code_rank))
        return top, bottom

    def loss(self, decoder: PretrainedModel, batch: dict[str, Tensor]) -> LossOutput:
        """The training loss on one aligned batch, through the frozen ``decoder`` (kind latent).

        batch: ``embedding`` (B, E); kind latent: ``image`` (B, C, H, W) in [0, 1] and, when the decoder
        has an encoder, ``target_latent`` (B, *latent_shape) (the encoder's mean of the image); kind
        codes: ``top`` (B, ht, wt), ``bottom`` (B, hb, wb) int64, the codes of the image.
        """
        out = self(batch["embedding"], batch.get("mask"))
        if self.config.kind == "codes":
            top, bottom = out
            ce_t = F.cross_entropy(top.flatten(0, -2), batch["top"].flatten())
            ce_b = F.cross_entropy(bottom.flatten(0, -2), batch["bottom"].flatten())
            return LossOutput(ce_t + ce_b, {"ce_top": ce_t.detach(), "ce_bottom": ce_b.detach()})
        # The decoder is frozen (no grad, eval mode) but differentiable: the pixel loss trains z.
        pixel = F.mse_loss(decoder.decode(out).images, batch["image"])
        logs = {"pixel": pixel.detach()}
        loss = pixel
        if "target_latent" in batch:
            latent = F.mse_loss(out, batch["target_latent"])
            logs["latent"] = latent.detach()
            loss = loss + self.config.latent_weight * latent
        return LossOutput(loss, logs)

    @torch.no_grad()
    def generate(
        self, decoder: PretrainedModel, embedding: Tensor, n: int = 1, temperature: float = 0.0,
        generator: torch.Generator | None = None, mask: Tensor | None = None,
    ) -> Tensor:
        """Images (B, n, C, H, W) in [0, 1] for B embeddings: the mode at ``temperature`` 0, samples above.
        With a :class:`CodeBank` in ``self.bank`` (kind codes), the bank's code maps f_tau scores best
        (:meth:`CodeBank.pick`) instead of per-position codes.

        The PyTorch reference of ``runtime.text.TextDecoder`` (which draws its noise with
        numpy); used for evaluation and the MLflow prompt grid.
        """
        out = self(embedding, mask)
        if self.config.kind == "codes" and self.bank is not None:
            bank = self.bank
            picks = bank.pick(bank.scores(*out, embedding if embedding.dim() == 2 else None), n, temperature, generator)
            images = decoder.decode_indices(bank.top[picks.flatten()], bank.bottom[picks.flatten()]).images
            return images.view(embedding.shape[0], n, *images.shape[1:])
        if self.config.kind == "latent":
            z = out.repeat_interleave(n, 0)
            if temperature > 0:
                z = z + temperature * self.config.sample_std * torch.randn(z.shape, generator=generator)
            images = decoder.decode(z).images
        else:
            top, bottom = (sample_codes(t.repeat_interleave(n, 0), temperature, generator) for t in out)
            images = decoder.decode_indices(top, bottom).images
        return images.view(embedding.shape[0], n, *images.shape[1:])


class WordAttention(nn.Module):
    """``queries`` learned queries attend over the words (B, L, E) (padding masked out); their reads,
    concatenated: (B, queries * value_dim)."""

    def __init__(self, embed_dim: int, queries: int, value_dim: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, embed_dim) * 0.02)
        self.key = nn.Linear(embed_dim, embed_dim)
        self.value = nn.Linear(embed_dim, value_dim)

    def forward(self, words: Tensor, mask: Tensor) -> Tensor:
        scores = torch.einsum("qe,ble->bql", self.queries, self.key(words)) / words.shape[-1] ** 0.5
        # Padding gets -1e9, not -inf: a row of padding only (never sent) would give NaN with -inf.
        scores = scores.masked_fill(mask[:, None, :] < 0.5, -1e9)
        return torch.einsum("bql,ble->bqe", scores.softmax(-1), self.value(words)).flatten(1)


# The captioner's optimiser (AdamW), shared by train-text and bench/text_map_variants.py. Weight decay:
# 960 pairs overfit a CNN, and 0.1 read unseen images' shapes better. lr 3e-3, constant: at 1e-3 (or
# decayed) 60 epochs left the form stream's shapes underfitted (bench/README.md).
CAPTIONER_LR = 3e-3
CAPTIONER_WEIGHT_DECAY = 0.1


class ImageCaptioner(nn.Module):
    """g: image -> unit-norm text embedding, the inverse direction of f_tau; used only while training f_tau.

    Trained on the aligned pairs by cosine loss, g gives every unlabelled image a pseudo-caption
    embedding, so f_tau also learns from images whose combination of attributes no aligned caption
    names (a red circle when the aligned set holds red squares and blue circles).

    Two streams, summed: the caption embeddings are (near) sums over words, so each stream can give
    its words' part. The *form* stream, a small CNN, sees only the per-pixel maximum over the colour
    channels (an outline that looks the same in every colour) and keeps the 4x4 layout; the *colour*
    stream sees each pixel's colour through 1x1 convolutions, pooled over the image, so it has no
    shapes to see. Neither can learn "red, so a square" from an aligned set without red circles: on
    ``shapes`` the held-out combinations' shapes read from its embeddings went from 0.38 (one CNN on
    colour plus outline) to 0.81 (bench/README.md).
    """

    def __init__(self, channels: int, embed_dim: int, width: int = 32, colour_width: int = 32):
        super().__init__()
        self.form = nn.Sequential(
            nn.Conv2d(1, width, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * width, 256), nn.SiLU(), nn.Linear(256, embed_dim),
        )
        self.colour_pixels = nn.Sequential(
            nn.Conv2d(channels, colour_width, 1), nn.SiLU(), nn.Conv2d(colour_width, colour_width, 1), nn.SiLU(),
        )
        self.colour = nn.Sequential(nn.Linear(2 * colour_width, 128), nn.SiLU(), nn.Linear(128, embed_dim))

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in [0, 1] -> (B, embed_dim), each row L2-normalised like the text encoders'."""
        return F.normalize(self.form_part(images) + self.colour_part(images), dim=-1)

    def form_part(self, images: Tensor) -> Tensor:
        """The form stream's (B, embed_dim), from the outline alone."""
        return self.form(images.amax(1, keepdim=True))

    def colour_part(self, images: Tensor) -> Tensor:
        """The colour stream's (B, embed_dim), from per-pixel colour features pooled over the image."""
        pixels = self.colour_pixels(images)
        # Mean and max over the image: how much of each colour feature, and whether it is there at all
        # (a small object is a few pixels of the mean).
        return self.colour(torch.cat([pixels.mean((2, 3)), pixels.amax((2, 3))], 1))


@dataclass
class CodeBank:
    """The distinct code maps of the train images, for decoding f_tau's code logits onto the image manifold.

    f_tau's logits are independent per position; their argmax mixes positions from different images
    (on ``shapes`` the 1-pixel jitter puts an object's codes at neighbouring positions in different
    images, and the per-position winners draw no one shape). Decoding from the bank scores each whole
    code map j of a train image instead, and decodes the best:

        score(j | y) = sum over positions p of log softmax(f_tau(y))_p[code_jp]
                       + text_weight * positions * cos(embed(y), captioner(x_j))   (in the retrieval space below)

    The first term is the log-likelihood of the map under f_tau (a product of its per-position
    distributions restricted to maps the encoder produced on real images); the second, when the bank
    has the captioner's embeddings of its images, is the caption-retrieval score, which reads held-out
    combinations better than f_tau does (it was trained on images, not on captions of them).
    ``text_weight`` is per position, so it weighs the same against the mean log-likelihood of a
    position at any code-map size.

    The cosine is taken in a *retrieval space* when the bank has one (``centre``, ``whiten``, from
    :func:`retrieval_space` over the aligned pairs): centred on the mean caption and whitened by the
    captioner's residuals on the aligned pairs, so that the directions in which a caption varies for a
    given image (its template, its synonyms) hardly count and those the image fixes count alike. A plain
    cosine is ruled by the words every caption shares and by the largest differences, template words
    among them: a held-out prompt then finds a bank image whose caption has its template and the wrong
    size (on ``shapes``, held-out combinations picked with all factors right: plain 0.38, the captions
    whitened 0.42, the residuals whitened 0.96, by the cosine alone; bench/README.md).

    ``top`` (N, ht, wt), ``bottom`` (N, hb, wb) int64; ``embedding`` (N, E) float32 unit rows or None;
    ``centre`` (E,) and ``whiten`` (E, E) float32 or None.
    """

    top: Tensor
    bottom: Tensor
    embedding: Tensor | None = None
    text_weight: float = 0.0
    centre: Tensor | None = None
    whiten: Tensor | None = None

    def __post_init__(self) -> None:
        # The bank side of the cosine, projected once.
        self.keys = None if self.embedding is None else self.project(self.embedding)

    def __len__(self) -> int:
        return int(self.top.shape[0])

    def project(self, embedding: Tensor) -> Tensor:
        """(B, E) embeddings -> unit rows in the retrieval space (only normalised without one)."""
        unit = F.normalize(embedding.float(), dim=-1)
        if self.whiten is None:
            return unit
        return F.normalize((unit - self.centre) @ self.whiten, dim=-1)

    def scores(self, top_logits: Tensor, bottom_logits: Tensor, text_embedding: Tensor | None = None) -> Tensor:
        """(B, N) scores of every bank map for B prompts (logits (B, h, w, K) per level, embedding (B, E))."""
        total = _map_log_likelihood(top_logits, self.top) + _map_log_likelihood(bottom_logits, self.bottom)
        if self.keys is not None and self.text_weight > 0 and text_embedding is not None:
            positions = self.top[0].numel() + self.bottom[0].numel()
            total = total + self.text_weight * positions * (self.project(text_embedding) @ self.keys.T)
        return total

    def pick(self, scores: Tensor, n: int, temperature: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """(B, n) bank rows per prompt: the n best at ``temperature`` 0, else n drawn without replacement
        from softmax(scores / temperature) (Gumbel-top-n). A bank smaller than n repeats its picks."""
        scores = gumbel_perturbed(scores, temperature, generator)
        picks = scores.topk(min(n, scores.shape[1]), dim=1).indices
        return picks.repeat(1, -(-n // picks.shape[1]))[:, :n]

    def save(self, path) -> None:
        """``bank.npz``: codes as uint8 (int16 above 256 codes), embeddings as float16 (a 9600-image
        bank of 16x16 + 8x8 maps and 384-dim embeddings is about 10 MB)."""
        import numpy as np

        dtype = np.uint8 if int(max(self.top.max(), self.bottom.max())) < 256 else np.int16
        arrays = {"top": self.top.numpy().astype(dtype), "bottom": self.bottom.numpy().astype(dtype),
                  "text_weight": np.float32(self.text_weight)}
        if self.embedding is not None:
            arrays["embedding"] = self.embedding.numpy().astype(np.float16)
        if self.whiten is not None:
            arrays.update(centre=self.centre.numpy().astype(np.float32), whiten=self.whiten.numpy().astype(np.float32))
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path) -> "CodeBank":
        import numpy as np

        with np.load(path) as f:
            floats = {k: torch.from_numpy(f[k].astype(np.float32)) if k in f else None for k in ("embedding", "centre", "whiten")}
            return cls(torch.from_numpy(f["top"].astype(np.int64)), torch.from_numpy(f["bottom"].astype(np.int64)),
                       floats["embedding"], float(f["text_weight"]), floats["centre"], floats["whiten"])


def retrieval_space(captions: Tensor, ridge: float, predictions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(centre (E,), whiten (E, E)) of :class:`CodeBank`'s retrieval space from (N, E) caption embeddings:
    centre their unit rows on their mean, rotate onto the eigenvectors of a covariance and scale each by
    ``1 / sqrt(variance + ridge * largest variance)``.

    The covariance is the captions' own, or, given the captioner's (N, E) ``predictions`` for the same
    images, that of the residuals ``caption - prediction``: how captions vary *for a given image*. On
    ``shapes`` that is the template and the synonyms ("a tiny red disc ..." or "red circle, small, ..."),
    which say nothing about the image; the residual-whitened cosine all but ignores those directions
    and counts the ones the image fixes (shape, colour, size, position). Whitening the captions
    themselves cannot tell the two apart: the template is one of their largest variations. The ridge
    keeps the directions with hardly any variance from being blown up without bound."""
    unit = F.normalize(captions.double(), dim=-1)
    centre = unit.mean(0)
    spread = unit - centre if predictions is None else unit - F.normalize(predictions.double(), dim=-1)
    covariance = spread.T @ spread / max(len(unit) - 1, 1)
    variance, vectors = torch.linalg.eigh(covariance)
    variance = variance.clamp_min(0)
    whiten = vectors * (variance + ridge * variance.max()).clamp_min(1e-12).rsqrt()
    return centre.float(), whiten.float()


def _map_log_likelihood(logits: Tensor, codes: Tensor) -> Tensor:
    """(B, h, w, K) logits, (N, h, w) codes -> (B, N): sum over positions of log softmax(logits)[code]."""
    logp = logits.float().log_softmax(-1).flatten(1, 2)  # (B, P, K)
    flat = codes.flatten(1)                              # (N, P)
    total = torch.zeros(logp.shape[0], flat.shape[0])
    for p in range(flat.shape[1]):  # one (B, N) gather per position: B * N * P memory at once would be GBs
        total += logp[:, p, flat[:, p]]
    return total


def sample_codes(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """(..., K) logits -> (...) int64: argmax at temperature 0, else Gumbel-max sampling of softmax(logits / T)."""
    return gumbel_perturbed(logits, temperature, generator).argmax(-1)


def gumbel_perturbed(logits: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
    """``logits`` at temperature 0, else logits / T plus Gumbel noise: its argmax (top-n) is a draw (n draws
    without replacement) from softmax(logits / T)."""
    if temperature <= 0:
        return logits
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-9, 1 - 1e-9)
    return logits / temperature - torch.log(-torch.log(u))


def text_map_for(decoder: PretrainedModel, embed_dim: int, **overrides: Any) -> TextMap:
    """The f_tau that fits ``decoder``'s latent space: code logits for a model that decodes code maps
    (VQ-VAE-2's ``decode_indices``), a latent regressor for any flat-latent decoder."""
    c = decoder.config
    base = {"image_size": c.image_size, "channels": c.channels, "embed_dim": embed_dim}
    if hasattr(decoder, "decode_indices"):
        base.update(kind="codes", num_codes=c.num_codes, top_shape=tuple(decoder.top_shape), bottom_shape=tuple(decoder.bottom_shape))
    else:
        base.update(kind="latent", latent_shape=latent_shape_of(decoder))
    return TextMap(TextMapConfig.from_dict({**base, **overrides}))


def latent_shape_of(decoder: PretrainedModel) -> tuple[int, ...]:
    """A flat-latent decoder's latent shape without the batch: ``latent_shape``, else ``(latent_dim,)``."""
    return tuple(getattr(decoder, "latent_shape", None) or (decoder.config.latent_dim,))


def freeze(model: PretrainedModel) -> PretrainedModel:
    """Eval mode (BatchNorm statistics and EMA copies untouched) and no gradients for any weight."""
    model.eval()
    model.requires_grad_(False)
    return model


def state_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes): equal iff bit-identical."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
