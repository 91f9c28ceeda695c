"""The key figures of an evaluation, apart from its full ``metrics.json``.

An evaluation writes hundreds of figures (per factor, per label count, per sampler, with an ``info`` block);
``dvc exp show`` would list every one as a column. The evaluate stages also write ``summary.json``, the few
figures that compare two runs at a glance, and ``dvc.yaml`` declares that file as the stage's metrics (the
full ``metrics.json`` stays an output: ``dvc metrics show <path>/metrics.json`` reads it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# An image model: its likelihood, sample quality against real images (the ratios are to the same figure of
# held-out real images), reconstruction, and its features with few labels. ``gmm_`` copies are the same
# figures for the fitted-mixture sampler where a model has one.
SAMPLE_FIGURES = ("sample_validity", "sample_precision_ratio", "sample_recall_ratio", "sample_coverage", "fd_classifier_ratio")
IMAGE_KEY_FIGURES = (
    "iwae_nll", "recon_psnr_db", "recon_ssim", *SAMPLE_FIGURES, *(f"gmm_{name}" for name in SAMPLE_FIGURES),
    "probe_accuracy_labels_100", "denoise_psnr_db",
)

# A text model (generate mode; t0 the mean, t1 a sample): all factors right on seen prompts, the drop on
# paraphrases, held-out combinations of tiers a and b, the spread of the free factors, copies of training
# images.
TEXT_KEY_FIGURES = (
    "generate_t0_seen_all_factors", "generate_t1_seen_all_factors", "generate_t1_paraphrase_drop",
    "generate_t1_heldout_a_all_factors", "generate_t1_heldout_b_all_factors", "generate_t1_free_entropy_ratio",
    "generate_t1_seen_copy_rate",
)


def write_summary(directory: Path, metrics: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    """Write ``directory/summary.json``: the figures of ``names`` that ``metrics`` holds as finite numbers, in
    that order. Returns them."""
    summary = {}
    for name in names:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            summary[name] = float(value)
    (Path(directory) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
