"""The export stage: every family to ONNX with real ONNX Runtime sessions, parity against PyTorch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from latentforge.models import MODELS, PretrainedModel, train_step
from latentforge.pipelines import onnx_graphs
from latentforge.pipelines.cli import main
from latentforge.models.priors import pick_tokens
from latentforge.models.samplers import GaussianMixtureConfig, GaussianMixtureSampler, fit_latent_sampler
from latentforge.runtime.images import ModelRuntime
from latentforge.pipelines.export import ExportError, export_model, load_sessions, pick_tokens_np, sample_vqvae2_onnx
from latentforge.pipelines.imaging import batch_to_tensor, save_png
from latentforge.pipelines.onnx_graphs import RANDOM_OPS, graph_op_types
from latentforge.pipelines.prepare import load_split

ATOL = 1e-4
MANIFEST_KEYS = {
    "format_version", "family", "model_class", "model_config", "data", "pixel_range", "layout", "preprocessing",
    "latent", "sampling", "graphs", "parity", "parity_index_ties", "parity_atol", "metrics", "source", "opset",
}
VQ_GRAPHS = {"encoder", "decoder", "prior_top_step", "prior_bottom_step", "prior_bottom_condition"}


def with_sampler(family: str) -> bool:
    """Whether the train stage fits a latent sampler to this family (a flat latent with an encoder, or
    GLO's learned codes): the ``exported`` fixture fits one to those, as training would."""
    return family not in ("gan", "vqvae2")


def expected_graphs(family: str) -> set[str]:
    if family == "vqvae2":
        return VQ_GRAPHS
    samplers = {"generator_gmm"} if with_sampler(family) else set()
    if family in ("gan", "glo"):
        return {"decoder", "generator", *samplers}
    return {"encoder", "decoder", "generator", *samplers}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tiny models are far too small to split across threads; on a busy 2-core machine every
    op would wait on a thread-pool barrier (behaviour is the same, only slower)."""
    with onnx_graphs.torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data_dir(project):
    root, params = project
    return root / "data" / "prepared" / params["data"]["name"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir):
    """family -> (export dir, manifest, model dir): tiny models on the 16x16 RGB shapes data, each
    exported once per module (the first test that needs a family pays for it)."""
    root = tmp_path_factory.mktemp("exports")
    train = batch_to_tensor(np.array(load_split(data_dir, "train")["images"][:16]))
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            torch.manual_seed(0)
            cls = MODELS[family]
            model = cls(cls.config_class.tiny(channels=3, image_size=16))
            if family in ("gan", "vqvae2"):
                # Two steps: the EMA generator leaves the live one, the codebooks leave their random init.
                model.train()
                optimizers = model.configure_optimizers()
                batch = {"image": train, "label": torch.zeros(16, dtype=torch.long), "index": torch.arange(16)}
                for step in range(2):
                    train_step(model, optimizers, batch, step)
            model.eval()
            if with_sampler(family):  # what the train stage fits after training (3 components for 16 latents)
                config = GaussianMixtureConfig(components=3, restarts=1)
                codes = getattr(model, "learned_codes", None)
                model.latent_sampler = (GaussianMixtureSampler.fit(codes(), config) if codes
                                        else fit_latent_sampler(model, train, config))
            model_dir = model.save_pretrained(root / "models" / family)
            out = root / "export" / family
            manifest = export_model(model_dir, data_dir, out, metrics={"recon_mse": 0.01}, source={"mlflow_run_id": "r1"})
            cache[family] = (out, manifest, model_dir)
        return cache[family]

    return get


# ----------------------------------------------------------------------------------------------------
# PyTorch references for a graph's inputs (dynamic-batch checks)


def _feed(manifest: dict, graph: str, batch: int, test_images: np.ndarray, rng: np.random.Generator) -> dict:
    spec = manifest["graphs"][graph]
    feed = {}
    for name, shape in spec["inputs"].items():
        dims = [batch if d is None else d for d in shape]
        if name == "images":
            feed[name] = batch_to_tensor(np.array(test_images[:batch])).numpy()
        elif name == "position":
            feed[name] = np.array(3, dtype=np.int64)
        elif name == "uniform":
            feed[name] = rng.random(dims, dtype=np.float32)
        elif spec["dtypes"][name] == "int64":
            feed[name] = rng.integers(0, manifest["latent"]["num_codes"], size=dims, dtype=np.int64)
        else:
            feed[name] = rng.standard_normal(dims, dtype=np.float32)
    return feed


def _reference(model, graph: str, feed: dict) -> list[np.ndarray]:
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
    with torch.no_grad():
        if graph == "encoder":
            out = model.encode(t["images"])
            if out.indices is not None:
                return [i.numpy() for i in out.indices]
            return [out.mean.numpy(), out.logvar.numpy()] if out.mean is not None else [out.latent.numpy()]
        if graph == "decoder":
            if "top_indices" in t:
                return [model.decode_indices(t["top_indices"], t["bottom_indices"]).images.numpy()]
            return [model.decode(t["latent"]).images.numpy()]
        if graph == "generator":
            return [model.sample(len(t["noise"]), noise=t["noise"]).images.numpy()]
        if graph == "generator_gmm":
            return [model.sample(len(t["noise"]), noise=t["noise"], uniform=t["uniform"], sampler="gmm").images.numpy()]
        if graph == "prior_bottom_condition":
            return [model.prior_bottom.embed_condition(t["top_indices"]).numpy()]
        prior = model.prior_top if graph == "prior_top_step" else model.prior_bottom
        logits, kv = prior.step_kv(t["prev_token"], t["position"], t["cache"], t.get("cond_emb"))
        return [logits.numpy(), kv.numpy()]


# ----------------------------------------------------------------------------------------------------
# Every family


@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_family_exports_with_parity_and_a_dynamic_batch(family, exported, data_dir):
    out, manifest, model_dir = exported(family)
    assert set(manifest["graphs"]) == expected_graphs(family)
    assert set(manifest["parity"]) == set(manifest["graphs"])
    assert all(0.0 <= diff <= ATOL for diff in manifest["parity"].values()), manifest["parity"]

    model = PretrainedModel.from_pretrained(out / "model").eval()
    test_images = load_split(data_dir, "test")["images"]
    rng = np.random.default_rng(0)
    loaded, sessions = load_sessions(out)
    assert loaded == manifest
    for name, session in sessions.items():
        # Noise is an input: no graph draws random numbers.
        assert not graph_op_types(out / manifest["graphs"][name]["file"]) & RANDOM_OPS, name
        assert [i.name for i in session.get_inputs()] == list(loaded["graphs"][name]["inputs"])
        outputs = list(loaded["graphs"][name]["outputs"])
        assert [o.name for o in session.get_outputs()] == outputs
        for batch in (1, 5):
            feed = _feed(manifest, name, batch, test_images, rng)
            got = session.run(outputs, feed)
            for out_name, actual, expected in zip(outputs, got, _reference(model, name, feed)):
                assert actual.shape == expected.shape, (name, out_name, batch)
                if actual.dtype == np.int64:
                    np.testing.assert_array_equal(actual, expected, err_msg=f"{name}.{out_name} batch {batch}")
                else:
                    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0, err_msg=f"{name}.{out_name} batch {batch}")
    images = sessions["decoder"].run(["images"], _feed(manifest, "decoder", 4, test_images, rng))[0]
    assert images.shape == (4, 3, 16, 16) and images.min() >= 0.0 and images.max() <= 1.0


def test_manifest_describes_the_export(exported, data_dir):
    data_manifest = json.loads((data_dir / "manifest.json").read_text())
    for family in ("vae", "vqvae2", "gan"):
        out, manifest, model_dir = exported(family)
        # A continuous latent with an encoder carries its attribute vectors (the data has factors).
        assert set(manifest) == MANIFEST_KEYS | ({"attributes"} if family == "vae" else set())
        assert json.loads((out / "manifest.json").read_text()) == manifest
        assert manifest["family"] == family and manifest["model_class"] == MODELS[family].__name__
        assert manifest["model_config"] == json.loads((model_dir / "config.json").read_text())["config"]
        assert manifest["data"] == {
            "name": data_manifest["name"], "data_hash": data_manifest["data_hash"], "image_shape": [16, 16, 3],
        }
        assert manifest["pixel_range"] == [0, 1] and manifest["layout"] == "NCHW"
        assert manifest["preprocessing"] == "uint8 HWC -> float32 NCHW / 255"
        assert manifest["metrics"] == {"recon_mse": 0.01} and manifest["source"] == {"mlflow_run_id": "r1"}
        assert manifest["opset"] >= 17
        for name, graph in manifest["graphs"].items():
            assert (out / graph["file"]).is_file()
            assert set(graph) == {"file", "inputs", "outputs", "dtypes"}
        # The model travels with the graphs, so a version can be rebuilt in PyTorch.
        assert (out / "model" / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
        assert (out / "model" / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()

    vae = exported("vae")[1]
    d = vae["model_config"]["latent_dim"]
    assert vae["latent"] == {"kind": "gaussian", "shape": [d]}
    assert vae["graphs"]["encoder"]["inputs"] == {"images": [None, 3, 16, 16]}
    assert vae["graphs"]["encoder"]["outputs"] == {"mean": [None, d], "logvar": [None, d]}
    assert vae["graphs"]["decoder"]["inputs"] == {"latent": [None, d]}
    assert vae["graphs"]["decoder"]["outputs"] == {"images": [None, 3, 16, 16]}
    # The fitted mixture is the default sampler; the prior keeps its generator graph.
    assert vae["sampling"] == {"kind": "noise", "graph": "generator", "noise_shape": [d], "distribution": "standard_normal",
                               "samplers": ["prior", "gmm"], "default_sampler": "gmm",
                               "sampler_graphs": {"prior": "generator", "gmm": "generator_gmm"}}
    assert vae["graphs"]["generator_gmm"]["inputs"] == {"noise": [None, d], "uniform": [None]}
    assert vae["graphs"]["generator_gmm"]["outputs"] == {"images": [None, 3, 16, 16]}
    assert (exported("vae")[0] / "model" / "sampler" / "sampler.safetensors").is_file()  # the sampler travels too

    gan = exported("gan")[1]
    assert gan["latent"]["kind"] == "deterministic" and "encoder" not in gan["graphs"]
    assert gan["sampling"]["kind"] == "noise"
    assert gan["sampling"]["samplers"] == ["prior"] and gan["sampling"]["default_sampler"] == "prior"
    assert exported("ae")[1]["graphs"]["encoder"]["outputs"] == {"latent": [None, 8]}

    vq = exported("vqvae2")[1]
    c = vq["model_config"]
    ht, hb = 16 // c["top_factor"], 16 // c["bottom_factor"]
    assert vq["latent"]["kind"] == "codes" and vq["latent"]["num_codes"] == c["num_codes"]
    assert vq["latent"]["indices"] == {"top": [ht, ht], "bottom": [hb, hb]}
    assert vq["graphs"]["encoder"]["outputs"] == {"top_indices": [None, ht, ht], "bottom_indices": [None, hb, hb]}
    assert vq["graphs"]["encoder"]["dtypes"]["top_indices"] == "int64"
    assert vq["graphs"]["decoder"]["inputs"] == {"top_indices": [None, ht, ht], "bottom_indices": [None, hb, hb]}
    step = vq["graphs"]["prior_bottom_step"]
    assert list(step["inputs"]) == ["prev_token", "position", "cache", "cond_emb"]
    assert step["inputs"]["position"] == [] and step["inputs"]["cache"][2] is None
    cache = step["inputs"]["cache"]  # (2, layers, B, heads, L, hd); the step returns this position's slot only
    assert step["outputs"] == {"logits": [None, c["num_codes"]], "new_kv": [*cache[:4], 1, cache[5]]}
    assert vq["sampling"]["levels"]["bottom"]["step_output"] == "new_kv"
    assert vq["sampling"]["kind"] == "prior" and vq["sampling"]["order"] == ["top", "bottom"]
    assert vq["sampling"]["samplers"] == ["prior"] and vq["sampling"]["default_sampler"] == "prior"
    assert vq["sampling"]["levels"]["bottom"]["condition_graph"] == "prior_bottom_condition"


def test_vqvae2_onnx_sampler(exported):
    out, _, _ = exported("vqvae2")
    manifest, sessions = load_sessions(out)
    model = PretrainedModel.from_pretrained(out / "model").eval()
    k = manifest["latent"]["num_codes"]

    first = sample_vqvae2_onnx(sessions, manifest, 3, seed=7)
    again = sample_vqvae2_onnx(sessions, manifest, 3, seed=7, temperature=1.0)
    other = sample_vqvae2_onnx(sessions, manifest, 3, seed=8)
    for key in ("top_indices", "bottom_indices", "images"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["bottom_indices"], other["bottom_indices"])
    assert first["top_indices"].shape == (3, *manifest["latent"]["indices"]["top"])
    assert first["bottom_indices"].shape == (3, *manifest["latent"]["indices"]["bottom"])
    for key in ("top_indices", "bottom_indices"):
        assert first[key].dtype == np.int64 and first[key].min() >= 0 and first[key].max() < k
    images = first["images"]
    assert images.shape == (3, 3, 16, 16) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0

    # Greedy decoding does not depend on the noise: the same codes as PyTorch's cached sampler.
    greedy = sample_vqvae2_onnx(sessions, manifest, 2, seed=1, top_k=1)
    top, bottom = model.sample_indices(2, generator=torch.Generator().manual_seed(0), top_k=1)
    np.testing.assert_array_equal(greedy["top_indices"], top.numpy())
    np.testing.assert_array_equal(greedy["bottom_indices"], bottom.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(greedy["images"], model.decode_indices(top, bottom).images.numpy(), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        sample_vqvae2_onnx(sessions, manifest, 1, temperature=0.0)
    with pytest.raises(ValueError, match="prior"):
        sample_vqvae2_onnx({}, exported("gan")[1], 1)


@pytest.mark.parametrize("family", ["vae", "glo"])
def test_runtime_generates_with_each_sampler(exported, family):
    """ModelRuntime.generate: the default sampler is the fitted mixture, a seed reproduces a draw, and the
    graph equals PyTorch's model.sample on the noise and uniforms numpy drew from that seed."""
    out, manifest, _ = exported(family)
    rt = ModelRuntime.from_export(out)
    model = PretrainedModel.from_pretrained(out / "model").eval()
    assert (rt.samplers, rt.default_sampler) == (["prior", "gmm"], "gmm")
    assert rt.describe()["samplers"] == ["prior", "gmm"] and rt.describe()["default_sampler"] == "gmm"
    gmm = rt.generate(4, seed=3)
    np.testing.assert_array_equal(gmm, rt.generate(4, seed=3, sampler="gmm"))
    assert not np.array_equal(gmm, rt.generate(4, seed=4))
    prior = rt.generate(4, seed=3, sampler="prior")
    assert not np.allclose(gmm, prior)
    rng = np.random.default_rng(3)
    graph, feeds = rt.sampler_feeds("gmm", 4, np.random.default_rng(3), 0.5)
    assert graph == "generator_gmm" and set(feeds) == {"noise", "uniform"}
    noise = rng.standard_normal((4, *rt.latent_shape), dtype=np.float32)
    np.testing.assert_array_equal(feeds["noise"], noise * np.float32(0.5))  # temperature scales the noise only
    np.testing.assert_array_equal(feeds["uniform"], rng.random(4, dtype=np.float32))
    with torch.no_grad():
        ref = model.sample(4, noise=torch.from_numpy(noise), uniform=torch.from_numpy(feeds["uniform"]), sampler="gmm")
    np.testing.assert_allclose(rt.generate(4, seed=3, temperature=1.0), ref.images.numpy(), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"has no sampler 'kde' \(it has: prior, gmm\)"):
        rt.generate(1, seed=0, sampler="kde")
    gan = ModelRuntime.from_export(exported("gan")[0])
    assert (gan.samplers, gan.default_sampler) == (["prior"], "prior")
    with pytest.raises(ValueError, match="no sampler 'gmm'"):
        gan.generate(1, seed=0, sampler="gmm")


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, None), (1.0, 1), (2.0, 3)])
def test_numpy_token_pick_matches_the_models(temperature, top_k):
    g = torch.Generator().manual_seed(0)
    logits, noise = torch.randn(64, 16, generator=g) * 3, torch.rand(64, 16, generator=g)
    expected = pick_tokens(logits, noise, temperature, top_k).numpy()
    np.testing.assert_array_equal(pick_tokens_np(logits.numpy(), noise.numpy(), temperature, top_k), expected)


# ----------------------------------------------------------------------------------------------------
# Failures write nothing


def test_a_parity_failure_raises_and_writes_nothing(exported, data_dir, tmp_path, monkeypatch):
    _, _, model_dir = exported("vae")
    real_session = onnx_graphs.onnx_session

    class Skewed:
        """A graph whose float outputs are off by 1e-3."""

        def __init__(self, session):
            self.session = session

        def run(self, names, feed):
            return [o + np.float32(1e-3) if o.dtype == np.float32 else o for o in self.session.run(names, feed)]

    monkeypatch.setattr(onnx_graphs, "onnx_session", lambda *a, **k: Skewed(real_session(*a, **k)))
    out = tmp_path / "exports" / "vae"
    with pytest.raises(ExportError, match=r"graph 'encoder', output 'mean': max \|onnx - torch\| = 0\.001 > atol 0\.0001"):
        export_model(model_dir, data_dir, out)
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []

    # An existing export is left as it was.
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ExportError):
        export_model(model_dir, data_dir, out)
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["vae"]
    assert [p.name for p in out.iterdir()] == ["manifest.json"] and (out / "manifest.json").read_text() == "{}"


def test_data_of_another_shape_is_refused(data_dir, tmp_path):
    cls = MODELS["ae"]
    model_dir = cls(cls.config_class.tiny(channels=3, image_size=32)).save_pretrained(tmp_path / "model")
    with pytest.raises(ExportError, match=r"16x16x3 images but the model .* takes 32x32x3"):
        export_model(model_dir, data_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sample_grids_travel_with_the_export_and_bad_ones_are_refused(data_dir, tmp_path):
    cls = MODELS["ae"]
    model_dir = cls(cls.config_class.tiny(channels=3, image_size=16)).save_pretrained(tmp_path / "model")
    not_png = tmp_path / "plots" / "samples.png"
    not_png.parent.mkdir()
    not_png.write_text("not an image")
    with pytest.raises(ExportError, match=r"sample grid .*samples\.png: not a PNG file"):
        export_model(model_dir, data_dir, tmp_path / "out", sample_grids=[not_png])
    with pytest.raises(ExportError, match=r"sample grid .*gmm_samples\.png: no such file"):
        export_model(model_dir, data_dir, tmp_path / "out", sample_grids=[tmp_path / "plots" / "gmm_samples.png"])
    assert not (tmp_path / "out").exists()

    grid = save_png(np.zeros((8, 8, 3), dtype=np.uint8), not_png)  # now a real PNG
    manifest = export_model(model_dir, data_dir, tmp_path / "out", sample_grids=[grid])
    assert manifest["sample_grids"] == {"samples.png": "sample_grids/samples.png"}
    assert (tmp_path / "out" / "sample_grids" / "samples.png").read_bytes() == grid.read_bytes()


# ----------------------------------------------------------------------------------------------------
# CLI


def _cli(capsys, params_path, *args):
    code = main(["export", "--params", str(params_path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_errors_are_one_line(project, capsys, tmp_path):
    root, params = project
    params_path = root / "params.yaml"
    code, _, err = _cli(capsys, params_path, "--model", "vae")
    model_dir = root / "artifacts" / "vae" / "model"
    assert code == 2 and err.count("\n") == 1
    assert str(model_dir) in err and "latentforge train --model vae" in err

    code, _, err = _cli(capsys, params_path, "--model", "nope")
    assert code == 2 and err.count("\n") == 1 and "unknown model family 'nope'" in err

    # A model of another image size than the data.
    cls = MODELS["ae"]
    bad_dir = root / "artifacts" / "ae" / "model"
    cls(cls.config_class.tiny(channels=3, image_size=32)).save_pretrained(bad_dir)
    try:
        code, _, err = _cli(capsys, params_path, "--model", "ae", "--out", str(tmp_path / "ae"))
    finally:
        shutil.rmtree(root / "artifacts" / "ae")
    assert code == 2 and err.count("\n") == 1 and "32x32x3" in err and "16x16x3" in err
    assert not (tmp_path / "ae").exists()


def test_cli_exports_with_metrics_and_source(project, exported, capsys, tmp_path):
    root, params = project
    _, _, model_dir = exported("gan")
    train_dir = root / "artifacts" / "gan"
    shutil.copytree(model_dir, train_dir / "model")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"mmd": 0.5}))
    out = tmp_path / "gan"
    try:
        code, stdout, err = _cli(capsys, root / "params.yaml", "--model", "gan", "--out", str(out), "--metrics", str(metrics))
        missing = _cli(capsys, root / "params.yaml", "--model", "gan", "--metrics", str(tmp_path / "missing.json"))
    finally:
        shutil.rmtree(train_dir)
    assert code == 0, err
    assert "decoder" in stdout and "generator" in stdout and str(out) in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"] == {"mmd": 0.5}
    assert manifest["source"]["model_dir"] == str(train_dir / "model") and "git_commit" in manifest["source"]
    code, _, err = missing
    assert code == 2 and err.count("\n") == 1 and "missing.json" in err
