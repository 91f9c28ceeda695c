"""Autoregressive priors over code maps: a small causal transformer (nanoGPT-style) with a KV cache.

A (h, w) map of code indices is read in raster order as a sequence of L = h * w tokens. Token i is
predicted from a start token and tokens 0..i-1, plus, for a conditional prior (VQ-VAE-2's bottom
prior), an embedding of the conditioning code map (the top codes) upsampled to this grid, added at every
position: position i sees the top codes above and around it, all of which are known before sampling.

Two ways to run the same network:

* ``forward(codes, cond)`` -> logits for all L positions at once (teacher forcing; training, scoring,
  and the simplest graph to export);
* ``step_logits(prev_token, position, cache, cond_emb)`` -> logits of one position plus the updated
  cache; ``step_kv`` -> the logits plus only this position's keys and values, which the caller writes
  into its cache (the exported step graph: reading the cache instead of copying it every position is
  what lets a batch of samples cost much less than the samples one by one). The cache is one
  fixed-size tensor and the steps have no in-place op, no data-dependent shape and no random op, so
  they export to ONNX as they are; sampling noise is an input of :func:`pick_tokens`.

``sample`` loops ``step_logits`` (one position per call, O(L) work per position instead of a full
O(L^2) forward) over a batch of sequences at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pick_tokens(logits: Tensor, noise: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """Draw one token per row of ``logits`` (B, K) given uniform ``noise`` (B, K) in [0, 1) (Gumbel-max).

    ``argmax(logits / temperature + Gumbel(noise))`` is a sample of ``softmax(logits / temperature)``
    restricted to the ``top_k`` largest logits (all when ``None``). Deterministic given ``noise``;
    ``top_k=1`` is greedy whatever the noise. Returns (B,) int64.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Clamp away from 0 and 1, where -log(-log(u)) is infinite.
    u = noise.float().clamp(1e-10, 1.0 - 1e-7)
    return (logits - torch.log(-torch.log(u))).argmax(dim=-1)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        shape = (b, t, self.heads, d // self.heads)
        return (y.view(shape).transpose(1, 2) for y in (q, k, v))  # each (B, H, T, hd)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, D) -> (B, T, D), each position attending to itself and earlier ones."""
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.ln2(x))

    def step(self, x: Tensor, position: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One position: x (B, 1, D); caches (B, H, L, hd) holding positions < ``position`` (later slots
        are ignored). Returns (x, k, v): this position's output and its key and value (B, H, 1, hd).

        The caches are only read: attention runs over the cached slots and this position's own key
        as two parts of one softmax, so the caller writes (k, v) into its cache in place, and an
        exported step outputs (B, H, 1, hd) instead of copying the whole cache every position.
        """
        q, k, v = self._qkv(x)
        scale = q.shape[-1] ** -0.5
        slots = torch.arange(k_cache.shape[2], device=x.device)
        # (B, H, L, 1) = K @ q^T: the big operand is read as it is (no transpose of the cache).
        cached = torch.matmul(k_cache, q.transpose(-1, -2)) * scale
        cached = cached.masked_fill((slots >= position).view(1, 1, -1, 1), float("-inf"))
        own = (q * k).sum(-1, keepdim=True) * scale                    # (B, H, 1, 1)
        top = torch.maximum(cached.amax(dim=2, keepdim=True), own)      # finite: own always is
        w_cached, w_own = torch.exp(cached - top), torch.exp(own - top)
        y = (torch.matmul(w_cached.transpose(-1, -2), v_cache) + w_own * v) / (w_cached.sum(2, keepdim=True) + w_own)
        x = x + self.proj(y.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.ln2(x)), k, v


class CodePrior(nn.Module):
    """Causal transformer prior p(codes) or p(codes | cond) over a (height, width) map of ``num_codes``.

    ``cond_codes``/``cond_size``: when given, the prior is conditioned on a (cond_h, cond_w) map of
    indices in ``[0, cond_codes)`` whose sides divide (height, width) (the top codes of VQ-VAE-2).
    """

    def __init__(
        self,
        num_codes: int,
        height: int,
        width: int,
        dim: int = 128,
        layers: int = 4,
        heads: int = 4,
        cond_codes: int | None = None,
        cond_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        if (cond_codes is None) != (cond_size is None):
            raise ValueError("give both cond_codes and cond_size, or neither")
        if cond_size is not None and (height % cond_size[0] or width % cond_size[1]):
            raise ValueError(f"cond_size {cond_size} must divide the code map size {(height, width)}")
        self.num_codes = num_codes
        self.height, self.width = height, width
        self.length = height * width
        self.dim, self.layers, self.heads = dim, layers, heads
        self.cond_size = tuple(cond_size) if cond_size is not None else None

        self.tok_emb = nn.Embedding(num_codes, dim)
        self.bos = nn.Parameter(torch.zeros(dim))  # the input at position 0
        self.pos_emb = nn.Parameter(torch.zeros(self.length, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_codes)
        if cond_codes is not None:
            # Embed the condition map, mix each cell with its neighbours (3x3 convs), then upsample to
            # this grid: cheap, and every position gets the top context around it, not only its cell.
            self.cond_emb = nn.Embedding(cond_codes, dim)
            self.cond_net = nn.Sequential(
                nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1)
            )
        else:
            self.cond_emb = None
            self.cond_net = None
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.bos, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # -- conditioning ----------------------------------------------------------------------------
    def embed_condition(self, cond: Tensor | None) -> Tensor | None:
        """Per-position conditioning (B, L, dim) from a condition map (B, cond_h, cond_w) int64."""
        if self.cond_emb is None:
            if cond is not None:
                raise ValueError("this prior is unconditional; cond must be None")
            return None
        if cond is None:
            raise ValueError("this prior is conditional; pass cond of shape (B, %d, %d)" % self.cond_size)
        if cond.dim() != 3 or tuple(cond.shape[1:]) != self.cond_size:
            raise ValueError(f"cond must have shape (B, {self.cond_size[0]}, {self.cond_size[1]}), got {tuple(cond.shape)}")
        c = self.cond_net(self.cond_emb(cond.long()).permute(0, 3, 1, 2))
        c = F.interpolate(c, size=(self.height, self.width), mode="nearest")
        return c.flatten(2).transpose(1, 2)

    # -- full sequence ---------------------------------------------------------------------------
    def forward(self, codes: Tensor, cond: Tensor | None = None) -> Tensor:
        """Logits (B, L, num_codes) for every position of ``codes`` (B, h, w) or (B, L) int64 given
        the earlier ones (teacher forcing); ``cond`` (B, cond_h, cond_w) for a conditional prior."""
        codes = self._flat(codes)
        b = codes.shape[0]
        x = torch.cat([self.bos.expand(b, 1, -1), self.tok_emb(codes[:, :-1])], dim=1)
        x = x + self.pos_emb
        cond_emb = self.embed_condition(cond)
        if cond_emb is not None:
            x = x + cond_emb
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, codes: Tensor, cond: Tensor | None = None) -> Tensor:
        """Mean cross-entropy (nats per code) of ``codes`` under the prior."""
        logits = self(codes, cond)
        return F.cross_entropy(logits.reshape(-1, self.num_codes), self._flat(codes).reshape(-1))

    def _flat(self, codes: Tensor) -> Tensor:
        if codes.dim() == 3 and tuple(codes.shape[1:]) == (self.height, self.width):
            return codes.reshape(codes.shape[0], -1).long()
        if codes.dim() == 2 and codes.shape[1] == self.length:
            return codes.long()
        raise ValueError(f"codes must have shape (B, {self.height}, {self.width}) or (B, {self.length}), got {tuple(codes.shape)}")

    # -- one step with a KV cache ----------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """An empty KV cache: zeros (2, layers, B, heads, L, dim // heads) (keys, then values)."""
        dtype = dtype or self.head.weight.dtype
        device = device or self.head.weight.device
        return torch.zeros(2, self.layers, batch, self.heads, self.length, self.dim // self.heads, device=device, dtype=dtype)

    def step_logits(
        self, prev_token: Tensor, position: Tensor | int, cache: Tensor, cond_emb: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Logits (B, num_codes) of the token at ``position`` and the cache with that position written.

        ``prev_token`` (B,) int64: the token at ``position - 1`` (ignored at position 0, pass any valid
        index); ``position``: int or 0-dim int64 tensor in [0, L); ``cache``: from :meth:`new_cache` or
        the previous step; ``cond_emb``: :meth:`embed_condition` of the condition map (conditional prior
        only), computed once per sequence. Step i with the true token i - 1 gives ``forward(...)[:, i]``.
        """
        logits, kv = self.step_kv(prev_token, position, cache, cond_emb)
        here = (torch.arange(self.length, device=cache.device) == position).view(1, 1, 1, 1, -1, 1)
        return logits, torch.where(here, kv, cache)

    def step_kv(
        self, prev_token: Tensor, position: Tensor | int, cache: Tensor, cond_emb: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`step_logits` without the cache write: logits (B, num_codes) and this position's keys
        and values (2, layers, B, heads, 1, dim // heads), for the caller to write into slot
        ``position`` of its cache (what the exported step graph and the ONNX sampler do)."""
        # index_select with a 1-element index rather than pos_emb[position]: tensor indexing by a
        # 0-dim tensor is data-dependent for torch.export, a gather is not.
        if not isinstance(position, Tensor):
            position = torch.tensor(position, device=cache.device)
        position = position.reshape(1)
        x = torch.where(position == 0, self.bos.view(1, -1), self.tok_emb(prev_token.long()))
        x = x + self.pos_emb.index_select(0, position)
        if self.cond_emb is not None:
            if cond_emb is None:
                raise ValueError("this prior is conditional; pass cond_emb=prior.embed_condition(cond)")
            x = x + cond_emb.index_select(1, position).squeeze(1)
        x = x.unsqueeze(1)  # (B, 1, D)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block.step(x, position, cache[0, i], cache[1, i])
            keys.append(k)
            values.append(v)
        logits = self.head(self.ln_f(x)).squeeze(1)
        return logits, torch.stack([torch.stack(keys), torch.stack(values)])  # (2, layers, B, H, 1, hd)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: Tensor | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> Tensor:
        """Sample ``n`` code maps (n, h, w) int64 at once, one position per cached step.

        ``cond`` (n, cond_h, cond_w) for a conditional prior; ``generator`` (on any device) makes the
        draw reproducible; ``temperature`` scales the logits, ``top_k`` keeps the k likeliest.
        """
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        if cond is not None and cond.shape[0] != n:
            raise ValueError(f"cond has {cond.shape[0]} maps for n={n} samples")
        device = self.head.weight.device
        cond_emb = self.embed_condition(cond)
        cache = self.new_cache(n, device)
        prev = torch.zeros(n, dtype=torch.long, device=device)
        out = torch.empty(n, self.length, dtype=torch.long, device=device)
        # Draw on the generator's device (a CPU generator can drive a GPU model, reproducibly).
        noise_device = generator.device if generator is not None else device
        for i in range(self.length):
            logits, cache = self.step_logits(prev, i, cache, cond_emb)
            noise = torch.rand(n, self.num_codes, generator=generator, device=noise_device).to(device)
            prev = pick_tokens(logits, noise, temperature, top_k)
            out[:, i] = prev
        return out.view(n, self.height, self.width)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, size=({self.height}, {self.width}), cond_size={self.cond_size}"
