"""The Ray Serve application: a FastAPI ingress and one ONNX Runtime deployment per registered model.

::

    HTTP -> ingress (FastAPI: routing, limits, errors) -> ModelServer "<name>" (ONNX Runtime, serve.batch)

``build_app(args)`` is the application builder that ``serving/config.yaml`` names
(``import_path: serving.app:build_app``); ``args`` is a :class:`serving.schemas.AppConfig`. Each
:class:`ModelServer` loads, from the MLflow registry, the version behind its alias (or a pinned
version) into ONNX Runtime sessions from the export's manifest and graphs alone: nothing here imports
PyTorch.

**Zero-downtime promotion.** Each model replica polls the registry every ``poll_interval_s``; when its
alias points at another version it loads that version next to the one it serves and then swaps one
reference. A request takes that reference once when it starts, so it runs wholly on one version, and
no request waits for or fails on a load. The same swap runs when ``user_config`` changes (``serve
deploy`` with another ``version``/``alias``: Serve calls ``reconfigure`` on the live replicas).

**Batching.** Graph calls from concurrent requests meet in ``serve.batch`` methods, grouped by version
and graph, and run as one ONNX Runtime call (``max_batch_size`` 1 turns batching off). Serve closes a
batch when its wait ends even while the previous batch still runs, so under load the batches that
queue behind a running one stay small (1-2 requests of 32 waiting, measured); a :class:`_Coalescer`
therefore merges every batch that waits into the next ONNX Runtime call, up to ``max_batch_size``,
and under load waits ``batch_wait_timeout_s`` for more when the call is not full.
**Overload**: ``max_ongoing_requests`` and ``max_queued_requests`` (config.yaml) bound every queue; a
request beyond them gets a 503 at once.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' body types from live annotations,
# which Serve's class-based ingress does not resolve from strings.
import asyncio
import importlib
import logging
import secrets
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentforge.serving import codec
from latentforge.serving.codec import BadInput
from latentforge.runtime.images import ModelRuntime, sample_codes
from latentforge.serving.schemas import (
    AnomalyResponse, AppConfig, DecodeRequest, EncodeResponse, ErrorResponse, GenerateRequest, GenerateResponse,
    ImagesRequest, ImagesResponse, InterpolateRequest, Limits, TextDecodeRequest, TextDecodeResponse,
)

log = logging.getLogger("ray.serve")
WEB = Path(__file__).resolve().parent / "web"
VERSION_HEADER = "X-Model-Version"


# ----------------------------------------------------------------------------------------------------
# The registry, seen from a replica


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


# ----------------------------------------------------------------------------------------------------
# One registered model


def _run_grouped(calls: list[tuple[ModelRuntime, str, dict[str, np.ndarray]]]) -> list[dict[str, np.ndarray]]:
    """Run graph calls of many requests: one ONNX Runtime call per (version, graph), inputs stacked
    along the batch axis and the outputs split back. Returns one output dict per call, in order."""
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (rt, graph, _) in enumerate(calls):
        groups[(id(rt), graph)].append(i)
    results: list[Any] = [None] * len(calls)
    for (_, graph), idx in groups.items():
        rt = calls[idx[0]][0]
        feeds = {k: np.concatenate([calls[i][2][k] for i in idx]) for k in calls[idx[0]][2]}
        out = rt.run_graph(graph, feeds)
        bounds = np.cumsum([0] + [len(next(iter(calls[i][2].values()))) for i in idx])
        for j, i in enumerate(idx):
            results[i] = {k: v[bounds[j] : bounds[j + 1]] for k, v in out.items()}
    return results


def _sample_grouped(draws: list[tuple[ModelRuntime, int, int, float, int | None]]) -> list[np.ndarray]:
    """VQ-VAE-2 draws of many requests: one prior sampling loop per (version, top_k)."""
    groups: dict[tuple[int, int | None], list[int]] = defaultdict(list)
    for i, (rt, _, _, _, top_k) in enumerate(draws):
        groups[(id(rt), top_k)].append(i)
    results: list[Any] = [None] * len(draws)
    for (_, top_k), idx in groups.items():
        rt = draws[idx[0]][0]
        spec = [(draws[i][1], np.random.default_rng(draws[i][2]), draws[i][3]) for i in idx]
        images = np.clip(sample_codes(rt.sessions, rt.manifest, spec, top_k)["images"], 0.0, 1.0)
        bounds = np.cumsum([0] + [n for n, _, _ in spec])
        for j, i in enumerate(idx):
            results[i] = images[bounds[j] : bounds[j + 1]]
    return results


class _Coalescer:
    """Runs ``fn(items) -> results`` one call at a time in a worker thread; whatever is submitted while
    a call runs waits, and the waiting items go together into the next call (at most ``max_items``).

    ``submit`` returns one future per item at once, without waiting for the call: a ``serve.batch``
    method returns them, so Serve's batch slot is free again and the next batch it forms joins the
    queue here instead of waiting for the slot with its contents fixed.

    ``linger_s``: under load (the last call merged several items) a call that is not full waits this
    long first, since more requests are on their way; an idle replica runs a lone request at once, so
    the wait costs nothing at concurrency 1."""

    def __init__(self, fn: Callable[[list], list], max_items: int, linger_s: float = 0.0):
        self.fn, self.max_items, self.linger_s = fn, max_items, linger_s
        self.waiting: list[tuple[Any, asyncio.Future]] = []
        self.drain_task: asyncio.Task | None = None
        self.last_size = 0

    def submit(self, items: list) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.waiting.extend(zip(items, futures))
        if self.drain_task is None or self.drain_task.done():
            self.drain_task = loop.create_task(self._drain())
        return futures

    async def _drain(self) -> None:
        while self.waiting:
            size = max(1, self.max_items)
            if self.last_size > 1 and len(self.waiting) < size and self.linger_s > 0:
                await asyncio.sleep(self.linger_s)
            take, self.waiting = self.waiting[:size], self.waiting[size:]
            self.last_size = len(take)
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in take])
            except Exception as exc:  # every caller of this call sees its error, the next call goes on
                results = [exc] * len(take)
            for (_, future), result in zip(take, results):
                if future.done():  # the caller went away
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


@serve.deployment(max_ongoing_requests=32, max_queued_requests=64)
class ModelServer:
    """One registered model in ONNX Runtime. ``user_config``: ``alias``/``version`` (which version),
    ``poll_interval_s``, ``max_batch_size``, ``batch_wait_timeout_s``, ``intra_op_threads``."""

    def __init__(self, name: str, tracking_uri: str):
        self.name, self.tracking_uri = name, tracking_uri
        self.runtime: ModelRuntime | None = None
        self.settings: dict[str, Any] = {}
        self._cache = Path(tempfile.mkdtemp(prefix=f"latentforge-{name}-"))
        self._poller: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._graph_calls = _Coalescer(_run_grouped, 16)
        self._draws = _Coalescer(_sample_grouped, 16)

    async def reconfigure(self, user_config: dict) -> None:
        self.settings = dict(user_config)
        size = int(self.settings.get("max_batch_size", 16))
        for method in (self._batch, self._sample):
            # No wait in serve.batch: the coalescer waits, and only under load (see _Coalescer).
            method.set_max_batch_size(size)
            method.set_batch_wait_timeout_s(0.0)
        for coalescer in (self._graph_calls, self._draws):
            coalescer.max_items = size
            coalescer.linger_s = float(self.settings.get("batch_wait_timeout_s", 0.005))
        await self.refresh()
        if self._poller is None and float(self.settings.get("poll_interval_s", 0)) > 0:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

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

    def _load(self, version: str, alias: str | None) -> ModelRuntime:
        dest = self._cache / f"v{version}"
        shutil.rmtree(dest, ignore_errors=True)
        export_dir = download_export(self.name, version, self.tracking_uri, dest)
        if is_text_export(export_dir):
            return load_text_runtime(export_dir, self.settings.get("decoder"), self.tracking_uri, self.name, version, alias)
        threads = int(self.settings.get("intra_op_threads", 0))
        return ModelRuntime.from_export(export_dir, self.name, version, alias, threads=threads)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(float(self.settings.get("poll_interval_s", 10)))
            try:
                await self.refresh()
            except Exception as exc:  # an unreachable registry must not stop serving the loaded version
                log.warning("%s: registry poll failed (%s); still serving version %s", self.name, exc,
                            self.runtime.version if self.runtime else "none")

    # -- batched graph calls --------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batch(self, calls: list) -> list:
        return self._graph_calls.submit(calls)  # futures: see _Coalescer

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _sample(self, draws: list) -> list:
        return self._draws.submit(draws)

    async def _run_graph(self, call: tuple) -> dict:
        """One request's graph call ``(runtime, graph, feeds)``, batched with the others'."""
        return await (await self._batch(call))

    async def _draw(self, draw: tuple) -> np.ndarray:
        """One request's VQ-VAE-2 draw ``(runtime, n, seed, temperature, top_k)``, batched with the others'."""
        return await (await self._sample(draw))

    # -- what the ingress calls -----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        info = self.runtime.describe()
        info["runtime"] = {"engine": "onnxruntime", "torch_imported": "torch" in sys.modules,
                           "poll_interval_s": float(self.settings.get("poll_interval_s", 0)),
                           "max_batch_size": int(self.settings.get("max_batch_size", 16))}
        return info

    async def call(self, op: str, payload: dict) -> dict:
        """Run ``op`` on ``payload`` (a validated request body); returns ``{"status", "body", "version"}``."""
        rt = self.runtime  # one version for the whole request, whatever a promotion does meanwhile
        try:
            if op not in rt.capabilities:
                raise BadInput("name", f"{self.name} (a {rt.manifest['family']}) cannot {op}: its export has no graphs "
                                       f"for it (it can: {', '.join(rt.capabilities)})", status=422)
            body = await getattr(self, "_" + op.replace("-", "_"))(rt, payload)
        except BadInput as exc:
            return {"status": exc.status, "body": exc.body(), "version": rt.version}
        return {"status": 200, "body": {"model": self.name, "model_version": rt.version, **body}, "version": rt.version}

    def _runner(self, rt: ModelRuntime):
        """A ``run(graph, feeds)`` for :class:`ModelRuntime` that goes through the batch."""

        async def run(graph: str, feeds: dict) -> dict:
            return await self._run_graph((rt, graph, feeds))

        return run

    async def _generate(self, rt: ModelRuntime, p: dict) -> dict:
        n, seed, temperature = p["n"], p["seed"], p["temperature"]
        if rt.manifest["sampling"]["kind"] == "prior":
            images = await self._draw((rt, n, seed, temperature, p.get("top_k")))
        else:
            noise = rt.noise(n, np.random.default_rng(seed), temperature)
            images = np.clip((await self._run_graph((rt, "generator", {"noise": noise})))["images"], 0.0, 1.0)
        return {"seed": seed, "format": p["format"], "images": codec.encode_images(images, p["format"])}

    async def _text_decode(self, rt, p: dict) -> dict:
        from latentforge.runtime.text import TextRequestError

        body = {k: p[k] for k in ("texts", "n", "seed", "temperature") if p.get(k) is not None}
        try:
            out = await asyncio.to_thread(rt.text_decode, body)
        except TextRequestError as exc:
            raise BadInput(exc.field, exc.reason) from None
        images = np.clip(out["images"], 0.0, 1.0)
        return {"seed": out["seed"], "format": p["format"], "images": [codec.encode_images(im, p["format"]) for im in images]}

    async def _encode(self, rt: ModelRuntime, p: dict) -> dict:
        images = codec.decode_images(p["images"], "images", rt.image_shape, p["max_images"])
        encoded = await self._runner(rt)("encoder", {"images": images})
        return {"latents": {k: v.tolist() for k, v in encoded.items()}}

    async def _decode(self, rt: ModelRuntime, p: dict) -> dict:
        feeds = _decoder_feeds(rt, p["latents"], p["max_images"])
        images = np.clip((await self._runner(rt)("decoder", feeds))["images"], 0.0, 1.0)
        return {"format": p["format"], "images": codec.encode_images(images, p["format"])}

    async def _reconstruct(self, rt: ModelRuntime, p: dict) -> dict:
        images = codec.decode_images(p["images"], "images", rt.image_shape, p["max_images"])
        run = self._runner(rt)
        encoded = await run("encoder", {"images": images})
        recon = np.clip((await run("decoder", rt.latent_of(encoded)))["images"], 0.0, 1.0)
        return {"format": p["format"], "images": codec.encode_images(recon, p["format"])}

    async def _anomaly_score(self, rt: ModelRuntime, p: dict) -> dict:
        images = codec.decode_images(p["images"], "images", rt.image_shape, p["max_images"])
        run = self._runner(rt)
        recon = np.clip((await run("decoder", rt.latent_of(await run("encoder", {"images": images}))))["images"], 0, 1)
        scores = np.square(images.astype(np.float64) - recon).reshape(len(images), -1).mean(1)
        threshold = rt.anomaly_threshold
        return {"scores": scores.tolist(), "threshold": threshold,
                "anomalous": None if threshold is None else [bool(s > threshold) for s in scores]}

    async def _interpolate(self, rt: ModelRuntime, p: dict) -> dict:
        ends = []
        for key in ("a", "b"):
            end = p[key]
            if (end.get("image") is None) == (end.get("latent") is None):
                raise BadInput(key, "give exactly one of image or latent")
            if end.get("latent") is not None:
                ends.append(codec.as_array(end["latent"], f"{key}.latent", rt.latent_shape))
            else:
                image = codec.decode_image(end["image"], f"{key}.image", rt.image_shape)[None]
                if "encoder" not in rt.manifest["graphs"]:
                    raise BadInput(f"{key}.image", f"{self.name} has no encoder: give a latent")
                ends.append(rt.latent_of(await self._runner(rt)("encoder", {"images": image}))["latent"][0])
        t = np.linspace(0.0, 1.0, p["steps"], dtype=np.float32).reshape(-1, *([1] * len(rt.latent_shape)))
        path = ((1 - t) * ends[0][None] + t * ends[1][None]).astype(np.float32)
        images = np.clip((await self._runner(rt)("decoder", {"latent": path}))["images"], 0.0, 1.0)
        return {"format": p["format"], "images": codec.encode_images(images, p["format"])}


def is_text_export(export_dir: Path) -> bool:
    import json

    return json.loads((Path(export_dir) / "manifest.json").read_text()).get("kind") == "text"


def load_text_runtime(export_dir: Path, decoder: str | None, tracking_uri: str, name: str, version: str, alias: str | None):
    """A text model (:class:`runtime.text.TextDecoder`, torch-free) as a served runtime.

    ``decoder`` (``name@alias`` or ``name/version``, the config's ``decoder`` of this model): the decoder
    version served beside it; a text model trained against another version is refused
    (:class:`runtime.text.DecoderMismatchError`), so the replica does not start.
    """
    from latentforge.runtime.text import TextDecoder

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


def _decoder_feeds(rt: ModelRuntime, latents: Any, limit: int) -> dict[str, np.ndarray]:
    """A decode request's ``latents`` -> the decoder's inputs, each checked for shape and values."""
    inputs = rt.decoder_inputs()
    if rt.latent_kind == "codes":
        if not isinstance(latents, dict) or set(latents) != set(inputs):
            raise BadInput("latents", f"expected an object with {' and '.join(inputs)} (code indices)")
        num_codes = int(rt.manifest["latent"]["num_codes"])
        sizes = {len(v) if isinstance(v, list) else -1 for v in latents.values()}
        if len(sizes) != 1 or not 1 <= sizes.pop() <= limit:
            raise BadInput("latents", f"{' and '.join(inputs)} must be lists of the same length, 1 to {limit}")
        return {k: codec.as_array(latents[k], f"latents.{k}", (len(latents[k]), *shape), np.int64, (0, num_codes))
                for k, shape in inputs.items()}
    if not isinstance(latents, list) or not latents:
        raise BadInput("latents", f"expected a non-empty list of latents of shape {list(rt.latent_shape)}")
    if len(latents) > limit:
        raise BadInput("latents", f"{len(latents)} latents, the limit is {limit}")
    return {"latent": codec.as_array(latents, "latents", (len(latents), *rt.latent_shape))}


# ----------------------------------------------------------------------------------------------------
# The HTTP ingress

api = FastAPI(
    title="latentforge",
    version="1",
    description="Generative autoencoder-family models from the MLflow registry, on ONNX Runtime. Every "
                f"response names the model version that produced it (field model_version, header {VERSION_HEADER}).",
)
ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 422, 503)}


def _error(status: int, field: str, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(BadInput(field, reason, status).body(), status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    field = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or "body"
    if first.get("type") == "json_invalid":
        return _error(400, "body", f"not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})")
    return _error(422, field, str(first.get("msg")))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, "path", f"{exc.detail}: {request.method} {request.url.path}")


# Set by the ingress replica at start. A module global, not ``api.state``: Serve ships the FastAPI app to
# the replica as a pickled copy, while this module (and so this dict and BodyLimit) is imported there.
BODY_LIMIT = {"max_body_bytes": Limits().max_body_bytes}


class BodyLimit:
    """ASGI middleware: a request body over ``max_body_bytes`` gets a 413 before any route reads it
    (announced by Content-Length or counted as it streams)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = BODY_LIMIT["max_body_bytes"]
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = length is not None and length.isdigit() and int(length) > limit
        chunks, size, more = [], 0, not too_big
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_big = size > limit
            if too_big:
                break
        if too_big:
            response = _error(413, "body", f"request body over the limit of {limit} bytes")
            return await response(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


api.add_middleware(BodyLimit)


@serve.deployment(max_ongoing_requests=64, max_queued_requests=128)
@serve.ingress(api)
class Ingress:
    """Routes, limits and errors; the models run in their own deployments (``models``: name -> handle)."""

    def __init__(self, models: dict, limits: dict):
        self.models = models
        self.limits = Limits.model_validate(limits)
        # Through the module: Serve pickles this class by value, with copies of the globals it names.
        importlib.import_module(__name__).BODY_LIMIT["max_body_bytes"] = self.limits.max_body_bytes
        self.page = (WEB / "index.html").read_text()

    async def _call(self, name: str, op: str, payload: dict) -> JSONResponse:
        handle = self.models.get(name)
        if handle is None:
            return _error(404, "name", f"no model {name!r} is served; served: {', '.join(sorted(self.models))}")
        try:
            out = await handle.call.remote(op, {**payload, "max_images": self.limits.max_images})
        except BackPressureError:
            return _error(503, "name", f"{name} is overloaded (its queue is full); retry later", {"Retry-After": "1"})
        return JSONResponse(out["body"], status_code=out["status"], headers={VERSION_HEADER: out["version"]})

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self):
        try:
            await asyncio.wait_for(asyncio.gather(*(h.describe.remote() for h in self.models.values())), timeout=10)
        except Exception as exc:
            return _error(503, "models", f"not ready: {type(exc).__name__}: {exc}")
        return {"status": "ready", "models": sorted(self.models)}

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        described = await asyncio.gather(*(h.describe.remote() for h in self.models.values()))
        return {"models": sorted(described, key=lambda m: m["name"])}

    @api.post("/v1/models/{name}/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(self, name: str, body: GenerateRequest):
        if body.n > self.limits.max_n:
            return _error(422, "n", f"n = {body.n} is above the limit of {self.limits.max_n}")
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        return await self._call(name, "generate", {**body.model_dump(), "seed": seed})

    @api.post("/v1/models/{name}/encode", response_model=EncodeResponse, responses=ERRORS)
    async def encode(self, name: str, body: ImagesRequest):
        return await self._call(name, "encode", body.model_dump())

    @api.post("/v1/models/{name}/decode", response_model=ImagesResponse, responses=ERRORS)
    async def decode(self, name: str, body: DecodeRequest):
        return await self._call(name, "decode", body.model_dump())

    @api.post("/v1/models/{name}/reconstruct", response_model=ImagesResponse, responses=ERRORS)
    async def reconstruct(self, name: str, body: ImagesRequest):
        return await self._call(name, "reconstruct", body.model_dump())

    @api.post("/v1/models/{name}/interpolate", response_model=ImagesResponse, responses=ERRORS)
    async def interpolate(self, name: str, body: InterpolateRequest):
        if body.steps > self.limits.max_steps:
            return _error(422, "steps", f"steps = {body.steps} is above the limit of {self.limits.max_steps}")
        return await self._call(name, "interpolate", body.model_dump())

    @api.post("/v1/models/{name}/text-decode", response_model=TextDecodeResponse, responses=ERRORS)
    async def text_decode(self, name: str, body: TextDecodeRequest):
        return await self._call(name, "text-decode", body.model_dump())

    @api.post("/v1/models/{name}/anomaly-score", response_model=AnomalyResponse, responses=ERRORS)
    async def anomaly_score(self, name: str, body: ImagesRequest):
        return await self._call(name, "anomaly-score", body.model_dump())


# ----------------------------------------------------------------------------------------------------
# The application builder


def build_app(args: dict):
    """The Serve application for ``args`` (:class:`serving.schemas.AppConfig`): one :class:`ModelServer`
    deployment per model, named after the registered model, behind the ``ingress`` deployment."""
    cfg = AppConfig.model_validate(args or {})
    uri = cfg.resolved_uri()
    models = {}
    for ref in cfg.models:
        user_config = {"alias": ref.alias, "version": ref.version, "poll_interval_s": cfg.poll_interval_s,
                       "max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
                       "intra_op_threads": cfg.intra_op_threads, "decoder": ref.decoder}
        models[ref.name] = ModelServer.options(name=ref.name, user_config=user_config).bind(ref.name, uri)
    return Ingress.options(name="ingress").bind(models, cfg.limits.model_dump())
