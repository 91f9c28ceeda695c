"""The Serve app over real HTTP: every endpoint against the ONNX sessions called directly, seeds,
versions, bad input, overload and zero-downtime promotion while clients keep calling."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import load_split
from latentforge.serving.codec import encode_png
from latentforge.runtime.images import ModelRuntime, sample_vqvae2_onnx
from tests.pipelines.conftest import REPO
from tests.serving.conftest import MODELS

VAE, VQ, GAN = MODELS["vae"], MODELS["vqvae2"], MODELS["gan"]


@pytest.fixture(scope="module")
def direct(registry):
    """The registered exports opened in-process: label -> ModelRuntime (the reference results)."""
    return {label: ModelRuntime.from_export(path) for label, path in registry["exports"].items()}


@pytest.fixture(scope="module")
def images(registry):
    """Four test images as (4, 3, 16, 16) float32 in [0, 1] and as base64 PNGs."""
    pixels = np.array(load_split(registry["prepared"], "test")["images"][:4])
    arrays = batch_to_tensor(pixels).numpy()
    return arrays, [encode_png(a) for a in arrays]


def post(url: str, name: str, op: str, body) -> requests.Response:
    return requests.post(f"{url}/v1/models/{name}/{op}", json=body, timeout=60)


def ok(response: requests.Response) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["X-Model-Version"] == body["model_version"]  # the header and the field agree
    return body


def png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


# ----------------------------------------------------------------------------------------------------


def test_models_health_and_openapi(server):
    assert requests.get(f"{server}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{server}/readyz", timeout=30).status_code == 200
    models = {m["name"]: m for m in requests.get(f"{server}/v1/models", timeout=30).json()["models"]}
    assert set(models) == set(MODELS.values())
    for m in models.values():
        assert (m["version"], m["alias"]) == ("1", "champion")
        assert m["runtime"]["engine"] == "onnxruntime" and m["runtime"]["torch_imported"] is False
        # intra_op_threads 0 in the config: the replica's reserved CPUs (num_cpus 0 in the tests), at
        # least 1, on every session; ORT's default (a thread per core) reads 0 here.
        assert set(m["runtime"]["intra_op_threads"].values()) == {1}, m["runtime"]
    assert models[VAE]["anomaly_threshold"] == 0.03 and models[VAE]["metrics"]["recon_mse"] == 0.05
    assert models[GAN]["capabilities"] == ["generate", "decode", "interpolate"]
    # Which samplers generate takes: the VAE's fitted mixture (its default) besides the prior.
    assert (models[VAE]["samplers"], models[VAE]["default_sampler"]) == (["prior", "gmm"], "gmm")
    assert (models[GAN]["samplers"], models[GAN]["default_sampler"]) == (["prior"], "prior")
    assert (models[VQ]["samplers"], models[VQ]["default_sampler"]) == (["prior"], "prior")
    assert "interpolate" not in models[VQ]["capabilities"] and "encode" in models[VQ]["capabilities"]
    paths = requests.get(f"{server}/openapi.json", timeout=10).json()["paths"]
    for op in ("generate", "encode", "decode", "reconstruct", "interpolate", "anomaly-score", "edit"):
        assert f"/v1/models/{{name}}/{op}" in paths
    assert requests.get(f"{server}/docs", timeout=10).status_code == 200


def test_serving_code_does_not_import_torch():
    code = ("import sys, latentforge.serving.app, latentforge.runtime.images, latentforge.serving.codec, "
            "latentforge.serving.schemas, latentforge.serving.launch; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.parametrize("label", ["vae-1", "gan-1"])
def test_generate_matches_onnx_and_seed_reproduces(server, direct, label):
    rt, name = direct[label], MODELS[label.split("-")[0]]
    body = ok(post(server, name, "generate", {"n": 3, "seed": 5, "temperature": 0.8, "format": "array"}))
    assert body["seed"] == 5 and body["model_version"] == "1" and body["sampler"] == rt.default_sampler
    expected = np.clip(rt.generate(3, seed=5, temperature=0.8), 0, 1)
    np.testing.assert_allclose(np.array(body["images"]), expected, atol=1e-5)

    first = ok(post(server, name, "generate", {"n": 2, "seed": 11}))
    again = ok(post(server, name, "generate", {"n": 2, "seed": 11}))
    other = ok(post(server, name, "generate", {"n": 2, "seed": 12}))
    assert first["images"] == again["images"] and first["images"] != other["images"]
    assert png(first["images"][0]).shape == (16, 16, 3)
    unseeded = ok(post(server, name, "generate", {"n": 1}))  # the server draws a seed and says which
    replay = ok(post(server, name, "generate", {"n": 1, "seed": unseeded["seed"]}))
    assert replay["images"] == unseeded["images"]


@pytest.mark.parametrize("sampler", ["prior", "gmm"])
def test_generate_with_a_named_sampler(server, direct, sampler):
    rt = direct["vae-1"]
    body = ok(post(server, VAE, "generate", {"n": 3, "seed": 7, "sampler": sampler, "format": "array"}))
    assert body["sampler"] == sampler
    np.testing.assert_allclose(np.array(body["images"]), np.clip(rt.generate(3, seed=7, sampler=sampler), 0, 1), atol=1e-5)
    again = ok(post(server, VAE, "generate", {"n": 3, "seed": 7, "sampler": sampler, "format": "array"}))
    assert again["images"] == body["images"]  # a seed reproduces a draw of either sampler
    other = "gmm" if sampler == "prior" else "prior"
    assert ok(post(server, VAE, "generate", {"n": 3, "seed": 7, "sampler": other, "format": "array"}))["images"] != body["images"]


def test_vqvae2_generates_through_its_prior(server, direct):
    rt = direct["vqvae2-1"]
    body = ok(post(server, VQ, "generate", {"n": 2, "seed": 3, "format": "array"}))
    expected = np.clip(sample_vqvae2_onnx(rt.sessions, rt.manifest, 2, seed=3)["images"], 0, 1)
    np.testing.assert_allclose(np.array(body["images"]), expected, atol=1e-5)
    greedy = ok(post(server, VQ, "generate", {"n": 1, "seed": 1, "top_k": 1}))
    assert greedy["images"] == ok(post(server, VQ, "generate", {"n": 1, "seed": 2, "top_k": 1}))["images"]


def test_encode_decode_reconstruct_anomaly_match_onnx(server, direct, images):
    arrays, pngs = images
    rt = direct["vae-1"]
    encoded = ok(post(server, VAE, "encode", {"images": pngs}))["latents"]
    ref = rt.encode(arrays)
    assert set(encoded) == {"mean", "logvar"}
    for key in ("mean", "logvar"):
        np.testing.assert_allclose(np.array(encoded[key]), ref[key], atol=1e-5)
    # Arrays in give the same latents as PNGs of the same pixels.
    by_array = ok(post(server, VAE, "encode", {"images": arrays.tolist()}))["latents"]
    np.testing.assert_allclose(np.array(by_array["mean"]), ref["mean"], atol=1e-5)

    decoded = ok(post(server, VAE, "decode", {"latents": encoded["mean"], "format": "array"}))
    np.testing.assert_allclose(np.array(decoded["images"]), rt.decode({"latent": ref["mean"]}), atol=1e-5)
    recon = ok(post(server, VAE, "reconstruct", {"images": pngs, "format": "array"}))
    np.testing.assert_allclose(np.array(recon["images"]), rt.reconstruct(arrays), atol=1e-5)
    recon_png = ok(post(server, VAE, "reconstruct", {"images": pngs}))["images"]
    assert len(recon_png) == 4 and png(recon_png[0]).shape == (16, 16, 3)

    scored = ok(post(server, VAE, "anomaly-score", {"images": pngs}))
    np.testing.assert_allclose(scored["scores"], rt.anomaly_scores(arrays), rtol=1e-4)
    assert scored["threshold"] == 0.03 and scored["anomalous"] == [s > 0.03 for s in scored["scores"]]


def test_vqvae2_codes_round_trip(server, direct, images):
    arrays, pngs = images
    rt = direct["vqvae2-1"]
    codes = ok(post(server, VQ, "encode", {"images": pngs}))["latents"]
    ref = rt.encode(arrays)
    assert np.array_equal(codes["top_indices"], ref["top_indices"])
    assert np.array_equal(codes["bottom_indices"], ref["bottom_indices"])
    decoded = ok(post(server, VQ, "decode", {"latents": codes, "format": "array"}))
    np.testing.assert_allclose(np.array(decoded["images"]), rt.decode(ref), atol=1e-5)
    scored = ok(post(server, VQ, "anomaly-score", {"images": pngs}))
    assert scored["threshold"] is None and scored["anomalous"] is None and len(scored["scores"]) == 4


def test_interpolate(server, direct, images):
    arrays, pngs = images
    rt = direct["vae-1"]
    path = ok(post(server, VAE, "interpolate",
                   {"a": {"image": pngs[0]}, "b": {"image": pngs[1]}, "steps": 5, "format": "array"}))["images"]
    mean = rt.encode(arrays[:2])["mean"]
    np.testing.assert_allclose(np.array(path), rt.interpolate(mean[0], mean[1], 5), atol=1e-5)
    # A GAN has no encoder: between latents it works, between images it says why not.
    gan = ok(post(server, GAN, "interpolate", {"a": {"latent": [0.0] * 8}, "b": {"latent": [1.0] * 8}, "steps": 3}))
    assert len(gan["images"]) == 3
    refused = post(server, GAN, "interpolate", {"a": {"image": pngs[0]}, "b": {"latent": [0.0] * 8}})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "a.image"


def _png_b64(size: int, mode: str) -> str:
    buf = io.BytesIO()
    Image.new(mode, (size, size)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _jpeg_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


BAD = [
    # (model, op, body, status, field, words in the reason)
    ("nope", "generate", {"n": 1}, 404, "name", "no model 'nope'"),
    (VAE, "encode", {"images": [_png_b64(8, "RGB")]}, 422, "images[0]", "8x8"),
    (VAE, "encode", {"images": [_png_b64(16, "L")]}, 422, "images[0]", "3-channel"),
    (VAE, "reconstruct", {"images": [_jpeg_b64()]}, 422, "images[0]", "not a PNG"),
    (VAE, "anomaly-score", {"images": ["@@not base64@@"]}, 422, "images[0]", "base64"),
    (VAE, "encode", {"images": [[[[2.0] * 16] * 16] * 3]}, 422, "images[0]", "[0, 1]"),
    (VAE, "decode", {"latents": [[0.0, float("nan"), 0.0, 0.0]]}, 422, "latents", "NaN"),
    (VAE, "decode", {"latents": [[0.0, float("inf"), 0.0, 0.0]]}, 422, "latents", "infinite"),
    (VAE, "decode", {"latents": [[0.0, 0.0, 0.0]]}, 422, "latents", "shape [1, 3], expected [1, 4]"),
    (VQ, "decode", {"latents": {"top_indices": [[[99] * 4] * 4], "bottom_indices": [[[0] * 8] * 8]}}, 422,
     "latents.top_indices", "[0, 16)"),
    (VAE, "generate", {"n": 65}, 422, "n", "limit of 64"),
    (VAE, "generate", {"n": 0}, 422, "n", "greater than or equal"),
    (VAE, "generate", {"temperature": -1}, 422, "temperature", "greater than"),
    (VAE, "generate", {"sampler": "kde"}, 422, "sampler", "'prior' or 'gmm'"),
    (GAN, "generate", {"sampler": "gmm"}, 422, "sampler", "has no sampler 'gmm' (it has: prior)"),
    (VQ, "generate", {"sampler": "gmm"}, 422, "sampler", "has no sampler 'gmm' (it has: prior)"),
    (VAE, "interpolate", {"a": {"latent": [0] * 4}, "b": {"latent": [1] * 4}, "steps": 17}, 422, "steps", "limit of 16"),
    (VAE, "encode", {"images": [_png_b64(16, "RGB")] * 17}, 422, "images", "limit is 16"),
    (VAE, "encode", {"imagez": []}, 422, "images", "required"),
    (VQ, "interpolate", {"a": {"latent": [0]}, "b": {"latent": [0]}}, 422, "name", "cannot interpolate"),
    (GAN, "encode", {"images": [_png_b64(16, "RGB")]}, 422, "name", "cannot encode"),
    (VAE, "edit", {"images": [_png_b64(16, "RGB")], "factor": "texture", "value": "x"}, 422, "factor",
     "unknown factor 'texture'; known: shape, colour, size, hpos, vpos"),
    (VAE, "edit", {"images": [_png_b64(16, "RGB")], "factor": "size", "value": "huge"}, 422, "value",
     "size has no value 'huge'; known: small, medium, large"),
    (VAE, "edit", {"images": [_png_b64(16, "RGB")], "factor": "size", "value": "small", "source": "tiny"}, 422, "source", "known"),
    (VAE, "edit", {"images": [_png_b64(16, "RGB")], "factor": "size", "value": "small", "strength": 3.5}, 422, "strength",
     "less than or equal to 3"),
    (VAE, "edit", {"factor": "size", "value": "small"}, 422, "images", "exactly one of images or latents"),
    (VAE, "edit", {"latents": [[0.0] * 3], "factor": "size", "value": "small"}, 422, "latents", "expected [1, 4]"),
    (GAN, "edit", {"latents": [[0.0] * 4], "factor": "size", "value": "small"}, 422, "name", "cannot edit"),
    (VQ, "edit", {"images": [_png_b64(16, "RGB")], "factor": "size", "value": "small"}, 422, "name", "cannot edit"),
]


@pytest.mark.parametrize("name,op,body,status,field,reason", BAD, ids=[f"{b[1]}-{b[4]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(server, name, op, body, status, field, reason):
    response = requests.post(f"{server}/v1/models/{name}/{op}", data=json.dumps(body),
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field and reason in error["reason"], error


def test_edit_matches_the_runtime_and_models_list_what_it_takes(server, direct, images):
    arrays, pngs = images
    models = {m["name"]: m for m in requests.get(f"{server}/v1/models", timeout=30).json()["models"]}
    edit = models[VAE]["edit"]
    assert edit["factors"]["hpos"] == ["left", "center", "right"] and edit["strength"] == [0.0, 3.0]
    assert (edit["method"], edit["labels_per_value"]) == ("translate", 50)
    assert models[GAN]["edit"] is None and "edit" not in models[VQ]["capabilities"]
    rt = direct["vae-1"]
    body = ok(post(server, VAE, "edit", {"images": pngs, "factor": "hpos", "value": "left", "strength": 1.5, "format": "array"}))
    expected, source = rt.edit(arrays, "hpos", "left", 1.5)
    np.testing.assert_allclose(np.array(body["images"]), expected, atol=1e-5)
    assert body["source"] == source and (body["factor"], body["value"], body["strength"]) == ("hpos", "left", 1.5)
    # From latents, with the source value named: z + (mean of large - mean of small), decoded.
    latents = rt.latent_of(rt.encode(arrays))["latent"]
    body = ok(post(server, VAE, "edit", {"latents": latents.tolist(), "factor": "size", "value": "large", "source": "small",
                                         "format": "array"}))
    means = rt.attributes.means["size"]
    moved = latents + means[edit["factors"]["size"].index("large")] - means[edit["factors"]["size"].index("small")]
    np.testing.assert_allclose(np.array(body["images"]), rt.decode({"latent": moved}), atol=1e-5)
    assert body["source"] == ["small"] * 4


def test_body_size_and_json_errors_and_unknown_routes(server):
    big = requests.post(f"{server}/v1/models/{VAE}/encode", data=b"{" + b" " * 300_000 + b"}",
                        headers={"Content-Type": "application/json"}, timeout=60)
    assert big.status_code == 413 and big.json()["error"]["field"] == "body"
    broken = requests.post(f"{server}/v1/models/{VAE}/generate", data=b"{not json",
                           headers={"Content-Type": "application/json"}, timeout=60)
    assert broken.status_code == 400 and broken.json()["error"]["field"] == "body"
    missing = requests.get(f"{server}/v2/nothing", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "path"
    ok(post(server, VAE, "generate", {"n": 1}))  # and it keeps serving


def test_overload_gives_503_fast_and_recovers(server):
    """64 simultaneous slow requests against a deployment that admits 4 + 4: the rest are refused with
    a JSON 503 at once (before the admitted ones finish), none hangs, and then it serves again."""
    start = threading.Barrier(64)

    def call(_):
        start.wait()
        t0 = time.monotonic()
        r = post(server, VQ, "generate", {"n": 64, "seed": 0})
        return r.status_code, time.monotonic() - t0, r

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(call, range(64)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 4, codes
    refused = [r for c, _, r in results if c == 503]
    assert all(r.json()["error"]["field"] == "name" and "overloaded" in r.json()["error"]["reason"] for r in refused)
    assert min(t for c, t, _ in results if c == 503) < max(t for c, t, _ in results if c == 200)
    ok(post(server, VQ, "generate", {"n": 1, "seed": 0}))


def test_promotion_under_load_drops_nothing(server, registry, direct):
    """8 client threads call generate on vae-shapes while `champion` moves 1 -> 2: every request
    succeeds, each answer is wholly one version's (its images match that version's export), and
    the version switches."""
    from latentforge.pipelines.registry import promote

    expected = {v: np.clip(direct[f"vae-{v}"].generate(1, seed=7), 0, 1) for v in ("1", "2")}
    results, errors, lock = [], [], threading.Lock()
    deadline = time.monotonic() + 180

    def client():
        while time.monotonic() < deadline:
            with lock:
                done = len(results) + len(errors)
                switched = any(v == "2" for v, _ in results)
            if done >= 200 and switched:
                return
            try:
                r = post(server, VAE, "generate", {"n": 1, "seed": 7, "format": "array"})
                body = r.json()
                assert r.status_code == 200 and r.headers["X-Model-Version"] == body["model_version"]
                with lock:
                    results.append((body["model_version"], np.array(body["images"])))
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none may happen
                with lock:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    while len(results) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    promote(VAE, registry["uri"], version=2)
    for t in threads:
        t.join()
    try:
        assert errors == []
        versions = [v for v, _ in results]
        assert len(results) >= 200 and set(versions) == {"1", "2"}
        assert versions[-1] == "2"  # requests that started after the swap run on version 2
        for v, imgs in results:
            np.testing.assert_allclose(imgs, expected[v], atol=1e-5)
    finally:
        promote(VAE, registry["uri"], version=1)  # leave champion where the other tests expect it
        for _ in range(120):
            if ok(post(server, VAE, "generate", {"n": 1}))["model_version"] == "1":
                break
            time.sleep(0.5)


def test_make_demo_calls_every_endpoint_and_saves_images(server, registry):
    """The server fixture runs `make demo`'s command (`latentforge serve --params-store --demo`)."""
    log = registry["root"] / "serve.log"
    for _ in range(240):  # the demo runs once the app is up, then the URL is printed
        if "serving at http://127.0.0.1" in log.read_text():
            break
        time.sleep(0.5)
    text = log.read_text()
    for line in (f"{VAE} v1 {op}" for op in ("generate", "reconstruct", "encode", "decode", "interpolate", "anomaly-score", "edit")):
        assert line in text, line
    assert f"{GAN} v1 interpolate: 8 steps" in text and f"{VQ} v1 decode" in text and f"{GAN} v1 encode" not in text
    demo = registry["root"] / "demo"
    saved = sorted(p.name for p in demo.iterdir())
    assert f"{VAE}-edit.png" in saved and f"{GAN}-edit.png" not in saved
    assert f"{VAE}-reconstruct.png" in saved and f"{VQ}-generate.png" in saved and f"{GAN}-interpolate.png" in saved
    # The VAE generates with its default sampler (gmm), and with the prior beside it for comparison.
    assert f"{VAE} v1 generate: 16 images (seed 0, sampler gmm)" in text and f"{VAE}-generate-prior.png" in saved
    grid = Image.open(demo / f"{VAE}-generate.png")
    assert grid.size == (4 * (8 * 18 - 2), 4 * (2 * 18 - 2))  # 16 images of 16 px, 8 a row, 2 px apart, x4


def test_serve_errors_are_one_line_and_exit_2(tmp_path):
    from latentforge.pipelines.cli import main

    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    (tmp_path / "bad.yaml").write_text("applications: 3\n")
    assert main(["serve", "--config", str(tmp_path / "bad.yaml")]) == 2


def test_session_threads_follow_the_setting_or_else_the_reserved_cpus():
    from latentforge.serving.model_store import session_threads

    assert session_threads(3) == 3
    assert session_threads(0) == 1  # outside a Ray worker nothing is reserved: one thread
