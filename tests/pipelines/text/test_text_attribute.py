"""On a tiny shapes preset, f_tau learns what the words mean: images generated for two prompts that differ
only in the colour are read as those two colours by the attribute classifier (pipelines/classifier.py).

The preset: every (shape, colour) pair, large and centred, 8 jittered copies each, 16x16; the decoder is
a vanilla autoencoder (the fastest family to learn colour). In-process and a few seconds; the Ray Train
path that runs the same loss is covered by test_text.py."""

from __future__ import annotations

import numpy as np
import torch

from latentforge.models import build_model, train_step
from latentforge.models.text import freeze, state_digest, text_map_for
from latentforge.pipelines.classifier import train_classifier
from latentforge.pipelines.data import SHAPE_FACTORS, render_shape, shape_caption
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.runtime.text import HashedTextEncoder


def _preset():
    rng = np.random.default_rng(0)
    images, captions, colours = [], [], []
    for shape in SHAPE_FACTORS["shape"]:
        for c, colour in enumerate(SHAPE_FACTORS["colour"]):
            for _ in range(8):
                values = {"shape": shape, "colour": colour, "size": "large", "hpos": "center", "vpos": "middle"}
                images.append(render_shape(values, 16, (float(rng.integers(-1, 2)), float(rng.integers(-1, 2)))))
                captions.append(shape_caption(values, rng))
                colours.append(c)
    return np.stack(images), captions, np.array(colours)


def test_two_prompts_differ_in_the_named_attribute():
    raw, captions, colour = _preset()
    images = batch_to_tensor(raw)
    torch.manual_seed(0)
    decoder = build_model("ae", image_size=16, channels=3, latent_dim=16, lr=3e-3, loss="mse")
    opts = decoder.configure_optimizers()
    for step in range(1000):
        idx = torch.randint(0, len(images), (32,))
        train_step(decoder, opts, {"image": images[idx], "label": torch.zeros(32, dtype=torch.int64), "index": idx}, step)
    freeze(decoder)
    digest = state_digest(decoder)

    # f_tau on an aligned half of the captions, through the frozen decoder.
    encoder = HashedTextEncoder(256)
    aligned = np.arange(0, len(images), 2)
    emb = torch.from_numpy(encoder.encode([captions[i] for i in aligned]))
    x = images[aligned]
    with torch.no_grad():
        target = decoder.encode(x).latent
    text_map = text_map_for(decoder, 256, hidden_dim=64, dropout=0.0, lr=3e-3)
    opt = torch.optim.Adam(text_map.parameters(), lr=text_map.config.lr)
    losses = []
    for step in range(400):
        idx = torch.randint(0, len(aligned), (32,))
        out = text_map.loss(decoder, {"embedding": emb[idx], "image": x[idx], "target_latent": target[idx]})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert state_digest(decoder) == digest  # the decoder stayed frozen

    clf = train_classifier(raw, {"factor_colour": colour}, {"factor_colour": 8}, epochs=8, batch_size=32, lr=5e-3,
                           widths=(8,), feature_dim=16, seed=0)
    with torch.no_grad():
        assert float((clf(images)["factor_colour"].argmax(1).numpy() == colour).mean()) >= 0.98

    text_map.eval()
    names = SHAPE_FACTORS["colour"]
    with torch.no_grad():
        for a, b in (("red", "blue"), ("green", "magenta")):
            prompts = [f"a large {a} square in the center", f"a large {b} square in the center"]
            generated = text_map.generate(decoder, torch.from_numpy(encoder.encode(prompts)), 1, 0.0)[:, 0]
            assert [names[i] for i in clf(generated)["factor_colour"].argmax(1).tolist()] == [a, b]
