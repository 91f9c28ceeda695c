"""Request and response bodies of the HTTP API (``/v1``), the app's configuration and its limits.

The pydantic models are what ``/openapi.json`` documents. Shapes and limits that depend on the model
or the configuration (image size, latent shape, ``n`` up to ``limits.max_n``) are checked when a
request runs, with a 4xx naming the field (:class:`serving.codec.BadInput`).
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from latentforge.runtime.images import MAX_EDIT_STRENGTH
from latentforge.runtime.store import absolute_uri

# An image in a request: a base64 PNG string (a data: URL is accepted too) or a (C, H, W) array in [0, 1].
Image = Union[str, list[list[list[float]]]]
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
    ONNX Runtime threads per session (0: one per core).
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


class GenerateRequest(_Request):
    n: int = Field(1, ge=1, description="images to draw (at most limits.max_n)")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="the same seed gives the same images; "
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

    texts: list[Any] = Field(description="prompts: 1 to 16 non-blank strings of at most 256 characters")
    n: Any = Field(1, description="images per text, 1 to 16")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1, description="the same seed gives the same images; "
                                "omitted: the server draws one and returns it")
    temperature: float = Field(1.0, ge=0, le=10, allow_inf_nan=False,
                               description="spread of the latent noise / code sampling; 0 gives the mode")
    mode: Any = Field(None, description="generate (default: new images from the text) or retrieve (the training "
                      "images a code bank scores best, with their row ids); GET /v1/models lists each model's modes")
    rerank: Any = Field(None, description="generate only: draw k samples per text (n <= k <= limits.max_rerank) and "
                        "return the n that the captioner's text/image cosine ranks best; models with rerank in GET /v1/models")
    format: Format = "png"


class Endpoint(_Request):
    """One end of an interpolation: an image or a latent (exactly one)."""

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
