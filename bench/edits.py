"""Editing by attribute vectors on trained models: ``latentforge evaluate``'s edit section alone, per
factor, against the number of labelled images per value, for each way of editing and each strength.

It reads what the pipeline wrote for each ``--family``: the trained model (``artifacts/train/<family>``,
with its MLflow run), the prepared data and the domain classifier (``dvc repro prepare classifier``).
Each of ``--images`` test images is moved to every other value of each factor, decoded and read by the
classifier's factor heads: success (the factor reads the target value), preservation (the other factors
read as on the unedited reconstruction) and clean (both), at each of ``--labels`` labelled train images
per value, plus the ways of editing at params' ``edit.labels_per_value`` (``pipelines.evaluate.sections.
EDIT_VARIANTS``) and how often the nearest value mean reads the image's own value; once per ``--strengths``.

Writes ``bench/results/edits.json`` and ``bench/results/edits-<family>-s<strength>.png`` (rows of edits).

    .venv/bin/python bench/edits.py --family vae --labels 5,50,500 --images 100 --strengths 1,1.5,2
"""

from __future__ import annotations

import argparse
import sys
import time

import common  # noqa: E402  (puts the repository root on sys.path)

from latentforge.pipelines.common.errors import UserError
from latentforge.pipelines.common.params import load_params
from latentforge.pipelines.evaluate import open_training_run, resolve_evaluation
from latentforge.pipelines.evaluate.sections import EDIT_VARIANTS, editing, load_evaluation, reconstruction

FIGURES = ("success", "preservation", "clean")


def run(family: str, labels: list[int], images: int, strength: float, params_path: str) -> dict:
    """The edit section's figures for one family at one strength; prints a table per factor."""
    params = load_params(params_path)
    params.setdefault("edit", {}).update(eval_labels=labels, eval_images=images, eval_strength=strength)
    job = resolve_evaluation(params, family)
    ev = load_evaluation(job, open_training_run(job))
    reconstruction(ev)
    t0 = time.perf_counter()
    if not editing(ev):
        raise SystemExit(f"edits: {family} cannot edit (no continuous latent with an encoder, or no factors)")
    seconds = time.perf_counter() - t0
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    ev.plots["edits.png"](common.RESULTS / f"edits-{family}-s{strength:g}.png")
    m, info = ev.metrics, ev.info["edit"]
    counts, default = info["label_counts"], info["labels_per_value"]
    print(f"{family}, strength {strength:g}: {info['edits']} edits of {info['test_images']} test images in {seconds:.0f}s; "
          f"method {info['method']}; success / preservation / clean per labels per value")
    print(f"{'factor':8} " + " ".join(f"{'n=' + str(n):>16}" for n in counts) + "  source read")
    for f in info["factors"]:
        cells = " ".join(" ".join(f"{m.get(f'edit_{x}_{f}_n{n}', float('nan')):.2f}" for x in FIGURES).rjust(16) for n in counts)
        print(f"{f:8} {cells}  {m[f'edit_source_accuracy_{f}']:.2f}")
    for variant in EDIT_VARIANTS:
        print(f"  n={default} {variant:16} " + "  ".join(f"{x} {m.get(f'edit_{x}_by_{variant}', float('nan')):.3f}" for x in FIGURES))
    return {"strength": strength, "seconds": round(seconds, 1), "info": info,
            "metrics": {k: v for k, v in m.items() if k.startswith("edit_")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", help="trained families to edit with (repeatable; default vae)")
    parser.add_argument("--labels", default="5,50,500", help="labelled train images per value, comma-separated")
    parser.add_argument("--images", type=int, default=100, help="test images edited per factor")
    parser.add_argument("--strengths", default="1", help="edit strengths, comma-separated (0 to 3)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    labels = [int(n) for n in args.labels.split(",")]
    strengths = [float(s) for s in args.strengths.split(",")]
    try:
        results = {family: [run(family, labels, args.images, s, args.params) for s in strengths] for family in args.family or ["vae"]}
    except UserError as exc:  # no trained model, classifier or prepared data: say which command makes it
        sys.exit(f"edits: {exc}")
    path = common.write_json({"environment": common.environment(), "commit": common.git_commit(), "labels": labels,
                              "images": args.images, "families": results}, common.RESULTS / "edits.json")
    print(f"-> {common.rel(path)}")


if __name__ == "__main__":
    main()
