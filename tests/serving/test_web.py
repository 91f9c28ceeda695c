"""The page at ``GET /`` in headless Chromium (Debian's package, driven by Playwright): it lists the
served models, generates a grid, reconstructs an uploaded PNG, interpolates between two and shows a
strip of edits; the test keeps a screenshot."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest

from latentforge.pipelines.prepare import load_split
from latentforge.serving.codec import encode_png

CHROMIUM = "/usr/bin/chromium"
# No network, no GPU, no first-run or background traffic: nothing is fetched while the test runs.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


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


def _png_files(registry, tmp_path: Path) -> list[Path]:
    pixels = np.array(load_split(registry["prepared"], "test")["images"][:2]).transpose(0, 3, 1, 2) / 255.0
    paths = []
    for i, image in enumerate(pixels):
        paths.append(tmp_path / f"upload-{i}.png")
        paths[-1].write_bytes(base64.b64decode(encode_png(image)))
    return paths


def test_page_generates_reconstructs_interpolates_and_edits(server, registry, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server}/")
    page.wait_for_selector("#model option[value='vae-shapes']", state="attached", timeout=30_000)
    page.select_option("#model", "vae-shapes")
    assert "version 1" in page.inner_text("#info")

    # The model's samplers, its default (the fitted mixture) selected.
    assert page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)") == ["prior", "gmm"]
    assert page.input_value("#sampler") == "gmm"
    page.fill("#n", "9")
    page.fill("#seed", "4")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#generated img').length === 9", timeout=60_000)
    # Every image decoded in the browser: a real PNG of the model's size.
    widths = page.eval_on_selector_all("#generated img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
    assert widths == [16] * 9
    assert "generate: vae-shapes version 1" in page.inner_text("#status")

    first, second = _png_files(registry, tmp_path)
    page.set_input_files("#upload", str(first))
    page.click("#reconstruct")
    page.wait_for_function("document.querySelectorAll('#reconstructed img').length === 2", timeout=60_000)

    page.set_input_files("#upload-a", str(first))
    page.set_input_files("#upload-b", str(second))
    page.fill("#steps", "5")
    page.click("#interpolate")
    page.wait_for_function("document.querySelectorAll('#interpolated img').length === 5", timeout=60_000)

    # A strip of edits: the uploaded image, then its edit to each value of the chosen factor.
    page.set_input_files("#upload-edit", str(first))
    page.select_option("#edit-factor", "hpos")
    page.click("#edit")
    page.wait_for_function("document.querySelectorAll('#edited img').length === 4", timeout=60_000)
    titles = page.eval_on_selector_all("#edited img", "imgs => imgs.map(i => i.complete && i.naturalWidth && i.title)")
    assert titles == ["input", "hpos: left", "hpos: center", "hpos: right"]

    # A model without an encoder hides what it cannot do; the text box waits for a text-decode model.
    page.select_option("#model", "gan-shapes")
    assert page.is_hidden("#reconstruct-box") and page.is_visible("#generate-box") and page.is_hidden("#text-box")
    assert page.is_hidden("#edit-box")
    assert page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)") == ["prior"]

    page.select_option("#model", "vae-shapes")
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 5_000
    keep = Path(__file__).resolve().parents[2] / "tests" / "serving" / "screenshots"
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / "page.png")  # git-ignored; a look at what the test saw
    assert errors == []
