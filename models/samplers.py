"""Ex-post latent samplers: a density fitted to the encoded training latents after training.

A VAE's prior N(0, I) and its aggregate posterior (the distribution of the encoded training images)
differ, most of all when the likelihood is sharp: prior draws then land in regions the decoder never
saw and decode to blurs. Fitting a density to the encoded training latents and sampling from it instead
(Ghosh et al. 2020, "From variational to deterministic autoencoders"; pythae's ``GaussianMixtureSampler``)
closes that gap, and turns any autoencoder with a flat latent into a generator.

:class:`GaussianMixtureSampler` is a Gaussian mixture fitted by EM (k-means++ initialisation, a few
restarts, regularised covariances). Sampling is split so that an exported graph holds no random op:

* :meth:`GaussianMixtureSampler.transform` is deterministic: standard normal ``noise`` (B, D) and a
  ``uniform`` (B,) in [0, 1) -> latents (B, D). The uniform picks the component through the cumulative
  weights; the latent is ``mean_k + L_k @ noise``.
* :meth:`GaussianMixtureSampler.sample` draws that noise and uniform from a generator and calls it.

A model carries a fitted sampler as ``model.latent_sampler`` (see :class:`~models.base.PretrainedModel`),
saved in the ``sampler/`` folder of its ``save_pretrained`` directory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from latentforge.models.base import ConfigError, check_types

SAMPLER_CONFIG_NAME = "config.json"
SAMPLER_WEIGHTS_NAME = "sampler.safetensors"
COVARIANCES = ("full", "diag")
LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class GaussianMixtureConfig:
    """How a :class:`GaussianMixtureSampler` is fitted.

    ``components``: mixture components K. ``covariance``: ``"full"`` (a (D, D) covariance per
    component) or ``"diag"``. ``restarts``: EM runs from different k-means++ seeds; the one with the
    highest log-likelihood is kept. ``max_iter`` / ``tol``: EM stops after ``max_iter`` iterations or
    when the mean log-likelihood per latent improves by less than ``tol`` nats. ``reg_covar``: added
    to every covariance's diagonal, relative to the data's mean per-dimension variance, so that a
    component on a few (or collinear) latents keeps an invertible covariance. ``seed``: seeds the
    initialisation, so a fit is reproducible.
    """

    components: int = 10
    covariance: str = "full"
    restarts: int = 3
    max_iter: int = 100
    tol: float = 1e-3
    reg_covar: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("components", "restarts", "max_iter"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GaussianMixtureConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("tol", "reg_covar"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"GaussianMixtureConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.covariance not in COVARIANCES:
            raise ConfigError(
                f"GaussianMixtureConfig.covariance must be one of {', '.join(COVARIANCES)}; got {self.covariance!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GaussianMixtureConfig":
        """Build from a plain dict (a params section, ``config.json``); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"GaussianMixtureConfig: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        # YAML writes 1e-4 as a float but 1 as an int: accept ints for float fields.
        floats = {k: float(v) for k, v in values.items() if k in ("tol", "reg_covar") and isinstance(v, int) and not isinstance(v, bool)}
        return cls(**{**values, **floats})


class GaussianMixtureSampler(nn.Module):
    """A Gaussian mixture over flat latents (D,): ``weights`` (K,), ``means`` (K, D) and lower Cholesky
    factors ``scale_tril`` (K, D, D) of the covariances, all buffers (saved, moved with ``.to``).

    Build one with :meth:`fit` (from latents) or :meth:`load` (from a directory).
    """

    kind = "gmm"

    def __init__(self, config: GaussianMixtureConfig, dim: int):
        super().__init__()
        if not isinstance(config, GaussianMixtureConfig):
            raise ConfigError(f"GaussianMixtureSampler needs a GaussianMixtureConfig, got {type(config).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"GaussianMixtureSampler: dim must be an int >= 1, got {dim!r}")
        self.config = config
        self.dim = dim
        k = config.components
        self.register_buffer("weights", torch.full((k,), 1.0 / k))
        self.register_buffer("means", torch.zeros(k, dim))
        self.register_buffer("scale_tril", torch.eye(dim).expand(k, dim, dim).clone())

    # -- fitting ----------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def fit(cls, latents: Tensor, config: GaussianMixtureConfig | None = None) -> "GaussianMixtureSampler":
        """Fit to ``latents`` (N, D) by EM, keeping the best of ``config.restarts`` runs; returns the sampler.

        The fit runs in float64 on the latents' device; the buffers are float32. Needs N >= components.
        """
        config = config or GaussianMixtureConfig()
        x = check_latents(latents, None, "GaussianMixtureSampler.fit").double()
        if not torch.isfinite(x).all():
            raise ValueError("GaussianMixtureSampler.fit: latents hold NaN or inf")
        n, d = x.shape
        if n < config.components:
            raise ValueError(
                f"GaussianMixtureSampler.fit: {n} latents cannot fit {config.components} components (need N >= components)"
            )
        generator = torch.Generator(device=x.device).manual_seed(config.seed)
        reg = config.reg_covar * float(x.var(0, unbiased=False).mean().clamp_min(1e-12))
        best, best_ll = None, -math.inf
        for _ in range(config.restarts):
            params, ll = _em(x, config, reg, generator)
            if ll > best_ll:
                best, best_ll = params, ll
        weights, means, covs = best
        sampler = cls(config, d).to(latents.device)
        sampler.weights.copy_(weights)
        sampler.means.copy_(means)
        sampler.scale_tril.copy_(torch.linalg.cholesky(covs))
        return sampler

    # -- sampling ---------------------------------------------------------------------------------
    def transform(self, noise: Tensor, uniform: Tensor) -> Tensor:
        """Deterministic: ``noise`` (B, D) ~ N(0, I) and ``uniform`` (B,) in [0, 1) -> latents (B, D).

        Component k is the first whose cumulative weight exceeds ``uniform``; the latent is
        ``means[k] + scale_tril[k] @ noise``. Only comparisons, a sum, gathers and a matmul: an exported
        graph needs no random op and no searchsorted.
        """
        check_latents(noise, self.dim, "GaussianMixtureSampler.transform(noise)")
        if uniform.dim() != 1 or uniform.shape[0] != noise.shape[0] or not uniform.is_floating_point():
            raise ValueError(
                f"GaussianMixtureSampler.transform: uniform must be a float (B,) tensor with B = {noise.shape[0]} "
                f"(noise's batch), got {uniform.dtype} {tuple(uniform.shape)}"
            )
        cumulative = torch.cumsum(self.weights, 0) / self.weights.sum()  # (K,), last = 1
        # Count the boundaries below u: always in [0, K-1] (the last boundary, 1, is left out).
        index = (uniform.to(cumulative).unsqueeze(1) >= cumulative[:-1].unsqueeze(0)).sum(1)  # (B,)
        noise = noise.to(self.means)
        return self.means[index] + torch.matmul(self.scale_tril[index], noise.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, D) latents: noise and uniform drawn from ``generator`` (where it lives), then :meth:`transform`."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"GaussianMixtureSampler.sample: n must be an int >= 1, got {n!r}")
        device = generator.device if generator is not None else self.means.device
        noise = torch.randn((n, self.dim), generator=generator, device=device)
        uniform = torch.rand((n,), generator=generator, device=device)
        return self.transform(noise.to(self.means.device), uniform.to(self.means.device))

    @torch.no_grad()
    def log_prob(self, latents: Tensor) -> Tensor:
        """log density of ``latents`` (N, D) under the mixture, (N,), in nats."""
        x = check_latents(latents, self.dim, "GaussianMixtureSampler.log_prob").double()
        log_pdf = _component_log_pdf(x, self.means.double(), self.scale_tril.double())
        return torch.logsumexp(log_pdf + self.weights.double().log(), 1).to(latents.dtype)

    # -- save / load ------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (class, fitting config, dim) and ``sampler.safetensors`` to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"class": type(self).__name__, "kind": self.kind, "dim": self.dim, "config": self.config.to_dict()}
        (directory / SAMPLER_CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        save_model(self, str(directory / SAMPLER_WEIGHTS_NAME))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "GaussianMixtureSampler":
        """Rebuild a sampler written by :meth:`save`."""
        directory = Path(directory)
        config_path = directory / SAMPLER_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no such file; is {directory} a saved sampler?")
        meta = json.loads(config_path.read_text())
        if meta.get("class") != cls.__name__:
            raise ConfigError(f"{directory} holds a {meta.get('class')!r}, not a {cls.__name__}")
        sampler = cls(GaussianMixtureConfig.from_dict(meta["config"]), int(meta["dim"]))
        load_model(sampler, str(directory / SAMPLER_WEIGHTS_NAME), strict=True, device=str(map_location))
        return sampler


def load_sampler(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> GaussianMixtureSampler:
    """The sampler saved in ``directory`` (the only kind today is the Gaussian mixture)."""
    return GaussianMixtureSampler.load(directory, map_location)


@torch.no_grad()
def encode_latents(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Latents (N, D) of ``images`` (N, C, H, W) in [0, 1]: the encoder's point estimate (a VAE's mean),
    in batches, in eval mode. For families without an amortised encoder (GLO) pass the learned codes
    to :meth:`GaussianMixtureSampler.fit` directly."""
    was_training = model.training
    model.eval()
    try:
        like = next(model.parameters())
        parts = [model.encode(images[i : i + batch_size].to(like)).point.float() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(parts).flatten(1)


def fit_latent_sampler(
    model: nn.Module, images: Tensor, config: GaussianMixtureConfig | None = None, batch_size: int = 256
) -> GaussianMixtureSampler:
    """Encode ``images`` (N, C, H, W) with ``model`` and fit a :class:`GaussianMixtureSampler` to the latents."""
    return GaussianMixtureSampler.fit(encode_latents(model, images, batch_size), config)


# ----------------------------------------------------------------------------------------------------
# EM


def check_latents(latents: Tensor, dim: int | None, who: str) -> Tensor:
    """Raise a concise ``ValueError`` unless ``latents`` is a float (N, D) tensor (D = ``dim`` when given)."""
    if not isinstance(latents, Tensor) or latents.dim() != 2 or not latents.is_floating_point() or (
        dim is not None and latents.shape[1] != dim
    ):
        what = f"{latents.dtype} {tuple(latents.shape)}" if isinstance(latents, Tensor) else type(latents).__name__
        want = "D" if dim is None else str(dim)
        raise ValueError(f"{who}: expected a float tensor of shape (N, {want}), got {what}")
    return latents


def _component_log_pdf(x: Tensor, means: Tensor, scale_tril: Tensor) -> Tensor:
    """log N(x | means[k], L_k L_k^T) for every latent and component: x (N, D) -> (N, K)."""
    diff = x.unsqueeze(0) - means.unsqueeze(1)  # (K, N, D)
    # Solve L y = diff^T per component: |y|^2 is the Mahalanobis distance.
    y = torch.linalg.solve_triangular(scale_tril, diff.transpose(1, 2), upper=False)  # (K, D, N)
    maha = y.square().sum(1)  # (K, N)
    log_det = torch.diagonal(scale_tril, dim1=1, dim2=2).log().sum(1)  # (K,) = log |L_k| = 0.5 log |Sigma_k|
    d = x.shape[1]
    return (-0.5 * (maha + d * LOG_2PI) - log_det.unsqueeze(1)).T


def _kmeans_pp(x: Tensor, k: int, generator: torch.Generator, iters: int = 10) -> Tensor:
    """k-means++ seeding then a few Lloyd iterations: centres (K, D) to start EM from."""
    n = x.shape[0]
    centres = [x[torch.randint(n, (1,), generator=generator, device=x.device)]]
    dist = (x - centres[0]).square().sum(1)
    for _ in range(1, k):
        # Next centre drawn with probability proportional to the squared distance to the nearest one.
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1.0 / n)
        nxt = x[torch.multinomial(probs, 1, generator=generator)]
        centres.append(nxt)
        dist = torch.minimum(dist, (x - nxt).square().sum(1))
    centres = torch.cat(centres)
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):  # an empty cluster keeps its centre
                centres[j] = members.mean(0)
    return centres


def _m_step(x: Tensor, resp: Tensor, covariance: str, reg: float) -> tuple[Tensor, Tensor, Tensor]:
    """Weights (K,), means (K, D), covariances (K, D, D) from responsibilities (N, K)."""
    counts = resp.sum(0) + 1e-10  # (K,)
    weights = counts / counts.sum()
    means = resp.T @ x / counts.unsqueeze(1)
    diff = x.unsqueeze(0) - means.unsqueeze(1)  # (K, N, D)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    if covariance == "full":
        covs = torch.einsum("nk,kni,knj->kij", resp, diff, diff) / counts.view(-1, 1, 1)
    else:
        covs = torch.diag_embed(torch.einsum("nk,kni->ki", resp, diff.square()) / counts.unsqueeze(1))
    return weights, means, covs + reg * eye


def _em(x: Tensor, config: GaussianMixtureConfig, reg: float, generator: torch.Generator):
    """One EM run from a k-means++ start: ((weights, means, covs), mean log-likelihood per latent)."""
    centres = _kmeans_pp(x, config.components, generator)
    resp = torch.nn.functional.one_hot(torch.cdist(x, centres).argmin(1), config.components).to(x.dtype)
    weights, means, covs = _m_step(x, resp, config.covariance, reg)
    previous = -math.inf
    for _ in range(config.max_iter):
        log_joint = _component_log_pdf(x, means, torch.linalg.cholesky(covs)) + weights.log()  # (N, K)
        log_norm = torch.logsumexp(log_joint, 1)
        ll = float(log_norm.mean())
        resp = (log_joint - log_norm.unsqueeze(1)).exp()
        weights, means, covs = _m_step(x, resp, config.covariance, reg)
        if ll - previous < config.tol:
            break
        previous = ll
    log_norm = torch.logsumexp(_component_log_pdf(x, means, torch.linalg.cholesky(covs)) + weights.log(), 1)
    return (weights, means, covs), float(log_norm.mean())
