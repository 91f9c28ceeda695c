"""Attribute vectors on tiny data: computed from labelled train images at export, stored with it, and an
edit through the torch-free runtime that the tiny attribute classifier reads as changed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.models import MODELS, train_step
from latentforge.pipelines.attributes import edit_settings, encode_points, factor_columns, labelled_rows
from latentforge.pipelines.classifier import read_images, train_classifier
from latentforge.pipelines.cli import main
from latentforge.pipelines.common.errors import ParamsError
from latentforge.pipelines.export import export_model
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.onnx_graphs import torch_threads
from latentforge.pipelines.prepare import load_split, read_manifest
from latentforge.runtime.images import ATTRIBUTES_FILE, EditRequestError, ModelRuntime
from latentforge.serving.codec import encode_png
from tests.pipelines.conftest import tiny_section

TRAIN_STEPS = 1500  # ~4 s: enough for the tiny VAE to place shapes (hpos, vpos) where they are


@pytest.fixture(scope="module")
def edited(project, tmp_path_factory):
    """A tiny VAE trained on the project's 16 px shapes, exported with its attribute vectors, and a tiny
    factor classifier: (prepared dir, manifest, model, export dir, classifier)."""
    root, params = project
    prepared = root / "data" / "prepared" / params["data"]["name"]
    manifest = read_manifest(prepared)
    train = load_split(prepared, "train")
    x = batch_to_tensor(np.array(train["images"]))
    torch.manual_seed(0)
    config = {**tiny_section("vae"), "image_size": 16, "channels": 3, "latent_dim": 8, "likelihood": "gaussian", "decoder_std": 0.1}
    model = MODELS["vae"](MODELS["vae"].config_class.from_dict(config))
    optimizers = model.configure_optimizers()
    heads = {f"factor_{f}": len(manifest["factor_values"][f]) for f in manifest["factor_names"]}
    targets = {f"factor_{f}": np.array(train["factors"][:, j]) for j, f in enumerate(manifest["factor_names"])}
    with torch_threads(1):  # batches of 32 tiny images: a thread pool only adds barriers, worse on a busy machine
        for step in range(TRAIN_STEPS):
            rows = torch.randint(0, len(x), (32,))
            train_step(model, optimizers, {"image": x[rows], "label": torch.zeros(32, dtype=torch.int64), "index": rows}, step)
        classifier = train_classifier(np.array(train["images"]), targets, heads, epochs=40, batch_size=32, widths=(8, 16),
                                      feature_dim=32)
    model.eval()
    out = tmp_path_factory.mktemp("attributes")
    model_dir = model.save_pretrained(out / "model")
    export_dir = out / "export"
    export_model(model_dir, prepared, export_dir, edit={"labels_per_value": 20})
    return prepared, manifest, model, export_dir, classifier


def test_export_stores_the_mean_latents_of_labelled_train_images(edited):
    prepared, manifest, model, export_dir, _ = edited
    entry = json.loads((export_dir / "manifest.json").read_text())["attributes"]
    assert entry["file"] == ATTRIBUTES_FILE and entry["labels_per_value"] == 20 and entry["method"] == "translate"
    assert list(entry["values"]) == manifest["factor_names"]
    assert all(1 <= c <= 20 for counts in entry["counts"].values() for c in counts)
    # The stored mean of hpos=left is the mean posterior mean of the 20 seeded train images showing it.
    train = load_split(prepared, "train")
    names, column = factor_columns(train, manifest)["hpos"]
    rows = labelled_rows(column, len(names), 20, seed=0)[names.index("left")]
    assert len(rows) == 20 and (column[rows] == names.index("left")).all()
    expected = encode_points(model, np.array(train["images"][rows])).mean(0)
    with np.load(export_dir / ATTRIBUTES_FILE) as means:
        assert means["hpos"].shape == (3, 8)
        np.testing.assert_allclose(means["hpos"][entry["values"]["hpos"].index("left")], expected, atol=1e-5)


def test_an_edit_reads_as_changed_and_strength_zero_changes_nothing(edited):
    prepared, manifest, _, export_dir, classifier = edited
    rt = ModelRuntime.from_export(export_dir)
    assert "edit" in rt.capabilities and rt.describe()["edit"]["factors"]["hpos"] == ["left", "center", "right"]
    test = load_split(prepared, "test")
    images = batch_to_tensor(np.array(test["images"])).numpy()
    column = test["factors"][:, manifest["factor_names"].index("hpos")]
    read = lambda x: read_images(classifier, torch.from_numpy(x))[1]["factor_hpos"].argmax(1)  # noqa: E731
    for target, name in enumerate(["left", "center", "right"]):
        others = column != target
        out, source = rt.edit(images[others], "hpos", name, strength=1.0)
        before = (read(rt.reconstruct(images[others])) == target).mean()
        after = (read(out) == target).mean()
        assert after >= 0.5 and before <= 0.2, (name, before, after)
        assert set(source) <= {"left", "center", "right"}
    unchanged, _ = rt.edit(images[:4], "shape", "square", strength=0.0)
    np.testing.assert_allclose(unchanged, rt.reconstruct(images[:4]), atol=1e-6)


@pytest.mark.parametrize("args,field,words", [
    (("size", "huge", 1.0), "value", "known: small, medium, large"),
    (("texture", "smooth", 1.0), "factor", "known: shape, colour, size, hpos, vpos"),
    (("size", "small", 3.5), "strength", "out of range [0, 3]"),
    (("size", "small", -0.1), "strength", "out of range"),
])
def test_a_bad_edit_names_the_field(edited, args, field, words):
    rt = ModelRuntime.from_export(edited[3])
    with pytest.raises(EditRequestError) as err:
        rt.edit(np.zeros((1, 3, 16, 16), np.float32), *args)
    assert err.value.field == field and words in err.value.reason


def test_cli_edit_writes_a_png_or_one_clear_error(edited, tmp_path, capsys):
    prepared, _, _, export_dir, _ = edited
    image = tmp_path / "in.png"
    Image.fromarray(np.array(load_split(prepared, "test")["images"][0])).save(image)
    out = tmp_path / "out" / "edited.png"
    base = ["edit", "--export-dir", str(export_dir), "--image", str(image), "--out", str(out)]
    assert main([*base, "--factor", "colour", "--value", "purple"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "value: colour has no value 'purple'; known: red" in err
    assert main([*base, "--factor", "colour", "--value", "red", "--strength", "9"]) == 2
    assert "strength" in capsys.readouterr().err and not out.exists()  # nothing written
    assert main([*base, "--factor", "colour", "--value", "red", "--source", "blue"]) == 0
    assert Image.open(out).size == (16, 16) and "colour blue -> red" in capsys.readouterr().out
    assert not list(out.parent.glob(".*"))  # no temp file left behind


def test_labelled_rows_are_nested_and_the_params_are_checked():
    column = np.random.default_rng(0).integers(-1, 3, size=400)
    few, many = labelled_rows(column, 3, 5, seed=1), labelled_rows(column, 3, 50, seed=1)
    for v in range(3):
        assert len(few[v]) == 5 and (many[v][:5] == few[v]).all() and (column[many[v]] == v).all()
    # A labelled data set without factors edits its classes, under the factor "label".
    split = {"labels": np.array([0, 1, -1, 1]), "factors": np.zeros((4, 0), np.int64)}
    columns = factor_columns(split, {"factor_names": [], "class_names": ["even", "odd"]})
    assert list(columns) == ["label"] and columns["label"][0] == ["even", "odd"]
    assert factor_columns(split, {"factor_names": [], "class_names": []}) == {}
    assert edit_settings({})["labels_per_value"] == 50
    for bad, words in (({"labels_per_value": 0}, "labels_per_value"), ({"method": "rotate"}, "method"),
                       ({"eval_labels": [5, 0]}, "eval_labels"), ({"eval_strength": 4}, "eval_strength"),
                       ({"strength": 1}, "unknown key")):
        with pytest.raises(ParamsError, match=words):
            edit_settings({"edit": bad})
