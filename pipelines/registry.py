"""The ``register`` and ``promote`` stages: export directories -> MLflow registry versions -> aliases.

One registered model per family and data set, named ``<family>-<data name>`` (``vae-shapes``). Each
:func:`register` call adds a version: an MLflow pyfunc model (:class:`OnnxAutoencoderModel`) whose
artifacts are the export directory (``manifest.json``, the ONNX graphs, the ``model/`` copy of the
``save_pretrained`` directory), logged to the training run named in the manifest
(``source.mlflow_run_id``) or, when the export names none, to a new run. Versions are tagged with
``family``, ``mlflow_run_id``, ``git_commit``, ``data_name``, ``data_hash``, ``primary_metric``,
``primary_metric_value`` and every evaluation metric of the manifest as ``metric.<name>``. The pyfunc is
an MLflow "model from code" (:mod:`pipelines.pyfunc_model`), and the version is its MLflow 3
``LoggedModel``: the manifest's evaluation metrics are linked to it (``model_id``), and :func:`promote`
and the gates read them there; the ``metric.<name>`` tags are a copy, read only for versions registered
before the metrics were linked (:func:`version_model_id`).

Serving follows two aliases, never stages (deprecated in MLflow):

* ``champion``: the version served by default;
* ``challenger``: the latest version that was registered but did not beat the champion.

:func:`promote` without a version applies the family's :class:`Policy` to the *newest* version:

* the newest version is the champion already: nothing changes;
* the newest version fails a gate: it becomes challenger, the champion (if any) stays;
* no champion yet: the newest version becomes champion;
* otherwise the first of the policy's metrics that both the newest version and the champion record is
  compared; the newest version becomes champion when it beats the champion by more than ``margin``
  (``mode: min``: ``new < champion - margin``; ``max``: ``new > champion + margin``; a tie never
  wins), else it becomes challenger. When neither the metric nor its fallback is recorded on both,
  :class:`RegistryError` says so and no alias moves.

Gates: a policy can also carry gates, figures a version must reach (``sample_validity >= 0.5``; a
figure the version does not record fails). :func:`promote` by policy never makes a version that fails
a gate champion: it becomes challenger, the champion stays, and the reason names each failed gate with
the version's figure. :func:`check_gates` reports the gates of the newest version and the champion
(``latentforge gates``, which ``make demo`` runs).

:func:`promote` with a version overrides the policy by hand: that version becomes champion (the reason
says which gates it fails, if any). When the champion moves (by policy or by hand) the displaced
champion keeps no alias (it is still a version: ``latentforge promote --version N`` rolls back to it),
and the ``challenger`` alias is removed if it pointed at the new champion, so that one version never
carries both aliases. The reason for every
alias change is written to the version's ``latentforge.promotion`` tag.

Holding the champion: :func:`promote` with ``hold_champion`` (a reason; ``register --promote`` and
``register-text --champion`` pass one inside a DVC experiment) never moves ``champion``: a version that
the policy (or the hand) would make champion becomes challenger instead, and the reason says that it
would have become champion, that champion was kept, and why. A fresh registry gets no champion that way
either: which version serves is decided on the main pipeline run or by ``latentforge promote``.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

import latentforge.runtime
from latentforge.pipelines.common.errors import DataError, RegistryError, TrainingError
from latentforge.pipelines.common.experiments import DvcExperiment
from latentforge.pipelines.common.params import ParamsError, check_keys, section
from latentforge.pipelines.common.tracking import experiment_id, fluent_tracking, mlflow_client
from latentforge.pipelines.common.tracking import tracking_uri as resolve_tracking_uri
from latentforge.runtime.images import ExportError, load_sessions

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTION_TAG = "latentforge.promotion"
METRIC_TAG_PREFIX = "metric."
ARTIFACT_KEY = "export"  # the name of the export directory among the pyfunc model's artifacts


# ----------------------------------------------------------------------------------------------------
# The promotion policy


_GATE_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@dataclass(frozen=True)
class Gate:
    """A figure a version must reach to become champion: ``metric op value`` (``sample_validity >= 0.5``).

    ``metric``: an evaluation metric of the export manifest (a version tag ``metric.<name>``); ``op``:
    one of ``>=``, ``>``, ``<=``, ``<``. A version that does not record the metric fails the gate.
    """

    metric: str
    op: str
    value: float

    def __post_init__(self) -> None:
        if not self.metric or not isinstance(self.metric, str):
            raise ParamsError(f"registry gate: metric must be a metric name, got {self.metric!r}")
        if self.op not in _GATE_OPS:
            raise ParamsError(f"registry gate on {self.metric}: op must be one of {', '.join(_GATE_OPS)}, got {self.op!r}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value)):
            raise ParamsError(f"registry gate on {self.metric}: the threshold must be a finite number, got {self.value!r}")

    @classmethod
    def parse(cls, metric: str, condition: Any, where: str) -> "Gate":
        """A gate from params' ``<metric>: "<op> <number>"`` (``sample_precision_ratio: ">= 0.5"``; quoted:
        YAML reads a bare ``>`` as the start of a block scalar)."""
        match = re.fullmatch(r"\s*(>=|<=|>|<)\s*(\S+)\s*", str(condition))
        try:
            value = float(match.group(2)) if match else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ParamsError(f'params {where}.{metric}: expected "<op> <number>" with op one of {", ".join(_GATE_OPS)} '
                              f'(e.g. ">= 0.5"), got {condition!r}')
        return cls(metric, match.group(1), value)

    def check(self, value: float | None) -> str | None:
        """None when ``value`` passes, else why not (the figure, or that it is not recorded, and the gate)."""
        if value is None:
            return f"{self.metric} not recorded, needs {self.op} {self.value:g}"
        if _GATE_OPS[self.op](value, self.value):
            return None
        return f"{self.metric} {value:.4g}, needs {self.op} {self.value:g}"

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Policy:
    """How :func:`promote` ranks a version against the champion.

    ``metric``: an evaluation metric of the export manifest (``manifest["metrics"]``); ``mode``: ``min``
    (lower is better) or ``max``; ``margin``: how much better, in the metric's own units, the new
    version must be (0: strictly better). ``fallback``: the policy compared when either version lacks
    ``metric`` (a VAE ranked by ``iwae_nll`` falls back to ``recon_mse``). ``gates``: figures a version
    must reach to become champion by policy, whatever it is compared with (:class:`Gate`; the family's
    policy holds them, not its fallback).
    """

    metric: str
    mode: str = "min"
    margin: float = 0.0
    fallback: "Policy | None" = None
    gates: tuple[Gate, ...] = ()

    def __post_init__(self) -> None:
        if not self.metric or not isinstance(self.metric, str):
            raise ParamsError(f"registry policy: metric must be a metric name, got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise ParamsError(f"registry policy for {self.metric}: mode must be min or max, got {self.mode!r}")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and self.margin >= 0):
            raise ParamsError(f"registry policy for {self.metric}: margin must be a number >= 0, got {self.margin!r}")

    def candidates(self) -> list["Policy"]:
        """This policy, then its fallbacks, in the order they are tried."""
        return [self, *(self.fallback.candidates() if self.fallback else [])]

    @property
    def metric_names(self) -> list[str]:
        """The metrics of :meth:`candidates`, in order."""
        return [p.metric for p in self.candidates()]

    def beats(self, new: float, champion: float) -> bool:
        """Whether ``new`` is better than ``champion`` by more than the margin."""
        if self.mode == "min":
            return new < champion - self.margin
        return new > champion + self.margin

    def failed_gates(self, metrics: dict[str, float]) -> list[str]:
        """Why a version with these metrics fails each gate it fails (empty: it passes them all)."""
        return [why for gate in self.gates if (why := gate.check(metrics.get(gate.metric))) is not None]

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str, gates: bool = True) -> "Policy":
        """A policy from params (``metric``, ``mode``, ``margin``, optional ``fallback`` and, unless
        ``gates`` is False (a fallback), ``gates``: ``{<metric>: "<op> <number>"}``); ``where`` names the
        params section in errors."""
        if not isinstance(values, dict):
            raise ParamsError(f"params {where}: expected a mapping with metric, mode, margin; got {values!r}")
        schema = {"metric": str, "mode": str, "margin": float, "fallback": (dict, type(None))}
        if gates:
            schema["gates"] = (dict, type(None))
        values = check_keys({"fallback": None, **({"gates": None} if gates else {}), **values}, schema, where)
        fallback = cls.from_dict(values["fallback"], f"{where}.fallback", gates=False) if values["fallback"] else None
        parsed = tuple(Gate.parse(str(m), c, f"{where}.gates") for m, c in (values.get("gates") or {}).items())
        return cls(values["metric"], values["mode"], float(values["margin"]), fallback, parsed)

    def to_dict(self) -> dict[str, Any]:
        """The params form :meth:`from_dict` reads."""
        out: dict[str, Any] = {"metric": self.metric, "mode": self.mode, "margin": self.margin}
        if self.fallback:
            out["fallback"] = self.fallback.to_dict()
        if self.gates:
            out["gates"] = {g.metric: f"{g.op} {g.value:g}" for g in self.gates}
        return out


# Used where params have no `registry` section; params.yaml states the same rankings. Each family is ranked
# first by the primary metric `latentforge evaluate` names for it (pipelines.evaluate.PRIMARY_METRICS). No
# gates: what a champion must reach depends on the data and the budget, so params.yaml sets them.
_RECON = Policy("recon_mse", "min", 0.0)
DEFAULT_POLICIES: dict[str, Policy] = {
    "default": _RECON,
    "vae": Policy("iwae_nll", "min", 0.0, fallback=_RECON),
    "vqvae2": Policy("fd_classifier", "min", 0.0, fallback=_RECON),
    "gan": Policy("fd_classifier", "min", 0.0),
    "aae": Policy("fd_classifier", "min", 0.0, fallback=_RECON),
    "glo": Policy("fd_classifier", "min", 0.0, fallback=_RECON),
    "denoising_ae": Policy("denoise_psnr_db", "max", 0.0, fallback=_RECON),
}


def policy_for(params: dict[str, Any] | None, family: str) -> Policy:
    """The promotion policy of ``family``: ``registry.policies.<family>``, else ``registry.policies.default``
    (else the built-in :data:`DEFAULT_POLICIES`)."""
    policies = ((params or {}).get("registry") or {}).get("policies")
    if policies is None:
        return DEFAULT_POLICIES.get(family, DEFAULT_POLICIES["default"])
    if not isinstance(policies, dict):
        raise ParamsError(f"params registry.policies: expected a mapping of family -> policy, got {policies!r}")
    key = family if family in policies else "default"
    if key not in policies:
        raise ParamsError(f"params registry.policies: no policy for {family!r} and no default")
    return Policy.from_dict(policies[key], f"registry.policies.{key}")


# ----------------------------------------------------------------------------------------------------
# The pyfunc model


def pyfunc_task(manifest: dict[str, Any]) -> str:
    """What :class:`OnnxAutoencoderModel` predicts for an export: ``"score-windows"`` for a time-series
    export, ``"reconstruct"`` when it has an encoder and a decoder graph, else ``"generate"`` when it
    samples from noise (a GAN, GLO)."""
    graphs = manifest.get("graphs") or {}
    if manifest.get("kind") == "timeseries":
        return "score-windows"
    if "encoder" in graphs and "decoder" in graphs:
        return "reconstruct"
    if (manifest.get("sampling") or {}).get("kind") == "noise" and "generator" in graphs:
        return "generate"
    raise RegistryError(
        f"the {manifest.get('family')} export has graphs {', '.join(sorted(graphs)) or 'none'}: neither "
        "encoder + decoder nor a noise generator, so it has no pyfunc predict"
    )


class OnnxAutoencoderModel(mlflow.pyfunc.PythonModel):
    """An exported latentforge model as an MLflow pyfunc, running the ONNX graphs with ONNX Runtime.

    ``predict`` takes one float32 numpy array and returns a dict of numpy arrays; which depends on the
    family (``manifest.json`` decides, see :func:`pyfunc_task`):

    * families with an encoder (vae, vqvae2, the autoencoders, aae): ``images`` (B, C, H, W) float32
      in [0, 1] -> ``reconstruction`` (B, C, H, W) float32 in [0, 1] (decoded from the posterior mean
      for a VAE) plus the encoder's outputs: ``mean``, ``logvar`` (B, *latent) for a VAE, ``latent``
      for deterministic autoencoders, ``top_indices`` (B, ht, wt), ``bottom_indices`` (B, hb, wb)
      int64 for VQ-VAE-2;
    * families without one (gan, glo): ``noise`` (B, *noise_shape) float32, standard normal ->
      ``images`` (B, C, H, W) float32 in [0, 1]; the same noise gives the same images;
    * a time-series export: ``windows`` (B, T, F) float32, scaled as the manifest's ``normalisation``
      says -> ``reconstruction`` (B, T, F) and ``scores`` (B,), each window's mean squared error
      (per-point scores of a whole series: :class:`runtime.series.SeriesRuntime`).

    Input of the wrong shape, values outside [0, 1] (images) or non-finite values raise ``ValueError``.
    The registered version's signature states the shapes; its input example is two test images
    (:func:`input_example`).
    """

    def __init__(self, format_version: int | None = None):
        #: The export format the version was registered with; a loaded export must have the same.
        self.format_version = format_version

    def load_context(self, context) -> None:
        """Build one ONNX Runtime session per graph of the registered export.

        Reads ``manifest.json`` and the graphs with onnxruntime alone, so that loading the model needs
        neither PyTorch nor the exporter (:func:`pipelines.export.load_sessions` checked this export
        when it was registered).
        """
        import onnxruntime as ort

        export_dir = Path(context.artifacts[ARTIFACT_KEY])
        manifest = json.loads((export_dir / "manifest.json").read_text())
        if self.format_version is None:  # a model from code (pipelines/pyfunc_model.py): the model config says it
            self.format_version = (context.model_config or {}).get("format_version")
        if self.format_version is not None and manifest.get("format_version") != self.format_version:
            raise RegistryError(
                f"{export_dir}: export format_version {manifest.get('format_version')!r}, registered as {self.format_version}"
            )
        sessions = {
            name: ort.InferenceSession(str(export_dir / graph["file"]), providers=["CPUExecutionProvider"])
            for name, graph in manifest["graphs"].items()
        }
        self.use(manifest, sessions)

    def use(self, manifest: dict[str, Any], sessions: dict[str, Any]) -> "OnnxAutoencoderModel":
        """Predict with these sessions (:func:`pipelines.export.load_sessions`'s result)."""
        self.manifest, self.sessions = manifest, sessions
        self.task = pyfunc_task(manifest)
        return self

    def predict(self, context, model_input: np.ndarray, params=None) -> dict[str, np.ndarray]:
        x = model_input
        if not isinstance(x, np.ndarray):
            raise ValueError(f"expected a float32 numpy array, got {type(x).__name__}")
        if x.dtype != np.float32:
            raise ValueError(f"expected float32, got {x.dtype}")
        if not np.all(np.isfinite(x)):
            raise ValueError("the input has NaN or infinite values")
        if self.task == "generate":
            noise_shape = list(self.manifest["sampling"]["noise_shape"])
            if x.ndim != 1 + len(noise_shape) or list(x.shape[1:]) != noise_shape:
                raise ValueError(f"noise must have shape (B, {', '.join(map(str, noise_shape))}), got {x.shape}")
            return {"images": self.sessions["generator"].run(["images"], {"noise": x})[0]}
        if self.task == "score-windows":
            shape = [self.manifest["data"]["window"], self.manifest["data"]["channels"]]
            if x.ndim != 3 or list(x.shape[1:]) != shape:
                raise ValueError(f"windows must have shape (B, {shape[0]}, {shape[1]}), got {x.shape}")
            recon = self.sessions["reconstruct"].run(["reconstruction"], {"windows": x})[0]
            return {"reconstruction": recon, "scores": np.square(recon - x).reshape(len(x), -1).mean(1)}

        h, w, c = self.manifest["data"]["image_shape"]
        if x.ndim != 4 or list(x.shape[1:]) != [c, h, w]:
            raise ValueError(f"images must have shape (B, {c}, {h}, {w}) (NCHW), got {x.shape}")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(f"image values must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        enc_names = list(self.manifest["graphs"]["encoder"]["outputs"])
        encoded = dict(zip(enc_names, self.sessions["encoder"].run(enc_names, {"images": x})))
        feed = {}
        for name in self.manifest["graphs"]["decoder"]["inputs"]:
            # A Gaussian encoder gives mean/logvar; the reconstruction decodes the mean.
            feed[name] = encoded[name] if name in encoded else encoded["mean"]
        recon = self.sessions["decoder"].run(["images"], feed)[0]
        return {"reconstruction": recon, **encoded}


def input_example(manifest: dict[str, Any], data_dir: str | os.PathLike | None, batch: int = 2) -> np.ndarray:
    """The registered version's input example: the first ``batch`` test images (NCHW, float32 in [0, 1])
    or test windows of the prepared data in ``data_dir``, which must be the data the export was made from
    (the same data hash). A generate-only export (gan, glo) takes noise, so its example is standard
    normal noise (seeded), by nature. :class:`RegistryError` when the data is needed and missing or other."""
    task = pyfunc_task(manifest)
    if task == "generate":
        return np.random.default_rng(0).standard_normal((batch, *manifest["sampling"]["noise_shape"])).astype(np.float32)
    from latentforge.pipelines.prepare import load_split, read_manifest  # pyarrow: only where registering
    from latentforge.pipelines.series import load_windows

    expected = (manifest.get("data") or {}).get("data_hash")
    if data_dir is None:
        raise RegistryError(f"registering a {manifest['family']} export needs its prepared data (the input example "
                            "is real test data); pass data_dir (latentforge register reads params data.*)")
    try:
        data_manifest = read_manifest(data_dir)
    except DataError as exc:
        raise RegistryError(f"input example: {exc}") from None
    if data_manifest.get("data_hash") != expected:
        raise RegistryError(f"input example: {data_dir} holds data {str(data_manifest.get('data_hash'))[:12]}, but the "
                            f"export was made from {str(expected)[:12]}; prepare that data (dvc checkout) first")
    if task == "score-windows":
        return np.ascontiguousarray(load_windows(data_dir, data_manifest, "test")["windows"][:batch], dtype=np.float32)
    images = load_split(data_dir, "test")["images"][:batch]  # (B, H, W, C) uint8
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


# ----------------------------------------------------------------------------------------------------
# Registering


def register(
    export_dir: str | os.PathLike,
    tracking_uri: str,
    name: str | None = None,
    policy: Policy | None = None,
    experiment: str = "latentforge",
    tags: dict[str, str] | None = None,
    data_dir: str | os.PathLike | None = None,
):
    """Add the export in ``export_dir`` as a new version of a registered model; return that
    ``ModelVersion`` (``.name``, ``.version``, ``.run_id``, ``.tags``; its LoggedModel: :func:`version_model_id`).

    The version is an MLflow 3 LoggedModel (``mlflow.pyfunc.log_model``, the model from code in
    :mod:`pipelines.pyfunc_model`), with the export's evaluation metrics linked to it (``model_id``);
    :func:`promote` ranks by those. ``data_dir``: the prepared data the export was made from, whose
    first test images are the input example (see :func:`input_example`; not needed for gan / glo).

    ``name``: the registered model (default ``<family>-<data name>`` from the manifest). ``policy``
    (default: :func:`policy_for` the family without params) decides which metric is tagged as the
    primary one. The pyfunc model is logged to the manifest's training run (``source.mlflow_run_id``),
    which must be in this tracking store, or to a new run in ``experiment`` when the export names no
    run. ``tags``: more version tags (the DVC experiment it was made in). No alias is set: that is
    :func:`promote`'s job.
    """
    export_dir = Path(export_dir)
    try:
        manifest, sessions = load_sessions(export_dir)
    except ExportError as exc:
        raise RegistryError(f"cannot register {export_dir}: {exc}") from None
    probe = OnnxAutoencoderModel(manifest["format_version"]).use(manifest, sessions)
    family = manifest["family"]
    data = manifest.get("data") or {}
    name = name or f"{family}-{data.get('name')}"
    policy = policy or policy_for(None, family)
    example = input_example(manifest, data_dir)
    signature = infer_signature(example, probe.predict(None, example))
    metrics = _numeric_metrics(manifest.get("metrics") or {})
    primary = next((m for m in policy.metric_names if m in metrics), None)
    tags = {**_version_tags(manifest, metrics, primary or policy.metric), **(tags or {})}

    client = connect(tracking_uri)
    try:
        existing = client.get_registered_model(name)
    except MlflowException:
        existing = None
    registered_family = (existing.tags or {}).get("family") if existing else None
    if registered_family not in (None, family):
        raise RegistryError(f"registered model {name!r} holds {registered_family} versions; this export is a {family}")
    run_id = _training_run(client, tracking_uri, experiment, name, manifest, tags["git_commit"])
    tags["mlflow_run_id"] = run_id
    trained_model_id = (manifest.get("source") or {}).get("mlflow_model_id")
    if trained_model_id:
        tags["trained_model_id"] = str(trained_model_id)  # the training's LoggedModel this export was made from

    with fluent_tracking(tracking_uri), tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            model_config={"format_version": manifest["format_version"]},
            artifacts={ARTIFACT_KEY: str(export_dir.resolve())},
            code_paths=[str(code_snapshot(Path(tmp)))],
            signature=signature,
            input_example=example,
            pip_requirements=pyfunc_requirements(),
            metadata={"latentforge": {"family": family, "task": probe.task, "data": data}},
        )
        if metrics:  # to the run and, linked, to the version's LoggedModel; the metric.* tags are a copy
            mlflow.log_metrics(metrics, model_id=info.model_id)
        if existing is None:
            client.create_registered_model(
                name, tags={"family": family, "data_name": str(data.get("name"))},
                description=f"latentforge {family} trained on {data.get('name')}; aliases {CHAMPION} / {CHALLENGER}",
            )
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    description = (
        f"{family} on {data.get('name')} (data {str(data.get('data_hash'))[:12]}), ONNX opset {manifest.get('opset')}; "
        + (f"{primary} = {metrics[primary]:.6g}" if primary else f"no {'/'.join(policy.metric_names)} recorded")
    )
    client.update_model_version(name, version.version, description=description)
    return client.get_model_version(name, version.version)


def _version_tags(manifest: dict[str, Any], metrics: dict[str, float], primary: str) -> dict[str, str]:
    """The tags of a new version: family, data, git commit, the primary metric (and its value when
    recorded), every metric as ``metric.<name>``, the export format and opset."""
    data = manifest.get("data") or {}
    source = manifest.get("source") or {}
    return {
        "family": manifest["family"],
        "data_name": str(data.get("name")),
        "data_hash": str(data.get("data_hash")),
        "git_commit": str(source.get("git_commit") or "unknown"),
        "primary_metric": primary,
        **({"primary_metric_value": repr(metrics[primary])} if primary in metrics else {}),
        **{f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in metrics.items()},
        "export_format_version": str(manifest.get("format_version")),
        "opset": str(manifest.get("opset")),
    }


def _training_run(client, tracking_uri: str, experiment: str, name: str, manifest: dict[str, Any], git_commit: str) -> str:
    """The run the version is logged to: the export's training run (which must be in this store), else a
    new ``register-<name>`` run in ``experiment`` (:func:`register` logs the export's metrics to it)."""
    run_id = (manifest.get("source") or {}).get("mlflow_run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            raise RegistryError(
                f"the export's training run {run_id} is not in the tracking store {tracking_uri}; "
                "set MLFLOW_TRACKING_URI (or params mlflow.tracking_uri) to the store the model was trained with"
            ) from None
        return run_id
    data = manifest.get("data") or {}
    run = client.create_run(
        experiment_id(client, experiment, tracking_uri),
        run_name=f"register-{name}",
        tags={"latentforge.family": manifest["family"], "latentforge.data_name": str(data.get("name")),
              "latentforge.data_hash": str(data.get("data_hash")), "mlflow.source.git.commit": git_commit},
    )
    return run.info.run_id  # register logs the metrics to it, linked to the model


def _numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a manifest's metrics (nested or non-numeric figures are not ranked)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    return out


def code_snapshot(tmp: Path) -> Path:
    """A copy of the sources a registered pyfunc runs with, for MLflow's ``code_paths``: returns
    ``tmp/latentforge``, holding ``pipelines/`` (every module, subpackages included) and ``runtime/``.

    The models from code (``pipelines/pyfunc_model.py``, ``pipelines/text/pyfunc_model.py``) import
    ``latentforge.pipelines.registry.OnnxAutoencoderModel`` and
    ``latentforge.pipelines.text.registry.TextDecodeModel``; MLflow puts the model's ``code/`` folder
    first on ``sys.path`` when it loads a version, so these import from the copy, which reads the export
    with the code it was registered with. ``latentforge`` has no ``__init__.py`` (a namespace package, as
    installed), so the installed project still provides what the copy lacks (``models``, ``serving``).
    """
    dest = tmp / "latentforge"
    for package in (Path(__file__).resolve().parent, Path(latentforge.runtime.__file__).resolve().parent):
        for src in package.rglob("*.py"):
            target = dest / package.name / src.relative_to(package)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def pyfunc_requirements() -> list[str]:
    """Pinned requirements of a registered pyfunc (the project itself must be installed where it is loaded)."""
    out = []
    for package in ("mlflow", "onnxruntime", "numpy", "pyyaml"):
        try:
            out.append(f"{package}=={package_version(package).split('+')[0]}")
        except PackageNotFoundError:
            out.append(package)
    return out


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


# ----------------------------------------------------------------------------------------------------
# Promoting


def connect(tracking_uri: str):
    """An MlflowClient for ``tracking_uri``, or one :class:`RegistryError` line when it is unreachable."""
    try:
        return mlflow_client(tracking_uri)
    except TrainingError as exc:
        raise RegistryError(str(exc)) from None


def _registered_model(client, name: str, tracking_uri: str):
    try:
        return client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=1000))
        raise RegistryError(
            f"no registered model {name!r} in {tracking_uri}; "
            + (f"registered: {', '.join(known)}" if known else "nothing is registered there yet (`latentforge register`)")
        ) from None


def _versions(client, name: str) -> dict[int, Any]:
    return {int(v.version): v for v in client.search_model_versions(f"name = '{_quote(name)}'")}


def _versions_and_aliases(client, name: str, tracking_uri: str) -> tuple[dict[int, Any], dict[str, str]]:
    """The versions (number -> version) and aliases (alias -> version) of registered model ``name``;
    :class:`RegistryError` for an unknown model or one without versions."""
    model = _registered_model(client, name, tracking_uri)
    versions = _versions(client, name)
    if not versions:
        raise RegistryError(f"registered model {name!r} has no versions; `latentforge register` one first")
    return versions, dict(model.aliases or {})


def version_model_id(version) -> str | None:
    """The id of the LoggedModel a registry version was made from, or None (registered before LoggedModels).

    ``ModelVersion.model_id`` where the registry store keeps it; the SQL store does not (MLflow 3.17), but
    it keeps the source the version was registered from, ``models:/<model_id>``.
    """
    if getattr(version, "model_id", None):
        return version.model_id
    match = re.fullmatch(r"models:/([^/@]+)", version.source or "")
    return match.group(1) if match else None


def _version_metrics(client, version) -> dict[str, float]:
    """The finite evaluation metrics of a version: those linked to its LoggedModel (:func:`version_model_id`),
    the latest value of each.

    Versions registered before the metrics were linked to the LoggedModel (or whose LoggedModel holds
    none) fall back to the copy in their ``metric.<name>`` tags.
    """
    linked: dict[str, float] = {}
    model_id = version_model_id(version)
    if model_id:
        try:
            logged = client.get_logged_model(model_id)
        except MlflowException:
            logged = None
        latest: dict[str, Any] = {}
        for m in (logged.metrics or []) if logged else []:
            if m.key not in latest or (m.timestamp, m.step) >= (latest[m.key].timestamp, latest[m.key].step):
                latest[m.key] = m
        linked = {k: float(m.value) for k, m in latest.items() if math.isfinite(m.value)}
    if linked:
        return linked
    values = {}
    for key, raw in (version.tags or {}).items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                value = float(raw)
            except ValueError:
                continue
            if math.isfinite(value):
                values[key[len(METRIC_TAG_PREFIX):]] = value
    return values


def promote(name: str, tracking_uri: str, version: int | None = None, policy: Policy | None = None,
            hold_champion: str | None = None) -> dict[str, Any]:
    """Move the ``champion`` / ``challenger`` aliases of registered model ``name`` (see the module docstring).

    ``version``: promote that version to champion by hand (``policy``, when given, only names the gates
    it fails); ``None``: apply ``policy`` (default: the built-in policy of the newest version's
    ``family`` tag) to the newest version. Returns what happened: ``name``, ``version``, ``alias`` (the
    alias it now has, or None), ``previous_champion``, ``changed``, ``reason``, ``failed_gates`` (why it
    fails each gate it fails) and, when compared, ``metric``, ``value``, ``champion_value``, ``mode``,
    ``margin``. ``hold_champion``: why ``champion`` must not move (e.g. the DVC experiment this runs in);
    the version that would become champion becomes challenger and ``held`` is True in the result.
    Raises :class:`RegistryError` (and moves no alias) for an unknown model or version,
    for versions the policy cannot compare, and when the registry is unreachable.
    """
    client = connect(tracking_uri)
    versions, aliases = _versions_and_aliases(client, name, tracking_uri)
    champion = int(aliases[CHAMPION]) if CHAMPION in aliases else None
    challenger = int(aliases[CHALLENGER]) if CHALLENGER in aliases else None
    result: dict[str, Any] = {"name": name, "previous_champion": champion, "changed": False}

    if version is not None:
        if int(version) not in versions:
            raise RegistryError(
                f"registered model {name!r} has no version {version}; versions: {', '.join(map(str, sorted(versions)))}"
            )
        target = int(version)
        failed = policy.failed_gates(_version_metrics(client, versions[target])) if policy else []
        result.update(version=target, alias=CHAMPION, failed_gates=failed)
        warning = f"; it fails its gates: {'; '.join(failed)}" if failed else ""
        if champion == target:
            return {**result, "reason": f"version {target} is the champion already{warning}"}
        reason = f"champion by hand (was {f'version {champion}' if champion else 'none'}){warning}"
        return _champion_unless_held(client, name, target, challenger, result, reason, hold_champion)

    newest = max(versions)
    new = versions[newest]
    policy = policy or policy_for(None, (new.tags or {}).get("family", ""))
    new_metrics = _version_metrics(client, new)
    failed = policy.failed_gates(new_metrics)
    result.update(version=newest, mode=policy.mode, failed_gates=failed)
    if champion == newest:
        return {**result, "alias": CHAMPION, "reason": f"the newest version {newest} is the champion already"}
    if failed:
        stays = f"champion stays version {champion}" if champion else "no champion"
        return _make_challenger(client, name, newest, challenger, result,
                                f"challenger by policy: fails its gates: {'; '.join(failed)} ({stays})")
    if champion is None:
        return _champion_unless_held(client, name, newest, challenger, result, "champion by policy: no champion before",
                                     hold_champion)

    current = _version_metrics(client, versions.get(champion) or client.get_model_version(name, str(champion)))
    for candidate in policy.candidates():
        value, champion_value = new_metrics.get(candidate.metric), current.get(candidate.metric)
        if value is not None and champion_value is not None:
            break
    else:
        def has(metrics):
            found = [m for m in policy.metric_names if m in metrics]
            return ", ".join(found) or "none of them"

        raise RegistryError(
            f"cannot rank {name} version {newest} against champion version {champion}: the policy compares "
            f"{' or '.join(policy.metric_names)}, which must be recorded on both (version {newest}: {has(new_metrics)}; "
            f"version {champion}: {has(current)}); register an export with these evaluation metrics, or promote "
            f"by hand with --version {newest}"
        )
    op, bound = ("<", champion_value - candidate.margin) if candidate.mode == "min" else (">", champion_value + candidate.margin)
    comparison = f"{candidate.metric} {value:.6g} {op} {champion_value:.6g} {'-' if op == '<' else '+'} margin {candidate.margin:g}"
    result.update(metric=candidate.metric, value=value, champion_value=champion_value, mode=candidate.mode,
                  margin=candidate.margin)
    if candidate.beats(value, champion_value):
        return _champion_unless_held(client, name, newest, challenger, result,
                                     f"champion by policy: {comparison} (version {champion})", hold_champion)
    return _make_challenger(client, name, newest, challenger, result,
                            f"challenger by policy: not {comparison} (champion version {champion})")


def _champion_unless_held(client, name: str, version: int, challenger: int | None, result: dict[str, Any],
                          reason: str, hold: str | None) -> dict[str, Any]:
    """Make ``version`` champion for ``reason``; with ``hold`` (why champion must stay) make it challenger
    instead, the reason saying both."""
    if hold is None:
        _move_champion(client, name, version, challenger, reason)
        return {**result, "alias": CHAMPION, "changed": True, "reason": reason}
    champion = result["previous_champion"]
    kept = f"version {champion}" if champion is not None else "none"
    held = f"challenger, not champion: would be {reason}, but champion is kept ({kept}) because {hold}"
    return {**_make_challenger(client, name, version, challenger, result, held), "held": True}


def _make_challenger(client, name: str, version: int, challenger: int | None, result: dict[str, Any], reason: str) -> dict[str, Any]:
    """Point ``challenger`` at ``version`` (the champion does not move); ``result`` completed."""
    if challenger != version:
        client.set_registered_model_alias(name, CHALLENGER, str(version))
        result["changed"] = True
    client.set_model_version_tag(name, str(version), PROMOTION_TAG, reason)
    return {**result, "alias": CHALLENGER, "reason": reason}


def _move_champion(client, name: str, version: int, challenger: int | None, reason: str) -> None:
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if challenger == version:  # one version never carries both aliases
        client.delete_registered_model_alias(name, CHALLENGER)
    client.set_model_version_tag(name, str(version), PROMOTION_TAG, reason)


def check_gates(name: str, tracking_uri: str, policy: Policy) -> dict[str, Any]:
    """``policy``'s gates on the versions of registered model ``name`` that matter: the newest (what the
    last pipeline run produced) and the champion (what is served). Returns ``name``, ``champion``
    (version or None) and ``versions``: one row per version checked (one when the newest is the
    champion), each ``version``, ``roles`` (``newest``, ``champion``), ``figures`` (each gate's
    metric -> the version's value, None when not recorded) and ``failed`` (why, per failed gate).
    Moves nothing; :class:`RegistryError` for an unknown model or one without versions."""
    client = connect(tracking_uri)
    versions, aliases = _versions_and_aliases(client, name, tracking_uri)
    champion = int(aliases[CHAMPION]) if CHAMPION in aliases else None
    roles: dict[int, list[str]] = {max(versions): ["newest"]}
    if champion is not None:
        roles.setdefault(champion, []).append("champion")
    rows = []
    for number, role in sorted(roles.items()):
        metrics = _version_metrics(client, versions.get(number) or client.get_model_version(name, str(number)))
        rows.append({"version": number, "roles": role, "figures": {g.metric: metrics.get(g.metric) for g in policy.gates},
                     "failed": policy.failed_gates(metrics)})
    return {"name": name, "champion": champion, "versions": rows}


# ----------------------------------------------------------------------------------------------------
# Listing


def list_models(tracking_uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """One row per version (of ``name``, or of every registered model), newest first within a model:
    ``name``, ``version``, ``aliases`` (list), ``primary_metric``, ``primary_metric_value`` (float or
    None), ``run_id``, ``created`` (UTC, ``YYYY-MM-DD HH:MM:SS``)."""
    client = connect(tracking_uri)
    if name is not None:
        models = [_registered_model(client, name, tracking_uri)]
    else:
        models, token = [], None
        while True:
            page = client.search_registered_models(max_results=1000, page_token=token)
            models.extend(page)
            token = page.token
            if not token:
                break
    rows = []
    for model in sorted(models, key=lambda m: m.name):
        by_version: dict[int, list[str]] = {}
        for alias, v in (model.aliases or {}).items():
            by_version.setdefault(int(v), []).append(alias)
        for number, v in sorted(_versions(client, model.name).items(), reverse=True):
            tags = v.tags or {}
            value = tags.get("primary_metric_value")
            rows.append({
                "name": model.name,
                "version": number,
                "aliases": sorted(by_version.get(number, [])),
                "primary_metric": tags.get("primary_metric"),
                "primary_metric_value": float(value) if value not in (None, "") else None,
                "run_id": v.run_id,
                "created": datetime.fromtimestamp(v.creation_timestamp / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """``list_models`` rows as an aligned text table."""
    header = ["NAME", "VERSION", "ALIASES", "PRIMARY METRIC", "RUN", "CREATED (UTC)"]
    body = [
        [
            r["name"], str(r["version"]), ",".join(r["aliases"]) or "-",
            f"{r['primary_metric']}={r['primary_metric_value']:.6g}" if r["primary_metric_value"] is not None
            else f"{r['primary_metric'] or '-'}=?",
            r["run_id"] or "-", r["created"],
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body])


# ----------------------------------------------------------------------------------------------------
# From params (the CLI)


def model_name(params: dict[str, Any], family: str) -> str:
    """The registered model of ``family`` on the configured data set: ``<family>-<data.name>``."""
    return f"{family}-{section(params, 'data')['name']}"


def export_dir_from_params(params: dict[str, Any], family: str) -> Path:
    """``<export.output_dir or artifacts/export>/<family>``, as the export stage writes it."""
    return Path(((params.get("export") or {}).get("output_dir")) or "artifacts/export") / family


def register_from_params(
    params: dict[str, Any], family: str, export_dir: str | os.PathLike | None = None, name: str | None = None,
    promote_it: bool = False, dvc_exp: DvcExperiment | None = None,
) -> tuple[Any, dict[str, Any] | None]:
    """``latentforge register --model <family> [--promote]``: register the family's export (and apply the
    policy). Returns ``(ModelVersion, promote result or None)``.

    ``dvc_exp``: the DVC experiment this runs in (:func:`common.experiments.dvc_experiment`): the version
    is tagged with its name and baseline, and the policy never moves ``champion`` (see :func:`promote`).
    """
    # Here, not at the top: models imports torch, and this module is imported (OnnxAutoencoderModel)
    # where a registered version is loaded, which needs onnxruntime only.
    from latentforge.models import MODELS, ConfigError

    if family not in MODELS:
        raise ConfigError(f"unknown model family {family!r}; choose one of: {', '.join(sorted(MODELS))}")
    export_dir = Path(export_dir) if export_dir else export_dir_from_params(params, family)
    manifest_path = export_dir / "manifest.json"
    if not manifest_path.is_file():
        raise RegistryError(f"no export at {export_dir}; run `latentforge export --model {family}` (or `dvc repro`) first")
    exported = json.loads(manifest_path.read_text()).get("family")
    if exported != family:
        raise RegistryError(f"{export_dir} holds a {exported} export, not {family}")
    policy = policy_for(params, family)
    uri = resolve_tracking_uri(params)
    experiment = section(params, "mlflow").get("experiment") or "latentforge"
    data = section(params, "data")
    version = register(export_dir, uri, name=name, policy=policy, experiment=experiment,
                       tags=dvc_exp.tags if dvc_exp else None, data_dir=Path(data["output_dir"]) / data["name"])
    hold = f"this runs in {dvc_exp}" if dvc_exp else None
    decision = promote(version.name, uri, policy=policy, hold_champion=hold) if promote_it else None
    return version, decision
