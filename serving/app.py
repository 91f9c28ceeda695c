"""The Ray Serve application: a FastAPI ingress and one ONNX Runtime deployment per registered model.

::

    HTTP -> ingress (FastAPI: routing, limits, errors) -> ModelServer "<name>" (ONNX Runtime, serve.batch)

``build_app(args)`` is the application builder that ``serving/config.yaml`` names
(``import_path: latentforge.serving.app:build_app``); ``args`` is a :class:`serving.schemas.AppConfig`.
Each :class:`ModelServer` loads, from the MLflow registry, the version behind its alias (or a pinned
version) into ONNX Runtime sessions from the export's manifest and graphs alone: nothing here imports
PyTorch.

**Zero-downtime promotion** (:mod:`serving.model_store`). Each model replica polls the registry every
``poll_interval_s``; when its alias points at another version it loads that version next to the one it
serves and then swaps one reference. A request takes that reference once when it starts, so it runs
wholly on one version, and no request waits for or fails on a load. The same swap runs when
``user_config`` changes (``serve deploy`` with another ``version``/``alias``: Serve calls
``reconfigure`` on the live replicas).

**Batching** (:mod:`serving.batching`). Graph calls from concurrent requests meet in ``serve.batch``
methods, grouped by version and graph, and run as one ONNX Runtime call (``max_batch_size`` 1 turns
batching off); a :class:`serving.batching.Coalescer` merges every batch that waits behind a running
call into the next one. What each operation computes is :mod:`serving.operations`.

**Overload**: ``max_ongoing_requests`` and ``max_queued_requests`` (config.yaml) bound every queue; a
request beyond them gets a 503 at once. Error bodies and the request body limit: :mod:`serving.errors`.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' body types from live annotations,
# which Serve's class-based ingress does not resolve from strings.
import asyncio
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentforge.runtime.images import ModelRuntime
from latentforge.serving import errors, schemas
from latentforge.serving.batching import Coalescer, run_grouped, sample_grouped
from latentforge.serving.codec import BadInput
from latentforge.serving.errors import error_response
from latentforge.serving.model_store import ModelStore
from latentforge.serving.operations import OPERATIONS
from latentforge.serving.schemas import (
    AnomalyRequest, AnomalyResponse, AppConfig, DecodeRequest, EditRequest, EditResponse, EncodeResponse,
    ErrorResponse, GenerateRequest, GenerateResponse,
    ImagesRequest, ImagesResponse, InterpolateRequest, Limits, MAX_SEED, TextDecodeRequest, TextDecodeResponse,
    check_limits, served_openapi,
)

WEB = Path(__file__).resolve().parent / "web"
VERSION_HEADER = "X-Model-Version"


# ----------------------------------------------------------------------------------------------------
# One registered model


@serve.deployment(max_ongoing_requests=32, max_queued_requests=64)
class ModelServer:
    """One registered model in ONNX Runtime. ``user_config``: ``alias``/``version`` (which version),
    ``poll_interval_s``, ``max_batch_size``, ``batch_wait_timeout_s``, ``intra_op_threads``, ``decoder``."""

    def __init__(self, name: str, tracking_uri: str):
        self.name = name
        self.store = ModelStore(name, tracking_uri)
        self._graph_calls = Coalescer(run_grouped, 16)
        self._draws = Coalescer(sample_grouped, 16)

    async def reconfigure(self, user_config: dict) -> None:
        """Apply ``user_config`` (Serve calls this at start and on every change): batch sizes, then
        the version it names (loaded and swapped in if it is not the one served), then polling."""
        self.store.settings = settings = dict(user_config)
        size = int(settings.get("max_batch_size", 16))
        for method in (self._batch, self._sample):
            # No wait in serve.batch: the coalescer waits, and only under load (see Coalescer).
            method.set_max_batch_size(size)
            method.set_batch_wait_timeout_s(0.0)
        for coalescer in (self._graph_calls, self._draws):
            coalescer.max_items = size
            coalescer.linger_s = float(settings.get("batch_wait_timeout_s", 0.005))
        await self.store.refresh()
        self.store.start_polling()

    # -- batched graph calls --------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batch(self, calls: list) -> list:
        return self._graph_calls.submit(calls)  # futures: see Coalescer

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _sample(self, draws: list) -> list:
        return self._draws.submit(draws)

    def _runner(self, rt: ModelRuntime):
        """``run(graph, feeds)`` on ``rt``, batched with the other requests' graph calls."""

        async def run(graph: str, feeds: dict) -> dict:
            return await (await self._batch((rt, graph, feeds)))

        return run

    def _drawer(self, rt: ModelRuntime):
        """``draw(n, seed, temperature, top_k)`` on ``rt``, batched with the other requests' VQ-VAE-2 draws."""

        async def draw(n: int, seed: int, temperature: float, top_k: Any) -> np.ndarray:
            return await (await self._sample((rt, n, seed, temperature, top_k)))

        return draw

    # -- what the ingress calls -----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The served version, for ``GET /v1/models``, with this replica's runtime settings."""
        settings = self.store.settings
        info = self.store.runtime.describe()
        sessions = getattr(self.store.runtime, "sessions", {})  # image and time-series models
        info["runtime"] = {"engine": "onnxruntime", "torch_imported": "torch" in sys.modules,
                           "poll_interval_s": float(settings.get("poll_interval_s", 0)),
                           "max_batch_size": int(settings.get("max_batch_size", 16)),
                           "intra_op_threads": {graph: s.get_session_options().intra_op_num_threads
                                                for graph, s in sessions.items()}}
        # The evaluation's sample grids this version carries (GET /v1/models/{name}/sample-grids/{file}).
        info["sample_grids"] = sorted(getattr(self.store.runtime, "sample_grids", {}))
        return info

    def sample_grid(self, file: str) -> dict[str, Any]:
        """One sample grid of the served version: ``{"version", "png"}`` (``png`` None when it has no such grid)."""
        rt = self.store.runtime
        return {"version": rt.version, "png": getattr(rt, "sample_grids", {}).get(file)}

    async def call(self, op: str, payload: dict) -> dict:
        """Run ``op`` on ``payload`` (a validated request body); returns ``{"status", "body", "version"}``."""
        rt = self.store.runtime  # one version for the whole request, whatever a promotion does meanwhile
        try:
            if op not in rt.capabilities:
                raise BadInput("name", f"{self.name} (a {rt.manifest['family']}) cannot {op}: its export has no graphs "
                                       f"for it (it can: {', '.join(rt.capabilities)})", status=422)
            body = await OPERATIONS[op](rt, payload, self._runner(rt), self._drawer(rt))
        except BadInput as exc:
            return {"status": exc.status, "body": exc.body(), "version": rt.version}
        return {"status": 200, "body": {"model": self.name, "model_version": rt.version, **body}, "version": rt.version}


# ----------------------------------------------------------------------------------------------------
# The HTTP ingress

api = FastAPI(
    title="latentforge",
    version="1",
    description="Generative autoencoder-family models from the MLflow registry, on ONNX Runtime. Every "
                f"response names the model version that produced it (field model_version, header {VERSION_HEADER}).",
)
ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 422, 503)}


api.add_exception_handler(RequestValidationError, errors.validation_error)
api.add_exception_handler(StarletteHTTPException, errors.http_error)
api.add_middleware(errors.BodyLimit)


def openapi() -> dict:
    """``/openapi.json``: FastAPI's document with the limits and model names that this process's ingress
    serves (:data:`serving.schemas.SERVED`, set by :class:`Ingress`), so that what it allows the app accepts."""
    if api.openapi_schema is None:
        document = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        api.openapi_schema = served_openapi(document, schemas.SERVED["limits"], schemas.SERVED["models"])
    return api.openapi_schema


# FastAPI's documented hook for a custom schema. The replica gets a pickled copy of `api` whose `openapi`
# is this module's function (by reference): it builds the document from the routes of the module's
# `api` in that process, the same routes.
api.openapi = openapi


@serve.deployment(max_ongoing_requests=64, max_queued_requests=128)
@serve.ingress(api)
class Ingress:
    """Routes, limits and errors; the models run in their own deployments (``models``: name -> handle)."""

    def __init__(self, models: dict, limits: dict):
        self.models = models
        self.limits = Limits.model_validate(limits)
        # Through the errors module: Serve pickles this class by value, with copies of the globals it
        # names, while a module (and its functions) travels by reference: the middleware reads this one.
        errors.set_body_limit(self.limits.max_body_bytes)
        schemas.SERVED.update(limits=self.limits, models=sorted(models))
        self.page = (WEB / "index.html").read_text()

    def _unknown_model(self, name: str) -> JSONResponse:
        return error_response(404, "name", f"no model {name!r} is served; served: {', '.join(sorted(self.models))}")

    async def _call(self, name: str, op: str, body: BaseModel) -> JSONResponse:
        """Run ``op`` with request ``body`` on model ``name``, after the checks of the configured limits."""
        handle = self.models.get(name)
        if handle is None:
            return self._unknown_model(name)
        try:
            check_limits(body, self.limits)
        except BadInput as exc:
            return error_response(exc.status, exc.field, exc.reason)
        try:
            out = await handle.call.remote(op, {**body.model_dump(), "max_images": self.limits.max_images})
        except BackPressureError:
            return error_response(503, "name", f"{name} is overloaded (its queue is full); retry later", {"Retry-After": "1"})
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
            return error_response(503, "models", f"not ready: {type(exc).__name__}: {exc}")
        return {"status": "ready", "models": sorted(self.models)}

    @api.get("/v1/models")
    async def list_models(self) -> dict:
        described = await asyncio.gather(*(h.describe.remote() for h in self.models.values()))
        return {"models": sorted(described, key=lambda m: m["name"])}

    @api.get("/v1/models/{name}/sample-grids/{file}", response_class=Response, responses={
        200: {"content": {"image/png": {}}, "description": "the PNG"}, 404: {"model": ErrorResponse}})
    async def sample_grid(self, name: str, file: str):
        """A grid of samples that the evaluation drew from the served version (the files GET /v1/models
        lists under ``sample_grids``), as a PNG."""
        handle = self.models.get(name)
        if handle is None:
            return self._unknown_model(name)
        grid = await handle.sample_grid.remote(file)
        if grid["png"] is None:
            return error_response(404, "file", f"{name} version {grid['version']} has no sample grid {file!r} "
                                                "(GET /v1/models lists its sample_grids)")
        return Response(grid["png"], media_type="image/png", headers={VERSION_HEADER: grid["version"]})

    @api.post("/v1/models/{name}/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(self, name: str, body: GenerateRequest):
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return await self._call(name, "generate", body.model_copy(update={"seed": seed}))

    @api.post("/v1/models/{name}/encode", response_model=EncodeResponse, responses=ERRORS)
    async def encode(self, name: str, body: ImagesRequest):
        return await self._call(name, "encode", body)

    @api.post("/v1/models/{name}/decode", response_model=ImagesResponse, responses=ERRORS)
    async def decode(self, name: str, body: DecodeRequest):
        return await self._call(name, "decode", body)

    @api.post("/v1/models/{name}/reconstruct", response_model=ImagesResponse, responses=ERRORS)
    async def reconstruct(self, name: str, body: ImagesRequest):
        return await self._call(name, "reconstruct", body)

    @api.post("/v1/models/{name}/interpolate", response_model=ImagesResponse, responses=ERRORS)
    async def interpolate(self, name: str, body: InterpolateRequest):
        return await self._call(name, "interpolate", body)

    @api.post("/v1/models/{name}/edit", response_model=EditResponse, responses=ERRORS)
    async def edit(self, name: str, body: EditRequest):
        return await self._call(name, "edit", body)

    @api.post("/v1/models/{name}/text-decode", response_model=TextDecodeResponse, responses=ERRORS)
    async def text_decode(self, name: str, body: TextDecodeRequest):
        return await self._call(name, "text-decode", body)

    @api.post("/v1/models/{name}/anomaly-score", response_model=AnomalyResponse, responses=ERRORS)
    async def anomaly_score(self, name: str, body: AnomalyRequest):
        given = [k for k in ("images", "series", "windows") if getattr(body, k) is not None]
        if len(given) != 1:
            return error_response(422, "images", "give exactly one of images, series (time-series points) or windows")
        return await self._call(name, "anomaly-score", body)


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
