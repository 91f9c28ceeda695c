"""The page at ``GET /`` in headless Chromium (Debian's package, driven by Playwright): for every model
the fixtures serve it shows the model card (the figures ``GET /v1/models`` lists, the sample grids the
version carries), generates a grid drawn large, and for the models with an encoder reconstructs and
interpolates PNGs dropped on its drop zones (a real ``drop`` event with a DataTransfer); a failed
request shows the API's message. One screenshot per model kind is kept under ``$ARTIFACTS/web`` (or the
test's tmp folder), its path printed."""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import requests

from latentforge.pipelines.prepare import load_split
from latentforge.serving.codec import encode_png
from tests.serving.conftest import MODELS
from tests.serving.test_text_decode import TEXT, text_model, text_server, vq_text_model  # noqa: F401 (fixtures)

CHROMIUM = "/usr/bin/chromium"
# No network, no GPU, no first-run or background traffic: nothing is fetched while the test runs.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ZOOM_MIN = 4  # the page draws images at least 4x their size
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the screenshots go: ``$ARTIFACTS/web`` when ARTIFACTS is set, else the tests' tmp folder."""
    folder = Path(os.environ["ARTIFACTS"]) / "web" if os.environ.get("ARTIFACTS") else tmp_path_factory.mktemp("web")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser):
    """A fresh page; the test fails on any uncaught script error in it."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert errors == []


def _open(page, server: str, model: str) -> None:
    page.goto(f"{server}/")
    page.wait_for_selector(f"#model option[value='{model}']", state="attached", timeout=30_000)
    page.select_option("#model", model)


def _png_files(registry, tmp_path: Path) -> list[Path]:
    pixels = np.array(load_split(registry["prepared"], "test")["images"][:2]).transpose(0, 3, 1, 2) / 255.0
    paths = []
    for i, image in enumerate(pixels):
        paths.append(tmp_path / f"upload-{i}.png")
        paths[-1].write_bytes(base64.b64decode(encode_png(image)))
    return paths


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), data[:16]
    return struct.unpack(">II", data[16:24])


def _drop(page, selector: str, path: Path, mime: str = "image/png") -> None:
    """Drop the file at ``path`` on ``selector``: a real drop event carrying a DataTransfer with the file."""
    data = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([data, name, mime]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: mime}));
            return transfer;
        }""", [data, path.name, mime])
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def _drawn_sizes(page, selector: str) -> list[dict]:
    """Each image under ``selector``: its natural width and the width it is drawn at, once decoded."""
    return page.eval_on_selector_all(selector, "imgs => imgs.map(i => ({loaded: i.complete && i.naturalWidth > 0, "
                                               "natural: i.naturalWidth, drawn: i.getBoundingClientRect().width}))")


def _assert_drawn_large(page, selector: str, count: int, width: int) -> None:
    page.wait_for_function(f"[...document.querySelectorAll('{selector}')].filter(i => i.complete && i.naturalWidth"
                           f" && getComputedStyle(i).getPropertyValue('--w')).length === {count}", timeout=WAIT_MS)
    sizes = _drawn_sizes(page, selector)
    assert [s["natural"] for s in sizes] == [width] * count, sizes
    assert all(s["drawn"] >= ZOOM_MIN * width for s in sizes), sizes


def _assert_card_matches(page, info: dict) -> None:
    """The card shows the family, version and alias and every numeric figure of ``info`` (GET /v1/models)."""
    assert page.inner_text("#card-family") == info["family"]
    assert page.inner_text("#card-version") == info["version"]
    assert page.inner_text("#card-alias") == (info["alias"] or "(pinned version)")
    rows = page.eval_on_selector_all("#card-metrics tr", "rs => rs.map(r => [r.dataset.metric, r.dataset.value, "
                                                         "r.cells[1].textContent])")
    numeric = {k: v for k, v in info["metrics"].items() if isinstance(v, (int, float))}
    assert {k: float(v) for k, v, _ in rows} == numeric
    for key, _, shown in rows:
        assert float(shown) == pytest.approx(numeric[key], rel=1e-3), (key, shown)
    assert page.is_visible("#card-no-metrics") == (not numeric)


def _shoot(page, folder: Path, name: str) -> Path:
    shot = folder / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert _png_size(shot.read_bytes())[0] >= 1000 and shot.stat().st_size > 5_000
    print(f"screenshot: {shot}")
    return shot


def test_vae_card_generate_drop_reconstruct_interpolate_edit(server, registry, page, screenshots, tmp_path):
    listed = {m["name"]: m for m in requests.get(f"{server}/v1/models", timeout=30).json()["models"]}
    vae = listed[MODELS["vae"]]
    _open(page, server, MODELS["vae"])
    assert "version 1" in page.inner_text("#info")

    # The card: figures as the API lists them, and the evaluation's sample grid the version carries.
    _assert_card_matches(page, vae)
    assert vae["sample_grids"] == ["samples.png"]
    grid = requests.get(f"{server}/v1/models/{MODELS['vae']}/sample-grids/samples.png", timeout=30)
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    page.wait_for_function("document.querySelector('#card-grids img').naturalWidth > 0", timeout=WAIT_MS)
    assert page.eval_on_selector("#card-grids img", "i => [i.naturalWidth, i.naturalHeight]") == list(_png_size(grid.content))

    # Generate: the model's samplers with its default (the fitted mixture) selected; n, seed, temperature.
    assert page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)") == ["prior", "gmm"]
    assert page.input_value("#sampler") == "gmm"
    assert page.is_visible("#temperature") and page.is_hidden("#top-k")
    page.fill("#n", "9")
    page.fill("#seed", "4")
    page.fill("#temperature", "0.8")
    page.click("#generate")
    _assert_drawn_large(page, "#generated img", 9, 16)
    assert "generate: vae-shapes version 1" in page.inner_text("#status")
    # The page's images are the API's for the same request.
    direct = requests.post(f"{server}/v1/models/{MODELS['vae']}/generate",
                           json={"n": 9, "seed": 4, "temperature": 0.8, "sampler": "gmm"}, timeout=60).json()
    shown = page.eval_on_selector_all("#generated img", "imgs => imgs.map(i => i.src.split(',')[1])")
    assert shown == direct["images"]

    # Reconstruct a PNG dropped on the zone: the input, then its reconstruction, both drawn large.
    first, second = _png_files(registry, tmp_path)
    _drop(page, "#drop-reconstruct", first)
    page.wait_for_selector("#drop-reconstruct .previews img")
    page.click("#reconstruct")
    _assert_drawn_large(page, "#reconstructed img", 2, 16)
    assert page.eval_on_selector_all("#reconstructed img", "imgs => imgs.map(i => i.title)") == ["input 1", "reconstruction 1"]

    # Interpolate between two dropped PNGs.
    _drop(page, "#drop-a", first)
    _drop(page, "#drop-b", second)
    page.fill("#steps", "5")
    page.click("#interpolate")
    _assert_drawn_large(page, "#interpolated img", 5, 16)

    # The file input stays as the fallback: an edit strip from a chosen file.
    page.set_input_files("#upload-edit", str(first))
    page.select_option("#edit-factor", "hpos")
    page.click("#edit")
    page.wait_for_function("document.querySelectorAll('#edited img').length === 4", timeout=WAIT_MS)
    titles = page.eval_on_selector_all("#edited img", "imgs => imgs.map(i => i.complete && i.naturalWidth && i.title)")
    assert titles == ["input", "hpos: left", "hpos: center", "hpos: right"]
    _shoot(page, screenshots, "vae")


def test_request_errors_show_the_apis_message(server, page, tmp_path):
    _open(page, server, MODELS["vae"])
    # n above the served limit (64): the API's 422 and its reason, in the section and the status line.
    page.fill("#n", "65")
    page.click("#generate")
    message = page.wait_for_selector("#generate-box .error:not(:empty)", timeout=WAIT_MS).inner_text()
    assert message.startswith("generate failed: n: n = 65 is above the limit of 64") and "HTTP 422" in message, message
    assert page.inner_text("#status") == message

    # A file that is not a PNG is refused where it was dropped; nothing is sent.
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    _drop(page, "#drop-reconstruct", text, mime="text/plain")
    assert page.inner_text("#reconstruct-box .error") == "not a PNG file: notes.txt (text/plain)"
    page.click("#reconstruct")
    assert "drop a PNG file on the zone or choose one first" in page.inner_text("#reconstruct-box .error")
    # A PNG of the wrong size: the API names the field and the size it expects.
    big = tmp_path / "big.png"
    big.write_bytes(base64.b64decode(encode_png(np.zeros((3, 20, 20)))))
    _drop(page, "#drop-reconstruct", big)
    page.click("#reconstruct")
    message = page.wait_for_selector("#reconstruct-box .error:not(:empty)", timeout=WAIT_MS).inner_text()
    assert message.startswith("reconstruct failed: images") and "HTTP 4" in message, message


@pytest.mark.parametrize("family", ["vqvae2", "gan"])
def test_each_family_card_and_generate(server, page, screenshots, family):
    name = MODELS[family]
    info = next(m for m in requests.get(f"{server}/v1/models", timeout=30).json()["models"] if m["name"] == name)
    _open(page, server, name)
    _assert_card_matches(page, info)
    assert page.is_visible("#card-no-grids")  # these versions carry no sample grid
    # What the model cannot do is hidden; top_k only for VQ-VAE-2's prior over codes.
    assert page.is_hidden("#reconstruct-box") == ("reconstruct" not in info["capabilities"])
    # Interpolating between images needs an encoder (a GAN decodes latents only: the box is hidden).
    assert page.is_hidden("#interpolate-box") == (not {"interpolate", "encode"} <= set(info["capabilities"]))
    assert page.is_hidden("#edit-box") and page.is_hidden("#text-box")
    assert page.is_visible("#top-k") == (family == "vqvae2")
    assert page.is_hidden("#sampler-label")  # one sampler: nothing to choose
    page.fill("#n", "4")
    page.fill("#seed", "7")
    page.fill("#temperature", "0.9")
    if family == "vqvae2":
        page.fill("#top-k", "8")
    page.click("#generate")
    _assert_drawn_large(page, "#generated img", 4, 16)
    # "Next seed" draws again from seed + 1.
    page.click("#next-seed")
    page.wait_for_function("document.querySelector('#generated img').title.startsWith('seed 8')", timeout=WAIT_MS)
    assert page.input_value("#seed") == "8"
    _shoot(page, screenshots, family)


def test_text_decode_model(text_server, page, screenshots):
    info = next(m for m in requests.get(f"{text_server}/v1/models", timeout=30).json()["models"] if m["name"] == TEXT)
    _open(page, text_server, TEXT)
    _assert_card_matches(page, info)
    assert page.is_visible("#text-box") and page.is_hidden("#generate-box")
    page.fill("#prompt", "a small red circle in the top left")
    page.fill("#text-n", "3")
    page.fill("#text-seed", "5")
    page.fill("#text-temperature", "0.5")
    page.press("#prompt", "Enter")
    _assert_drawn_large(page, "#text-decoded img", 3, 16)
    assert page.inner_text("#text-rows") == "generated, seed 5"
    _shoot(page, screenshots, "text")
