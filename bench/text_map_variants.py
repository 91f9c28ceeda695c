"""f_tau variants for VQ-VAE-2 against the text-conditioning targets, on one frozen decoder.

The pipeline's f_tau (``models.text.TextMap``: pooled MiniLM sentence embedding -> MLP -> code logits per
position) meets the seen-prompt target on a well-trained decoder but not the held-out-combination or the
paraphrase targets. This script trains other heads and objectives in-process on the same aligned set,
the same frozen decoder and the same codes, and scores each with ``evaluate-text``'s prompt sets and
attribute classifier, so the variants compare with each other and with ``evaluate-text``'s figures.

Input: a ``train-text`` output of a VQ-VAE-2 (``--text-dir``: its ``decoder/``, ``text.json`` and
aligned rows), the attribute classifier (``--classifier``) and the prepared ``shapes`` data
(``--prepared``); all three come from ``dvc repro``. Variants (``--variants``, comma-separated):

* ``mlp``: the pipeline's TextMap, Adam at a constant learning rate;
* ``mlp-cosine``: the same with the pipeline's cosine schedule (what ``train-text`` does);
* ``mlp-pixel``: ``mlp`` plus a pixel loss through the frozen decoder on the softmax-expected codes;
* ``codebook-distance``: the head outputs a vector per position, logits = -squared distance to the frozen
  codebook (the code geometry the decoder knows);
* ``token-attention``: MiniLM's token embeddings (not the pooled sentence) through 8 learned attention
  queries, then the same MLP and low-rank code head;
* ``pseudo``: ``mlp`` trained on the aligned pairs plus every other train image, captioned by the
  pipeline's captioner (``models.text.ImageCaptioner``, trained on the aligned pairs to map an image to
  its caption's embedding: what ``text.pseudo_ratio`` does in ``train-text``), with twice the steps;
* ``word-attention``: 8 learned queries over MiniLM's embedding of each word on its own (what
  ``text.encoder: minilm-word-attention`` does), then the same MLP and code head.

``--pooling words`` feeds the other variants the mean of MiniLM's embeddings of each word
(``text.encoder: minilm-words``) instead of the sentence embedding.

A side line scores the text side alone: a per-factor classifier on the pooled embeddings (and on the
token-attention features) of the same aligned captions, evaluated on the same prompt sets; it says how
much of each factor the embedding still carries on paraphrases and held-out combinations.

    .venv/bin/python bench/text_map_variants.py                        # ~6 min on 2 cores
    .venv/bin/python bench/text_map_variants.py --variants mlp --prompts 60 --epochs 5   # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import common  # noqa: E402  (puts the repository root on sys.path)

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("mlp", "mlp-cosine", "mlp-pixel", "codebook-distance", "token-attention", "pseudo", "word-attention")
MAX_TOKENS = 40


def token_embeddings(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM's contextual token embeddings, padded: (N, MAX_TOKENS, 384) and a (N, MAX_TOKENS) mask."""
    from latentforge.pipelines.text.encoders import load_minilm

    out = load_minilm().encode(list(texts), output_value="token_embeddings")
    tokens = torch.zeros(len(texts), MAX_TOKENS, out[0].shape[1])
    mask = torch.zeros(len(texts), MAX_TOKENS)
    for i, t in enumerate(out):
        t = t[:MAX_TOKENS]
        tokens[i, : len(t)], mask[i, : len(t)] = t, 1.0
    return tokens, mask


def word_embeddings(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM's embedding of each word on its own, as ``text.encoder: minilm-word-attention`` feeds f_tau:
    (N, MAX_WORDS, 384) and a (N, MAX_WORDS) mask (``runtime.text.word_set``)."""
    from latentforge.pipelines.text.encoders import text_features

    feats = text_features({"kind": "minilm", "pooling": "attention"}, texts)
    return torch.from_numpy(feats["embedding"]), torch.from_numpy(feats["mask"])


def attention_pool() -> nn.Module:
    """8 learned queries over token or word embeddings: the pipeline's ``models.text.WordAttention``."""
    from latentforge.models.text import WordAttention

    pool = WordAttention(384, 8, 64)
    pool.out_dim = 8 * 64
    return pool


class CodeHead(nn.Module):
    """Features -> (top (B, ht, wt, K), bottom (B, hb, wb, K)) logits: the TextMap trunk and low-rank head,
    or (``codebooks``) an r = code_dim vector per position scored by distance to the frozen codebooks."""

    def __init__(self, in_dim: int, cfg: dict, codebooks: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        hidden, rank, k = cfg["hidden_dim"], cfg["code_rank"], cfg["num_codes"]
        layers: list[nn.Module] = []
        for i in range(cfg["layers"]):
            layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Dropout(cfg["dropout"])]
        self.trunk = nn.Sequential(*layers)
        self.top_shape, self.bottom_shape = tuple(cfg["top_shape"]), tuple(cfg["bottom_shape"])
        self.codebooks = codebooks
        rank = codebooks[0].shape[1] if codebooks is not None else rank
        self.rank = rank
        self.top = nn.Linear(hidden, int(np.prod(self.top_shape)) * rank)
        self.bottom = nn.Linear(hidden, int(np.prod(self.bottom_shape)) * rank)
        if codebooks is None:
            self.top_codes, self.bottom_codes = nn.Linear(rank, k), nn.Linear(rank, k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        t = self.top(h).view(-1, *self.top_shape, self.rank)
        b = self.bottom(h).view(-1, *self.bottom_shape, self.rank)
        if self.codebooks is None:
            return self.top_codes(t), self.bottom_codes(b)
        return tuple(-(v.pow(2).sum(-1, keepdim=True) - 2 * v @ cb.T + cb.pow(2).sum(-1)) for v, cb in zip((t, b), self.codebooks))


def pseudo_pairs(data: dict[str, Any], epochs: int = 60, seed: int = 0) -> torch.Tensor:
    """Train the pipeline's captioner (``models.text.ImageCaptioner``, with ``train-text``'s optimiser) on the
    aligned (image, embedding) pairs; return its embeddings of every train image."""
    from latentforge.models.text import CAPTIONER_LR, CAPTIONER_WEIGHT_DECAY, ImageCaptioner

    torch.manual_seed(seed)
    g = ImageCaptioner(data["image"].shape[1], data["embedding"].shape[1])
    opt = torch.optim.AdamW(g.parameters(), CAPTIONER_LR, weight_decay=CAPTIONER_WEIGHT_DECAY)
    n = len(data["image"])
    for _ in range(epochs):
        g.train()
        for idx in torch.randperm(n).split(64):
            loss = 1 - (g(data["image"][idx]) * data["embedding"][idx]).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    g.eval()
    with torch.no_grad():
        return torch.cat([g(x) for x in data["all_image"].split(512)]), g


def train_variant(name: str, data: dict[str, Any], cfg: dict, decoder, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "pseudo":  # the aligned pairs plus every unlabelled image with the captioner's embedding
        n_aligned = len(data["top"])
        data = {"embedding": torch.cat([data["embedding"], data["pseudo"]]), "top": torch.cat([data["top"], data["all_top"]]),
                "bottom": torch.cat([data["bottom"], data["all_bottom"]])}
        epochs = max(4, round(2 * epochs * n_aligned / len(data["top"])))  # twice the steps of the aligned set alone
    tokens = name in ("token-attention", "word-attention")
    pool = attention_pool() if tokens else None
    codebooks = (decoder.vq_t.embed.clone(), decoder.vq_b.embed.clone()) if name == "codebook-distance" else None
    head = CodeHead(pool.out_dim if pool else data["embedding"].shape[1], cfg, codebooks)
    model = nn.ModuleDict({"head": head, **({"pool": pool} if pool else {})})
    opt = torch.optim.Adam(model.parameters(), cfg["lr"])
    n, batch = len(data["top"]), 64
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * -(-n // batch)) if name == "mlp-cosine" else None
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n).split(batch):
            key = "words" if name == "word-attention" else "tokens"
            x = model["pool"](data[key][idx], data[key + "_mask"][idx]) if tokens else data["embedding"][idx]
            top, bottom = head(x)
            loss = F.cross_entropy(top.flatten(0, -2), data["top"][idx].flatten()) + \
                F.cross_entropy(bottom.flatten(0, -2), data["bottom"][idx].flatten())
            if name == "mlp-pixel":
                q_t = torch.einsum("bhwk,kd->bdhw", top.softmax(-1), decoder.vq_t.embed)
                q_b = torch.einsum("bhwk,kd->bdhw", bottom.softmax(-1), decoder.vq_b.embed)
                loss = loss + 10.0 * F.mse_loss(decoder._decode_raw(q_t, q_b), data["image"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    return model.eval()


def text_side(data: dict[str, Any], prompt_feats: dict[str, Any], targets: dict[str, np.ndarray], factor_sizes: list[int],
              tokens: bool, seed: int) -> dict[str, list[float]]:
    """Per-factor accuracy of a classifier from the text features alone (the same captions, 300 epochs)."""
    torch.manual_seed(seed)
    pool = attention_pool() if tokens else None
    in_dim = pool.out_dim if pool else data["embedding"].shape[1]
    trunk = nn.Sequential(nn.Linear(in_dim, 256), nn.LayerNorm(256), nn.SiLU(), nn.Dropout(0.1))
    heads = nn.ModuleList(nn.Linear(256, k) for k in factor_sizes)
    model = nn.ModuleDict({"trunk": trunk, "heads": heads, **({"pool": pool} if pool else {})})
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    y = torch.from_numpy(data["factors"])

    def features(d):
        return model["pool"](d["tokens"], d["tokens_mask"]) if tokens else d["embedding"]

    for _ in range(300):
        model.train()
        h = trunk(features(data))
        loss = sum(F.cross_entropy(head(h), y[:, j]) for j, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    out = {}
    with torch.no_grad():
        for set_name, feats in prompt_feats.items():
            h = trunk(features(feats))
            out[set_name] = [round(float((head(h).argmax(1).numpy() == targets[set_name][:, j]).mean()), 3) for j, head in enumerate(heads)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-dir", type=Path, default=common.REPO / "artifacts" / "text" / "vqvae2")
    parser.add_argument("--classifier", type=Path, default=common.REPO / "artifacts" / "classifier" / "shapes")
    parser.add_argument("--prepared", type=Path, default=common.REPO / "data" / "prepared" / "shapes")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompts", type=int, default=150, help="prompts per set (default 150)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pooling", choices=("sentence", "words"), help="MiniLM pooling of the inputs (default: the text model's)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "text_map_variants.json")
    args = parser.parse_args(argv)

    variants = common.parse_names("text_map_variants", "variants", args.variants, VARIANTS)
    if variants is None:
        return 2
    for path, what in ((args.text_dir / "text.json", "a train-text output"), (args.classifier, "the attribute classifier"),
                       (args.prepared / "manifest.json", "the prepared shapes data")):
        if not path.exists():  # like model_quality without MNIST: skip, so `make bench` goes on
            print(f"text_map_variants: skipped: {path} is missing ({what}); run `dvc repro` first")
            return 0

    from latentforge.pipelines.classifier import load_classifier
    from latentforge.pipelines.imaging import batch_to_tensor
    from latentforge.pipelines.prepare import load_split
    from latentforge.pipelines.text.encoders import embed_texts
    from latentforge.pipelines.text.evaluate import prompt_sets, score as _score
    from latentforge.pipelines.text.outputs import load_text_model

    _, decoder, record = load_text_model(args.text_dir)
    if not hasattr(decoder, "decode_indices"):
        print(f"text_map_variants: {args.text_dir} is a {record['family']} text model; these variants are for VQ-VAE-2 codes",
              file=sys.stderr)
        return 2
    if record["text_encoder"]["kind"] != "minilm":
        print("text_map_variants: the text model uses the hashed encoder; token-attention needs MiniLM", file=sys.stderr)
        return 2
    classifier, _ = load_classifier(args.classifier)
    manifest = json.loads((args.prepared / "manifest.json").read_text())
    train = load_split(args.prepared, "train")
    # The sets this benchmark reads (tier (a) as "heldout"), as (prompts, targets of every factor).
    every_set = prompt_sets(record, manifest, train, args.prompts, args.seed)
    sets = {name: every_set[key][:2] for key, name in (("seen", "seen"), ("paraphrase", "paraphrase"), ("heldout_a", "heldout"))}
    heads = [f"factor_{n}" for n in manifest["factor_names"]]
    cfg = json.loads((args.text_dir / "text_map" / "config.json").read_text())["config"]
    rows = np.asarray(record["aligned"]["aligned_rows"])
    captions = [str(c) for c in train["captions"][rows]]
    spec = {**record["text_encoder"], **({"pooling": args.pooling} if args.pooling else {})}
    result: dict[str, Any] = {"benchmark": "text_map_variants", "environment": common.environment(),
                              "text_dir": str(args.text_dir), "decoder": record["decoder"].get("path"), "pooling": spec.get("pooling", "sentence"),
                              "aligned_size": len(rows), "prompts_per_set": args.prompts, "epochs": args.epochs, "variants": {}}
    with torch.no_grad():
        images = batch_to_tensor(train["images"][rows])
        top, bottom = decoder.encode(images).indices
        tokens, mask = token_embeddings(captions)
        words, words_mask = word_embeddings(captions)
        data = {"embedding": torch.from_numpy(embed_texts(spec, captions)), "tokens": tokens,
                "tokens_mask": mask, "words": words, "words_mask": words_mask,
                "image": images, "top": top, "bottom": bottom, "factors": train["factors"][rows]}
        prompt_feats = {}
        for set_name, (prompts, _) in sets.items():
            t, m = token_embeddings(prompts)
            w, wm = word_embeddings(prompts)
            prompt_feats[set_name] = {"embedding": torch.from_numpy(embed_texts(spec, prompts)), "tokens": t,
                                      "tokens_mask": m, "words": w, "words_mask": wm}
        ceiling_rows = rows[: args.prompts]
        ceiling_images = decoder.decode_indices(*decoder.encode(batch_to_tensor(train["images"][ceiling_rows])).indices).images
        ceiling: dict[str, float] = {}
        _score(ceiling, "ceiling", classifier(ceiling_images), train["factors"][ceiling_rows], heads)
    result["ceiling_per_factor"] = round(ceiling["ceiling_per_factor"], 3)
    result["ceiling_all_factors"] = round(ceiling["ceiling_all_factors"], 3)
    print(f"text_map_variants: {len(rows)} aligned pairs, {args.prompts} prompts per set; decoder ceiling "
          f"{result['ceiling_per_factor']:.3f} per factor, {result['ceiling_all_factors']:.3f} all factors", flush=True)

    if "pseudo" in variants:
        t0 = time.perf_counter()
        with torch.no_grad():
            data["all_image"] = batch_to_tensor(train["images"])
            codes = [decoder.encode(x).indices for x in data["all_image"].split(512)]
            data["all_top"], data["all_bottom"] = (torch.cat([c[i] for c in codes]) for i in (0, 1))
        data["pseudo"], _ = pseudo_pairs(data, seed=args.seed)
        # How well does g caption what the aligned set never shows? Nearest aligned-caption factors would be
        # circular; instead: cosine of g(image) to the true caption embedding, seen vs held-out combinations.
        held = np.zeros(len(train["factors"]), dtype=bool)
        fv, fn = manifest["factor_values"], manifest["factor_names"]
        for s_name, c_name in record["aligned"]["holdout"]:
            held |= (train["factors"][:, fn.index("shape")] == fv["shape"].index(s_name)) & \
                (train["factors"][:, fn.index("colour")] == fv["colour"].index(c_name))
        probe = np.flatnonzero(held)[:300]
        seen_probe = np.setdiff1d(np.flatnonzero(~held), rows)[:300]  # seen combinations, images not in the aligned set
        true = torch.from_numpy(embed_texts(spec, [str(c) for c in train["captions"][probe]]))
        result["pseudo_cosine_heldout"] = round(float((data["pseudo"][probe] * true).sum(-1).mean()), 3)
        print(f"pseudo captions: cosine to the true caption on held-out combinations {result['pseudo_cosine_heldout']} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)

    targets = {k: v[1] for k, v in sets.items()}
    sizes = [len(manifest["factor_values"][n]) for n in manifest["factor_names"]]
    result["text_side"] = {"factors": manifest["factor_names"],
                           "pooled": text_side(data, prompt_feats, targets, sizes, False, args.seed),
                           "token_attention": text_side(data, prompt_feats, targets, sizes, True, args.seed)}
    print(f"text side alone, per-factor accuracy {manifest['factor_names']}: {json.dumps(result['text_side'])}", flush=True)
    if "pseudo" in data:  # the factors a text-side classifier reads from the captioner's embeddings
        result["text_side"]["captioner"] = text_side(
            data, {"seen": {"embedding": data["pseudo"][seen_probe]}, "heldout": {"embedding": data["pseudo"][probe]}},
            {"seen": train["factors"][seen_probe], "heldout": train["factors"][probe]}, sizes, False, args.seed)
        print(f"the captioner's embeddings of unlabelled images, read by the text side: {result['text_side']['captioner']}", flush=True)

    for name in variants:
        t0 = time.perf_counter()
        model = train_variant(name, data, cfg, decoder, args.epochs, args.seed)
        metrics: dict[str, float] = {}
        with torch.no_grad():
            for set_name, (_, set_targets) in sets.items():
                feats = prompt_feats[set_name]
                key = "words" if name == "word-attention" else "tokens"
                x = model["pool"](feats[key], feats[key + "_mask"]) if "pool" in model else feats["embedding"]
                top_l, bottom_l = model["head"](x)
                out = decoder.decode_indices(top_l.argmax(-1), bottom_l.argmax(-1)).images
                _score(metrics, set_name, classifier(out), set_targets, heads)
        row = {k: round(v, 3) for k, v in metrics.items()}
        row["paraphrase_drop"] = round(100 * (metrics["seen_per_factor"] - metrics["paraphrase_per_factor"]), 1)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        result["variants"][name] = row
        print(f"{name:18s} seen {row['seen_per_factor']:.3f} (shape {row['seen_acc_shape']:.2f})  paraphrase "
              f"{row['paraphrase_per_factor']:.3f} (drop {row['paraphrase_drop']:.1f})  held-out all factors "
              f"{row['heldout_all_factors']:.3f} (shape {row['heldout_acc_shape']:.2f})  {row['seconds']:.0f}s", flush=True)
        common.write_json(result, args.out)
    common.write_json(result, args.out)
    print(f"-> {common.rel(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
