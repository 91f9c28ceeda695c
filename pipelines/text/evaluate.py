"""``evaluate-text``: does ``decoder(f_tau(text))`` show what the text says, and is it new?

The project's domain classifier (``latentforge classifier``: one head per factor of ``shapes``, trained
on the **train split**) reads the factors of the images. Prompt sets of ``text.eval_prompts`` each:

* ``seen``: captions of the aligned set (the training prompts);
* ``paraphrase``: the same images' factors in the words of :mod:`pipelines.text.paraphrases` (a style the
  training templates never use);
* ``heldout_a``: training-style captions of the tier (a) combinations (``text.holdout``: held out of the
  aligned pairs only; pseudo-captions and the bank still show them);
* ``heldout_b``: the same for the tier (b) combinations (``text.holdout_strict``: also held out of the
  pseudo-captions and the bank, so no text-side training signal pairs those words with those images);
* ``free``: "a <colour> <shape>" of aligned combinations: size and position left free.

Per **mode** (``generate``; ``retrieve`` with a code bank; ``rerank``: generate :data:`RERANK_K` samples
and keep the n the captioner's cosine ranks best, with a captioner) and per set, two decodings:
``<mode>_t0_<set>_*`` the mode (temperature 0, one image per prompt; not for rerank, whose samples
would all be the mode) and ``<mode>_t1_<set>_*`` temperature 1 with :data:`SAMPLES` images per prompt:

* ``acc_<factor>``, ``per_factor`` (their mean), ``all_factors`` (every factor right) of the factors the
  prompt states (shape and colour only for ``free``);
* ``copy_rate``: the fraction of the images whose pixel MSE to the nearest train image is below
  ``copy_threshold``, the median MSE of the decoder's reconstructions of train images (as close to a
  training image as the decoder's own rendering of one); retrieval copies by construction. Beside it
  ``copy_rate_real``: the same fraction for held-out real images (the val split), what a generator that
  draws new real images scores (high on data whose held-out images repeat train images, as ``shapes``'
  do); the threshold depends on the decoder, so copy rates compare modes of one decoder, not decoders;
* ``<mode>_t1_free_entropy_<factor>`` and ``<mode>_t1_free_entropy_ratio``: for the factors ``free``
  prompts leave open, the entropy of what the samples of one prompt show over the uniform entropy,
  averaged over prompts (0: always the same, 1: uniform);
* ``<mode>_t<0|1>_paraphrase_drop``: seen minus paraphrase per-factor accuracy, in points.

Also ``seen_*``, ``paraphrase_*``, ``heldout_*`` and ``paraphrase_drop``: the ``generate`` mode at
temperature 0 on seen, paraphrase and tier (a) (the figures earlier versions reported; the registry's
primary metric); ``ceiling_*`` (the same figures on the frozen decoder's reconstructions of aligned
images: what any f_tau could reach through it; ``ceiling_method``: ``encode``, or ``latent_fit`` for a
decoder without an encoder), the classifier's own test accuracy per head (it must be >= 0.98 to be
trusted) and the issue's generation targets. Data without factors but with classes: the label head's
accuracy on seen prompts. Written to ``<evaluate.output_dir>/<family>-text/metrics.json`` and logged to
the text run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentforge.models.text import latent_shape_of, rerank
from latentforge.pipelines.classifier import LABEL_HEAD, load_classifier
from latentforge.pipelines.common.errors import EvaluationError
from latentforge.pipelines.common.files import atomic_directory
from latentforge.pipelines.common.params import section
from latentforge.pipelines.common.summary import TEXT_KEY_FIGURES, write_summary
from latentforge.pipelines.common.tracking import mlflow_client, tracking_uri
from latentforge.pipelines.data import SHAPE_FACTORS, shape_caption
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import load_split, read_manifest
from latentforge.pipelines.text.encoders import text_tensors
from latentforge.pipelines.text.outputs import load_scorer, load_text_model, text_modes
from latentforge.pipelines.text.paraphrases import paraphrase

CLASSIFIER_MIN_ACCURACY = 0.98
SAMPLES = 8      # images per prompt at temperature 1
RERANK_K = 16    # samples drawn per prompt for mode rerank, of which SAMPLES are kept
CHUNK = 128      # prompts per decoding call
REAL_COPY_IMAGES = 500  # held-out real images the copy rate of real data is measured on
# The generation-mode targets per family: (seen per-factor at T=1, tier (b) all factors at T=1);
# a family not named here is held to the VAE's.
FAMILY_TARGETS = {"vqvae2": (0.95, 0.75), "vae": (0.85, 0.50), "gan": (0.80, 0.40)}
PARAPHRASE_DROP_MAX_POINTS = 5.0
FREE_ENTROPY_MIN = 0.6
FREE_FACTORS = ("size", "hpos", "vpos")  # what "a <colour> <shape>" leaves open


def prompt_sets(record: dict[str, Any], manifest: dict[str, Any], train: dict[str, np.ndarray], count: int,
                seed: int) -> dict[str, tuple[list[str], np.ndarray, list[str]]]:
    """{set name: (prompts, targets (N, F) factor indices, or (N, 1) labels for data without factors,
    the factor names the prompts state)}."""
    rng = np.random.default_rng(seed)
    rows = np.asarray(record["aligned"]["aligned_rows"])
    pick = rows[rng.choice(len(rows), size=min(count, len(rows)), replace=False)]
    names = manifest.get("factor_names") or []
    if not names:
        return {"seen": ([str(c) for c in train["captions"][pick]], train["labels"][pick][:, None], [LABEL_HEAD])}
    factors = train["factors"][pick]
    values = manifest["factor_values"]
    sets = {"seen": ([str(c) for c in train["captions"][pick]], factors, names)}
    if names == list(SHAPE_FACTORS):
        as_values = lambda row: {k: values[k][row[j]] for j, k in enumerate(names)}  # noqa: E731
        sets["paraphrase"] = ([paraphrase(as_values(r), rng) for r in factors], factors, names)
        for tier, key in (("heldout_a", "holdout"), ("heldout_b", "holdout_strict")):
            pairs = [(values["shape"].index(s), values["colour"].index(c)) for s, c in record["aligned"].get(key) or []]
            if pairs:
                held = np.stack([rng.integers(0, len(values[k]), size=count) for k in names], axis=1)
                chosen = np.array(pairs)[rng.integers(0, len(pairs), size=count)]
                held[:, names.index("shape")], held[:, names.index("colour")] = chosen[:, 0], chosen[:, 1]
                sets[tier] = ([shape_caption(as_values(r), rng) for r in held], held, names)
        free = factors[:, [names.index("shape"), names.index("colour")]]
        sets["free"] = ([f"a {values['colour'][c]} {values['shape'][s]}" for s, c in free], factors, ["shape", "colour"])
    return sets


def evaluate_text(text_dir: str | Path, classifier_dir: str | Path, prepared_dir: str | Path, count: int = 300,
                  seed: int = 0, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The figures above for the train-text output in ``text_dir`` (see the module docstring)."""
    text_map, decoder, record = load_text_model(text_dir)
    scorer = load_scorer(text_dir, record)
    classifier, meta = load_classifier(classifier_dir)
    prepared_dir = Path(prepared_dir)
    manifest = read_manifest(prepared_dir)
    if meta.get("data_hash") != record["data"]["data_hash"]:
        raise EvaluationError(f"the classifier in {classifier_dir} was trained on other data than the text model; "
                              "re-run `latentforge classifier`")
    train = load_split(prepared_dir, "train")
    names = manifest.get("factor_names") or []
    heads = [f"factor_{n}" for n in names] or [LABEL_HEAD]
    modes = text_modes(record)
    metrics: dict[str, Any] = {"aligned_size": record["aligned"]["aligned_size"], "prompts_per_set": count,
                               "encoder": record["text_encoder"]["kind"], "modes": modes, "samples_per_prompt": SAMPLES,
                               "rerank_k": RERANK_K if "rerank" in modes else None,
                               "classifier_trained_on": "train split",
                               "holdout_tiers": {"a": record["aligned"]["holdout"], "b": record["aligned"].get("holdout_strict") or []}}
    metrics.update(classifier_trust(classifier_dir, heads))
    sets = prompt_sets(record, manifest, train, count, seed)
    train_pixels = batch_to_tensor(np.array(train["images"])).flatten(1)
    # The nearest train image of a sample is the nearest distinct one: shapes repeats images (9600 train
    # images, 6123 distinct), and the copy rates compare each sample with every distinct image only once.
    distinct_pixels = batch_to_tensor(np.unique(np.array(train["images"]), axis=0)).flatten(1)
    # Each prompt set's text inputs, encoded once for all modes and temperatures (the encoder is deterministic).
    encoded = {name: encode_chunks(record["text_encoder"], prompts) for name, (prompts, _, _) in sets.items()}
    rows = np.asarray(record["aligned"]["aligned_rows"])[:count]
    with torch.no_grad():
        ceiling, metrics["ceiling_method"] = reconstructions(decoder, train, rows, seed)
        threshold = None
        if ceiling is not None:
            # What the frozen decoder itself can show: the classifier on its reconstructions of aligned images;
            # and how close to a training image its own renderings of one are (the copy threshold).
            targets = train["factors"] if names else train["labels"][:, None]
            score(metrics, "ceiling", read(classifier, ceiling), targets[rows], heads)
            threshold = float(((ceiling.flatten(1) - train_pixels[torch.from_numpy(rows)]) ** 2).mean(1).median())
            # What a perfect generator scores: held-out real images under the same threshold. On a data set
            # with few distinct images (shapes repeats train images in val) a real new image is often a "copy".
            val = load_split(prepared_dir, "val")["images"][:REAL_COPY_IMAGES]
            metrics["copy_rate_real"] = copy_rate(batch_to_tensor(np.array(val)), distinct_pixels, threshold)
        metrics["copy_threshold"] = threshold
        generator = torch.Generator().manual_seed(seed)
        for mode in modes:
            for temperature, n in ((0.0, 1), (1.0, SAMPLES)):
                if mode == "rerank" and temperature == 0:
                    continue  # the k samples at the mode are one image: nothing to rank
                prefix = f"{mode}_t{temperature:g}"
                for name, (prompts, targets, stated) in sets.items():
                    images = decode_prompts(mode, text_map, decoder, scorer, record, prompts, n, temperature, generator,
                                            encoded[name])
                    flat = images.flatten(0, 1)
                    logits = read(classifier, flat)
                    used = [heads.index(f"factor_{f}") if f != LABEL_HEAD else 0 for f in stated]
                    score(metrics, f"{prefix}_{name}", logits, np.repeat(targets[:, used], n, axis=0), [heads[j] for j in used])
                    metrics[f"{prefix}_{name}_copy_rate"] = None if threshold is None else copy_rate(flat, distinct_pixels, threshold)
                    if name == "free" and n > 1:
                        free_entropy(metrics, prefix, logits, n, manifest)
                if f"{prefix}_paraphrase_per_factor" in metrics:
                    seen, para = metrics[f"{prefix}_seen_per_factor"], metrics[f"{prefix}_paraphrase_per_factor"]
                    metrics[f"{prefix}_paraphrase_drop"] = 100.0 * (seen - para)
        for name, (prompts, _, _) in sets.items():
            metrics[f"{name}_examples"] = prompts[:3]
    add_legacy_names(metrics)
    metrics["targets"] = targets_of(record["family"], metrics)
    summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("generate_t1_seen_per_factor", "generate_t1_heldout_b_all_factors",
                                                          "generate_t1_free_entropy_ratio", "generate_t1_seen_copy_rate",
                                                          "retrieve_t1_seen_copy_rate") if isinstance(metrics.get(k), float))
    echo(f"evaluate-text {record['family']} (modes {', '.join(modes)}; classifier trained on the train split): {summary}")
    return metrics


def classifier_trust(classifier_dir: str | Path, heads: list[str]) -> dict[str, Any]:
    """The classifier's test accuracy per head (its ``metrics.json``) and whether it is trusted (every
    head used at least :data:`CLASSIFIER_MIN_ACCURACY`); {} without that file."""
    path = Path(classifier_dir) / "metrics.json"
    if not path.is_file():
        return {}
    accs = {k[len("test_accuracy_"):]: v for k, v in json.loads(path.read_text()).items() if k.startswith("test_accuracy_")}
    used = [accs[h] for h in heads if h in accs]
    return {**{f"classifier_test_accuracy_{k}": v for k, v in accs.items()},
            "classifier_min_accuracy": min(used) if used else float("nan"),
            "classifier_trusted": bool(used) and min(used) >= CLASSIFIER_MIN_ACCURACY}


def encode_chunks(spec: dict[str, Any], prompts: list[str]) -> list[dict[str, torch.Tensor]]:
    """The text inputs (:func:`pipelines.text.encoders.text_tensors`) of ``prompts``, :data:`CHUNK` at a time."""
    return [text_tensors(spec, prompts[i:i + CHUNK]) for i in range(0, len(prompts), CHUNK)]


def decode_prompts(mode: str, text_map, decoder, scorer, record: dict[str, Any], prompts: list[str], n: int,
                   temperature: float, generator: torch.Generator,
                   encoded: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """(N, n, C, H, W) images for N prompts in ``mode``: ``generate`` (:meth:`TextMap.generate`), ``retrieve``
    (:meth:`TextMap.retrieve`, training images) or ``rerank`` (:data:`RERANK_K` generated samples, the n the
    ``scorer`` ranks best). ``encoded``: the prompts' :func:`encode_chunks`, when already computed."""
    out = []
    for inputs in encoded if encoded is not None else encode_chunks(record["text_encoder"], prompts):
        emb, mask = inputs["embedding"], inputs.get("mask")
        if mode == "retrieve":
            out.append(text_map.retrieve(decoder, emb, n, temperature, generator, mask)[0])
        elif mode == "rerank":
            drawn = text_map.generate(decoder, emb, RERANK_K, temperature, generator, mask)
            out.append(rerank(drawn, scorer.scores(emb, drawn), n))
        else:
            out.append(text_map.generate(decoder, emb, n, temperature, generator, mask))
    return torch.cat(out)


def read(classifier, images: torch.Tensor, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """The classifier's logits {head: (N, classes)} for (N, C, H, W) images, ``chunk`` at a time."""
    parts = [classifier(images[i:i + chunk]) for i in range(0, len(images), chunk)]
    return {h: torch.cat([p[h] for p in parts]) for h in parts[0]}


def score(metrics: dict[str, Any], name: str, logits: dict[str, torch.Tensor], targets: np.ndarray, heads: list[str]) -> None:
    """Write into ``metrics`` the figures of prompt set ``name``: ``<name>_acc_<head>`` per head,
    ``<name>_per_factor`` and ``<name>_all_factors``; ``logits``: {head: (N, classes)}, ``targets`` (N, heads)."""
    correct = np.stack([logits[h].argmax(1).numpy() == targets[:, j] for j, h in enumerate(heads)], axis=1)
    for j, h in enumerate(heads):
        metrics[f"{name}_acc_{h.removeprefix('factor_')}"] = float(correct[:, j].mean())
    metrics[f"{name}_per_factor"] = float(correct.mean())
    metrics[f"{name}_all_factors"] = float(correct.all(1).mean())


def nearest_mse(images: torch.Tensor, train_pixels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N,) per-pixel MSE of each of the (N, C, H, W) ``images`` to its nearest row of ``train_pixels``
    (M, C*H*W): ``|a|^2 + |b|^2 - 2 a.b`` over all pairs, ``chunk`` images at a time."""
    flat = images.flatten(1).float()
    norms = (train_pixels ** 2).sum(1)
    out = []
    for i in range(0, len(flat), chunk):
        a = flat[i:i + chunk]
        d = (a ** 2).sum(1, keepdim=True) + norms[None] - 2 * a @ train_pixels.T
        out.append(d.min(1).values.clamp_min(0) / flat.shape[1])
    return torch.cat(out)


def copy_rate(images: torch.Tensor, train_pixels: torch.Tensor, threshold: float) -> float:
    """The fraction of ``images`` whose pixel MSE to the nearest train image (``train_pixels`` (M, C*H*W))
    is below ``threshold`` (the decoder's median reconstruction error of train images)."""
    return float((nearest_mse(images, train_pixels) < threshold).float().mean())


def free_entropy(metrics: dict[str, Any], prefix: str, logits: dict[str, torch.Tensor], n: int, manifest: dict[str, Any]) -> None:
    """``<prefix>_free_entropy_<factor>`` for each of :data:`FREE_FACTORS`: per prompt, the entropy of the
    classifier's readings of its n samples over log(number of values), averaged over prompts; and
    ``<prefix>_free_entropy_ratio``, their mean. ``logits`` are of N prompts x n samples, in that order."""
    ratios = []
    for factor in FREE_FACTORS:
        values = len(manifest["factor_values"][factor])
        shown = logits[f"factor_{factor}"].argmax(1).numpy().reshape(-1, n)
        counts = np.stack([(shown == v).sum(1) for v in range(values)], axis=1) / n
        entropy = -(np.where(counts > 0, counts * np.log(np.maximum(counts, 1e-12)), 0.0)).sum(1)
        metrics[f"{prefix}_free_entropy_{factor}"] = float(entropy.mean() / np.log(values))
        ratios.append(metrics[f"{prefix}_free_entropy_{factor}"])
    metrics[f"{prefix}_free_entropy_ratio"] = float(np.mean(ratios))


def add_legacy_names(metrics: dict[str, Any]) -> None:
    """``seen_*``, ``paraphrase_*``, ``heldout_*`` and ``paraphrase_drop``: the generate mode at temperature
    0 on seen, paraphrase and tier (a) prompts, under the names earlier versions used (the registry's
    primary metric, the benchmarks); ``paraphrase_drop_all_factors`` likewise."""
    for key in [k for k in metrics if k.startswith("generate_t0_")]:
        rest = key[len("generate_t0_"):]
        for old, new in (("seen_", "seen_"), ("paraphrase_", "paraphrase_"), ("heldout_a_", "heldout_")):
            if rest.startswith(old) and not rest.endswith("copy_rate"):
                metrics[new + rest[len(old):]] = metrics[key]
    if "paraphrase_per_factor" in metrics:
        metrics["paraphrase_drop_all_factors"] = 100.0 * (metrics["seen_all_factors"] - metrics["paraphrase_all_factors"])


def targets_of(family: str, metrics: dict[str, Any]) -> dict[str, bool]:
    """The issue's generation-mode targets that this evaluation measured: seen per-factor at T=1, the
    paraphrase drop at T=1, tier (b) all factors at T=1 and the free-factor entropy ratio."""
    seen, tier_b = FAMILY_TARGETS.get(family, FAMILY_TARGETS["vae"])
    checks = {f"generate_t1_seen_per_factor>={seen:g}": ("generate_t1_seen_per_factor", lambda v: v >= seen),
              f"generate_t1_paraphrase_drop<={PARAPHRASE_DROP_MAX_POINTS:g}":
                  ("generate_t1_paraphrase_drop", lambda v: v <= PARAPHRASE_DROP_MAX_POINTS),
              f"generate_t1_heldout_b_all_factors>={tier_b:g}": ("generate_t1_heldout_b_all_factors", lambda v: v >= tier_b),
              f"generate_t1_free_entropy_ratio>={FREE_ENTROPY_MIN:g}": ("generate_t1_free_entropy_ratio", lambda v: v >= FREE_ENTROPY_MIN)}
    return {name: bool(ok(metrics[key])) for name, (key, ok) in checks.items() if key in metrics}




# Fitting a latent to an image for decoders without an encoder: the best of LATENT_FIT_RESTARTS draws
# z ~ N(0, I), then LATENT_FIT_STEPS Adam steps on the pixel loss (about 30 s for 300 images of the demo GAN
# on 2 cores). Fewer restarts or steps leave the fit, not the decoder, as the limit.
LATENT_FIT_STEPS = 200
LATENT_FIT_RESTARTS = 8
LATENT_FIT_LR = 0.05


def reconstructions(decoder, train: dict[str, np.ndarray], rows: np.ndarray, seed: int = 0) -> tuple[torch.Tensor | None, str | None]:
    """(images (N, C, H, W), method) of the frozen decoder's best renderings of aligned train images:
    ``decode(encode(x))`` (``"encode"``), or, for a decoder without an encoder, of a latent fitted to
    each image (``"latent_fit"``); (None, None) for a decoder with neither (a code-map decoder without
    an encoder)."""
    generator = torch.Generator().manual_seed(seed)
    if type(decoder).__name__ == "GLO":  # its encode fits codes by optimisation
        method, render = "latent_fit", lambda x: decoder.decode(decoder.encode(x, generator=generator).latent)
    elif decoder.has_encoder and hasattr(decoder, "decode_indices"):
        method, render = "encode", lambda x: decoder.decode_indices(*decoder.encode(x).indices)
    elif decoder.has_encoder:
        method, render = "encode", lambda x: decoder.decode(decoder.encode(x).point)
    elif not hasattr(decoder, "decode_indices"):
        method, render = "latent_fit", lambda x: decoder.decode(fit_latents(decoder, x, generator=generator))
    else:
        return None, None
    out = [render(batch_to_tensor(np.array(train["images"][rows[i:i + 128]]))).images for i in range(0, len(rows), 128)]
    return torch.cat(out), method


def fit_latents(decoder, x: torch.Tensor, steps: int = LATENT_FIT_STEPS, restarts: int = LATENT_FIT_RESTARTS,
                lr: float = LATENT_FIT_LR, generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents z (B, *latent_shape) whose ``decoder.decode(z)`` comes closest (pixel MSE) to images x
    (B, C, H, W): the best of ``restarts`` draws from N(0, I) per image, then ``steps`` Adam steps.
    Only z gets gradients: the decoder's weights and their ``.grad`` are left as they are."""
    shape = latent_shape_of(decoder)
    b = x.shape[0]
    with torch.no_grad():
        candidates = torch.randn((restarts, b, *shape), generator=generator)
        errors = torch.stack([((decoder.decode(c).images - x) ** 2).flatten(1).mean(1) for c in candidates])
        z = candidates[errors.argmin(0), torch.arange(b)].clone()
    z.requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = ((decoder.decode(z).images - x) ** 2).flatten(1).mean(1).sum()
            (z.grad,) = torch.autograd.grad(loss, z)
            optimizer.step()
    return z.detach()


def evaluate_text_from_params(params: dict[str, Any], family: str, echo: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """``latentforge evaluate-text --model <family>``: write ``<evaluate.output_dir>/<family>-text/metrics.json``
    atomically and log the numbers to the text model's MLflow run."""
    text = section(params, "text")
    data = section(params, "data")
    text_dir = Path(text["output_dir"]) / family
    classifier_dir = Path(section(params, "classifier")["output_dir"]) / data["name"]
    prepared = Path(data["output_dir"]) / data["name"]
    metrics = evaluate_text(text_dir, classifier_dir, prepared, int(text["eval_prompts"]), int(text["seed"]), echo)
    out = Path(section(params, "evaluate")["output_dir"]) / f"{family}-text"
    with atomic_directory(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        write_summary(tmp, metrics, TEXT_KEY_FIGURES)
    run_id = json.loads((text_dir / "text.json").read_text()).get("mlflow_run_id")
    if run_id:
        # Imported here: mlflow only when there is a run to log to.
        from mlflow.entities import Metric

        client = mlflow_client(tracking_uri(params))
        now = int(time.time() * 1000)
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        client.log_batch(run_id, metrics=[Metric(f"eval/{k}", v, now, 0) for k, v in numbers.items()])
        client.log_artifact(run_id, str(out / "metrics.json"), artifact_path="evaluate")
    return out, metrics
