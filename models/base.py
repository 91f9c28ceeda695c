"""What every model family shares: typed configs, save/load, output types and the stepping interface.

The contract (see DESIGN.md, "Model"):

* Images enter and leave every model as float tensors of shape (B, C, H, W) with values in [0, 1].
  A family that prefers another range internally (a GAN's tanh, a Bernoulli decoder's logits) converts
  inside the model, never at the call site.
* A training batch is a dict: ``"image"`` (B, C, H, W) float in [0, 1], ``"label"`` (B,) int64 (-1 where
  unknown) and ``"index"`` (B,) int64, the sample's row in the training split (GLO needs it).
* One generic loop (:func:`train_step`) trains every family. A family declares the optimiser steps it
  takes per batch in ``phases`` (``("main",)`` for most, ``("disc", "gen")`` for a GAN), builds one
  optimiser per phase in :meth:`PretrainedModel.configure_optimizers`, computes the loss of a phase in
  ``forward(batch, phase=..., step=...)`` and does any non-gradient update (EMA of a generator) in
  :meth:`PretrainedModel.after_step`. The loop calls ``forward`` through the (possibly DDP-wrapped)
  module, so gradients are synchronised across workers without the model knowing about it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAMPLER_DIR = "sampler"  # an optional ex-post latent sampler (models/samplers.py) inside a model directory


class ConfigError(ValueError):
    """A model configuration that cannot be built; the message names the field and the reason."""


@dataclass
class ModelConfig:
    """Fields every family has. Subclasses add their own (with defaults) and validate in ``validate``."""

    image_size: int = 32
    channels: int = 3
    lr: float = 2e-4
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on a value no model could be built from. Subclasses extend it."""
        check_types(self)
        require_positive(self, "image_size", "channels", "lr")

    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelConfig":
        """A preset small enough for unit tests (seconds on a CPU). Families override the sizes."""
        return cls(**{"image_size": 16, "channels": 1, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict (a ``params.yaml`` section, ``config.json``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(names))}"
            )
        hints = typing.get_type_hints(cls)
        coerced = {k: _coerce(cls.__name__, k, v, hints[k]) for k, v in values.items()}
        return cls(**coerced)


def require_positive(config: ModelConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ConfigError(f"{type(config).__name__}.{name} must be > 0, got {value!r}")


def require_choice(config: ModelConfig, name: str, choices: typing.Iterable[str]) -> None:
    value = getattr(config, name)
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{type(config).__name__}.{name} must be one of {', '.join(choices)}; got {value!r}")


def require_divisible(config: ModelConfig, size: int, factor: int, what: str) -> None:
    if factor <= 0 or size % factor:
        raise ConfigError(
            f"{type(config).__name__}: {what} ({factor}) does not divide the input size {size}"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _coerce(owner: str, name: str, value: Any, hint: Any) -> Any:
    """Accept what YAML/JSON produce for a field of type ``hint`` (list for tuple, int for float)."""
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_types(config: ModelConfig) -> None:
    """Reject a value of the wrong type with a message naming the field (``lr: "fast"``)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _is_instance(value, hints[f.name]):
            raise ConfigError(
                f"{type(config).__name__}.{f.name} must be of type {_type_name(hints[f.name])}, got {value!r}"
            )


def _is_instance(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_is_instance(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is_instance(v, args[0]) for v in value)
        return len(args) == len(value) and all(_is_instance(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


# ----------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class EncoderOutput:
    """``latent``: what ``decode`` takes back. Gaussian families also fill ``mean``/``logvar``;
    quantised families fill ``indices`` (one (B, h, w) int64 tensor per level)."""

    latent: Tensor
    mean: Tensor | None = None
    logvar: Tensor | None = None
    indices: tuple[Tensor, ...] | None = None

    @property
    def point(self) -> Tensor:
        """One latent per image without sampling: the mean where there is one, else ``latent``."""
        return self.mean if self.mean is not None else self.latent


@dataclass
class DecoderOutput:
    """``images``: (B, C, H, W) float in [0, 1]."""

    images: Tensor


@dataclass
class LossOutput:
    """``loss``: the scalar this phase's optimiser minimises. ``logs``: detached scalars to report
    (each loss term, KL, codebook perplexity ...), keyed without the phase prefix."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# The model base


class PretrainedModel(nn.Module):
    """Base of every family: holds the config, saves and loads itself, declares how it steps."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    phases: ClassVar[tuple[str, ...]] = ("main",)

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.latent_sampler = None

    # -- ex-post latent sampler -------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "latent_sampler":
            # Kept out of the module tree (nn.Module would register it as a submodule): model.safetensors
            # stays the same with or without a sampler, which lives in its own ``sampler/`` folder.
            self._check_latent_sampler(value)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _check_latent_sampler(self, sampler: Any) -> None:
        """Raise a ``ValueError`` unless ``sampler`` is None or a sampler of this model's flat latent."""
        if sampler is None:
            return
        if not all(hasattr(sampler, a) for a in ("dim", "kind", "sample", "transform")):
            raise ValueError(f"latent_sampler must be a fitted sampler (models/samplers.py) or None, got {type(sampler).__name__}")
        shape = tuple(getattr(self, "latent_shape", ()) or ())
        if shape != (sampler.dim,):
            raise ValueError(
                f"{type(self).__name__}: a latent sampler of dim {sampler.dim} does not fit this model's latent "
                f"shape {shape or 'unknown'}; only flat latents (latent_dim,) can carry one"
            )

    @torch.no_grad()
    def sample_latent_sampler(
        self, sampler: str, n: int, generator: torch.Generator | None = None,
        noise: Tensor | None = None, uniform: Tensor | None = None,
    ) -> DecoderOutput:
        """Decode n latents drawn from the fitted ``self.latent_sampler`` of kind ``sampler`` ("gmm").

        ``noise`` (n, latent_dim) ~ N(0, I) and ``uniform`` (n,) in [0, 1), given together, replace the
        draw (what an exported graph takes as inputs); else both are drawn from ``generator``.
        """
        fitted = self.latent_sampler
        if fitted is None or fitted.kind != sampler:
            have = "none" if fitted is None else repr(fitted.kind)
            raise ValueError(
                f"{type(self).__name__}.sample(sampler={sampler!r}): no such fitted latent sampler (this model has "
                f"{have}); choose 'prior', or fit one (models.samplers.fit_latent_sampler) and set model.latent_sampler"
            )
        if (noise is None) != (uniform is None):
            raise ValueError(f"sample(sampler={sampler!r}): pass both noise (n, D) and uniform (n,), or neither")
        z = fitted.sample(n, generator) if noise is None else fitted.transform(noise, uniform)
        like = next(self.parameters())
        return self.decode(z.to(device=like.device, dtype=like.dtype))

    # -- stepping --------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimiser per phase. Default: Adam over all trainable parameters for ``"main"``."""
        params = [p for p in self.parameters() if p.requires_grad]
        return {"main": torch.optim.Adam(params, lr=self.config.lr)}

    def forward(self, batch: dict[str, Tensor], phase: str = "main", step: int = 0) -> LossOutput:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Non-gradient updates after all phases of a step (EMA weights). Default: nothing."""

    # -- validation ------------------------------------------------------------------------------
    #: False for families without an encoder network (a GAN): callers skip ``encode`` for them.
    has_encoder: ClassVar[bool] = True
    #: The key of :meth:`validation_step`'s output that checkpoints are scored by (lower is better).
    val_metric: ClassVar[str] = "recon_mse"

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Held-out figures for one batch, each a scalar tensor averaged over the batch.

        Default: the reconstruction MSE through ``encode``/``decode``. Families override it to add
        their own terms (a VAE's negative ELBO) or when they cannot reconstruct (a GAN).
        """
        x = batch["image"]
        recon = self.decode(self.encode(x).latent).images
        return {"recon_mse": torch.mean((recon.float() - x.float()) ** 2)}

    # -- save / load -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (with the class name) and ``model.safetensors`` to ``directory``, and the
        fitted ``latent_sampler``, if any, to its ``sampler/`` folder.

        Written to a temporary sibling first and renamed; an existing ``directory`` is moved aside and
        removed only once the rename has succeeded, so a crash leaves the old model or the new one, never
        half of one or neither.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        old = tmp.with_name(f"{tmp.name}.old")
        try:
            meta = {"class": type(self).__name__, "config": self.config.to_dict()}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            save_model(self, str(tmp / WEIGHTS_NAME))
            if self.latent_sampler is not None:
                self.latent_sampler.save(tmp / SAMPLER_DIR)
            if directory.exists():
                directory.rename(old)
            tmp.rename(directory)
        except BaseException:
            if old.exists() and not directory.exists():
                old.rename(directory)  # the new model did not land: put the old one back
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "PretrainedModel":
        """Rebuild a model from a ``save_pretrained`` directory alone.

        Called on :class:`PretrainedModel` itself, the class is looked up by the name in ``config.json``.
        A ``sampler/`` folder, when present, is loaded as ``latent_sampler`` (None otherwise).
        """
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no such file; is {directory} a save_pretrained directory?")
        meta = json.loads(config_path.read_text())
        target = cls
        if cls is PretrainedModel:
            from latentforge.models import model_class_by_name

            target = model_class_by_name(meta["class"])
        elif meta["class"] != cls.__name__:
            raise ConfigError(f"{directory} holds a {meta['class']}, not a {cls.__name__}")
        model = target(target.config_class.from_dict(meta["config"]))
        load_model(model, str(directory / WEIGHTS_NAME), strict=True, device=str(map_location))
        if (directory / SAMPLER_DIR).is_dir():
            from latentforge.models.samplers import load_sampler

            model.latent_sampler = load_sampler(directory / SAMPLER_DIR, map_location)
        model.eval()
        return model


class FlatLatentModel(PretrainedModel):
    """A family with a flat latent (latent_dim,) and a prior of its own, which a fitted ex-post latent
    sampler (models/samplers.py) can replace: :meth:`sample` picks one, :meth:`sample_prior` is the family's."""

    def sample(
        self, n: int, generator: torch.Generator | None = None, noise: Tensor | None = None,
        sampler: str = "prior", uniform: Tensor | None = None,
    ) -> DecoderOutput:
        """n images (n, C, H, W) in [0, 1]. ``sampler="prior"``: :meth:`sample_prior` (``noise`` (n, latent_dim),
        standard normal, replaces its draw). ``sampler="gmm"``: z from the fitted ``latent_sampler``; ``noise``
        and ``uniform`` (n,) together replace its draw."""
        if sampler != "prior":
            return self.sample_latent_sampler(sampler, n, generator, noise, uniform)
        if uniform is not None:
            raise ValueError("sample: uniform is only used by a fitted latent sampler (sampler='gmm')")
        return self.sample_prior(n, generator, noise)

    def sample_prior(self, n: int, generator: torch.Generator | None = None, noise: Tensor | None = None) -> DecoderOutput:
        """n images decoded from the family's own prior; ``noise`` (n, latent_dim) replaces its standard normal draw."""
        raise NotImplementedError(f"{type(self).__name__} has no prior of its own")


def train_step(
    model: PretrainedModel,
    optimizers: dict[str, torch.optim.Optimizer],
    batch: dict[str, Tensor],
    step: int,
    forward: nn.Module | None = None,
) -> dict[str, float]:
    """One step of training for any family: every phase's forward, backward and optimiser step.

    ``forward`` is the module to call (a DDP wrapper of ``model`` when distributed, so that gradients
    are all-reduced); it defaults to ``model``. Returns the phase logs as floats, prefixed by phase
    when the family has more than one.
    """
    forward = forward if forward is not None else model
    logs: dict[str, float] = {}
    for phase in model.phases:
        optimizer = optimizers[phase]
        optimizer.zero_grad(set_to_none=True)
        out = forward(batch, phase=phase, step=step)
        out.loss.backward()
        optimizer.step()
        prefix = "" if len(model.phases) == 1 else f"{phase}/"
        logs[f"{prefix}loss"] = float(out.loss.detach())
        logs.update({f"{prefix}{k}": float(v) for k, v in out.logs.items()})
    model.after_step(step)
    return logs
