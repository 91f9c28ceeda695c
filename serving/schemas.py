"""Request and response bodies of the HTTP API (``/v1``), the app's configuration and its limits.

The pydantic models are what ``/openapi.json`` documents, and ``/openapi.json`` states every limit the
app enforces, so that what the schema allows the app accepts: the fixed ones as the models' bounds, the
configured ones (``limits.*``) written into the served schema from the same :class:`Limits` the ingress
checks (:data:`LIMITED_FIELDS`, :func:`served_openapi`). What depends on the model (image size and
channels, latent shape, its samplers and operations, edit factors) is checked when a request runs, with
a 4xx naming the field and what the model expects (:class:`serving.codec.BadInput`); ``GET /v1/models``
lists it per model.
"""

from __future__ import annotations

import copy
import os
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from latentforge.runtime.images import MAX_EDIT_STRENGTH
from latentforge.runtime.store import absolute_uri
from latentforge.runtime.text import MAX_N as MAX_TEXT_N
from latentforge.runtime.text import MAX_RERANK, MAX_SEED, MAX_TEXT_CHARS, MAX_TEXTS, MODES
from latentforge.serving.codec import PIXEL_RANGE, BadInput

# An image in a request: a base64 PNG string (a data: URL is accepted too) or a (C, H, W) array in [0, 1]
# (codec.PIXEL_RANGE, checked by codec.decode_image: its message names the image; the schema states it).
Image = Union[str, Annotated[list[list[list[float]]], WithJsonSchema({
    "type": "array", "items": {"type": "array", "items": {"type": "array", "items": {
        "type": "number", "minimum": PIXEL_RANGE[0], "maximum": PIXEL_RANGE[1]}}}})]]
Format = Literal["png", "array"]
# Where generate draws latents from: the model's prior, or a Gaussian mixture fitted to the encoded
# training images after training (models/samplers.py). GET /v1/models says which a model has.
Sampler = Literal["prior", "gmm"]


class Limits(BaseModel):
    """Bounds that keep one request from taking a replica for long: ``n`` of generate, images per
    request, ``steps`` of interpolate, the request body in bytes."""

    model_config = ConfigDict(extra="forbid")
    max_n: int = Field(64, ge=1)
    max_images: int = Field(64, ge=1)
    max_steps: int = Field(32, ge=2)
    max_points: int = Field(100_000, ge=1, description="points of a time series per anomaly-score request")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)


class ModelRef(BaseModel):
    """A registered model to serve and which of its versions: an alias (default ``champion``) or a version."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    alias: Optional[str] = "champion"
    version: Optional[int] = Field(None, ge=1)
    decoder: Optional[str] = Field(None, description="text models: the decoder they must have been trained against, "
                                   "name@alias or name/version; another version is refused at load")

    @property
    def ref(self) -> str:
        return f"version {self.version}" if self.version else f"alias {self.alias}"


class AppConfig(BaseModel):
    """The application's arguments (``args:`` of ``serving/config.yaml``, or ``latentforge serve``).

    ``tracking_uri``: the MLflow store (default ``$MLFLOW_TRACKING_URI``); ``poll_interval_s``: how
    often each replica asks the registry where its alias points (0: never; a moved alias is then
    picked up only on redeploy); ``max_batch_size``: requests per ONNX Runtime call in the model
    replicas (1: no batching); ``batch_wait_timeout_s``: how long a call that is not full waits for
    more requests while the replica is under load (never at concurrency 1); ``intra_op_threads``:
    ONNX Runtime intra-op threads per session (0: the CPUs the replica reserves, ``num_cpus`` of its
    ``ray_actor_options`` rounded down, at least 1; see :func:`serving.model_store.session_threads`).
    """

    model_config = ConfigDict(extra="forbid")
    tracking_uri: Optional[str] = None
    models: list[ModelRef] = Field(min_length=1)
    limits: Limits = Limits()
    poll_interval_s: float = Field(10.0, ge=0)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    intra_op_threads: int = Field(0, ge=0)

    @field_validator("tracking_uri")
    @classmethod
    def _absolute(cls, uri: Optional[str]) -> Optional[str]:
        return absolute_uri(uri) if uri else uri

    def resolved_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError("no MLflow tracking URI: set args.tracking_uri in the serve config or MLFLOW_TRACKING_URI")
        return absolute_uri(uri)


# ----------------------------------------------------------------------------------------------------
# Requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def exactly_one_of(*fields: str) -> ConfigDict:
    """A request's config whose JSON schema says that exactly one of ``fields`` is given (not null): the
    app refuses none or several with a 422 naming the first field."""
    branches = [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields]
    return ConfigDict(extra="forbid", json_schema_extra={"oneOf": branches})


class GenerateRequest(_Request):
    n: int = Field(1, ge=1, description="images to draw (at most limits.max_n)")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="the same seed gives the same images; "
                                "omitted: the server draws one and returns it")
    temperature: float = Field(1.0, gt=0, le=100, allow_inf_nan=False,
                               description="scales the noise (noise families) or the prior's logits (VQ-VAE-2)")
    top_k: Optional[int] = Field(None, ge=1, description="VQ-VAE-2: sample among the k likeliest codes")
    sampler: Optional[Sampler] = Field(None, description="where latents are drawn from: prior, or gmm (a mixture fitted "
                                       "to the training latents); omitted: the model's default_sampler "
                                       "(GET /v1/models lists each model's samplers)")
    format: Format = "png"


class ImagesRequest(_Request):
    images: list[Image] = Field(min_length=1, description="base64 PNGs (or (C, H, W) arrays in [0, 1])")
    format: Format = "png"


class AnomalyRequest(_Request):
    """Exactly one of: ``images`` (an image model), or for a time-series model the whole ``series`` (a
    score per point) or ``windows`` (a score per window). Raw values: the model scales them itself."""

    model_config = exactly_one_of("images", "series", "windows")

    images: Optional[list[Image]] = Field(None, min_length=1, description="base64 PNGs (or (C, H, W) arrays in [0, 1])")
    series: Optional[list[Any]] = Field(None, description="time-series models: the points, each a number (one channel) "
                                        "or a list of its channel values; at least one window long")
    windows: Optional[list[Any]] = Field(None, description="time-series models: (B, window, channels) raw values")


class DecodeRequest(_Request):
    latents: Union[list[Any], dict[str, list[Any]]] = Field(
        description="(B, *latent_shape) floats, or for VQ-VAE-2 {top_indices: (B, ht, wt), bottom_indices: (B, hb, wb)}")
    format: Format = "png"


class TextDecodeRequest(_Request):
    """Text-conditioned decoding (a ``<family>-<data>-text`` model). The texts, ``n``, ``seed``, ``mode``
    and ``rerank`` are checked by :func:`runtime.text.parse_text_decode` (a 4xx naming the field)."""

    # The bounds below are runtime.text's, stated here for the schema (json_schema_extra) and enforced by
    # parse_text_decode, so that its messages name the field the way the runtime's own callers see them.
    texts: list[Any] = Field(description=f"prompts: 1 to {MAX_TEXTS} non-blank strings of at most {MAX_TEXT_CHARS} "
                             "characters", json_schema_extra={
                                 "minItems": 1, "maxItems": MAX_TEXTS,
                                 "items": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS, "pattern": r"\S"}})
    n: Any = Field(1, description=f"images per text, 1 to {MAX_TEXT_N}",
                   json_schema_extra={"type": "integer", "minimum": 1, "maximum": MAX_TEXT_N})
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="the same seed gives the same images; "
                                "omitted: the server draws one and returns it")
    temperature: float = Field(1.0, ge=0, le=10, allow_inf_nan=False,
                               description="spread of the latent noise / code sampling; 0 gives the mode")
    mode: Any = Field(None, description="generate (default: new images from the text) or retrieve (the training "
                      "images a code bank scores best, with their row ids); GET /v1/models lists each model's modes",
                      json_schema_extra={"anyOf": [{"enum": list(MODES)}, {"type": "null"}]})
    rerank: Any = Field(None, description=f"generate only: draw k samples per text (n <= k <= {MAX_RERANK}) and "
                        "return the n that the captioner's text/image cosine ranks best; models with rerank in GET /v1/models",
                        json_schema_extra={"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_RERANK}, {"type": "null"}]})
    format: Format = "png"


class Endpoint(_Request):
    """One end of an interpolation: an image or a latent (exactly one)."""

    model_config = exactly_one_of("image", "latent")

    image: Optional[Image] = None
    latent: Optional[list[Any]] = Field(None, description="(*latent_shape) floats")


class InterpolateRequest(_Request):
    a: Endpoint
    b: Endpoint
    steps: int = Field(8, ge=2, description="images on the path, both ends included (at most limits.max_steps)")
    format: Format = "png"


class EditRequest(_Request):
    """An edit by attribute vector: images (or latents) moved towards ``value`` of ``factor``. Which
    factors and values a model takes: ``edit`` in ``GET /v1/models`` (an unknown one is a 422 listing them)."""

    model_config = exactly_one_of("images", "latents")

    images: Optional[list[Image]] = Field(None, description="base64 PNGs (or (C, H, W) arrays in [0, 1]); or give latents")
    latents: Optional[list[Any]] = Field(None, description="(B, *latent_shape) floats instead of images")
    factor: str = Field(description="the factor to change, e.g. shape")
    value: str = Field(description="the value it should show, e.g. square")
    strength: float = Field(1.0, ge=0, le=MAX_EDIT_STRENGTH, allow_inf_nan=False,
                            description="how far along the attribute vector: 0 decodes the image unchanged, 1 the whole "
                                        "difference of the mean latents")
    source: Optional[str] = Field(None, description="the images' current value of the factor when known; omitted: read "
                                  "from each latent (the nearest value's mean)")
    format: Format = "png"


# ----------------------------------------------------------------------------------------------------
# The configured limits: checked by the ingress and stated by /openapi.json, from one Limits

# Request fields that ``limits.*`` bound: (request model, field, limit, status when over it). A number
# is bounded itself (JSON schema ``maximum``); a list by its length (``maxItems``), and an object of
# lists (VQ-VAE-2 code indices) by each list's length.
LIMITED_FIELDS: tuple[tuple[type[BaseModel], str, str, int], ...] = (
    (GenerateRequest, "n", "max_n", 422),
    (InterpolateRequest, "steps", "max_steps", 422),
    (ImagesRequest, "images", "max_images", 422),
    (DecodeRequest, "latents", "max_images", 422),
    (EditRequest, "images", "max_images", 422),
    (EditRequest, "latents", "max_images", 422),
    (AnomalyRequest, "images", "max_images", 422),
    (AnomalyRequest, "windows", "max_images", 422),
    (AnomalyRequest, "series", "max_points", 413),
)


def check_limits(body: BaseModel, limits: Limits) -> None:
    """Raise :class:`serving.codec.BadInput` naming the first field of ``body`` over its limit."""
    for model, field, name, status in LIMITED_FIELDS:
        if not isinstance(body, model) or getattr(body, field) is None:
            continue
        value, limit = getattr(body, field), getattr(limits, name)
        if isinstance(value, int) and value > limit:
            raise BadInput(field, f"{field} = {value} is above the limit of {limit} (limits.{name})", status)
        lengths = [len(v) for v in value.values() if isinstance(v, list)] if isinstance(value, dict) else \
            [len(value)] if isinstance(value, list) else []
        if lengths and max(lengths) > limit:
            raise BadInput(field, f"{max(lengths)} items, the limit is {limit} (limits.{name})", status)


# What this process's ingress serves, for /openapi.json (serving.app.openapi): set by the ingress replica
# at start. A module global for the reason of errors.BODY_LIMIT: Serve ships the FastAPI app and the
# ingress class to the replica as pickled copies, while this module is imported there.
SERVED: dict[str, Any] = {"limits": Limits(), "models": []}


def served_openapi(schema: dict[str, Any], limits: Limits, models: list[str]) -> dict[str, Any]:
    """``schema`` (FastAPI's OpenAPI document, not modified) with ``limits`` written into the request
    bodies (:data:`LIMITED_FIELDS`) and the served model names as the choices of every ``{name}``."""
    schema = _integer_bounds(copy.deepcopy(schema))
    components = schema.get("components", {}).get("schemas", {})
    for model, field, name, _ in LIMITED_FIELDS:
        _bound(components[model.__name__]["properties"][field], getattr(limits, name))
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "name":
                    parameter["schema"]["enum"] = sorted(models)
    return schema


def _integer_bounds(node: Any) -> Any:
    """``node`` with the bounds of its integer schemas as JSON integers (FastAPI's OpenAPI model holds
    them as floats: ``1.0``), so that a client reads an integer bound as one."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for value in node.values():
            _integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _integer_bounds(value)
    return node


def _bound(prop: dict[str, Any], limit: int) -> None:
    """Bound a property's JSON schema (or each branch of its ``anyOf``) by ``limit``."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "integer":
            branch["maximum"] = limit
        elif branch.get("type") == "array":
            branch["maxItems"] = limit
        elif branch.get("type") == "object" and branch.get("additionalProperties", {}).get("type") == "array":
            branch["additionalProperties"]["maxItems"] = limit


# ----------------------------------------------------------------------------------------------------
# Responses (every one names the model version that produced it)


class _Response(BaseModel):
    model: str
    model_version: str


class ImagesResponse(_Response):
    images: list[Any]
    format: Format


class GenerateResponse(ImagesResponse):
    seed: int
    sampler: str = Field(description="the sampler the images were drawn with")


class TextDecodeResponse(_Response):
    images: list[list[Any]] = Field(description="per text, its n images")
    format: Format
    seed: int
    mode: str = Field(description="generate or retrieve: whether the images are new or training images")
    rows: Optional[list[list[int]]] = Field(None, description="retrieve: per text, the train-split row id of each image")


class EncodeResponse(_Response):
    latents: dict[str, list[Any]] = Field(description="the encoder's outputs: mean + logvar, latent, or code indices")


class EditResponse(ImagesResponse):
    factor: str
    value: str
    strength: float
    source: list[str] = Field(description="per image, the value it was translated from (given, or read from its latent)")


class AnomalyResponse(_Response):
    scores: list[float] = Field(description="per image: reconstruction MSE (pixels in [0, 1]); time series: per point "
                                "(series: the mean error of the windows covering it) or per window (windows)")
    threshold: Optional[float] = Field(description="the threshold evaluate chose (null when not recorded)")
    anomalous: Optional[list[bool]] = Field(description="score > threshold (null without a threshold)")


class ErrorBody(BaseModel):
    field: str
    reason: str
    status: int


class ErrorResponse(BaseModel):
    error: ErrorBody
