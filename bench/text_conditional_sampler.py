"""Conditional latent samplers for a flat-latent text model, against the generate mode's f_tau sampling.

``latentforge evaluate-text`` samples a flat-latent text model (VAE, the autoencoders) around f_tau(y):
``z = f_tau(y) + T * sample_std * eps``. Issue 20 part 3 asks whether a conditional sampler over z given
the text does better. The flat-latent families with a Gaussian-mixture sampler (``sampler/`` beside the
trained model, :class:`models.samplers.GaussianMixtureSampler`) already carry K components that hold the
data's latents; this script learns which components a text asks for and samples from them:

* ``p(k | y)``: a small MLP from the text embedding (the text model's encoder) to the mixture's
  responsibilities of the image's latent, trained on the aligned pairs (their captions) and the unlabelled
  train images pseudo-captioned by the text model's own captioner (``captioner.safetensors``), as
  ``train-text`` trains f_tau. The rows are the text model's ``aligned_rows`` and ``unlabelled_rows``: the
  tier (b) combinations are in neither (checked here), so no text-side signal of the sampler pairs those
  words with those images. The mixture itself is the decoder's, fitted on every train latent at training
  time, like the decoder.

Variants (``--variants``), each decoded through the text model's frozen decoder at 8 samples per prompt:

* ``ftau``: the generate mode at T=1 (:func:`pipelines.text.evaluate.decode_prompts`), today's sampler;
* ``ftau-rerank``: the rerank mode at T=1 (16 drawn, the captioner keeps 8);
* ``ftau-t0.7``, ``-t0.6``, ``-t0.5``, ``-t0.25``: the generate mode at lower temperatures (controls: is a
  conditional sampler better than f_tau with less noise?);
* ``cgmm``: k ~ p(k | y), z ~ N(mean_k, cov_k);
* ``cgmm-t0.5``: the same with p(k | y) tempered (p^2, renormalised);
* ``cgmm-top8``: k drawn from the 8 most probable components only;
* ``cgmm-offset``: f_tau's point moved by the drawn component's offset from the expected one,
  ``z = f_tau(y) + mean_k - sum_j p(j | y) mean_j + L_k eps``;
* ``gmm-posterior``: no text-side fitting: f_tau(y) read as a noisy observation of z (noise ``sample_std``)
  under the mixture, k ~ p(k | f_tau(y)) and z from that component's posterior given f_tau(y) (a product
  of two Gaussians); ``gmm-posterior-x2``: the same with twice the noise (a looser reading of f_tau);
* ``cgmm-posterior``: k ~ p(k | y) from the component classifier, z from component k's posterior given
  f_tau(y) as an observation with noise ``sample_std``: the component holds what it pins down tightly
  (on ``shapes``: position and size), f_tau the directions the component leaves broad (shape, colour);
  ``cgmm-posterior-x0.5``, ``-x0.25``, ``-x0.1``: the same with that noise scaled (f_tau read tighter);
  ``cgmm-posterior-x0.25-t1.5``: with p(k | y) tempered the other way (p^(1/1.5): flatter);
* ``cgmm-rerank``, ``cgmm-posterior-x0.25-rerank``: 16 drawn, the captioner keeps 8 (what the rerank
  mode does for f_tau).

Scoring is ``evaluate-text``'s (its prompt sets, classifier readings, ``score``, ``free_entropy`` and
``copy_rate``, imported): per-factor and all-factor accuracy per prompt set, the free-factor entropy
ratio of "a <colour> <shape>" prompts and the seen prompts' copy rate.

    .venv/bin/python bench/text_conditional_sampler.py --project /tmp/demo2          # ~6 min on 2 cores
    .venv/bin/python bench/text_conditional_sampler.py --project /tmp/demo2 --prompts 60 --variants ftau,cgmm   # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import common  # noqa: E402  (puts the repository root on sys.path)

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# f_tau's own sampling through evaluate-text's decode_prompts: variant -> (mode, temperature).
FTAU_MODES = {"ftau": ("generate", 1.0), "ftau-rerank": ("rerank", 1.0), "ftau-t0.7": ("generate", 0.7),
              "ftau-t0.6": ("generate", 0.6), "ftau-t0.5": ("generate", 0.5), "ftau-t0.25": ("generate", 0.25)}
VARIANTS = (*FTAU_MODES, "cgmm", "cgmm-t0.5", "cgmm-top8", "cgmm-offset", "gmm-posterior", "gmm-posterior-x2",
            "cgmm-posterior", "cgmm-posterior-x0.5", "cgmm-posterior-x0.25", "cgmm-posterior-x0.1",
            "cgmm-posterior-x0.25-t1.5", "cgmm-rerank", "cgmm-posterior-x0.25-rerank")
SETS = ("seen", "paraphrase", "heldout_a", "heldout_b", "free")
# The default run (about 6 min on 2 cores); the others are the noise ladder and reranking (--variants).
DEFAULT_VARIANTS = ("ftau", "ftau-rerank", "cgmm", "cgmm-t0.5", "cgmm-top8", "cgmm-offset", "gmm-posterior", "cgmm-posterior",
                    "cgmm-posterior-x0.25")
CHUNK = 128  # prompts per decoding call


class ComponentClassifier(nn.Module):
    """p(k | y): text embeddings (B, E) -> logits over the mixture's K components (B, K)."""

    def __init__(self, embed_dim: int, components: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, components))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)


def responsibilities(sampler, latents: torch.Tensor) -> torch.Tensor:
    """(N, K) posterior over the mixture's components of (N, D) latents."""
    mixture = torch.distributions.MultivariateNormal(sampler.means, scale_tril=sampler.scale_tril)
    log_joint = mixture.log_prob(latents[:, None, :]) + sampler.weights.log()
    return log_joint.softmax(1)


def fit_component_classifier(embedding: torch.Tensor, targets: torch.Tensor, epochs: int, seed: int) -> ComponentClassifier:
    """Train :class:`ComponentClassifier` by cross-entropy to soft ``targets`` (N, K) from (N, E) ``embedding``."""
    torch.manual_seed(seed)
    model = ComponentClassifier(embedding.shape[1], targets.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        for idx in np.array_split(rng.permutation(len(embedding)), max(1, len(embedding) // 256)):
            loss = -(targets[idx] * F.log_softmax(model(embedding[idx]), 1)).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def fitting_set(record: dict[str, Any], train: dict[str, np.ndarray], manifest: dict[str, Any], decoder, scorer,
                sampler) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(embeddings (N, E), responsibilities (N, K), what was used): the aligned captions' embeddings and the
    captioner's pseudo-captions of the unlabelled rows, with their latents' component posteriors."""
    from latentforge.models.samplers import encode_latents
    from latentforge.pipelines.imaging import batch_to_tensor
    from latentforge.pipelines.text.aligned import combination_rows
    from latentforge.pipelines.text.captioner import caption
    from latentforge.pipelines.text.encoders import text_tensors
    from latentforge.pipelines.text.job import holdout_pairs

    aligned = np.asarray(record["aligned"]["aligned_rows"])
    unlabelled = np.asarray(record["aligned"]["unlabelled_rows"], dtype=np.int64)
    strict = holdout_pairs(record["aligned"].get("holdout_strict") or [], manifest)
    rows = np.concatenate([aligned, unlabelled])
    if combination_rows(train["factors"][rows], manifest, strict).any():
        raise SystemExit("text_conditional_sampler: the text model's aligned or unlabelled rows show a tier (b) combination")
    captions = [str(c) for c in train["captions"][aligned]]
    embedding = [text_tensors(record["text_encoder"], captions)["embedding"]]
    if len(unlabelled):
        embedding.append(torch.from_numpy(caption(scorer.captioner, np.array(train["images"][unlabelled]))))
    latents = encode_latents(decoder, batch_to_tensor(np.array(train["images"][rows])))
    targets = torch.cat([responsibilities(sampler, part) for part in latents.split(1024)])
    return torch.cat(embedding), targets, {"aligned": len(aligned), "pseudo_captioned": len(unlabelled)}


def draw_components(probs: torch.Tensor, n: int, generator: torch.Generator, temperature: float = 1.0,
                    top: int | None = None) -> torch.Tensor:
    """(B, n) component indices drawn from (B, K) ``probs``, tempered (p^(1/temperature)) and/or restricted
    to the ``top`` most probable."""
    logits = probs.clamp_min(1e-30).log() / temperature
    if top is not None:
        cut = logits.topk(top, 1).values[:, -1:]
        logits = logits.masked_fill(logits < cut, -float("inf"))
    return torch.multinomial(logits.softmax(1), n, replacement=True, generator=generator)


def component_draw(sampler, picks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B * n, D) latents: for each of the (B, n) ``picks``, a draw from that component's Gaussian."""
    k = picks.flatten()
    eps = torch.randn((len(k), sampler.dim), generator=generator)
    return sampler.means[k] + (sampler.scale_tril[k] @ eps[:, :, None])[:, :, 0]


class ComponentPosterior:
    """The mixture's components given an observation ``f = z + noise * eps`` of the latent (f_tau(y)):
    p(f | k) = N(f | mean_k, cov_k + noise^2 I), and z | k, f ~ N(prior_part_k + gain_k f, posterior_cov_k)."""

    def __init__(self, sampler, noise: float):
        cov = sampler.scale_tril @ sampler.scale_tril.transpose(1, 2)
        eye = torch.eye(sampler.dim)
        self.observed = torch.distributions.MultivariateNormal(sampler.means, covariance_matrix=cov + noise ** 2 * eye)
        posterior_cov = torch.linalg.inv(torch.linalg.inv(cov) + eye / noise ** 2)
        self.tril = torch.linalg.cholesky(posterior_cov)                                           # (K, D, D)
        self.gain = posterior_cov / noise ** 2                                                      # (K, D, D)
        self.prior_part = (posterior_cov @ torch.linalg.solve(cov, sampler.means[:, :, None]))[:, :, 0]  # (K, D)
        self.log_weights = sampler.weights.log()

    def component_probs(self, f: torch.Tensor) -> torch.Tensor:
        """(B, K) p(k | f) for (B, D) observations."""
        return (self.observed.log_prob(f[:, None, :]) + self.log_weights).softmax(1)

    def draw(self, f: torch.Tensor, picks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B * n, D) latents from the (B, n) ``picks``' posteriors given the (B, D) observations ``f``."""
        k = picks.flatten()
        f = f.repeat_interleave(picks.shape[1], 0)
        eps = torch.randn(f.shape, generator=generator)
        return self.prior_part[k] + (self.gain[k] @ f[:, :, None])[:, :, 0] + (self.tril[k] @ eps[:, :, None])[:, :, 0]


class LatentSamplers:
    """The conditional variants as functions (text embedding (B, E), n, generator) -> latents (B * n, D)."""

    def __init__(self, text_map, sampler, classifier: ComponentClassifier, noise: float):
        self.text_map, self.sampler, self.classifier, self.noise = text_map, sampler, classifier, noise
        self.posteriors: dict[float, ComponentPosterior] = {}

    def probs(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(embedding).softmax(1)

    def posterior_at(self, noise: float) -> ComponentPosterior:
        if noise not in self.posteriors:
            self.posteriors[noise] = ComponentPosterior(self.sampler, noise)
        return self.posteriors[noise]

    def cgmm(self, embedding, n, generator, temperature: float = 1.0, top: int | None = None):
        return component_draw(self.sampler, draw_components(self.probs(embedding), n, generator, temperature, top), generator)

    def offset(self, embedding, n, generator):
        probs = self.probs(embedding)
        picks = draw_components(probs, n, generator)
        expected = probs @ self.sampler.means                       # (B, D)
        shift = component_draw(self.sampler, picks, generator) - expected.repeat_interleave(n, 0)
        return self.text_map(embedding).repeat_interleave(n, 0) + shift

    def gmm_posterior(self, embedding, n, generator, scale: float = 1.0):
        """k ~ p(k | f_tau(y)) under the mixture, z ~ p(z | k, f_tau(y)); no text-side fitting."""
        posterior, f = self.posterior_at(scale * self.noise), self.text_map(embedding)
        return posterior.draw(f, draw_components(posterior.component_probs(f), n, generator), generator)

    def cgmm_posterior(self, embedding, n, generator, scale: float = 1.0, temperature: float = 1.0):
        """k ~ p(k | y) (the component classifier, tempered), z ~ p(z | k, f_tau(y))."""
        posterior = self.posterior_at(scale * self.noise)
        picks = draw_components(self.probs(embedding), n, generator, temperature)
        return posterior.draw(self.text_map(embedding), picks, generator)

    def by_name(self) -> dict[str, Callable]:
        return {"cgmm": self.cgmm, "cgmm-t0.5": lambda e, n, g: self.cgmm(e, n, g, temperature=0.5),
                "cgmm-top8": lambda e, n, g: self.cgmm(e, n, g, top=8), "cgmm-offset": self.offset,
                "gmm-posterior": self.gmm_posterior, "gmm-posterior-x2": lambda e, n, g: self.gmm_posterior(e, n, g, 2.0),
                "cgmm-posterior": self.cgmm_posterior, "cgmm-posterior-x0.5": lambda e, n, g: self.cgmm_posterior(e, n, g, 0.5),
                "cgmm-posterior-x0.25": lambda e, n, g: self.cgmm_posterior(e, n, g, 0.25),
                "cgmm-posterior-x0.1": lambda e, n, g: self.cgmm_posterior(e, n, g, 0.1),
                "cgmm-posterior-x0.25-t1.5": lambda e, n, g: self.cgmm_posterior(e, n, g, 0.25, 1.5), "cgmm-rerank": self.cgmm,
                "cgmm-posterior-x0.25-rerank": lambda e, n, g: self.cgmm_posterior(e, n, g, 0.25)}


def fit_sampler(record: dict[str, Any], train: dict[str, np.ndarray], manifest: dict[str, Any], decoder, scorer, sampler,
                epochs: int, seed: int) -> tuple[ComponentClassifier, dict[str, Any]]:
    """p(k | y) fitted on :func:`fitting_set`, and what to record about the fit."""
    t0 = time.perf_counter()
    with torch.no_grad():
        embedding, targets, used = fitting_set(record, train, manifest, decoder, scorer, sampler)
    model = fit_component_classifier(embedding, targets, epochs, seed)
    with torch.no_grad():
        fit_ce = float(-(targets * F.log_softmax(model(embedding), 1)).sum(1).mean())
        entropy = float(-(targets * targets.clamp_min(1e-30).log()).sum(1).mean())
    fit = {**used, "cross_entropy": round(fit_ce, 3), "targets_entropy": round(entropy, 3), "seconds": round(time.perf_counter() - t0, 1)}
    print(f"text_conditional_sampler: p(k | y) over {sampler.config.components} components on {used['aligned']} aligned + "
          f"{used['pseudo_captioned']} pseudo-captioned images (cross-entropy {fit_ce:.2f} nats, {fit['seconds']:.0f}s)", flush=True)
    return model, fit


def decode_latents(decoder, draw: Callable, embedding: torch.Tensor, n: int, generator: torch.Generator,
                   scorer=None, keep: int | None = None) -> torch.Tensor:
    """(B, n or keep, C, H, W) images of the latents ``draw`` gives for B embeddings; with ``scorer``, the
    ``keep`` of the n that the captioner ranks best (:func:`models.text.rerank`)."""
    from latentforge.models.text import rerank

    out = []
    for i in range(0, len(embedding), CHUNK):
        emb = embedding[i:i + CHUNK]
        images = decoder.decode(draw(emb, n, generator)).images
        images = images.view(len(emb), n, *images.shape[1:])
        out.append(images if scorer is None else rerank(images, scorer.scores(emb, images), keep))
    return torch.cat(out)


def score_images(metrics: dict[str, Any], prefix: str, images: torch.Tensor, targets: np.ndarray, stated: list[str],
                 set_name: str, ctx: dict[str, Any]) -> None:
    """evaluate-text's figures of one prompt set's (N, n, C, H, W) images under ``<prefix>_<set>``."""
    from latentforge.pipelines.text.evaluate import copy_rate, free_entropy, read, score

    n = images.shape[1]
    flat = images.flatten(0, 1)
    logits = read(ctx["classifier"], flat)
    used = [ctx["heads"].index(f"factor_{f}") for f in stated]
    score(metrics, f"{prefix}_{set_name}", logits, np.repeat(targets[:, used], n, axis=0), [ctx["heads"][j] for j in used])
    if set_name == "seen":
        metrics[f"{prefix}_seen_copy_rate"] = copy_rate(flat, ctx["train_pixels"], ctx["threshold"])
    if set_name == "free":
        free_entropy(metrics, prefix, logits, n, ctx["manifest"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=common.REPO, help="a checkout that ran the pipeline (its params.yaml and artifacts)")
    parser.add_argument("--family", default="vae", help="a flat-latent family with a gmm sampler (default vae)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--prompts", type=int, default=None, help="prompts per set (default: the text model's text.eval_prompts)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of p(k | y)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seeds p(k | y)'s fit and the draws (default: the text model's text.seed); the prompts stay evaluate-text's")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/text_conditional_sampler_<family>.json")
    args = parser.parse_args(argv)
    variants = common.parse_names("text_conditional_sampler", "variants", args.variants, VARIANTS)
    set_names = common.parse_names("text_conditional_sampler", "sets", args.sets, SETS)
    if variants is None or set_names is None:
        return 2

    from latentforge.models.samplers import load_sampler
    from latentforge.pipelines.classifier import load_classifier
    from latentforge.pipelines.common.params import load_params, section
    from latentforge.pipelines.imaging import batch_to_tensor
    from latentforge.pipelines.prepare import load_split, read_manifest
    from latentforge.pipelines.text.encoders import text_tensors
    from latentforge.pipelines.text.evaluate import (REAL_COPY_IMAGES, RERANK_K, SAMPLES, copy_rate, decode_prompts, prompt_sets,
                                                     reconstructions)
    from latentforge.pipelines.text.outputs import load_scorer, load_text_model

    if not (args.project / "params.yaml").is_file():
        print(f"text_conditional_sampler: {args.project} has no params.yaml; --project names a checkout that ran the pipeline",
              file=sys.stderr)
        return 2
    params = load_params(args.project / "params.yaml")
    data_name = section(params, "data")["name"]
    text_dir = args.project / section(params, "text")["output_dir"] / args.family
    classifier_dir = args.project / section(params, "classifier")["output_dir"] / data_name
    prepared = args.project / section(params, "data")["output_dir"] / data_name
    sampler_dir = args.project / section(params, "train")["output_dir"] / args.family / "model" / "sampler"
    for path, what in ((text_dir / "text.json", "the train-text output"), (classifier_dir / "config.json", "the attribute classifier"),
                       (prepared / "manifest.json", "the prepared data"), (sampler_dir / "config.json", "the model's gmm sampler")):
        if not path.exists():  # like the other text benchmarks: skip, so `make bench` goes on
            print(f"text_conditional_sampler: skipped: {path} is missing ({what})")
            return 0

    torch.manual_seed(0)
    t_start = time.perf_counter()
    text_map, decoder, record = load_text_model(text_dir)
    if text_map.config.kind != "latent" or text_map.config.word_attention:
        print(f"text_conditional_sampler: {text_dir} is not a flat-latent text model with one embedding per text", file=sys.stderr)
        return 2
    scorer = load_scorer(text_dir, record)
    if scorer is None:
        print(f"text_conditional_sampler: {text_dir} has no captioner (text.pseudo_ratio 0); the sampler is fitted with its pseudo-captions",
              file=sys.stderr)
        return 2
    sampler = load_sampler(sampler_dir)
    classifier, _ = load_classifier(classifier_dir)
    manifest = read_manifest(prepared)
    train = load_split(prepared, "train")
    seed = int(record["settings"]["seed"])
    draw_seed = seed if args.seed is None else args.seed
    count = args.prompts or int(record["settings"]["eval_prompts"])
    sets = {k: v for k, v in prompt_sets(record, manifest, train, count, seed).items() if k in set_names}
    heads = [f"factor_{n}" for n in manifest["factor_names"]]
    result: dict[str, Any] = {"benchmark": "text_conditional_sampler", "environment": common.environment(),
                              "project": str(args.project), "family": args.family, "prompts_per_set": count,
                              "samples_per_prompt": SAMPLES, "components": sampler.config.components, "epochs": args.epochs, "seed": draw_seed,
                              "noise": text_map.config.sample_std, "variants": {}}

    with torch.no_grad():
        # The copy threshold as evaluate-text sets it: the decoder's median reconstruction error of aligned images.
        train_pixels = batch_to_tensor(np.array(train["images"])).flatten(1)
        rows = np.asarray(record["aligned"]["aligned_rows"])[:count]
        ceiling, _ = reconstructions(decoder, train, rows, seed)
        threshold = float(((ceiling.flatten(1) - train_pixels[torch.from_numpy(rows)]) ** 2).mean(1).median())
        val = load_split(prepared, "val")["images"][:REAL_COPY_IMAGES]
        result["copy_rate_real"] = copy_rate(batch_to_tensor(np.array(val)), train_pixels, threshold)
        prompt_embeddings = {k: text_tensors(record["text_encoder"], prompts)["embedding"] for k, (prompts, _, _) in sets.items()}
    print(f"text_conditional_sampler: {count} prompts per set; copy rate of held-out real images {result['copy_rate_real']:.3f}", flush=True)
    component_classifier = None
    if any(name not in FTAU_MODES for name in variants):
        component_classifier, result["fit"] = fit_sampler(record, train, manifest, decoder, scorer, sampler, args.epochs, draw_seed)

    ctx = {"classifier": classifier, "heads": heads, "train_pixels": train_pixels, "threshold": threshold, "manifest": manifest}
    samplers = LatentSamplers(text_map, sampler, component_classifier, text_map.config.sample_std).by_name()
    with torch.no_grad():
        for name in variants:
            t0 = time.perf_counter()
            generator = torch.Generator().manual_seed(draw_seed)
            metrics: dict[str, Any] = {}
            for set_name, (prompts, set_targets, stated) in sets.items():
                if name in FTAU_MODES:
                    mode, temperature = FTAU_MODES[name]
                    images = decode_prompts(mode, text_map, decoder, scorer, record, prompts, SAMPLES, temperature, generator)
                elif name.endswith("-rerank"):
                    images = decode_latents(decoder, samplers[name], prompt_embeddings[set_name], RERANK_K, generator, scorer, SAMPLES)
                else:
                    images = decode_latents(decoder, samplers[name], prompt_embeddings[set_name], SAMPLES, generator)
                score_images(metrics, name, images, set_targets, stated, set_name, ctx)
            if "seen" in sets and "paraphrase" in sets:
                metrics[f"{name}_paraphrase_drop"] = 100.0 * (metrics[f"{name}_seen_per_factor"] - metrics[f"{name}_paraphrase_per_factor"])
            row = {k[len(name) + 1:]: round(v, 4) for k, v in metrics.items()}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            result["variants"][name] = row
            print(f"{name:14s} " + "  ".join(f"{k} {row[k]:.3f}" for k in ("seen_per_factor", "heldout_b_all_factors",
                                                                          "free_entropy_ratio", "seen_copy_rate") if k in row)
                  + f"  ({row['seconds']:.0f}s)", flush=True)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    out = args.out or common.RESULTS / f"text_conditional_sampler_{args.family}.json"
    common.write_json(result, out)
    print(f"-> {common.rel(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
