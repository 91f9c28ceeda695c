"""f_tau (models/text.py): shapes per family, save/load, config errors, frozen decoders, code sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentforge.models import MODELS, ConfigError
from latentforge.models.text import TextMap, TextMapConfig, freeze, sample_codes, state_digest, text_map_for


@pytest.mark.parametrize("family, overrides", [("vae", {}), ("vqvae2", {}), ("vqvae2", {"code_rank": 4}), ("gan", {}),
                                               ("conv_ae", {})])
def test_text_map_fits_the_decoder_and_trains_through_it(family, overrides, tmp_path):
    torch.manual_seed(0)
    cls = MODELS[family]
    decoder = freeze(cls(cls.config_class.tiny()))
    digest = state_digest(decoder)
    text_map = text_map_for(decoder, 24, hidden_dim=16, **overrides)
    emb = torch.randn(5, 24)
    x = torch.rand(5, decoder.config.channels, decoder.config.image_size, decoder.config.image_size)
    if text_map.config.kind == "codes":
        top, bottom = text_map(emb)
        if overrides.get("code_rank"):  # low rank: a small per-position vector, one shared map to the K logits
            assert text_map.bottom_head.out_features == 4 * decoder.bottom_shape[0] * decoder.bottom_shape[1]
        assert top.shape == (5, *decoder.top_shape, decoder.config.num_codes)
        assert bottom.shape == (5, *decoder.bottom_shape, decoder.config.num_codes)
        batch = {"embedding": emb, "top": decoder.encode(x).indices[0], "bottom": decoder.encode(x).indices[1]}
    else:
        assert text_map(emb).shape == (5, *text_map.config.latent_shape) == (5, decoder.config.latent_dim)
        batch = {"embedding": emb, "image": x}
    out = text_map.loss(decoder, batch)
    out.loss.backward()
    assert all(p.grad is not None for p in text_map.parameters())
    assert all(p.grad is None for p in decoder.parameters())  # no gradient reaches the frozen decoder
    assert state_digest(decoder) == digest
    images = text_map.eval().generate(decoder, emb[:2], n=3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, decoder.config.channels, decoder.config.image_size, decoder.config.image_size)
    again = TextMap.from_pretrained(text_map.save_pretrained(tmp_path / "tm"))
    assert torch.equal(again(emb)[0] if isinstance(again(emb), tuple) else again(emb),
                       text_map(emb)[0] if isinstance(text_map(emb), tuple) else text_map(emb))


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="latent_shape"):
        TextMapConfig(kind="latent")
    with pytest.raises(ConfigError, match="num_codes"):
        TextMapConfig(kind="codes", top_shape=(2, 2), bottom_shape=(4, 4))
    with pytest.raises(ConfigError, match="code_rank"):
        TextMapConfig(kind="codes", num_codes=8, top_shape=(2, 2), bottom_shape=(4, 4), code_rank=-1)
    with pytest.raises(ConfigError, match="kind"):
        TextMapConfig(kind="pixels", latent_shape=(4,))
    with pytest.raises(ValueError, match="embedding must have shape"):
        TextMap(TextMapConfig(embed_dim=8, latent_shape=(4,)))(torch.zeros(2, 9))
    with pytest.raises(ConfigError, match="word_attention"):
        TextMapConfig(latent_shape=(4,), word_attention=-1)


def test_word_attention_reads_the_words_and_ignores_padding():
    torch.manual_seed(0)
    m = TextMap(TextMapConfig(embed_dim=8, kind="codes", num_codes=6, top_shape=(2, 2), bottom_shape=(4, 4),
                              word_attention=3, attention_dim=4)).eval()
    words, mask = torch.randn(2, 5, 8), torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    top, bottom = m(words, mask)
    assert top.shape == (2, 2, 2, 6) and bottom.shape == (2, 4, 4, 6)
    padded = words.clone()
    padded[0, 3:] = 100.0  # what sits in the padding slots does not matter
    assert torch.equal(m(padded, mask)[0][0], top[0])
    changed = words.clone()
    changed[0, 1] = torch.randn(8)  # a real word does
    assert not torch.allclose(m(changed, mask)[0][0], top[0])
    with pytest.raises(ValueError, match="word attention needs"):
        m(words[:, 0])


def test_sample_codes_mode_and_seeded_draws():
    logits = torch.randn(4, 3, 3, 10)
    assert torch.equal(sample_codes(logits, 0.0), logits.argmax(-1))
    a = sample_codes(logits, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, sample_codes(logits, 1.0, torch.Generator().manual_seed(1)))
    peaked = torch.full((2, 10), -1e4)
    peaked[:, 3] = 0
    assert torch.equal(sample_codes(peaked, 1.0, torch.Generator().manual_seed(2)), torch.tensor([3, 3]))


def test_image_captioner_maps_images_to_unit_embeddings_and_learns_them():
    from latentforge.models.text import ImageCaptioner

    torch.manual_seed(0)
    g = ImageCaptioner(channels=3, embed_dim=16)
    images = torch.zeros(2, 3, 16, 16)
    images[0, 0, 2:8, 2:8], images[1, 2, 10:12, :] = 1.0, 1.0  # a red square and a blue bar
    targets = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    out = g(images)
    assert out.shape == (2, 16) and torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        before = float((g(images) * targets).sum(-1).mean())
    opt = torch.optim.Adam(g.parameters(), 1e-2)
    for _ in range(30):
        loss = 1 - (g(images) * targets).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = (g(images) * targets).sum(-1)
    assert float(after.mean()) > max(before, 0.9)  # each image towards its own caption
    assert float(g(images)[0] @ targets[1]) < float(after[0])


def test_image_captioner_streams_split_form_from_colour():
    """The form stream cannot see colour and the colour stream cannot see layout, so neither can tie a
    shape to a colour (the shortcut that read held-out combinations' shapes wrongly)."""
    from latentforge.models.text import ImageCaptioner

    torch.manual_seed(0)
    g = ImageCaptioner(channels=3, embed_dim=16).eval()
    red_square, blue_square, red_bar = (torch.zeros(1, 3, 16, 16) for _ in range(3))
    red_square[0, 0, 4:8, 4:8] = 1.0
    blue_square[0, 2, 4:8, 4:8] = 1.0
    red_bar[0, 0, 2, 0:16] = 1.0  # the same 16 red pixels, laid out differently
    form, colour = g.form_part, g.colour_part
    with torch.no_grad():
        assert torch.equal(form(red_square), form(blue_square))
        assert not torch.allclose(form(red_square), form(red_bar))
        assert torch.allclose(colour(red_square), colour(red_bar), atol=1e-6)
        assert not torch.allclose(colour(red_square), colour(blue_square))
        # and the whole captioner is the normalised sum of the two
        expected = torch.nn.functional.normalize(form(red_square) + colour(red_square), dim=-1)
        assert torch.allclose(g(red_square), expected, atol=1e-6)


def _tiny_bank(decoder, count: int, embed_dim: int = 0, text_weight: float = 0.0):
    from latentforge.models.text import CodeBank

    x = torch.rand(count, decoder.config.channels, decoder.config.image_size, decoder.config.image_size)
    top, bottom = decoder.encode(x).indices
    embedding = torch.nn.functional.normalize(torch.randn(count, embed_dim), dim=-1) if embed_dim else None
    rows = 3 * torch.arange(count) + 5  # train-split rows, not bank positions
    return CodeBank(top, bottom, embedding, text_weight, rows=rows)


def test_code_bank_scores_whole_maps_by_f_tau_likelihood_plus_retrieval(tmp_path):
    from latentforge.models.text import CodeBank

    torch.manual_seed(0)
    decoder = freeze(MODELS["vqvae2"](MODELS["vqvae2"].config_class.tiny()))
    bank = _tiny_bank(decoder, 7, embed_dim=6, text_weight=0.5)
    k = decoder.config.num_codes
    top_logits = torch.randn(3, *decoder.top_shape, k)
    bottom_logits = torch.randn(3, *decoder.bottom_shape, k)
    text = torch.randn(3, 6)
    scores = bank.scores(top_logits, bottom_logits, text)
    positions = bank.top[0].numel() + bank.bottom[0].numel()
    for b in range(3):
        for j in range(7):  # brute force: the map's log-probability under the per-position softmaxes
            ll = sum(torch.log_softmax(lg[b], -1).gather(-1, codes[j][..., None]).sum()
                     for lg, codes in ((top_logits, bank.top), (bottom_logits, bank.bottom)))
            cos = torch.nn.functional.cosine_similarity(text[b], bank.embedding[j], dim=0)
            assert scores[b, j].item() == pytest.approx((ll + 0.5 * positions * cos).item(), rel=1e-4, abs=1e-3)
    # Without embeddings (no captioner) the score is the likelihood alone.
    plain = CodeBank(bank.top, bank.bottom).scores(top_logits, bottom_logits, text)
    assert torch.allclose(scores - plain, 0.5 * positions * torch.nn.functional.normalize(text, dim=-1) @ bank.embedding.T, atol=1e-3)
    # The mode: the best n in order; samples: seeded, n distinct rows; a bank smaller than n repeats.
    assert torch.equal(bank.pick(scores, 3), scores.argsort(1, descending=True)[:, :3])
    drawn = bank.pick(scores, 5, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, bank.pick(scores, 5, 1.0, torch.Generator().manual_seed(1)))
    assert all(len(set(row.tolist())) == 5 for row in drawn)
    assert bank.pick(scores, 10).shape == (3, 10)
    # save/load keeps the codes exactly and the embeddings to float16
    bank.save(tmp_path / "bank.npz")
    again = CodeBank.load(tmp_path / "bank.npz")
    assert torch.equal(again.top, bank.top) and torch.equal(again.bottom, bank.bottom) and again.text_weight == 0.5
    assert torch.allclose(again.embedding, bank.embedding, atol=1e-3) and torch.equal(again.rows, bank.rows)
    with pytest.raises(ValueError, match="rows"):
        CodeBank(bank.top, bank.bottom, rows=bank.rows[:3])


def test_retrieval_space_whitens_the_captions_and_the_bank_scores_in_it(tmp_path):
    from latentforge.models.text import CodeBank, retrieval_space
    from latentforge.runtime.text import CodeBankNp

    torch.manual_seed(0)
    # Captions that vary a lot along one direction and little along another, on a shared offset.
    e = torch.zeros(200, 6)
    e[:, 0] = 3.0
    e[:, 1] = 1.0 * torch.randn(200)
    e[:, 2] = 0.05 * torch.randn(200)
    unit = torch.nn.functional.normalize(e, dim=-1)
    variance = torch.linalg.eigvalsh(torch.cov(unit.T).double()).clamp_min(0).float()  # ascending
    for ridge in (1e-6, 0.1):
        centre, whiten = retrieval_space(e, ridge)
        assert torch.allclose(centre, unit.mean(0), atol=1e-6)
        white = (unit - centre) @ whiten
        # Decorrelated, each principal direction's variance v scaled to v / (v + ridge * v_max): a near-zero
        # ridge gives every direction the captions vary in unit variance; 0.1 leaves the weak ones small.
        expected = variance / (variance + ridge * variance.max())
        assert torch.allclose(torch.cov(white.T), torch.diag(expected), atol=1e-3)
    assert expected[-1] > 0.9 and expected[-2] < 0.5  # (ridge 0.1)

    # Given the captioner's predictions, the residuals (caption - prediction) are whitened instead: a
    # direction captions vary in for the same image (a template word, dim 3 here) then counts far less
    # than one the image fixes (dim 1), though the captions vary as much in both.
    template = torch.randint(0, 2, (200,)).float() * 2 - 1
    captions = torch.stack([torch.full((200,), 3.0), torch.randn(200), 0.01 * torch.randn(200), template], 1)
    predictions = captions * torch.tensor([1.0, 1.0, 1.0, 0.0])  # the image tells everything but the template
    caption = torch.tensor([[3.0, 0.5, 0.0, 1.0]])
    other_template, other_image = caption * torch.tensor([1.0, 1.0, 1.0, -1.0]), caption * torch.tensor([1.0, -1.0, 1.0, 1.0])

    def moved(space, other):  # how far a change of the caption moves it in the whitened space
        centre, whiten = space
        white = lambda x: (torch.nn.functional.normalize(x, dim=-1) - centre) @ whiten  # noqa: E731
        return float((white(other) - white(caption)).norm())

    by_captions, by_residuals = retrieval_space(captions, 1e-3), retrieval_space(captions, 1e-3, predictions)
    assert moved(by_captions, other_template) > moved(by_captions, other_image)
    assert moved(by_residuals, other_template) < 0.25 * moved(by_residuals, other_image)

    decoder = freeze(MODELS["vqvae2"](MODELS["vqvae2"].config_class.tiny()))
    plain = _tiny_bank(decoder, 7, embed_dim=6, text_weight=0.5)
    centre, whiten = retrieval_space(e, ridge=0.1)
    bank = CodeBank(plain.top, plain.bottom, plain.embedding, 0.5, centre, whiten, plain.rows)
    k = decoder.config.num_codes
    top_logits, bottom_logits = torch.randn(3, *decoder.top_shape, k), torch.randn(3, *decoder.bottom_shape, k)
    text = torch.randn(3, 6)
    positions = bank.top[0].numel() + bank.bottom[0].numel()

    def projected(x):
        return torch.nn.functional.normalize((torch.nn.functional.normalize(x, dim=-1) - centre) @ whiten, dim=-1)

    retrieval = bank.scores(top_logits, bottom_logits, text) - CodeBank(bank.top, bank.bottom).scores(top_logits, bottom_logits)
    assert torch.allclose(retrieval, 0.5 * positions * projected(text) @ projected(bank.embedding).T, atol=1e-3)
    assert not torch.allclose(retrieval, plain.scores(top_logits, bottom_logits, text)
                              - CodeBank(bank.top, bank.bottom).scores(top_logits, bottom_logits), atol=1e-2)
    # save/load keeps the space; serving's numpy bank scores the same
    bank.save(tmp_path / "bank.npz")
    again = CodeBank.load(tmp_path / "bank.npz")
    assert torch.allclose(again.whiten, whiten) and torch.allclose(again.centre, centre)
    expected = again.scores(top_logits, bottom_logits, text)
    served = CodeBankNp(tmp_path / "bank.npz").scores(top_logits.numpy(), bottom_logits.numpy(), text.numpy())
    assert np.allclose(served, expected.numpy(), rtol=1e-4, atol=1e-2)


def test_retrieve_decodes_the_best_scoring_bank_maps_and_returns_their_rows():
    torch.manual_seed(0)
    decoder = freeze(MODELS["vqvae2"](MODELS["vqvae2"].config_class.tiny()))
    text_map = text_map_for(decoder, 6, hidden_dim=16).eval()
    emb = torch.randn(2, 6)
    with pytest.raises(ValueError, match="cannot retrieve"):
        text_map.retrieve(decoder, emb)
    text_map.bank = _tiny_bank(decoder, 9, embed_dim=6, text_weight=1.0)
    with torch.no_grad():
        images, rows = text_map.retrieve(decoder, emb, n=2, temperature=0.0)
        best = text_map.bank.scores(*text_map(emb), emb).argsort(1, descending=True)[:, :2]
        expected = decoder.decode_indices(text_map.bank.top[best.flatten()], text_map.bank.bottom[best.flatten()]).images
    assert torch.equal(images.flatten(0, 1), expected)
    assert torch.equal(rows, 3 * best + 5)  # the bank's recorded train rows, not its positions


class _Untouchable:
    """A bank that fails the test on any read."""

    def __getattr__(self, name):
        raise AssertionError(f"generate read the bank ({name})")


def test_generate_never_reads_the_bank():
    torch.manual_seed(0)
    decoder = freeze(MODELS["vqvae2"](MODELS["vqvae2"].config_class.tiny()))
    text_map = text_map_for(decoder, 6, hidden_dim=16).eval()
    emb = torch.randn(2, 6)
    without = text_map.generate(decoder, emb, 3, 1.0, torch.Generator().manual_seed(4))
    text_map.bank = _Untouchable()
    with_bank = text_map.generate(decoder, emb, 3, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(without, with_bank)
    mode = text_map.generate(decoder, emb, 1, 0.0)[:, 0]  # the mode: per-position argmax codes, decoded
    top, bottom = (t.argmax(-1) for t in text_map(emb))
    assert torch.equal(mode, decoder.decode_indices(top, bottom).images)


def test_caption_scorer_scores_saves_and_reranks(tmp_path):
    from latentforge.models.text import CaptionScorer, ImageCaptioner, rerank, retrieval_space

    torch.manual_seed(0)
    captioner = ImageCaptioner(channels=3, embed_dim=8, width=4, colour_width=4).eval()
    centre, whiten = retrieval_space(torch.randn(20, 8), ridge=0.1)
    scorer = CaptionScorer(captioner, centre, whiten)
    images, text = torch.rand(2, 5, 3, 16, 16), torch.randn(2, 8)
    scores = scorer.scores(text, images)
    with torch.no_grad():
        proj = lambda x: torch.nn.functional.normalize((torch.nn.functional.normalize(x, dim=-1) - centre) @ whiten, dim=-1)  # noqa: E731
        expected = torch.stack([proj(captioner(images[b])) @ proj(text[b:b + 1])[0] for b in range(2)])
    assert scores.shape == (2, 5) and torch.allclose(scores, expected, atol=1e-5)
    scorer.save(tmp_path / "captioner.safetensors")
    again = CaptionScorer.load(tmp_path / "captioner.safetensors")
    assert torch.allclose(again.scores(text, images), scores, atol=1e-6) and again.captioner.layout == captioner.layout
    assert CaptionScorer.load(_saved(CaptionScorer(captioner), tmp_path / "plain.safetensors")).whiten is None
    # rerank: the n best per row, best first
    kept = rerank(images, scores, 2)
    order = scores.argsort(1, descending=True)[:, :2]
    assert torch.equal(kept, torch.stack([images[b, order[b]] for b in range(2)]))
    with pytest.raises(ValueError, match="n <= k"):
        rerank(images, scores, 6)


def _saved(scorer, path):
    scorer.save(path)
    return path
