"""The ``evaluate`` stage: one trained family on the test split -> DVC metrics, plots, and its MLflow run.

``latentforge evaluate --model vae`` reads ``artifacts/train/vae/{model,metrics.json}``, the prepared data
and the domain classifier (``latentforge classifier``), and writes ``<evaluate.output_dir>/vae/``:
``metrics.json`` (flat numeric metrics + an ``info`` block that says what each figure was computed on)
and ``plots/*.png``. The same figures (as ``eval/<name>``) and files (under ``evaluate/``) are logged to
the training's MLflow run. Everything is written to a temporary folder first and renamed at the end.

Subsets keep a family well under a minute on 2 CPUs (``info.counts`` records every size): each split
is encoded on at most ``split_images`` seeded images (``optimised_encode_images`` for families that
encode by optimisation), the family's ``validation_step`` runs on ``validation_images`` of them, the
IWAE on ``iwae_images``, sample metrics on ``num_samples`` samples for every family (VQ-VAE-2's
KV-cached prior included; ``info.sampling`` records each sampler's seconds), the t-SNE on ``tsne_points``.

What is computed, where the family allows it:

* reconstruction (families with an encoder; GLO encodes by optimisation with ``encode_steps`` steps):
  ``recon_mse``, ``recon_psnr_db``, ``recon_ssim`` (means over test images), and ``test_<key>`` for
  each figure of the family's own ``validation_step`` on the test split (batch means where the family
  computes a figure per batch, such as codebook usage);
* VAE: ``elbo`` (``-test_nelbo``, nats per image, one posterior sample, analytic KL) and ``iwae_nll``
  (nats per image; k = ``iwae_k``, on ``iwae_images`` test images) and ``iwae_nll_bits_per_dim``. Under
  the Bernoulli likelihood on non-binary pixels these are cross-entropies, comparable only between VAEs
  of the same likelihood;
* VQ-VAE-2: ``codebook_usage_<level>``, ``codebook_perplexity_<level>`` over the test set,
  ``code_bits_per_image`` (sum over levels of h * w * log2(num_codes)), ``png_bits_per_image`` (PIL,
  optimize=False), ``compression_ratio`` (PNG bits / code bits) and ``prior_bits_per_image`` (the
  priors' cross-entropy: what an entropy coder driven by the prior would spend);
* denoising AE: ``denoise_psnr_db`` (restored vs clean) beside ``noisy_psnr_db`` (noisy input vs clean);
* samples, in the feature space of the domain classifier (not Inception: not comparable with published
  FIDs), on ``num_samples`` samples against as many test images, each figure beside its value for as
  many train images (a disjoint real set: what a perfect model scores at this count):
  ``fd_classifier`` and ``fd_classifier_floor`` (``fd_classifier_ratio``: fd / floor),
  ``sample_precision`` / ``sample_recall`` (k-NN manifolds, k = 3) and ``sample_precision_real`` /
  ``sample_recall_real`` (``*_ratio``: figure / real), ``sample_validity`` (fraction of samples whose
  every factor head, or the label head on data without factors, reads with probability >= 0.9;
  ``sample_validity_real``) and ``sample_coverage`` (distinct factor combinations among valid samples /
  the same for the test images; ``sample_coverage_real``). Beside them ``classifier_accuracy`` (the
  classifier's main-head test accuracy) and ``features_trusted`` (1 when it is >= 0.9, else 0). The
  model's own sampler gives the unprefixed figures; each ex-post sampler it carries (``sections.
  EXTRA_SAMPLERS``) the same figures prefixed ``<name>_``;
* ``probe_accuracy``: logistic regression on train latents -> labels, scored on test latents;
* the few-label curve: ``probe_accuracy_labels_<n>`` (the same probe fitted on the latents of only n
  labelled train images, n in ``probe_labels``, mean over ``probe_repeats`` draws) beside
  ``pixel_probe_accuracy_labels_<n>`` (the probe on those images' pixels): do the latents, learned from
  the unlabelled train split, generalise from few labels better than pixels?
* ``anomaly_auroc_class_<c>``: AUROC of per-image reconstruction MSE, class c (``anomaly_class``) vs the
  other classes, on the test split, and ``anomaly_threshold``: the ``anomaly_percentile`` percentile of
  the other classes' errors on the val split (the threshold serving flags anomalies with). NB: the model
  was trained on all classes, class c included; the figure the literature reports ("one class held out
  of training") needs a training run on data without class c;
* ``interp_min_confidence``: the mean over pairs of test images of different classes of the minimum
  along the decoded latent path of the classifier's max-softmax (prior draws for families without an
  encoder);
* ``mig`` and ``mig_<factor>`` (data with factors, flat latents): mutual information gap, 20 bins;
* editing by attribute vectors (continuous latents with an encoder, data with factors or classes; the
  ``edit`` params): ``edit_success_<factor>`` (the classifier reads the target value) and
  ``edit_preservation_<factor>`` (the other factors read as on the unedited reconstruction) with their
  means, at ``edit.labels_per_value`` and (suffix ``_n<labels>``) each of ``edit.eval_labels``;
  ``edit_success_by_<variant>`` per way of editing; ``edit_source_accuracy_<factor>``.

Plots: ``samples.png`` (64 samples), ``samples_nearest.png`` (those samples beside their nearest training
images in the classifier's feature space; both ``<name>_`` prefixed per ex-post sampler),
``reconstructions.png``, ``interpolation.png``, ``tsne.png`` (test latents coloured by label),
``label_efficiency.png`` (the few-label curve),
``loss_curves.png`` (``train/*loss`` and ``epoch/val_score`` from the MLflow run), ``edits.png`` (rows of
edits: image, reconstruction, its edit to each value of a factor) and ``edit_labels.png`` (edit figures
against the labels per value).

Layout: this module is the orchestrator; ``job`` resolves and checks the inputs and talks to the
training's MLflow run, ``sections`` holds one function per section above, ``inference`` runs a family
generically (encode, decode, sample), ``plots`` draws the figures and ``metrics`` holds the pure metrics.
"""


from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

from latentforge.pipelines.common.errors import EvaluationError
from latentforge.pipelines.common.files import atomic_directory
from latentforge.pipelines.common.progress import progress
from latentforge.pipelines.common.summary import IMAGE_KEY_FIGURES, write_summary
from latentforge.pipelines.evaluate.inference import BATCH, encode_images
from latentforge.pipelines.evaluate.job import (
    EVALUATE_SCHEMA,
    PRIMARY_METRICS,
    EvalJob,
    log_to_mlflow,
    open_training_run,
    primary_metric,
    resolve_evaluation,
)
from latentforge.pipelines.evaluate.sections import MIG_BINS, PLOT_SECTIONS, PR_K, SECTIONS, load_evaluation

__all__ = [
    "BATCH",
    "EVALUATE_SCHEMA",
    "MIG_BINS",
    "PRIMARY_METRICS",
    "PR_K",
    "EvalJob",
    "EvaluationError",
    "encode_images",
    "primary_metric",
    "resolve_evaluation",
    "run_evaluation",
]


def run_evaluation(job: EvalJob, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``job``; write ``metrics.json`` and plots atomically, log them to the training's MLflow
    run. Returns the metrics dict (as written)."""
    client = open_training_run(job)  # fail fast, before the minutes of work
    t_start = time.time()
    seconds: dict[str, float] = {}
    tick = [t_start]

    def lap(name: str) -> None:
        now = time.time()
        seconds[name] = round(now - tick[0], 2)
        tick[0] = now
        echo(f"[evaluate {job.family}] {name}: {seconds[name]:.1f}s")

    ev = load_evaluation(job, client)
    lap("load")
    for name, section in progress(SECTIONS, f"evaluate {job.family}", unit="sections"):
        if section(ev):
            lap(name)
    for section in PLOT_SECTIONS:
        section(ev)

    primary, direction = ev.info["primary_metric"], ev.info["primary_direction"]
    with atomic_directory(job.out_dir) as tmp:
        (tmp / "plots").mkdir()
        for fname, draw in ev.plots.items():
            draw(tmp / "plots" / fname)
        lap("plots")
        seconds["total"] = round(time.time() - t_start, 2)
        ev.info["seconds"] = seconds
        out = {**{k: _finite_or_none(v) for k, v in sorted(ev.metrics.items())}, "info": ev.info}
        (tmp / "metrics.json").write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
        write_summary(tmp, out, IMAGE_KEY_FIGURES)
        log_to_mlflow(client, job, ev.metrics, tmp, primary, direction)
    echo(f"[evaluate {job.family}] {primary} {ev.metrics.get(primary, float('nan')):.5g} ({direction}); "
         f"{len(ev.metrics)} metrics, {len(ev.plots)} plots -> {job.out_dir}; MLflow run {job.run_id} ({seconds['total']:.0f}s)")
    return out


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None
