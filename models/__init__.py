"""latentforge model zoo: pure PyTorch, one file per family. No ray, mlflow, dvc or serving imports here.

``MODELS`` maps the name used in ``params.yaml`` and on the command line to the model class; each class
names its config dataclass in ``config_class``.
"""

from __future__ import annotations

from models.base import (
    ConfigError,
    DecoderOutput,
    EncoderOutput,
    LossOutput,
    ModelConfig,
    PretrainedModel,
    train_step,
)

# --- autoencoders.py (helper A) ---
# --- vae.py, gan.py, aae.py, glo.py (helper B) ---
# --- vqvae2.py, priors.py (helper C) ---

MODELS: dict[str, type[PretrainedModel]] = {
    # --- autoencoders (helper A) ---
    # --- vae / gan / aae / glo (helper B) ---
    # --- vqvae2 (helper C) ---
}


def model_class_by_name(class_name: str) -> type[PretrainedModel]:
    """The registered class whose ``__name__`` is ``class_name`` (as written in ``config.json``)."""
    for cls in MODELS.values():
        if cls.__name__ == class_name:
            return cls
    raise ConfigError(f"unknown model class {class_name!r}; registered: {', '.join(sorted(c.__name__ for c in MODELS.values()))}")


def build_model(name: str, **config: object) -> PretrainedModel:
    """Build the family registered as ``name`` from config values (unknown keys are an error)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    return cls(cls.config_class.from_dict(dict(config)))


__all__ = [
    "MODELS",
    "ConfigError",
    "DecoderOutput",
    "EncoderOutput",
    "LossOutput",
    "ModelConfig",
    "PretrainedModel",
    "build_model",
    "model_class_by_name",
    "train_step",
]
