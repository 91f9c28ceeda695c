"""Registering a text export as its own MLflow model version, tied to its decoder version.

``register_text(export_dir, tracking_uri)`` logs a pyfunc (:class:`TextDecodeModel`, ONNX Runtime only,
logged as a model from code: :mod:`pipelines.text.pyfunc_model`) to the text model's training run, its
evaluation metrics linked to the version's LoggedModel, and registers it as ``<family>-<data>-text``,
tagged with the decoder it was trained against (``decoder_name``, ``decoder_version``,
``decoder_sha256``). Serving loads it with
:func:`runtime.text.TextDecoder.load` (``decoder_name``/``decoder_version`` of the decoder it
serves), which refuses a mismatch. Neither module imports torch.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

from latentforge.pipelines.common.errors import RegistryError
from latentforge.pipelines.common.tracking import fluent_tracking
from latentforge.pipelines.registry import code_snapshot, connect, pyfunc_requirements
from latentforge.runtime.text import TextDecoder

ARTIFACT_KEY = "text_export"
PRIMARY_METRIC = "generate_t1_seen_per_factor"  # evaluate-text: generated images of aligned prompts, temperature 1, 8 each


class TextDecodeModel(mlflow.pyfunc.PythonModel):
    """Texts -> images with ONNX Runtime: ``predict(texts, params={"n", "seed", "temperature", "mode", "rerank"})``.

    ``texts``: a list of strings or a DataFrame with a ``text`` column. Returns ``{"images": (T, n, C,
    H, W) float32 in [0, 1]}``, plus ``"rows"`` (T, n) train-split row ids for ``mode`` retrieve; the
    same seed gives the same images. ``rerank`` 0: none. Bad input raises
    :class:`runtime.text.TextRequestError` (a ValueError naming the field).
    """

    def load_context(self, context) -> None:
        self.decoder = TextDecoder.load(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        params = params or {}
        texts = list(model_input["text"]) if hasattr(model_input, "columns") else model_input
        seed = params.get("seed")
        body = {"texts": texts, "n": int(params.get("n", 1)), "seed": None if seed is None or int(seed) < 0 else int(seed),
                "temperature": float(params.get("temperature", 1.0)), "mode": str(params.get("mode", "generate")),
                "rerank": int(params["rerank"]) if int(params.get("rerank") or 0) > 0 else None}
        out = self.decoder.text_decode(body)
        return {k: out[k] for k in ("images", "rows") if k in out}


def register_text(export_dir: str | Path, tracking_uri: str, name: str | None = None, tags: dict[str, str] | None = None):
    """A new version of ``<family>-<data>-text`` (or ``name``) from the export-text directory; returns it.
    ``tags``: more version tags (the DVC experiment it was made in)."""
    export_dir = Path(export_dir)
    try:
        probe = TextDecoder.load(export_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise RegistryError(f"cannot register {export_dir}: {exc}") from None
    manifest = probe.manifest
    data, decoder = manifest["data"], manifest["decoder"]
    name = name or f"{manifest['family']}-{data['name']}-text"
    example = pd.DataFrame({"text": ["a large red circle in the center", "a small blue square in the top left"]})
    params = {"n": 1, "seed": 0, "temperature": 1.0, "mode": "generate", "rerank": 0}
    signature = infer_signature(example, {"images": probe(list(example["text"]), n=1, seed=0)}, params=params)
    tags = {
        "kind": "text", "family": manifest["family"], "data_name": str(data["name"]), "data_hash": str(data["data_hash"]),
        "decoder_name": str(decoder.get("name")), "decoder_version": str(decoder.get("version")),
        "decoder_sha256": str(decoder.get("sha256")), "text_encoder": manifest["text_encoder"]["kind"],
        "aligned_size": str(manifest["aligned"]["aligned_size"]),
        # What `latentforge models` shows: the headline figure, per-factor accuracy on seen prompts
        # of generated images at temperature 1.
        "primary_metric": PRIMARY_METRIC,
        **({"primary_metric_value": repr(manifest["metrics"][PRIMARY_METRIC])}
           if isinstance((manifest.get("metrics") or {}).get(PRIMARY_METRIC), (int, float)) else {}),
        **{f"metric.{k}": repr(v) for k, v in manifest.get("metrics", {}).items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)},
        **(tags or {}),
    }
    client = connect(tracking_uri)
    run_id = (manifest.get("source") or {}).get("mlflow_run_id")
    if not run_id:
        raise RegistryError(f"{export_dir}: the export names no train-text MLflow run")
    try:
        client.get_run(run_id)
    except Exception:
        raise RegistryError(f"the text model's run {run_id} is not in the tracking store {tracking_uri}") from None
    with fluent_tracking(tracking_uri), tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={ARTIFACT_KEY: str(export_dir.resolve())},
            code_paths=[str(code_snapshot(Path(tmp)))], signature=signature, input_example=(example, params),
            pip_requirements=pyfunc_requirements() + ["tokenizers", "pandas"],
            metadata={"latentforge": {"kind": "text", "family": manifest["family"], "decoder": decoder}},
        )
        metrics = {k: float(v) for k, v in (manifest.get("metrics") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if metrics:  # linked to the version's LoggedModel; the metric.* tags below are a copy
            mlflow.log_metrics(metrics, model_id=info.model_id)
        try:
            client.get_registered_model(name)
        except Exception:
            client.create_registered_model(name, tags={"kind": "text", "family": manifest["family"]},
                                           description=f"text -> {manifest['family']} latent (f_tau) on {data['name']}")
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    client.update_model_version(name, version.version, description=(
        f"f_tau for decoder {decoder.get('name')} version {decoder.get('version')} ({manifest['text_encoder']['kind']} "
        f"encoder, {manifest['aligned']['aligned_size']} aligned pairs)"))
    return client.get_model_version(name, version.version)
