"""What each endpoint computes on one model version: numpy over graph calls that the replica batches.

Every operation is ``async op(rt, p, run, draw) -> body``: ``rt`` the version the request runs on,
``p`` its validated request body (plus ``max_images``), ``run(graph, feeds)`` a graph call on ``rt``
through the replica's batch, ``draw(n, seed, temperature, top_k)`` a VQ-VAE-2 draw on ``rt`` through
the batch. The body is the response without ``model``/``model_version``. A bad request raises
:class:`serving.codec.BadInput` naming the field. :data:`OPERATIONS` maps the names of
:data:`runtime.images.CAPABILITIES` (and ``text-decode``) to them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import numpy as np

from latentforge.runtime.images import EditRequestError, ModelRuntime
from latentforge.runtime.series import SeriesRuntime, check_series, errors_to_points, scale, sliding_windows
from latentforge.runtime.text import TextRequestError
from latentforge.serving import codec
from latentforge.serving.codec import BadInput

# A graph call of one request, batched with the others': (graph, feeds) -> every output by name.
Run = Callable[[str, dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]
# A VQ-VAE-2 draw of one request, batched: (n, seed, temperature, top_k) -> images (n, C, H, W) in [0, 1].
Draw = Callable[[int, int, float, Any], Awaitable[np.ndarray]]


async def generate(rt: ModelRuntime, p: dict, run: Run, draw: Draw) -> dict:
    """``n`` new images from ``seed`` (the same seed and sampler, the same images): the graph of the
    request's ``sampler`` (default: the model's) on noise drawn from the seed, or VQ-VAE-2's prior."""
    n, seed, temperature = p["n"], p["seed"], p["temperature"]
    try:
        sampler = rt.check_sampler(p.get("sampler"))
    except ValueError as exc:
        raise BadInput("sampler", str(exc), status=422) from None
    if rt.manifest["sampling"]["kind"] == "prior":
        images = await draw(n, seed, temperature, p.get("top_k"))
    else:
        graph, feeds = rt.sampler_feeds(sampler, n, np.random.default_rng(seed), temperature)
        images = np.clip((await run(graph, feeds))["images"], 0.0, 1.0)
    return {"seed": seed, "sampler": sampler, "format": p["format"], "images": codec.encode_images(images, p["format"])}


async def text_decode(rt, p: dict, run: Run, draw: Draw) -> dict:
    """Images for texts (``rt``: a :class:`runtime.text.TextDecoder`); per text its ``n`` images, generated
    or (``mode`` retrieve) training images with their train-split ``rows``."""
    body = {k: p[k] for k in ("texts", "n", "seed", "temperature", "mode", "rerank") if p.get(k) is not None}
    try:
        out = await asyncio.to_thread(rt.text_decode, body)
    except TextRequestError as exc:
        raise BadInput(exc.field, exc.reason) from None
    images = np.clip(out["images"], 0.0, 1.0)
    rows = out["rows"].tolist() if "rows" in out else None
    return {"seed": out["seed"], "mode": out["mode"], "rows": rows, "format": p["format"],
            "images": [codec.encode_images(im, p["format"]) for im in images]}


async def encode(rt: ModelRuntime, p: dict, run: Run, draw: Draw) -> dict:
    """The encoder's outputs for the request's images (mean + logvar, latent, or code indices)."""
    images = codec.decode_images(p["images"], "images", rt.image_shape, p["max_images"])
    encoded = await run("encoder", {"images": images})
    return {"latents": {k: v.tolist() for k, v in encoded.items()}}


async def decode(rt: ModelRuntime, p: dict, run: Run, draw: Draw) -> dict:
    """Images from the request's latents (or VQ-VAE-2 code indices)."""
    feeds = decoder_feeds(rt, p["latents"], p["max_images"])
    images = np.clip((await run("decoder", feeds))["images"], 0.0, 1.0)
    return {"format": p["format"], "images": codec.encode_images(images, p["format"])}


async def reconstruct(rt: ModelRuntime, p: dict, run: Run, draw: Draw) -> dict:
    """decode(encode(images)); a VAE decodes its posterior mean."""
    images = codec.decode_images(p["images"], "images", rt.image_shape, p["max_images"])
    encoded = await run("encoder", {"images": images})
    recon = np.clip((await run("decoder", rt.latent_of(encoded)))["images"], 0.0, 1.0)
    return {"format": p["format"], "images": codec.encode_images(recon, p["format"])}


async def anomaly_score(rt: ModelRuntime | SeriesRuntime, p: dict, run: Run, draw: Draw) -> dict:
    """Per-image reconstruction MSE, and whether it is above the export's ``anomaly_threshold``; for a
    time-series model, per-point (``series``) or per-window (``windows``) scores (:func:`series_scores`)."""
    if isinstance(rt, SeriesRuntime):
        return await series_scores(rt, p, run)
    if p.get("images") is None:
        raise BadInput("images", f"{rt.name} scores images: give images")
    images = codec.decode_images(p["images"], "images", rt.image_shape, p["max_images"])
    recon = np.clip((await run("decoder", rt.latent_of(await run("encoder", {"images": images}))))["images"], 0, 1)
    scores = np.square(images.astype(np.float64) - recon).reshape(len(images), -1).mean(1)
    threshold = rt.anomaly_threshold
    return {"scores": scores.tolist(), "threshold": threshold,
            "anomalous": None if threshold is None else [bool(s > threshold) for s in scores]}


SERIES_CHUNK = 512  # windows per batched graph call of one series request


async def series_scores(rt: SeriesRuntime, p: dict, run: Run) -> dict:
    """A time-series model's scores: ``series`` (n points, raw) -> one score per point, the mean
    reconstruction error of the windows covering it; ``windows`` (B, T, F) raw -> one per window."""
    field = "series" if p.get("series") is not None else "windows"
    if p.get(field) is None:
        raise BadInput("series", f"{rt.name} scores time series: give series (points) or windows")
    try:
        if field == "windows":
            windows = rt.scaled_windows(p["windows"])
            if len(windows) > p["max_images"]:
                raise ValueError(f"{len(windows)} windows, the limit is {p['max_images']}")
        else:
            values = scale(check_series(p["series"], rt.channels, rt.window), rt.normalisation)
            windows = sliding_windows(values, rt.window)
    except ValueError as exc:
        raise BadInput(field, str(exc)) from None
    errors = []
    for i in range(0, len(windows), SERIES_CHUNK):
        x = np.ascontiguousarray(windows[i : i + SERIES_CHUNK], dtype=np.float32)
        errors.append(((await run("reconstruct", {"windows": x}))["reconstruction"].astype(np.float64) - x) ** 2)
    error = np.concatenate(errors)
    scores = error.reshape(len(error), -1).mean(1) if field == "windows" else errors_to_points(error.mean(2), len(values))
    return {"scores": scores.tolist(), "threshold": rt.threshold, "anomalous": (scores > rt.threshold).tolist()}


async def interpolate(rt: ModelRuntime, p: dict, run: Run, draw: Draw) -> dict:
    """``steps`` images decoded along the straight line between ends ``a`` and ``b`` (each an image,
    encoded first, or a latent), both ends included."""
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
                raise BadInput(f"{key}.image", f"{rt.name} has no encoder: give a latent")
            ends.append(rt.latent_of(await run("encoder", {"images": image}))["latent"][0])
    t = np.linspace(0.0, 1.0, p["steps"], dtype=np.float32).reshape(-1, *([1] * len(rt.latent_shape)))
    path = ((1 - t) * ends[0][None] + t * ends[1][None]).astype(np.float32)
    images = np.clip((await run("decoder", {"latent": path}))["images"], 0.0, 1.0)
    return {"format": p["format"], "images": codec.encode_images(images, p["format"])}


async def edit(rt: ModelRuntime, p: dict, run: Run, draw: Draw) -> dict:
    """The request's images (encoded first) or latents moved ``strength`` along the attribute vector
    towards ``value`` of ``factor``, decoded; with each one's source value (given, or read from its latent)."""
    if (p.get("images") is None) == (p.get("latents") is None):
        raise BadInput("images", "give exactly one of images or latents")
    if p.get("images") is not None:
        images = codec.decode_images(p["images"], "images", rt.image_shape, p["max_images"])
        latents = rt.latent_of(await run("encoder", {"images": images}))["latent"]
    else:
        latents = decoder_feeds(rt, p["latents"], p["max_images"])["latent"]
    try:
        edited, rows = rt.attributes.shift(p["factor"], p["value"], latents, p["strength"], p.get("source"))
    except EditRequestError as exc:
        raise BadInput(exc.field, exc.reason) from None
    images = np.clip((await run("decoder", {"latent": edited}))["images"], 0.0, 1.0)
    names = rt.attributes.values[p["factor"]]
    return {"factor": p["factor"], "value": p["value"], "strength": p["strength"], "source": [names[r] for r in rows],
            "format": p["format"], "images": codec.encode_images(images, p["format"])}


def decoder_feeds(rt: ModelRuntime, latents: Any, limit: int) -> dict[str, np.ndarray]:
    """A decode request's ``latents`` -> the decoder's inputs, each checked for shape and values:
    ``latent`` (B, *latent_shape) float32, or VQ-VAE-2's ``top_indices``/``bottom_indices`` (B, h, w) int64."""
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


# Operation name (as the routes and CAPABILITIES spell it) -> what computes it.
OPERATIONS: dict[str, Callable[[Any, dict, Run, Draw], Awaitable[dict]]] = {
    "generate": generate,
    "encode": encode,
    "decode": decode,
    "reconstruct": reconstruct,
    "interpolate": interpolate,
    "anomaly-score": anomaly_score,
    "edit": edit,
    "text-decode": text_decode,
}
