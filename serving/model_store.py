"""The MLflow registry, seen from a model replica: which version to serve, its download, the swap.

:class:`ModelStore` holds the version a replica serves. It polls the registry every
``poll_interval_s``; when the alias points at another version it loads that version next to the one
it serves and then swaps one reference (zero-downtime promotion). A request takes that reference once
when it starts, so it runs wholly on one version, and no request waits for or fails on a load.

mlflow is imported inside the functions that talk to the registry: only model replicas call them,
and the ingress replica, which imports this module through ``serving.app``, need not load mlflow.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from latentforge.runtime.images import ModelRuntime
from latentforge.runtime.series import SeriesRuntime
from latentforge.runtime.text import TextDecoder

log = logging.getLogger("ray.serve")


def fetch_version(name: str, tracking_uri: str, alias: str | None, version: int | None) -> str:
    """The version number ``alias`` (or the pinned ``version``) of registered model ``name`` resolves to."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if version:
        return str(client.get_model_version(name, str(version)).version)
    return str(client.get_model_version_by_alias(name, alias).version)


def download_export(name: str, version: str, tracking_uri: str, dest: Path) -> Path:
    """Download version ``version`` of ``name`` into ``dest``; returns its export directory (the
    folder that holds ``manifest.json`` among the pyfunc model's artifacts)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)  # a replica is its own process: the global is this model's store
    mlflow.set_registry_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)))
    found = sorted(local.glob("artifacts/*/manifest.json")) or sorted(local.rglob("manifest.json"))
    if not found:
        raise FileNotFoundError(f"{name} version {version}: no manifest.json among its artifacts ({local})")
    return found[0].parent


def is_text_export(export_dir: Path) -> bool:
    """Whether the export at ``export_dir`` is a text model (manifest ``kind`` ``text``)."""
    return json.loads((Path(export_dir) / "manifest.json").read_text()).get("kind") == "text"


def is_series_export(export_dir: Path) -> bool:
    """Whether the export at ``export_dir`` is a time-series model (manifest ``kind`` ``timeseries``)."""
    return json.loads((Path(export_dir) / "manifest.json").read_text()).get("kind") == "timeseries"


def read_sample_grids(export_dir: Path) -> dict[str, bytes]:
    """The export's sample grid PNGs (its manifest's ``sample_grids``: file name -> path in the export),
    read into memory: file name -> bytes; empty for an export without them. A listed file that is
    missing is an error (the export is incomplete)."""
    listed = json.loads((Path(export_dir) / "manifest.json").read_text()).get("sample_grids") or {}
    grids = {}
    for name, relative in listed.items():
        path = Path(export_dir) / relative
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the manifest lists it as sample grid {name!r}")
        grids[name] = path.read_bytes()
    return grids


def load_text_runtime(export_dir: Path, decoder: str | None, tracking_uri: str, name: str, version: str, alias: str | None):
    """A text model (:class:`runtime.text.TextDecoder`, torch-free) as a served runtime.

    ``decoder`` (``name@alias`` or ``name/version``, the config's ``decoder`` of this model): the decoder
    version served beside it; a text model trained against another version is refused
    (:class:`runtime.text.DecoderMismatchError`), so the replica does not start.
    """
    served_name = served_version = None
    if decoder and "/" in decoder:
        served_name, pinned = decoder.rsplit("/", 1)
        served_version = fetch_version(served_name, tracking_uri, None, int(pinned))
    elif decoder:
        served_name, _, served_alias = decoder.partition("@")
        served_version = fetch_version(served_name, tracking_uri, served_alias or "champion", None)
    rt = TextDecoder.load(export_dir, served_name, served_version)
    rt.name, rt.version, rt.alias = name, str(version), alias
    return rt


def session_threads(configured: int) -> int:
    """ONNX Runtime intra-op threads for this replica's sessions: ``configured`` when above 0, else the
    CPUs the replica reserves (``ray_actor_options.num_cpus``) rounded down, at least 1. ORT's own default,
    a thread per core, would have replicas of 0.5 or 0.1 CPU each contend for every core of the node."""
    if configured > 0:
        return configured
    import ray

    reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0) if ray.is_initialized() else 0.0
    return max(1, math.floor(reserved))


class ModelStore:
    """The served version of registered model ``name`` in one replica (``runtime``; None until the
    first :meth:`refresh`). ``settings`` (the deployment's ``user_config``): ``alias``/``version``
    (which version), ``poll_interval_s``, ``intra_op_threads``, ``decoder`` (text models)."""

    def __init__(self, name: str, tracking_uri: str):
        self.name, self.tracking_uri = name, tracking_uri
        self.runtime: ModelRuntime | None = None
        self.settings: dict[str, Any] = {}
        self._cache = Path(tempfile.mkdtemp(prefix=f"latentforge-{name}-"))
        self._poller: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    async def refresh(self) -> bool:
        """Load the version the alias (or pinned version) names now, if it is not the one served; the
        swap is one assignment, after the new sessions are ready. Returns whether it changed."""
        async with self._lock:
            alias, version = self.settings.get("alias", "champion"), self.settings.get("version")
            target = await asyncio.to_thread(fetch_version, self.name, self.tracking_uri, alias, version)
            if self.runtime is not None and self.runtime.version == target:
                return False
            runtime = await asyncio.to_thread(self._load, target, None if version else alias)
            previous, self.runtime = self.runtime, runtime
            log.info("%s: serving version %s (was %s)", self.name, target, previous.version if previous else "none")
            if previous is not None and previous.version != target:
                # Its sessions hold the graphs in memory (requests still on them finish); the files can go.
                shutil.rmtree(self._cache / f"v{previous.version}", ignore_errors=True)
            return True

    def start_polling(self) -> None:
        """Poll the registry every ``poll_interval_s`` from now on (once; not at all when it is 0)."""
        if self._poller is None and float(self.settings.get("poll_interval_s", 0)) > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def _load(self, version: str, alias: str | None) -> ModelRuntime:
        dest = self._cache / f"v{version}"
        shutil.rmtree(dest, ignore_errors=True)
        export_dir = download_export(self.name, version, self.tracking_uri, dest)
        runtime = self._runtime(export_dir, version, alias)
        # On the runtime, so that the one swap of `runtime` also swaps the model card's grids.
        runtime.sample_grids = read_sample_grids(export_dir)
        return runtime

    def _runtime(self, export_dir: Path, version: str, alias: str | None):
        """The runtime of the export at ``export_dir``: text, time-series or image model."""
        if is_text_export(export_dir):
            return load_text_runtime(export_dir, self.settings.get("decoder"), self.tracking_uri, self.name, version, alias)
        threads = session_threads(int(self.settings.get("intra_op_threads", 0)))
        if is_series_export(export_dir):
            return SeriesRuntime.from_export(export_dir, self.name, version, alias, threads=threads)
        return ModelRuntime.from_export(export_dir, self.name, version, alias, threads=threads)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(float(self.settings.get("poll_interval_s", 10)))
            try:
                await self.refresh()
            except Exception as exc:  # an unreachable registry must not stop serving the loaded version
                log.warning("%s: registry poll failed (%s); still serving version %s", self.name, exc,
                            self.runtime.version if self.runtime else "none")
