"""latentforge model zoo: pure PyTorch, one file per family. No ray, mlflow, dvc or serving imports here.

``MODELS`` maps the name used in ``params.yaml`` and on the command line to the model class; each class
names its config dataclass in ``config_class``.
"""

from __future__ import annotations

from latentforge.models.base import (
    ConfigError,
    DecoderOutput,
    EncoderOutput,
    LossOutput,
    ModelConfig,
    PretrainedModel,
    train_step,
)

# Classic autoencoders: a flat code and no prior.
from latentforge.models.autoencoders import (
    AutoEncoder,
    ConvAutoEncoder,
    DenoisingAutoEncoder,
    LinearAutoEncoder,
    LSTMAutoEncoder,
    MLPAutoEncoder,
    SparseAutoEncoder,
    TiedAutoEncoder,
)
# Generative families with a flat (B, latent_dim) latent and a prior to sample from.
from latentforge.models.aae import AAE, AAEConfig
from latentforge.models.gan import GAN, GANConfig
from latentforge.models.glo import GLO, GLOConfig
from latentforge.models.vae import VAE, VAEConfig
# Hierarchical vector-quantised autoencoder (the autoregressive priors over its codes are in priors.py).
from latentforge.models.vqvae2 import VQVAE2, VQVAE2Config

MODELS: dict[str, type[PretrainedModel]] = {
    # classic autoencoders
    "ae": AutoEncoder,
    "mlp_ae": MLPAutoEncoder,
    "conv_ae": ConvAutoEncoder,
    "sparse_ae": SparseAutoEncoder,
    "denoising_ae": DenoisingAutoEncoder,
    "tied_ae": TiedAutoEncoder,
    "lstm_ae": LSTMAutoEncoder,
    "linear_ae": LinearAutoEncoder,
    # flat-latent generative families
    "vae": VAE,
    "gan": GAN,
    "aae": AAE,
    "glo": GLO,
    # vector-quantised
    "vqvae2": VQVAE2,
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
