"""``evaluate-text``: does ``decoder(f_tau(text))`` show what the text says?

The project's domain classifier (``latentforge classifier``: one head per factor of ``shapes``) reads
the factors of the generated images (the mode: latent f_tau(y), or argmax codes). Three prompt sets of
``text.eval_prompts`` each:

* ``seen``: captions of the aligned set (the training prompts);
* ``paraphrase``: the same images' factors in the words of :mod:`pipelines.text.paraphrases` (a style the
  training templates never use);
* ``heldout``: training-style captions of the held-out (shape, colour) combinations (composition).

Per set: ``<set>_acc_<factor>`` (per-factor accuracy), ``<set>_per_factor`` (their mean) and
``<set>_all_factors`` (every factor right). Also ``paraphrase_drop`` (seen minus paraphrase per-factor
accuracy, in points), ``ceiling_*`` (the same figures on the frozen decoder's reconstructions of
aligned images: what any f_tau could reach through it; ``ceiling_method`` says how they were made:
``encode`` for a family with an encoder, ``latent_fit`` for one without (a GAN: a latent fitted to each
image by restarts and Adam steps on the pixel loss; GLO: its own optimising encoder)), the
classifier's own test accuracy per head (it must be >= 0.98 to be trusted)
and the targets of the issue. Data without factors but with classes: the label head's accuracy on seen
prompts. Written to ``<evaluate.output_dir>/<family>-text/metrics.json`` and logged to the text run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentforge.models.text import latent_shape_of
from latentforge.pipelines.classifier import LABEL_HEAD, load_classifier
from latentforge.pipelines.common.errors import EvaluationError
from latentforge.pipelines.common.files import atomic_directory
from latentforge.pipelines.common.params import section
from latentforge.pipelines.common.tracking import mlflow_client, tracking_uri
from latentforge.pipelines.data import SHAPE_FACTORS, shape_caption
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import load_split, read_manifest
from latentforge.pipelines.text.encoders import text_tensors
from latentforge.pipelines.text.outputs import load_text_model
from latentforge.pipelines.text.paraphrases import paraphrase

CLASSIFIER_MIN_ACCURACY = 0.98
TARGETS = {"seen_per_factor": 0.90, "heldout_all_factors": 0.75, "paraphrase_drop_max_points": 5.0}


def prompt_sets(record: dict[str, Any], manifest: dict[str, Any], train: dict[str, np.ndarray], count: int, seed: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """{set name: (prompts, targets (N, F) factor indices, or (N, 1) labels for data without factors)}."""
    rng = np.random.default_rng(seed)
    rows = np.asarray(record["aligned"]["aligned_rows"])
    pick = rows[rng.choice(len(rows), size=min(count, len(rows)), replace=False)]
    names = manifest.get("factor_names") or []
    if not names:
        return {"seen": ([str(c) for c in train["captions"][pick]], train["labels"][pick][:, None])}
    factors = train["factors"][pick]
    values = manifest["factor_values"]
    sets = {"seen": ([str(c) for c in train["captions"][pick]], factors)}
    if names == list(SHAPE_FACTORS):
        as_values = lambda row: {k: values[k][row[j]] for j, k in enumerate(names)}  # noqa: E731
        sets["paraphrase"] = ([paraphrase(as_values(r), rng) for r in factors], factors)
        holdout = [(values["shape"].index(s), values["colour"].index(c)) for s, c in record["aligned"]["holdout"]]
        if holdout:
            held = np.stack([rng.integers(0, len(values[k]), size=count) for k in names], axis=1)
            pairs = np.array(holdout)[rng.integers(0, len(holdout), size=count)]
            held[:, names.index("shape")], held[:, names.index("colour")] = pairs[:, 0], pairs[:, 1]
            sets["heldout"] = ([shape_caption(as_values(r), rng) for r in held], held)
    return sets


def evaluate_text(text_dir: str | Path, classifier_dir: str | Path, prepared_dir: str | Path, count: int = 300,
                  seed: int = 0, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The figures above for the train-text output in ``text_dir`` (see the module docstring)."""
    text_map, decoder, record = load_text_model(text_dir)
    classifier, meta = load_classifier(classifier_dir)
    prepared_dir = Path(prepared_dir)
    manifest = read_manifest(prepared_dir)
    if meta.get("data_hash") != record["data"]["data_hash"]:
        raise EvaluationError(f"the classifier in {classifier_dir} was trained on other data than the text model; "
                              "re-run `latentforge classifier`")
    train = load_split(prepared_dir, "train")
    names = manifest.get("factor_names") or []
    heads = [f"factor_{n}" for n in names] or [LABEL_HEAD]
    metrics: dict[str, Any] = {"aligned_size": record["aligned"]["aligned_size"], "prompts_per_set": count,
                               "encoder": record["text_encoder"]["kind"]}
    cls_metrics_path = Path(classifier_dir) / "metrics.json"
    if cls_metrics_path.is_file():
        cls_metrics = json.loads(cls_metrics_path.read_text())
        accs = {k[len("test_accuracy_"):]: v for k, v in cls_metrics.items() if k.startswith("test_accuracy_")}
        metrics.update({f"classifier_test_accuracy_{k}": v for k, v in accs.items()})
        used = [accs[h] for h in heads if h in accs]
        metrics["classifier_min_accuracy"] = min(used) if used else float("nan")
        metrics["classifier_trusted"] = bool(used) and min(used) >= CLASSIFIER_MIN_ACCURACY

    sets = prompt_sets(record, manifest, train, count, seed)
    with torch.no_grad():
        ceiling, metrics["ceiling_method"] = reconstructions(decoder, train, np.asarray(record["aligned"]["aligned_rows"])[:count], seed)
        if ceiling is not None:
            # What the frozen decoder itself can show: the classifier on its reconstructions of aligned images.
            targets = train["factors"] if names else train["labels"][:, None]
            rows = np.asarray(record["aligned"]["aligned_rows"])[:count]
            sets_scores = {"ceiling": (ceiling, targets[rows])}
        else:
            sets_scores = {}
        for name, (prompts, targets) in sets.items():
            images = []
            for i in range(0, len(prompts), 128):
                inputs = text_tensors(record["text_encoder"], prompts[i:i + 128])
                images.append(text_map.generate(decoder, inputs["embedding"], 1, 0.0, mask=inputs.get("mask"))[:, 0])
            score(metrics, name, classifier(torch.cat(images)), targets, heads)
            metrics[f"{name}_examples"] = prompts[:3]
        for name, (images, targets) in sets_scores.items():
            score(metrics, name, classifier(images), targets, heads)
    if "paraphrase_per_factor" in metrics:
        metrics["paraphrase_drop"] = 100.0 * (metrics["seen_per_factor"] - metrics["paraphrase_per_factor"])
        metrics["paraphrase_drop_all_factors"] = 100.0 * (metrics["seen_all_factors"] - metrics["paraphrase_all_factors"])
    metrics["targets"] = {
        "seen_per_factor>=0.90": metrics["seen_per_factor"] >= TARGETS["seen_per_factor"],
        **({"heldout_all_factors>=0.75": metrics["heldout_all_factors"] >= TARGETS["heldout_all_factors"]}
           if "heldout_all_factors" in metrics else {}),
        **({"paraphrase_drop<=5": metrics["paraphrase_drop"] <= TARGETS["paraphrase_drop_max_points"]}
           if "paraphrase_drop" in metrics else {}),
    }
    summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("seen_per_factor", "seen_all_factors", "paraphrase_per_factor",
                                                          "heldout_all_factors") if k in metrics)
    echo(f"evaluate-text {record['family']}: {summary} (aligned set {metrics['aligned_size']})")
    return metrics


def score(metrics: dict[str, Any], name: str, logits: dict[str, torch.Tensor], targets: np.ndarray, heads: list[str]) -> None:
    """Write into ``metrics`` the figures of prompt set ``name``: ``<name>_acc_<head>`` per head,
    ``<name>_per_factor`` and ``<name>_all_factors``; ``logits``: {head: (N, classes)}, ``targets`` (N, heads)."""
    correct = np.stack([logits[h].argmax(1).numpy() == targets[:, j] for j, h in enumerate(heads)], axis=1)
    for j, h in enumerate(heads):
        metrics[f"{name}_acc_{h.removeprefix('factor_')}"] = float(correct[:, j].mean())
    metrics[f"{name}_per_factor"] = float(correct.mean())
    metrics[f"{name}_all_factors"] = float(correct.all(1).mean())




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
