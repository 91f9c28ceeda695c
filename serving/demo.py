"""The end of ``make demo``: call every endpoint of every served model and save the images it returns.

:func:`run_demo` talks to a running app over HTTP only (it is what a user's client would do): for each
model of ``GET /v1/models`` and each operation it offers, one request on real test images (the
prepared test split) or on latents, the returned images written as PNG grids under ``out_dir``
(``<model>-<operation>.png``; generate also ``<model>-generate-<sampler>.png`` for each sampler
other than the model's default). Returns one line per call, which ``latentforge serve --demo`` prints.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import requests

from latentforge.runtime.grid import make_grid
from latentforge.serving.codec import encode_png


def _save(pngs: list[str], path: Path, scale: int = 4, columns: int = 8) -> Path:
    """base64 PNGs of one size -> one grid, ``columns`` per row, 2 white pixels apart, upscaled ``scale``
    times (nearest: crisp pixels)."""
    from PIL import Image

    tiles = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(p))).convert("RGB")) for p in pngs])
    grid = make_grid(tiles, nrow=columns, pad=2, fill=255)[2:-2, 2:-2]
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), resample=Image.NEAREST).save(path)
    return path


def run_demo(url: str, images: np.ndarray, out_dir: str | Path, timeout: float = 120.0) -> list[str]:
    """Call every endpoint of every model served at ``url``; ``images``: test images (N >= 2, H, W, C)
    uint8 for the operations that take images. Writes PNG grids to ``out_dir``; returns a report line
    per call. Raises ``RuntimeError`` naming the call when one does not answer 200."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = [encode_png(img.transpose(2, 0, 1) / 255.0) for img in images[:8]]
    lines = []
    session = requests.Session()

    def post(name: str, op: str, body: dict) -> dict:
        response = session.post(f"{url}/v1/models/{name}/{op}", json=body, timeout=timeout)
        if response.status_code != 200:
            raise RuntimeError(f"{op} on {name}: {response.status_code} {response.text[:300]}")
        return response.json()

    for model in session.get(f"{url}/v1/models", timeout=timeout).json()["models"]:
        name, can = model["name"], set(model["capabilities"])
        tag = f"{name} v{model['version']}"
        if "generate" in can:
            out = post(name, "generate", {"n": 16, "seed": 0})
            lines.append(f"{tag} generate: 16 images (seed 0, sampler {out['sampler']}) -> "
                         f"{_save(out['images'], out_dir / f'{name}-generate.png')}")
            for sampler in [s for s in model.get("samplers") or [] if s != out["sampler"]]:  # the others, to compare
                other = post(name, "generate", {"n": 16, "seed": 0, "sampler": sampler})
                path = _save(other["images"], out_dir / f"{name}-generate-{sampler}.png")
                lines.append(f"{tag} generate: 16 images (seed 0, sampler {sampler}) -> {path}")
        if "reconstruct" in can:
            out = post(name, "reconstruct", {"images": pngs})
            path = _save(pngs + out["images"], out_dir / f"{name}-reconstruct.png")
            lines.append(f"{tag} reconstruct: {len(pngs)} test images (top row) and their reconstructions -> {path}")
        latents = None
        if "encode" in can:
            latents = post(name, "encode", {"images": pngs})["latents"]
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in latents.items())
            lines.append(f"{tag} encode: {shapes}")
        if "decode" in can:
            if latents is None:  # no encoder: decode draws from the prior N(0, I)
                shape = model["latent"]["shape"]
                feed = np.random.default_rng(0).standard_normal((8, *shape)).round(4).tolist()
            elif "top_indices" in latents:
                feed = {k: v for k, v in latents.items()}
            else:
                feed = latents.get("mean", latents.get("latent"))
            out = post(name, "decode", {"latents": feed})
            lines.append(f"{tag} decode: {len(out['images'])} images -> {_save(out['images'], out_dir / f'{name}-decode.png')}")
        if "interpolate" in can:
            if "encode" in can:
                ends = {"a": {"image": pngs[0]}, "b": {"image": pngs[1]}}
            else:
                rng = np.random.default_rng(1)
                ends = {k: {"latent": rng.standard_normal(model["latent"]["shape"]).round(4).tolist()} for k in "ab"}
            out = post(name, "interpolate", {**ends, "steps": 8})
            lines.append(f"{tag} interpolate: 8 steps -> {_save(out['images'], out_dir / f'{name}-interpolate.png')}")
        if "text-decode" in can:
            prompts = ["a large red circle in the center", "a small blue square in the top left",
                       "a medium green triangle in the bottom right", "a large yellow diamond in the center"]
            out = post(name, "text-decode", {"texts": prompts, "n": 4, "seed": 0})
            path = _save([png for row in out["images"] for png in row], out_dir / f"{name}-text-decode.png", columns=4)
            lines.append(f"{tag} text-decode (generate): {len(prompts)} prompts x 4 images (one row each) -> {path}")
            if model.get("rerank"):  # 16 samples per prompt, the 4 the captioner ranks best
                out = post(name, "text-decode", {"texts": prompts, "n": 4, "seed": 0, "rerank": 16})
                path = _save([png for row in out["images"] for png in row], out_dir / f"{name}-text-rerank.png", columns=4)
                lines.append(f"{tag} text-decode (generate, rerank 16): {len(prompts)} prompts x 4 images -> {path}")
            if "retrieve" in model.get("modes", []):
                out = post(name, "text-decode", {"texts": prompts, "n": 4, "seed": 0, "mode": "retrieve"})
                path = _save([png for row in out["images"] for png in row], out_dir / f"{name}-text-retrieve.png", columns=4)
                lines.append(f"{tag} text-decode (retrieve): training rows {out['rows']} -> {path}")
        if "edit" in can:  # one row per value of the first factor: the test images moved to that value
            factor, values = next(iter(model["edit"]["factors"].items()))
            rows = [post(name, "edit", {"images": pngs, "factor": factor, "value": v})["images"] for v in values]
            path = _save(pngs + [png for row in rows for png in row], out_dir / f"{name}-edit.png", columns=len(pngs))
            lines.append(f"{tag} edit: {len(pngs)} test images (top row), then a row per {factor} ({', '.join(values)}) -> {path}")
        if "anomaly-score" in can:
            out = post(name, "anomaly-score", {"images": pngs})
            scores = ", ".join(f"{s:.4f}" for s in out["scores"])
            lines.append(f"{tag} anomaly-score: [{scores}], threshold {out['threshold']}")
    return lines
