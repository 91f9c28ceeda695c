"""Whether a stage command runs inside a DVC experiment (``dvc exp run``), and which one.

``dvc exp run`` sets three variables for every stage command it runs, the same way for a workspace
run, ``--temp`` and ``--queue`` (DVC 3, ``dvc/repo/experiments/queue/base.py``, ``_stash_exp``):

* ``DVC_EXP_NAME``: the experiment's name (given with ``-n`` or a generated one);
* ``DVC_EXP_BASELINE_REV``: the git commit the experiment starts from;
* ``DVC_ROOT``: the main repository's root, also when the stage runs in the executor's copy of the
  repository under ``<repo>/.dvc/tmp/exps/<tmp>/`` (``--temp``, ``--queue``).

A plain ``dvc repro`` sets ``DVC_ROOT`` (its own root) and neither ``DVC_EXP_*`` variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

EXPERIMENT_TAG = "dvc_experiment"
BASELINE_TAG = "dvc_experiment_baseline_rev"


@dataclass(frozen=True)
class DvcExperiment:
    """The DVC experiment a stage command runs in: its ``name``, the ``baseline_rev`` it starts from and
    the main repository's ``repo_root`` (not the executor's temporary copy)."""

    name: str
    baseline_rev: str
    repo_root: Path

    @property
    def tags(self) -> dict[str, str]:
        """The tags a registered version made in this experiment carries."""
        return {EXPERIMENT_TAG: self.name, BASELINE_TAG: self.baseline_rev}

    def __str__(self) -> str:
        return f"DVC experiment {self.name!r} (baseline {self.baseline_rev[:7]})"


def dvc_experiment(environ: Mapping[str, str] | None = None) -> DvcExperiment | None:
    """The experiment this process runs in, from ``environ`` (default ``os.environ``); None outside one."""
    environ = os.environ if environ is None else environ
    name = environ.get("DVC_EXP_NAME")
    if not name:
        return None
    root = environ.get("DVC_ROOT") or os.getcwd()
    return DvcExperiment(name=name, baseline_rev=environ.get("DVC_EXP_BASELINE_REV", ""), repo_root=Path(root))
