"""Vector quantisation with an EMA codebook (VQ-VAE, van den Oord et al. 2017; VQ-VAE-2, Razavi et al. 2019).

The codebook is not trained by gradients: each code moves to the running mean (exponential moving
average) of the encoder outputs assigned to it. That is the paper's "EMA" variant; it converges faster
and more stably than the codebook loss. Only the commitment term (pull the encoder towards its code)
reaches the optimiser, and the decoder's gradient is copied past the non-differentiable lookup by the
straight-through estimator.

Distributed data parallel training: the EMA statistics of one step (code counts and sums of assigned
vectors) are all-reduced before they are used, so every worker applies the same update and keeps an
identical codebook without relying on DDP's buffer broadcast. Dead codes are restarted from encoder
outputs that rank 0 picks and broadcasts, for the same reason.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_exporting() -> bool:
    """True while torch.export / the ONNX exporters trace us: keep the graph free of Python-side state."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


class VectorQuantizerEMA(nn.Module):
    """Nearest-code quantiser of (B, D, h, w) feature maps with an EMA-updated codebook of ``num_codes``.

    ``forward(z)`` returns ``(quantized, indices, loss)`` like vector-quantize-pytorch:

    * ``quantized`` (B, D, h, w): the nearest codes, with the straight-through estimator (its gradient
      flows to ``z`` unchanged);
    * ``indices`` (B, h, w) int64 in ``[0, num_codes)``;
    * ``loss``: ``commitment * mse(z, sg[quantized])``, a scalar.

    In training mode (``self.training``) ``forward`` also updates the codebook: the EMA of each code's
    assignment count (``cluster_size``, roughly "uses per batch") and of the sum of its assigned vectors
    (``embed_avg``), all-reduced over workers when ``torch.distributed`` is initialised. Codes whose
    ``cluster_size`` falls below ``dead_threshold`` are re-initialised to random encoder outputs of the
    current batch (rank 0's batch, broadcast); ``dead_threshold=0`` disables the restart.

    Every call records the batch's code statistics in ``last_usage`` (fraction of codes used at least
    once), ``last_perplexity`` (exp of the entropy of the code histogram; ``num_codes`` at best) and
    ``last_restarted`` (codes restarted by this call), all detached 0-dim tensors. In training they
    describe the global batch (counts are all-reduced), otherwise the local one; an exported
    (traced) call records nothing.

    Note: a training-mode forward on a distributed run is a collective: every rank must make it.
    Evaluate in ``eval()`` mode (or pass ``update=False``).
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        decay: float = 0.99,
        commitment: float = 0.25,
        eps: float = 1e-5,
        dead_threshold: float = 1.0,
    ):
        super().__init__()
        if num_codes <= 0 or dim <= 0:
            raise ValueError(f"num_codes and dim must be > 0, got {num_codes} and {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if dead_threshold < 0:
            raise ValueError(f"dead_threshold must be >= 0, got {dead_threshold}")
        self.num_codes = num_codes
        self.dim = dim
        self.decay = decay
        self.commitment = commitment
        self.eps = eps
        self.dead_threshold = dead_threshold
        embed = torch.randn(num_codes, dim)
        self.register_buffer("embed", embed)  # (K, D) the codebook
        # Counts start at 1, not 0: a zero start would make the bias-uncorrected EMA of a used code look
        # "dead" for its first ~1/(1-decay) steps and restart it. Starting at 1 with the default
        # threshold of 1 restarts, after the first step, exactly the codes that step did not use:
        # a data-dependent initialisation of the codebook for free.
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_avg", embed.clone())
        self.last_usage = torch.zeros(())
        self.last_perplexity = torch.zeros(())
        self.last_restarted = torch.zeros((), dtype=torch.long)

    # -- lookups ---------------------------------------------------------------------------------
    def nearest(self, z: Tensor) -> Tensor:
        """Indices (B, h, w) int64 of the nearest codes to ``z`` (B, D, h, w); no update, no gradient."""
        self._check(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim).float()
            return self._assign(flat).view(z.shape[0], *z.shape[2:])

    def codes_from_indices(self, indices: Tensor) -> Tensor:
        """The code vectors (B, D, h, w) of ``indices`` (B, h, w) int64."""
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        return F.embedding(indices.long(), self.embed).permute(0, 3, 1, 2).contiguous()

    def _assign(self, flat: Tensor) -> Tensor:
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; the ||x||^2 term does not change the argmin.
        distance = (self.embed.pow(2).sum(1) - 2 * flat @ self.embed.t())
        return distance.argmin(dim=1)

    def _check(self, z: Tensor) -> None:
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"expected z of shape (B, {self.dim}, h, w), got {tuple(z.shape)}")

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, z: Tensor, *, update: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Quantise ``z`` (B, D, h, w); update the codebook when ``update`` (default: ``self.training``)."""
        self._check(z)
        update = self.training if update is None else update
        b, _, h, w = z.shape
        # Distances and EMA statistics in float32 even under bf16/fp16 autocast: a low-precision argmin
        # picks wrong codes and low-precision running sums drift.
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim).float()
            indices = self._assign(flat)
            quantized = F.embedding(indices, self.embed).view(b, h, w, self.dim).permute(0, 3, 1, 2)
            if update:
                self._update(flat, indices)
            elif not is_exporting():
                self.last_restarted = torch.zeros((), dtype=torch.long, device=z.device)
                self._record(self._counts(indices))
            zf = z.float()
            loss = self.commitment * F.mse_loss(zf, quantized.detach())
            # Straight-through: forward value is the code, backward is the identity to z.
            quantized = zf + (quantized - zf).detach()
        return quantized.to(z.dtype), indices.view(b, h, w), loss

    def _counts(self, indices: Tensor) -> Tensor:
        # scatter_add, not bincount: a fixed (K,) output shape whatever the indices (traceable).
        ones = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
        return torch.zeros(self.num_codes, device=indices.device).scatter_add_(0, indices, ones)

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor) -> None:
        """EMA update of the codebook from this batch (statistics all-reduced when distributed)."""
        counts = self._counts(indices)
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, indices, flat)
        if _distributed():
            # One collective for both statistics: [counts | sums] of shape (K, 1 + D).
            stats = torch.cat([counts[:, None], sums], dim=1)
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            counts, sums = stats[:, 0], stats[:, 1:]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps a never-used code from dividing by zero.
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        self._record(counts)  # the global batch's usage
        self._restart_dead(flat)

    @torch.no_grad()
    def _restart_dead(self, flat: Tensor) -> None:
        # The dead mask comes from all-reduced counts, so every rank agrees on which codes are dead
        # and on how many vectors to broadcast.
        dead = self.cluster_size < self.dead_threshold
        n_dead = int(dead.sum())
        self.last_restarted = torch.tensor(n_dead, device=flat.device)
        if n_dead == 0:
            return
        picks = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        fresh = flat[picks].contiguous()
        if _distributed():
            dist.broadcast(fresh, src=0)
        # A restarted code starts at the threshold: it survives the next step if it is used at least
        # about as often as the threshold asks, and is restarted again otherwise.
        self.embed[dead] = fresh
        self.cluster_size[dead] = self.dead_threshold
        self.embed_avg[dead] = fresh * self.dead_threshold

    def _record(self, counts: Tensor) -> None:
        total = counts.sum().clamp_min(1)
        p = counts / total
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        self.last_usage = ((counts > 0).float().mean()).detach()
        self.last_perplexity = entropy.exp().detach()

    def stats(self) -> dict[str, Tensor]:
        """The last call's batch statistics: ``usage``, ``perplexity``, ``restarted`` (detached scalars)."""
        return {
            "usage": self.last_usage,
            "perplexity": self.last_perplexity,
            "restarted": self.last_restarted.float(),
        }

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, "
            f"commitment={self.commitment}, dead_threshold={self.dead_threshold}"
        )
