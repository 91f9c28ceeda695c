"""Sample quality of one family under other settings, without the pipeline: the figures of
``latentforge evaluate``'s sample-quality section for a model trained in a plain loop.

It reads what ``dvc repro`` (or ``make demo``) wrote: the prepared data (``data/prepared/<data.name>``) and
the domain classifier (``artifacts/classifier/<data.name>``). It trains ``--family`` from params.yaml's
``train.models`` section with ``--set key=value`` overrides for ``--epochs`` epochs (batch 64, the same
``models.train_step`` as Ray Train), then scores 1,000 of its samples (``--samples``) against as many test
images, each figure beside its value for as many train images (the real ceiling):

* validity, coverage / real coverage, precision / real, recall / real, FD / floor (the classifier's
  features); the same for the model's reconstructions of the test images (what its decoder can draw);
* every flat-latent family: its prior and a Gaussian mixture per ``--components`` value;
* VQ-VAE-2: its priors at ``--bottom-temperatures`` for the bottom level (the top at temperature 1), and
  the bottom prior given the test images' true top codes (the bottom prior alone).

Writes ``bench/results/sample_quality/<tag>.json`` and ``<tag>-<sampler>.png`` (64 samples).

    .venv/bin/python bench/sample_quality.py --family vae --epochs 30 --set latent_dim=16 --components 50,200,400
    .venv/bin/python bench/sample_quality.py --family vqvae2 --epochs 12 --set bottom_dropout=0 --bottom-temperatures 1,0.5
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import common  # noqa: E402  (puts the repository root on sys.path)

import numpy as np
import torch

from latentforge.models import MODELS, train_step
from latentforge.models.samplers import GaussianMixtureConfig, GaussianMixtureSampler, encode_latents
from latentforge.pipelines.classifier import load_classifier, read_images, reading_heads
from latentforge.pipelines.common.params import load_params, section
from latentforge.pipelines.evaluate import metrics as M
from latentforge.pipelines.imaging import batch_to_tensor, save_png, tensor_to_uint8
from latentforge.pipelines.prepare import load_split
from latentforge.runtime.grid import make_grid

CONFIDENT = 0.9
BATCH = 64


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings -> a dict, values parsed as Python literals where they are one."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"sample_quality: --set wants key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def train(family: str, config: dict, images: torch.Tensor, epochs: int, seed: int, after_epoch=None):
    """Train ``family`` in a plain loop; ``after_epoch(model, epoch)`` (1-based) runs in eval mode after each
    epoch, outside the timed training seconds."""
    torch.manual_seed(seed)
    model = MODELS[family](MODELS[family].config_class.from_dict(config))
    optimizers = model.configure_optimizers()
    step, start, paused = 0, time.time(), 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images))
        for i in range(0, len(images) - BATCH + 1, BATCH):
            logs = train_step(model, optimizers, {"image": images[order[i : i + BATCH]]}, step)
            step += 1
        print(f"epoch {epoch + 1}/{epochs} {time.time() - start - paused:.0f}s loss {logs['loss' if 'loss' in logs else next(iter(logs))]:.4g}", flush=True)
        if after_epoch is not None and epoch + 1 < epochs:
            began = time.time()
            with torch.no_grad():
                after_epoch(model.eval(), epoch + 1)
            paused += time.time() - began
    return model.eval(), time.time() - start - paused


class Scorer:
    """The sample-quality figures of image sets against a fixed real set, read by the domain classifier."""

    def __init__(self, classifier, test: np.ndarray, train: np.ndarray, n: int):
        self.classifier, self.heads = classifier, reading_heads(classifier.heads)
        self.real = read_images(classifier, test[:n])
        self.ceiling = self._raw(read_images(classifier, train[:n]))

    def _raw(self, fake) -> dict[str, float]:
        (rf, rp), (ff, fp) = self.real, fake
        precision, recall = M.precision_recall(rf, ff, k=3)
        return {
            "validity": M.validity([fp[h] for h in self.heads], CONFIDENT),
            "coverage": M.coverage_ratio([fp[h] for h in self.heads], [rp[h] for h in self.heads], CONFIDENT),
            "precision": precision,
            "recall": recall,
            "fd": M.frechet_distance_features(rf, ff),
        }

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        raw = self._raw(read_images(self.classifier, images))
        c = self.ceiling
        return {
            "validity": raw["validity"],
            "coverage": raw["coverage"],
            "precision_ratio": raw["precision"] / c["precision"],
            "recall_ratio": raw["recall"] / c["recall"],
            "fd_ratio": raw["fd"] / c["fd"],
        }


def samplers(model, args, train_images: torch.Tensor, test_images: torch.Tensor, generator: torch.Generator):
    """(name, images) of every sampler this family has in this benchmark."""
    n = args.samples
    if hasattr(model, "sample_indices"):  # VQ-VAE-2: per-level temperatures
        true_top = model.encode(test_images[:n]).indices[0]
        for t in args.bottom_temperatures:
            top = model.prior_top.sample(n, generator=generator)
            bottom = model.prior_bottom.sample(n, cond=top, generator=generator, temperature=t)
            yield f"prior_bottom_t{t:g}", model.decode_indices(top, bottom).images
            bottom = model.prior_bottom.sample(n, cond=true_top, generator=generator, temperature=t)
            yield f"true_top_bottom_t{t:g}", model.decode_indices(true_top, bottom).images
        return
    yield "prior", model.sample(n, generator=generator).images
    if len(tuple(getattr(model, "latent_shape", ()) or ())) == 1 and model.has_encoder:
        latents = encode_latents(model, train_images[:10000])
        for k in args.components:
            for cov in args.covariances:
                mixture = GaussianMixtureSampler.fit(latents, GaussianMixtureConfig(components=k, covariance=cov, restarts=1))
                yield f"gmm{k}" + ("" if cov == "full" else f"_{cov}"), model.decode(mixture.sample(n, generator)).images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(MODELS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--components", default="50,200,400", help="Gaussian mixture sizes (flat-latent families)")
    parser.add_argument("--covariances", default="full", help="Gaussian mixture covariance kinds (full,diag)")
    parser.add_argument("--bottom-temperatures", default="1", help="VQ-VAE-2 bottom-level temperatures")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--params", default=str(common.REPO / "params.yaml"))
    parser.add_argument("--tag", default=None, help="results name (default: the family)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="also score the prior's samples every N epochs (a learning curve; 0: only at the end)")
    args = parser.parse_args()
    args.components = [int(k) for k in args.components.split(",") if k]
    args.covariances = [c for c in args.covariances.split(",") if c]
    args.bottom_temperatures = [float(t) for t in args.bottom_temperatures.split(",") if t]

    params = load_params(args.params)
    name = params["data"]["name"]
    data_dir = common.REPO / params["data"]["output_dir"] / name
    classifier_dir = common.REPO / params["classifier"]["output_dir"] / name
    if not data_dir.is_dir() or not classifier_dir.is_dir():
        print(f"sample_quality: needs {data_dir} and {classifier_dir}; run `dvc repro classifier` first", file=sys.stderr)
        return 2
    train_images = batch_to_tensor(load_split(data_dir, "train")["images"])
    test_images = batch_to_tensor(load_split(data_dir, "test")["images"])
    config = {**(section(params, "train.models").get(args.family) or {}), **parse_overrides(args.overrides)}
    config.update(image_size=train_images.shape[-1], channels=train_images.shape[1])
    if args.family == "glo":
        config["num_samples"] = len(train_images)

    classifier, _ = load_classifier(classifier_dir)
    n = min(args.samples, len(test_images))
    score = Scorer(classifier, test_images.permute(0, 2, 3, 1).mul(255).round().byte().numpy(),
                   train_images.permute(0, 2, 3, 1).mul(255).round().byte().numpy(), n)
    curve: dict[int, dict[str, float]] = {}

    def score_prior(model, epoch: int) -> None:
        if args.eval_every and epoch % args.eval_every == 0:
            curve[epoch] = score(model.sample(n, generator=torch.Generator().manual_seed(args.seed)).images)
            print(f"  epoch {epoch} prior: " + "  ".join(f"{k} {v:.3f}" for k, v in curve[epoch].items()), flush=True)

    model, seconds = train(args.family, config, train_images, args.epochs, args.seed, score_prior)
    tag = args.tag or args.family
    out_dir = common.RESULTS / "sample_quality"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        if model.has_encoder:
            figures["reconstructions"] = score(model.decode(model.encode(test_images[:n]).latent).images)
        for sampler, images in samplers(model, args, train_images, test_images, generator):
            figures[sampler] = score(images)
            save_png(make_grid(tensor_to_uint8(images[:64]), nrow=8), out_dir / f"{tag}-{sampler}.png", scale=3)
    for sampler, f in figures.items():
        print(f"{tag} {sampler:>22}: " + "  ".join(f"{k} {v:.3f}" for k, v in f.items()))
    common.write_json({
        "environment": common.environment(), "family": args.family, "config": config, "epochs": args.epochs,
        "train_seconds": round(seconds, 1), "samples": n, "figures": figures, "prior_by_epoch": curve,
    }, out_dir / f"{tag}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
