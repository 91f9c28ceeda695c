"""``export-text``: a train-text output -> parity-checked ONNX graphs + ``manifest.json`` for serving.

Graphs (``B`` is the dynamic batch):

* ``text_map``: ``embedding`` (B, E) float32 -> ``latent`` (B, *latent_shape) (flat-latent decoders) or
  ``top_logits`` (B, ht, wt, K) and ``bottom_logits`` (B, hb, wb, K) (VQ-VAE-2);
* ``decoder``: the frozen decoder, ``latent`` -> ``images`` (B, C, H, W), or ``top_indices``,
  ``bottom_indices`` int64 -> ``images``;
* ``text_encoder`` (MiniLM only): ``input_ids``, ``attention_mask`` (B, T) int64 -> ``sentence_embedding``
  (B, 384), mean-pooled and L2-normalised, beside its ``tokenizer.json`` (run by ``tokenizers``).
  The hashed encoder needs no file: its settings are in the manifest;
* ``captioner`` (a text model trained with pseudo-captions, one embedding per text): ``images``
  (B, C, H, W) -> ``embedding`` (B, E), beside ``scorer_space.npz`` (its retrieval space): what
  ``rerank`` scores generated samples with (manifest ``rerank``).

No graph draws random numbers: the latent noise and the code sampling are drawn by numpy in
:class:`runtime.text.TextDecoder`. A text model with a code bank (``text.bank``) also gets
``bank.npz`` (the train images' code maps, their train-split rows and captioner embeddings), scored in
numpy for the ``retrieve`` mode (manifest ``retrieval``). Parity: each graph against PyTorch on the
aligned captions (max abs difference <= ``atol``), then the whole torch-free path (:class:`TextDecoder`,
the mode) against :meth:`models.text.TextMap.generate` and, with a bank, :meth:`models.text.TextMap.retrieve`
(the same rows). Written to a temporary sibling and renamed on success only.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from latentforge.pipelines.common.files import atomic_directory
from latentforge.pipelines.common.params import section
from latentforge.pipelines.onnx_graphs import OPSET, Decoder, Graph, IndexDecoder, compare, export_graphs
from latentforge.pipelines.text.encoders import load_minilm, minilm_dir, text_tensors
from latentforge.pipelines.text.outputs import load_scorer, load_text_model, text_modes
from latentforge.runtime.images import ExportError
from latentforge.runtime.text import (
    FORMAT_VERSION, MAX_N, MAX_RERANK, MAX_TEXT_CHARS, MAX_TEXTS, OnnxMiniLMEncoder, TextDecoder,
)

PARITY_TEXTS = 16


class _TextMapGraph(nn.Module):
    def __init__(self, text_map: nn.Module):
        super().__init__()
        self.text_map = text_map

    def forward(self, embedding: Tensor):
        return self.text_map(embedding)


class _WordTextMapGraph(_TextMapGraph):
    """f_tau with word attention: ``embedding`` (B, L, E) and ``mask`` (B, L) float32."""

    def forward(self, embedding: Tensor, mask: Tensor):  # type: ignore[override]
        return self.text_map(embedding, mask)


class _CaptionerGraph(nn.Module):
    """``images`` (B, C, H, W) -> the captioner's unit ``embedding`` (B, E)."""

    def __init__(self, captioner: nn.Module):
        super().__init__()
        self.captioner = captioner

    def forward(self, images: Tensor) -> Tensor:
        return self.captioner(images)


class _MiniLMGraph(nn.Module):
    """input_ids, attention_mask (B, T) -> mean-pooled, L2-normalised embedding (B, 384): what
    sentence-transformers' all-MiniLM-L6-v2 pipeline computes (Transformer, Pooling(mean), Normalize)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def export_text(text_dir: str | Path, out_dir: str | Path, metrics: dict | None = None, atol: float = 1e-4) -> dict[str, Any]:
    """Export the train-text output in ``text_dir`` to ``out_dir``; return the manifest (see the module doc)."""
    text_dir, out_dir = Path(text_dir), Path(out_dir)
    text_map, decoder, record = load_text_model(text_dir)
    modes = text_modes(record)
    scorer = load_scorer(text_dir, record) if "rerank" in modes else None
    c = text_map.config
    prompts = _parity_prompts(record)
    inputs = text_tensors(record["text_encoder"], prompts)
    graphs = [_text_map_graph(text_map, inputs), _decoder_graph(text_map, decoder, inputs, record["data"]["image_shape"])]
    if scorer is not None:
        graphs.append(_captioner_graph(scorer, text_map, decoder, inputs))

    with atomic_directory(out_dir) as tmp:
        export_graphs(graphs, tmp, atol)
        parity = {g.name: g.parity for g in graphs}
        spec = dict(record["text_encoder"])
        if spec["kind"] == "minilm":
            spec.update(graph="text_encoder.onnx", tokenizer="tokenizer.json")
            parity["text_encoder"] = export_minilm(tmp, prompts, atol)
        text_map_graph, decoder_graph = graphs[:2]
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "text",
            "family": record["family"],
            "data": record["data"],
            "text_encoder": spec,
            "text_map": {"file": "text_map.onnx", "kind": c.kind, "inputs": {k: v[0] for k, v in text_map_graph.inputs.items()},
                         "outputs": {k: v[0] for k, v in text_map_graph.outputs.items()}},
            "decoder_graph": {"file": "decoder.onnx", "inputs": {k: v[0] for k, v in decoder_graph.inputs.items()}},
            "sampling": {"kind": "latent_noise", "sample_std": c.sample_std} if c.kind == "latent" else {"kind": "codes"},
            "retrieval": _retrieval(record, text_dir, tmp) if "retrieve" in modes else None,
            "rerank": _rerank(scorer, tmp) if scorer is not None else None,
            "decoder": {k: record["decoder"].get(k) for k in ("source", "name", "version", "sha256", "state_sha256", "path")},
            "aligned": {k: record["aligned"][k] for k in ("aligned_size", "holdout")},
            "limits": {"max_texts": MAX_TEXTS, "max_text_chars": MAX_TEXT_CHARS, "max_n": MAX_N, "max_rerank": MAX_RERANK},
            "parity": parity,
            "parity_atol": atol,
            "metrics": dict(metrics or {}),
            "source": {"mlflow_run_id": record.get("mlflow_run_id"), "run_name": record.get("run_name")},
            "opset": OPSET,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # TextDecoder.load reads it
        parity.update(_check_text_decode(tmp, text_map, decoder, prompts, inputs, atol))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _text_map_graph(text_map: nn.Module, inputs: dict[str, Tensor]) -> Graph:
    """The ``text_map`` graph (f_tau): ``embedding`` (B, E) (and, with word attention, ``embedding``
    (B, L, E) and ``mask`` (B, L)) -> ``latent`` or ``top_logits``/``bottom_logits``; parity on ``inputs``."""
    c = text_map.config
    emb, mask = inputs["embedding"], inputs.get("mask")

    def check_text_map(session, atol):
        out = text_map(emb, mask)
        ref = {"latent": out} if c.kind == "latent" else {"top_logits": out[0], "bottom_logits": out[1]}
        return compare("text_map", session, inputs, ref, atol, "the aligned captions"), {}

    if c.kind == "latent":
        outputs = {"latent": ([None, *c.latent_shape], "float32")}
    else:
        outputs = {"top_logits": ([None, *c.top_shape, c.num_codes], "float32"),
                   "bottom_logits": ([None, *c.bottom_shape, c.num_codes], "float32")}
    if mask is None:
        return Graph("text_map", _TextMapGraph(text_map), {"embedding": ([None, c.embed_dim], "float32")}, outputs,
                     (emb[:2],), {"embedding": 0}, check_text_map)
    # Word attention: a fixed number of word slots (runtime.text.MAX_WORDS), so only the batch is dynamic.
    words = emb.shape[1]
    return Graph("text_map", _WordTextMapGraph(text_map),
                 {"embedding": ([None, words, c.embed_dim], "float32"), "mask": ([None, words], "float32")},
                 outputs, (emb[:2], mask[:2]), {"embedding": 0, "mask": 0}, check_text_map)


def _decoder_graph(text_map: nn.Module, decoder: nn.Module, inputs: dict[str, Tensor], image_shape: list[int]) -> Graph:
    """The frozen decoder's graph, its parity checked on what f_tau maps ``inputs`` to (plus random
    latents for a flat latent); ``image_shape`` is (H, W, C)."""
    c = text_map.config
    h, w, ch = image_shape
    img = [None, ch, h, w]
    with torch.no_grad():
        mapped = text_map(inputs["embedding"], inputs.get("mask"))
    if c.kind == "latent":
        z = torch.cat([mapped, torch.randn(mapped.shape, generator=torch.Generator().manual_seed(0))])

        def check_decoder(session, atol):
            return compare("decoder", session, {"latent": z}, {"images": decoder.decode(z).images}, atol, "f_tau's latents"), {}

        return Graph("decoder", Decoder(decoder), {"latent": ([None, *c.latent_shape], "float32")},
                     {"images": (img, "float32")}, (z[:2],), {"latent": 0}, check_decoder)
    top, bottom = mapped[0].argmax(-1), mapped[1].argmax(-1)

    def check_codes(session, atol):
        ref = {"images": decoder.decode_indices(top, bottom).images}
        return compare("decoder", session, {"top_indices": top, "bottom_indices": bottom}, ref, atol, "f_tau's codes"), {}

    return Graph("decoder", IndexDecoder(decoder),
                 {"top_indices": ([None, *c.top_shape], "int64"), "bottom_indices": ([None, *c.bottom_shape], "int64")},
                 {"images": (img, "float32")}, (top[:2], bottom[:2]), {"top_indices": 0, "bottom_indices": 0},
                 check_codes)


def _captioner_graph(scorer, text_map, decoder, inputs: dict[str, Tensor]) -> Graph:
    """The ``captioner`` graph (images -> embedding), its parity checked on what the text model generates
    for ``inputs`` (the mode and one sample per text)."""
    with torch.no_grad():
        images = torch.cat([text_map.generate(decoder, inputs["embedding"], 1, t, torch.Generator().manual_seed(0))[:, 0]
                            for t in (0.0, 1.0)])
    c, h, w = images.shape[1:]

    def check_captioner(session, atol):
        ref = {"embedding": scorer.captioner(images)}
        return compare("captioner", session, {"images": images}, ref, atol, "generated images"), {}

    return Graph("captioner", _CaptionerGraph(scorer.captioner), {"images": ([None, c, h, w], "float32")},
                 {"embedding": ([None, scorer.captioner.layout["embed_dim"]], "float32")}, (images[:2],), {"images": 0},
                 check_captioner)


def _check_text_decode(export_dir: Path, text_map, decoder, prompts: list[str], inputs: dict[str, Tensor], atol: float) -> dict[str, float]:
    """The whole torch-free path (:class:`TextDecoder` over ``export_dir``) against PyTorch at the mode (no
    randomness to line up): ``text_decode``, generate against ``text_map.generate``; with a bank,
    ``text_retrieve``, retrieve against ``text_map.retrieve`` (the same training rows, the same images).
    The max abs differences, each at most ``atol``."""
    emb, mask = inputs["embedding"][:MAX_TEXTS], None if inputs.get("mask") is None else inputs["mask"][:MAX_TEXTS]
    runtime = TextDecoder.load(export_dir)
    got = runtime(prompts[:MAX_TEXTS], n=1, temperature=0.0)
    with torch.no_grad():
        ref = text_map.generate(decoder, emb, 1, 0.0, mask=mask).numpy()
    diffs = {"text_decode": float(np.abs(got - ref).max())}
    if runtime.bank is not None:
        got, rows = runtime.retrieve(prompts[:MAX_TEXTS], n=2, temperature=0.0)
        with torch.no_grad():
            ref, ref_rows = text_map.retrieve(decoder, emb, 2, 0.0, mask=mask)
        if not np.array_equal(rows, ref_rows.numpy()):
            raise ExportError("parity: text_retrieve (numpy bank) picks other training rows than PyTorch's CodeBank")
        diffs["text_retrieve"] = float(np.abs(got - ref.numpy()).max())
    for name, diff in diffs.items():
        if diff > atol:
            raise ExportError(f"parity: {name} (ONNX Runtime) differs from PyTorch by {diff:.3g} > {atol}")
    return diffs


def _retrieval(record: dict[str, Any], text_dir: Path, out: Path) -> dict[str, Any]:
    """The manifest's ``retrieval``: the text model's code bank (its ``bank.npz`` copied to ``out``, its
    facts from ``text.json``)."""
    bank = record["bank"]
    shutil.copy2(text_dir / bank["file"], out / "bank.npz")
    return {"file": "bank.npz", **{k: bank[k] for k in ("size", "text_weight", "captioned")},
            "whitened": bool(bank.get("whitened")), "space": bank.get("space")}


def _rerank(scorer, out: Path) -> dict[str, Any]:
    """The manifest's ``rerank``: the captioner graph and its retrieval space (``scorer_space.npz``)."""
    space = {} if scorer.whiten is None else {"centre": scorer.centre.numpy(), "whiten": scorer.whiten.numpy()}
    np.savez(out / "scorer_space.npz", **space)
    return {"captioner": "captioner.onnx", "space": "scorer_space.npz", "whitened": scorer.whiten is not None, "max_k": MAX_RERANK}


def _parity_prompts(record: dict[str, Any]) -> list[str]:
    """Real captions of the aligned set (recorded by train-text): the parity inputs."""
    captions = list(record["aligned"].get("sample_captions") or [])[:PARITY_TEXTS]
    if len(captions) < 2:
        raise ExportError("the text model records fewer than 2 aligned captions; re-run `latentforge train-text`")
    return captions


def export_minilm(out: Path, texts: list[str], atol: float) -> float:
    """Write ``text_encoder.onnx`` + ``tokenizer.json`` for all-MiniLM-L6-v2; return the max |ONNX - ST|."""
    st = load_minilm()
    bert = st[0].auto_model.eval()
    graph = _MiniLMGraph(bert).eval()
    ids = torch.ones((2, 8), dtype=torch.int64)
    mask = torch.ones((2, 8), dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("sequence", min=1, max=512)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (ids, mask), str(out / "text_encoder.onnx"), input_names=["input_ids", "attention_mask"],
                              output_names=["sentence_embedding"], opset_version=OPSET, dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), verbose=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"graph 'text_encoder': torch.onnx.export failed: {first}") from exc
    shutil.copy2(minilm_dir() / "tokenizer.json", out / "tokenizer.json")
    got = OnnxMiniLMEncoder(out / "text_encoder.onnx", out / "tokenizer.json").encode(texts)
    ref = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    diff = float(np.abs(got - ref).max())
    if diff > atol:
        raise ExportError(f"parity: text_encoder (ONNX + tokenizers) differs from sentence-transformers by {diff:.3g} > {atol}")
    return diff


def export_text_from_params(params: dict, family: str, out: str | Path | None = None) -> tuple[Path, dict]:
    """``latentforge export-text --model <family>``: ``<text.output_dir>/<family>`` ->
    ``<export.output_dir or artifacts/export-text>/<family>``, with evaluate-text's metrics when present."""
    text_dir = Path(section(params, "text")["output_dir"]) / family
    if not (text_dir / "text.json").is_file():
        raise ExportError(f"no text model at {text_dir}; run `latentforge train-text --model {family}` first")
    metrics_path = Path(section(params, "evaluate")["output_dir"]) / f"{family}-text" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    out = Path(out) if out else Path("artifacts/export-text") / family
    return out, export_text(text_dir, out, metrics=metrics)
