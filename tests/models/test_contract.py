"""The model contract (models/base.py, DESIGN.md "Model"), checked for every family in ``MODELS``.

Each test takes the ``family`` fixture, so a newly registered family is covered without editing this
file. Every family is built from its config's ``tiny()`` preset; the suite must stay fast on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import types
import typing

import pytest
import torch

from latentforge.models import MODELS, ConfigError, DecoderOutput, EncoderOutput, PretrainedModel, build_model, train_step

# Fields where a negative value is legitimate, so the "negative numbers are rejected" check skips them.
NEGATIVE_ALLOWED = {"seed"}

OVERFIT_STEPS = 50
WINDOW = 4  # steps averaged at each end of the overfitting run


def try_encode(model: PretrainedModel, images: torch.Tensor) -> EncoderOutput | None:
    """``model.encode(images)``, or None for a family that declares ``has_encoder = False`` (a GAN),
    whose ``encode`` must then say so with NotImplementedError."""
    if model.has_encoder:
        return model.encode(images)
    with pytest.raises(NotImplementedError):
        model.encode(images)
    return None


def state_equal(a: PretrainedModel, b: PretrainedModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Configs


def test_class_names_are_unique():
    # from_pretrained on PretrainedModel finds the class by the name written in config.json.
    names = [cls.__name__ for cls in MODELS.values()]
    assert len(names) == len(set(names)), f"duplicate class names in MODELS: {sorted(names)}"


def test_tiny_config_round_trips(family):
    cls = MODELS[family]
    config = cls.config_class.tiny()
    plain = json.loads(json.dumps(config.to_dict()))  # what config.json / params.yaml hold
    assert cls.config_class.from_dict(plain) == config
    model = build_model(family, **plain)
    assert type(model) is cls and model.config == config


def _negative(hint):
    """-1 or -1.0 for an int / float field (also ``int | None`` ...), None for any other type."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if float in kinds:
        return -1.0
    if int in kinds:
        return -1
    return None


def test_bad_configs_raise_config_error(family):
    cls = MODELS[family]
    config_class = cls.config_class

    def rejected(**values) -> bool:
        """True when building the model from tiny(**values) raises ConfigError; another error fails."""
        try:
            cls(config_class.tiny(**values))
        except ConfigError:
            return True
        except Exception as exc:  # noqa: BLE001 - the point is to name the wrong exception
            pytest.fail(f"{config_class.__name__} with {values!r} raised {type(exc).__name__}, not ConfigError: {exc}")
        return False

    # A wrong type, directly and through from_dict (what a params.yaml typo produces).
    assert rejected(lr="fast"), "lr='fast' accepted"
    with pytest.raises(ConfigError, match="lr"):
        config_class.from_dict({**config_class.tiny().to_dict(), "lr": "fast"})
    with pytest.raises(ConfigError, match="no_such_field"):
        config_class.from_dict({"no_such_field": 1})
    # The model refuses another family's config.
    other = next((c for c in MODELS.values() if c.config_class is not config_class), None)
    if other is not None:
        with pytest.raises(ConfigError):
            cls(other.config_class.tiny())

    # Negative sizes, rates and weights; nonsense choices. Collected so one run names every hole.
    hints = typing.get_type_hints(config_class)
    tiny = config_class.tiny()
    accepted = []
    for f in dataclasses.fields(config_class):
        if f.name in NEGATIVE_ALLOWED:
            continue
        hint, value = hints[f.name], getattr(tiny, f.name)
        if _negative(hint) is not None:
            bad = _negative(hint)
        elif typing.get_origin(hint) is tuple and value and all(isinstance(v, int) for v in value):
            bad = tuple(-1 for _ in value)
        elif hint is str:
            bad = "__no_such_choice__"
        else:
            continue
        if not rejected(**{f.name: bad}):
            accepted.append(f"{f.name}={bad!r}")
    assert not accepted, f"{config_class.__name__} accepted: {', '.join(accepted)}"


# ----------------------------------------------------------------------------------------------------
# Shapes and ranges


def test_encode_decode_sample_shapes(family, tiny_model, batch_for, assert_images):
    model = tiny_model(family).eval()
    c = model.config
    images = batch_for(c, n=5)["image"]
    shape = (5, c.channels, c.image_size, c.image_size)
    with torch.no_grad():
        enc = try_encode(model, images)
        if enc is not None:
            assert isinstance(enc, EncoderOutput)
            assert enc.latent.shape[0] == 5 and enc.latent.is_floating_point()
            assert torch.isfinite(enc.latent).all()
            dec = model.decode(enc.latent)
            assert isinstance(dec, DecoderOutput)
            assert_images(dec.images, shape)
        out = model.sample(3, generator=seeded(0))
    assert isinstance(out, DecoderOutput)
    assert_images(out.images, (3, *shape[1:]))


def test_phases_and_optimizers(family, tiny_model, batch_for):
    model = tiny_model(family)
    optimizers = model.configure_optimizers()
    assert set(optimizers) == set(model.phases) and model.phases
    own = {id(p) for p in model.parameters()}
    for phase, opt in optimizers.items():
        params = [p for group in opt.param_groups for p in group["params"]]
        assert params and all(id(p) in own for p in params), f"optimiser {phase!r} holds foreign parameters"
    with pytest.raises((ValueError, KeyError)):
        model(batch_for(model.config), phase="__no_such_phase__")


def test_validation_step(family, tiny_model, batch_for):
    model = tiny_model(family).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figures = model.validation_step(batch_for(model.config))
    assert model.val_metric in figures, f"validation_step gives {sorted(figures)}, no {model.val_metric!r}"
    for key, value in figures.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and torch.isfinite(value), key
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "validation_step changed the model's state"


# ----------------------------------------------------------------------------------------------------
# Save / load


def test_save_pretrained_round_trip(family, tiny_model, batch_for, tmp_path):
    model = tiny_model(family)
    batch = batch_for(model.config)
    optimizers = model.configure_optimizers()
    for step in range(2):  # so that running statistics / EMA buffers are not at their initial values
        train_step(model, optimizers, batch, step)
    model.eval()
    path = model.save_pretrained(tmp_path / "model")
    assert json.loads((path / "config.json").read_text())["class"] == type(model).__name__

    for loaded in (type(model).from_pretrained(path), PretrainedModel.from_pretrained(path)):
        assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
        state_equal(model, loaded)
        with torch.no_grad():
            encoded = []
            for m in (model, loaded):
                torch.manual_seed(0)  # for families whose encode draws noise
                encoded.append(try_encode(m, batch["image"]))
            if encoded[0] is not None:
                latent = encoded[0].latent
                assert torch.equal(latent, encoded[1].latent)
                assert torch.equal(model.decode(latent).images, loaded.decode(latent).images)
            a = model.sample(2, generator=seeded(1)).images
            b = loaded.sample(2, generator=seeded(1)).images
        assert torch.equal(a, b)


def test_from_pretrained_refuses_other_class(family, tiny_model, tmp_path):
    model = tiny_model(family)
    path = model.save_pretrained(tmp_path / "model")
    other = next((c for c in MODELS.values() if c is not type(model)), None)
    if other is None:
        pytest.skip("only one family registered")
    with pytest.raises(ConfigError):
        other.from_pretrained(path)


def test_save_pretrained_replaces_a_model_only_when_the_new_one_is_written(tmp_path, monkeypatch):
    tiny = {"image_size": 16, "channels": 1, "latent_dim": 4}
    first, second = build_model("ae", **tiny), build_model("ae", **tiny, activation="tanh")
    path = first.save_pretrained(tmp_path / "model")
    second.save_pretrained(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert PretrainedModel.from_pretrained(path).config == second.config

    rename = pathlib.Path.rename

    def failing_final_rename(self, target):
        if pathlib.Path(target) == path and self.name.startswith(".model.") and not self.name.endswith(".old"):
            raise OSError("disk gone")
        return rename(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", failing_final_rename)
    with pytest.raises(OSError, match="disk gone"):
        first.save_pretrained(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert PretrainedModel.from_pretrained(path).config == second.config


# ----------------------------------------------------------------------------------------------------
# Reproducibility


def test_same_seed_same_model_and_training(family, tiny_model, batch_for):
    a, b = tiny_model(family, seed=0), tiny_model(family, seed=0)
    state_equal(a, b)
    batch = batch_for(a.config)
    logs = []
    for model in (a, b):
        optimizers = model.configure_optimizers()
        torch.manual_seed(1)
        logs.append([train_step(model, optimizers, batch, step) for step in range(3)])
    assert logs[0] == logs[1]
    state_equal(a, b)
    c = tiny_model(family, seed=1)
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


def test_sample_depends_only_on_its_generator(family, tiny_model, batch_for):
    model = tiny_model(family)
    optimizers = model.configure_optimizers()
    train_step(model, optimizers, batch_for(model.config), 0)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model.sample(4, generator=seeded(7)).images
        torch.manual_seed(2)  # a different global RNG state must not matter
        b = model.sample(4, generator=seeded(7)).images
        c = model.sample(4, generator=seeded(8)).images
        torch.manual_seed(3)
        d = model.sample(4).images
        torch.manual_seed(3)
        e = model.sample(4).images
    assert torch.equal(a, b), "same generator seed, different samples"
    assert not torch.equal(a, c), "different generator seeds, identical samples"
    assert torch.equal(d, e), "same global seed, different samples"


# ----------------------------------------------------------------------------------------------------
# Training


def _tracked_key(model: PretrainedModel, logs: dict[str, float]) -> str:
    """The logged term that must fall when overfitting one batch.

    One phase: its ``loss``. Several phases: the reconstruction term where the family logs one (the
    other phases are adversarial or a prior over codes that move while the autoencoder learns). A
    family with no reconstruction term at all (a GAN) has no loss that must fall by construction except
    the first phase's, its discriminator's, which learns to tell one fixed batch from early samples.
    """
    if len(model.phases) == 1:
        return "loss"
    recon = [k for k in logs if k.rsplit("/", 1)[-1].startswith("recon")]
    return recon[0] if recon else f"{model.phases[0]}/loss"


def test_loss_falls_when_overfitting_one_batch(family, tiny_model, batch_for):
    model = tiny_model(family)
    batch = batch_for(model.config)
    optimizers = model.configure_optimizers()
    torch.manual_seed(0)
    history = [train_step(model, optimizers, batch, step) for step in range(OVERFIT_STEPS)]
    assert all(math.isfinite(v) for logs in history for v in logs.values()), "non-finite logs"
    key = _tracked_key(model, history[0])
    values = [logs[key] for logs in history]
    first = sum(values[:WINDOW]) / WINDOW
    last = sum(values[-WINDOW:]) / WINDOW
    assert last < first - 0.05 * abs(first), (
        f"{key}: mean of first {WINDOW} steps {first:.4f}, of last {WINDOW} {last:.4f}"
    )


def test_gradients_reach_the_encoder(family, tiny_model, batch_for):
    model = tiny_model(family)
    batch = batch_for(model.config)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # The encoder's parameters: those the latent depends on (names differ between families). A random
    # projection, not a sum, so that normalised outputs still give every such parameter a gradient.
    torch.manual_seed(0)
    enc = try_encode(model, batch["image"])
    if enc is None:
        pytest.skip(f"{family} has no encoder (has_encoder = False)")
    outputs = [t for t in (enc.latent, enc.mean, enc.logvar) if t is not None and t.requires_grad]
    if not outputs:
        pytest.skip(f"{family}.encode returns a latent with no gradient path (no encoder network)")
    probe = sum((t.float() * torch.randn_like(t.float())).sum() for t in outputs)
    grads = torch.autograd.grad(probe, [p for _, p in named], allow_unused=True)
    encoder = [n for (n, _), g in zip(named, grads) if g is not None and bool(g.abs().sum() > 0)]
    assert encoder, f"{family}: encode's output depends on no parameter"

    # Every phase's loss, backpropagated: each encoder parameter must receive a non-zero gradient.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    for phase in model.phases:
        model(batch, phase=phase, step=0).loss.backward()
    params = dict(named)
    missing = [n for n in encoder if params[n].grad is None or not bool(params[n].grad.abs().sum() > 0)]
    assert not missing, f"{family}: no gradient from the loss reaches {missing}"
