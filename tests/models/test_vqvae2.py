"""VQVAE2: latent sizes from the input size and factors, config errors, encode/decode/decode_indices/
sample shapes, the straight-through gradient to the encoders, the staged (or joint) training of the
autoencoder and the priors through the generic train_step, and save/load."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from latentforge.models import MODELS, ConfigError, PretrainedModel, build_model, train_step
from latentforge.models.vqvae2 import VQVAE2, VQVAE2Config

torch.set_num_threads(1)


def _model(**overrides) -> VQVAE2:
    torch.manual_seed(0)
    return VQVAE2(VQVAE2Config.tiny(**overrides))


def _batch(n: int = 8, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Smooth blobs rather than white noise: something an autoencoder can learn in a few steps.
    images = F.interpolate(torch.rand(n, 1, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear")
    return {"image": images, "label": torch.full((n,), -1), "index": torch.arange(n)}


def test_registered():
    assert MODELS["vqvae2"] is VQVAE2
    assert isinstance(build_model("vqvae2", **VQVAE2Config.tiny().to_dict()), VQVAE2)


@pytest.mark.parametrize("size, bottom, top", [(16, 8, 4), (28, 14, 7), (32, 16, 8)])
def test_latent_sizes_follow_the_input_size(size, bottom, top):
    model = _model(image_size=size)
    out = model.encode(torch.rand(2, 1, size, size))
    idx_t, idx_b = out.indices
    assert idx_t.shape == (2, top, top) and idx_b.shape == (2, bottom, bottom)
    assert out.latent.shape == (2, 2 * model.config.code_dim, bottom, bottom) == (2, *model.latent_shape)
    assert model.decode(out.latent).images.shape == (2, 1, size, size)


def test_other_factors():
    model = _model(image_size=32, bottom_factor=4, top_factor=16)
    idx_t, idx_b = model.encode(torch.rand(1, 1, 32, 32)).indices
    assert idx_t.shape == (1, 2, 2) and idx_b.shape == (1, 8, 8)
    model = _model(image_size=8, bottom_factor=1, top_factor=2)
    idx_t, idx_b = model.encode(torch.rand(1, 1, 8, 8)).indices
    assert idx_t.shape == (1, 4, 4) and idx_b.shape == (1, 8, 8)


def test_defaults_are_for_mnist():
    config = VQVAE2Config()
    assert (config.image_size, config.channels, config.bottom_size, config.top_size) == (28, 1, 14, 7)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(image_size=28, top_factor=8), "top_factor .8. does not divide the input size 28"),
        (dict(image_size=30, bottom_factor=4, top_factor=8), "bottom_factor"),
        (dict(bottom_factor=3, top_factor=6), "power of two"),
        (dict(bottom_factor=4, top_factor=4), "larger than bottom_factor"),
        (dict(image_size=-16), "image_size must be > 0"),
        (dict(num_codes=-1), "num_codes must be > 0"),
        (dict(code_dim=0), "code_dim must be > 0"),
        (dict(bottom_factor=-2), "bottom_factor must be > 0"),
        (dict(res_blocks=-1), "res_blocks must be >= 0"),
        (dict(decay=1.0), "decay"),
        (dict(dead_threshold=-1.0), "dead_threshold"),
        (dict(prior_dim=30, prior_heads=4), "multiple of prior_heads"),
        (dict(num_codes=2.5), "num_codes must be of type int"),
        (dict(vq_steps=-1), "vq_steps must be >= 0"),
        (dict(bottom_dropout=1.0), "bottom_dropout must be in"),
        (dict(bottom_dropout=-0.1), "bottom_dropout must be in"),
    ],
)
def test_bad_configs_raise_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        VQVAE2Config.tiny(**overrides)


def test_config_round_trips_through_a_dict():
    config = VQVAE2Config.tiny(num_codes=32)
    assert VQVAE2Config.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown field"):
        VQVAE2Config.from_dict({"codes": 3})


def test_decode_and_decode_indices_agree_and_images_are_in_range():
    model = _model().eval()
    x = _batch(4)["image"]
    enc = model.encode(x)
    with torch.no_grad():
        from_latent = model.decode(enc.latent).images
        from_indices = model.decode_indices(*enc.indices).images
    torch.testing.assert_close(from_latent, from_indices)
    assert from_latent.shape == x.shape
    assert float(from_latent.min()) >= 0 and float(from_latent.max()) <= 1


def test_decode_rejects_bad_input():
    model = _model().eval()
    with pytest.raises(ValueError, match="latent must have shape"):
        model.decode(torch.zeros(1, 3, 8, 8))
    top, bottom = torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="top indices must have shape"):
        model.decode_indices(bottom, bottom)
    with pytest.raises(ValueError, match=r"bottom indices must lie in \[0, 16\)"):
        model.decode_indices(top, bottom + 16)
    with pytest.raises(ValueError, match="integers"):
        model.decode_indices(top.float(), bottom)
    with pytest.raises(ValueError, match="images must have shape"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="phases"):
        model(_batch(2), phase="vq")  # the old phase names are gone: one "main" phase


def test_straight_through_gradient_reaches_the_encoders():
    model = _model()
    x = _batch(4)["image"]
    (q_t, _, _), (q_b, _, _) = model._quantize(x, update=False)
    F.mse_loss(model._decode_raw(q_t, q_b), x).backward()  # reconstruction only, no commitment
    for name, module in (("enc_b", model.enc_b), ("enc_t", model.enc_t), ("pre_t", model.pre_t)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


def test_encode_never_updates_the_codebooks():
    model = _model().train()
    before = model.vq_b.embed.clone()
    model.encode(_batch(4)["image"])
    assert torch.equal(model.vq_b.embed, before)


def test_train_step_trains_both_parts_and_logs():
    model = _model(lr=3e-3, prior_lr=3e-3).train()
    optimizers = model.configure_optimizers()
    assert set(optimizers) == set(model.phases) == {"main"}
    assert [g["lr"] for g in optimizers["main"].param_groups] == [3e-3, 3e-3]
    batch = _batch(16)
    first = train_step(model, optimizers, batch, 0)
    for key in (
        "loss", "recon", "commit_top", "commit_bottom", "usage_top", "usage_bottom",
        "perplexity_top", "perplexity_bottom", "prior_ce_top", "prior_ce_bottom",
    ):
        assert key in first, key
    for step in range(1, 40):
        last = train_step(model, optimizers, batch, step)
    assert last["recon"] < 0.5 * first["recon"]
    assert last["prior_ce_top"] + last["prior_ce_bottom"] < first["prior_ce_top"] + first["prior_ce_bottom"]
    assert last["usage_bottom"] > 0.5


def _changed(model: VQVAE2, state: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, state[k])}


def test_vq_steps_train_the_autoencoder_then_only_the_priors_on_frozen_codes():
    model = _model(vq_steps=2).train()
    optimizers = model.configure_optimizers()
    batch = _batch(8)
    assert [model.stages(s) for s in (0, 1, 2, 50)] == [(True, False), (True, False), (False, True), (False, True)]

    for step in (0, 1):  # the autoencoder alone: encoders, decoders and codebooks move, the priors do not
        state = {k: v.clone() for k, v in model.state_dict().items()}
        logs = train_step(model, optimizers, batch, step)
        changed = _changed(model, state)
        assert "vq_b.embed" in changed and "enc_b.0.weight" in changed and "dec.0.weight" in changed
        assert not any(k.startswith("prior_") for k in changed)
        assert "recon" in logs and "prior_ce_top" not in logs

    for step in (2, 3):  # the priors alone; the autoencoder stays bit-identical (no Adam momentum drift)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        logs = train_step(model, optimizers, batch, step)
        changed = _changed(model, state)
        assert changed and all(k.startswith("prior_") for k in changed), changed - {k for k in changed if k.startswith("prior_")}
        assert "prior_ce_bottom" in logs and "recon" not in logs
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prior_"))


def test_bottom_dropout_hides_whole_bottom_maps_in_training_only():
    model = _model(bottom_dropout=0.5).train()
    q_b = torch.randn(64, 8, 8, 8)
    dropped = model._drop_bottom(q_b)
    zero = dropped.flatten(1).eq(0).all(1)
    assert 0 < int(zero.sum()) < 64  # some images lose their whole bottom map ...
    assert torch.equal(dropped[~zero], q_b[~zero])  # ... the others keep it untouched
    assert torch.equal(model.eval()._drop_bottom(q_b), q_b)  # never at evaluation or sampling
    assert torch.equal(_model().train()._drop_bottom(q_b), q_b)  # off by default


def test_joint_training_keeps_the_prior_loss_off_the_autoencoder():
    model = _model().train()
    batch = _batch(8)
    model(batch, step=0).loss.backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("prior_") and p.grad is not None}
    # The same step with the priors' loss removed: the autoencoder's gradients must not change.
    alone = _model(vq_steps=1).train()
    alone.load_state_dict(_model().state_dict())
    alone(batch, step=0).loss.backward()
    for n, p in alone.named_parameters():
        if not n.startswith("prior_") and p.grad is not None:
            assert torch.allclose(joint[n], p.grad), n


def test_sample_shapes_range_and_reproducibility():
    model = _model().eval()
    images = model.sample(3, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (3, 1, 16, 16)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    again = model.sample(3, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(images, again)
    top, bottom = model.sample_indices(3, top_k=1)
    assert top.shape == (3, 4, 4) and bottom.shape == (3, 8, 8)
    assert torch.equal(top, model.sample_indices(3, generator=torch.Generator().manual_seed(5), top_k=1)[0])


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    optimizers = model.configure_optimizers()
    for step in range(3):
        train_step(model, optimizers, _batch(8, seed=step), step)
    model.eval()
    model.save_pretrained(tmp_path / "vqvae2")
    loaded = PretrainedModel.from_pretrained(tmp_path / "vqvae2")
    assert isinstance(loaded, VQVAE2) and not loaded.training
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = _batch(4, seed=9)["image"]
    a, b = model.encode(x), loaded.encode(x)
    for ia, ib in zip(a.indices, b.indices):
        assert torch.equal(ia, ib)
    torch.testing.assert_close(model.decode(a.latent).images, loaded.decode(b.latent).images)


def test_validation_step_reports_per_level_figures_and_changes_nothing():
    model = _model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figures = model.validation_step(_batch(8))
    assert model.val_metric == "checkpoint_score"
    assert figures["checkpoint_score"] == figures["prior_ce_top"] + figures["prior_ce_bottom"] + figures["recon_mse"]
    assert set(figures) == {
        "checkpoint_score", "recon_mse", "prior_ce_top", "prior_ce_bottom", "usage_top", "usage_bottom", "perplexity_top", "perplexity_bottom",
    }
    assert all(v.dim() == 0 and torch.isfinite(v) for v in figures.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
