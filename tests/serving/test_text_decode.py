"""``POST /v1/models/{name}/text-decode`` on the real app (Ray Serve, HTTP, MLflow registry): text models
``vae-shapes-text`` (f_tau for vae-shapes version 1, generate only) and ``vqvae2-shapes-text`` (for
vqvae2-shapes version 1, with a code bank of the train images and a captioner: generate, retrieve and
rerank), hashed encoder, untrained: the endpoint's behaviour is under test, not the models' quality,
served beside their decoders."""

from __future__ import annotations

import pytest
import requests
import yaml

from tests.pipelines.conftest import REPO
from tests.serving.conftest import free_port, running_serve, serve_config

TEXT = "vae-shapes-text"
VQ_TEXT = "vqvae2-shapes-text"


def _register_text_model(registry, decoder: str, with_bank_and_captioner: bool):
    """Register a text model for ``decoder`` (``name/version``) as version 1 of ``<name>-text``, its
    champion; with a code bank of the job's train images and an (untrained) captioner when asked."""
    from mlflow.tracking import MlflowClient

    from latentforge.models import PretrainedModel
    from latentforge.models.text import CaptionScorer, ImageCaptioner, state_digest, text_map_for
    from latentforge.pipelines.common.params import load_params
    from latentforge.pipelines.common.tracking import experiment_id as _experiment_id
    from latentforge.pipelines.text.aligned import prepare_arrays
    from latentforge.pipelines.text.captioner import code_bank
    from latentforge.pipelines.text.export import export_text
    from latentforge.pipelines.text.job import resolve_text_job
    from latentforge.pipelines.text.outputs import write_outputs
    from latentforge.pipelines.text.registry import register_text

    root, uri = registry["root"], registry["uri"]
    name = decoder.split("/")[0]
    params = load_params(REPO / "params.yaml")
    params["data"]["output_dir"] = str(registry["prepared"].parent)
    params["mlflow"]["tracking_uri"] = uri
    # pseudo_ratio 0: nothing is trained here (the captioner below is built by hand), so no caption-text output.
    params["text"].update(encoder="hashed", hashed_dim=128, aligned_fraction=0.5, pseudo_ratio=0.0, output_dir=str(root / "text"))
    job = resolve_text_job(params, decoder)
    arrays, info = prepare_arrays(job, echo=lambda s: None)
    model = PretrainedModel.from_pretrained(job.decoder_dir)
    ckpt = root / f"{name}-text-ckpt"
    text_map_for(model, arrays["embedding"].shape[1], hidden_dim=16).save_pretrained(ckpt / "text_map")
    model.save_pretrained(ckpt / "decoder")
    if with_bank_and_captioner:
        captioner = ImageCaptioner(arrays["image"].shape[-1], arrays["embedding"].shape[1], width=4, colour_width=4).eval()
        CaptionScorer(captioner).save(ckpt / "captioner.safetensors")
        code_bank(arrays, captioner, 1.0).save(ckpt / "bank.npz")
    digest = state_digest(model)
    client = MlflowClient(uri)
    run_id = client.create_run(_experiment_id(client, "latentforge", uri), run_name=f"{name}-text-test").info.run_id
    write_outputs(job, ckpt, info, {"losses": [1.0], "decoder_before": digest, "decoder_after": digest}, run_id, 0.0)
    export_dir = root / f"{name}-text-export"
    export_text(job.output_dir, export_dir)
    version = register_text(export_dir, uri)
    client.set_registered_model_alias(f"{name}-text", "champion", version.version)
    return export_dir


@pytest.fixture(scope="module")
def text_model(registry):
    """Register vae-shapes-text version 1 (trained against vae-shapes version 1), its champion."""
    return _register_text_model(registry, "vae-shapes/1", with_bank_and_captioner=False)


@pytest.fixture(scope="module")
def vq_text_model(registry):
    """Register vqvae2-shapes-text version 1 (against vqvae2-shapes version 1, a bank and a captioner)."""
    return _register_text_model(registry, "vqvae2-shapes/1", with_bank_and_captioner=True)


@pytest.fixture(scope="module")
def text_server(registry, text_model, vq_text_model, tmp_path_factory):
    """The app serving vae-shapes, vae-shapes-text (decoder: vae-shapes@champion) and vqvae2-shapes-text
    (decoder: vqvae2-shapes@champion) on a free port."""
    tmp = tmp_path_factory.mktemp("serve-text")
    port = free_port()
    config = serve_config(registry)
    app = config["applications"][0]
    app["args"]["models"] = [{"name": "vae-shapes"}, {"name": TEXT, "decoder": "vae-shapes@champion"},
                             {"name": VQ_TEXT, "decoder": "vqvae2-shapes@champion"}]
    template = next(d for d in app["deployments"] if d["name"] == "vae-shapes")
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("ingress", "vae-shapes")] + [
        {**template, "name": TEXT}, {**template, "name": VQ_TEXT}]
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    with running_serve(["--config", str(tmp / "config.yaml"), "--port", str(port), "--num-cpus", "2"],
                       port, tmp / "serve.log") as url:
        yield url


def _post(url: str, body: dict, name: str = TEXT) -> requests.Response:
    return requests.post(f"{url}/v1/models/{name}/text-decode", json=body, timeout=60)


def test_n_images_per_text_reproducible_with_a_seed(text_server):
    texts = ["a large red circle in the center", "small blue square, top left"]
    r = _post(text_server, {"texts": texts, "n": 3, "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == TEXT and body["model_version"] == r.headers["X-Model-Version"] == "1" and body["seed"] == 5
    assert [len(per_text) for per_text in body["images"]] == [3, 3]
    assert len(set(body["images"][0])) == 3  # n different samples
    assert _post(text_server, {"texts": texts, "n": 3, "seed": 5}).json()["images"] == body["images"]
    assert _post(text_server, {"texts": texts, "n": 3, "seed": 6}).json()["images"] != body["images"]
    drawn = _post(text_server, {"texts": texts[:1]}).json()
    again = _post(text_server, {"texts": texts[:1], "seed": drawn["seed"]}).json()
    assert again["images"] == drawn["images"]  # the returned seed reproduces a request that sent none
    arrays = _post(text_server, {"texts": texts[:1], "n": 2, "seed": 1, "format": "array"}).json()["images"]
    assert len(arrays[0]) == 2 and len(arrays[0][0]) == 3  # (C, H, W) nested lists


@pytest.mark.parametrize("body, field", [
    ({"texts": []}, "texts"),
    ({"texts": ["   "]}, "texts[0]"),
    ({"texts": ["x" * 300]}, "texts[0]"),
    ({"texts": ["ok", 7]}, "texts[1]"),
    ({"texts": ["ok"] * 17}, "texts"),
    ({"texts": "a red circle"}, "texts"),
    ({"texts": ["ok"], "n": 0}, "n"),
    ({"texts": ["ok"], "n": 17}, "n"),
    ({"texts": ["ok"], "n": "two"}, "n"),
    ({"n": 1}, "texts"),
    ({"texts": ["ok"], "mode": "dream"}, "mode"),
    ({"texts": ["ok"], "mode": "retrieve"}, "mode"),            # vae-shapes-text has no code bank
    ({"texts": ["ok"], "rerank": 4}, "rerank"),                 # nor a captioner to rerank with
    ({"texts": ["ok"], "n": 3, "rerank": 2}, "rerank"),         # k below n
    ({"texts": ["ok"], "rerank": 33}, "rerank"),                # above limits.max_rerank
    ({"texts": ["ok"], "mode": "retrieve", "rerank": 4}, "rerank"),
])
def test_bad_input_is_a_4xx_naming_the_field(text_server, body, field):
    r = _post(text_server, body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["field"] == field


def test_retrieve_returns_training_rows_and_generate_does_not(text_server, registry):
    from latentforge.pipelines.prepare import load_split

    texts = ["a large red circle in the center", "small blue square, top left"]
    r = _post(text_server, {"texts": texts, "n": 3, "seed": 2, "mode": "retrieve"}, name=VQ_TEXT)
    assert r.status_code == 200, r.text
    body = r.json()
    train_count = len(load_split(registry["prepared"], "train")["images"])
    assert body["mode"] == "retrieve" and [len(row) for row in body["rows"]] == [3, 3]
    assert all(0 <= row < train_count for per_text in body["rows"] for row in per_text)
    assert [len(per_text) for per_text in body["images"]] == [3, 3]
    generated = _post(text_server, {"texts": texts, "n": 3, "seed": 2}, name=VQ_TEXT).json()
    assert generated["mode"] == "generate" and generated["rows"] is None
    reranked = _post(text_server, {"texts": texts, "n": 2, "seed": 2, "rerank": 6}, name=VQ_TEXT)
    assert reranked.status_code == 200, reranked.text
    assert [len(per_text) for per_text in reranked.json()["images"]] == [2, 2]
    assert _post(text_server, {"texts": texts, "n": 2, "seed": 2, "rerank": 6}, name=VQ_TEXT).json()["images"] == reranked.json()["images"]
    r = _post(text_server, {"texts": texts, "n": 2, "rerank": 1}, name=VQ_TEXT)
    assert r.status_code == 422 and r.json()["error"]["field"] == "rerank"


def test_text_decode_only_on_text_models_and_listed(text_server):
    r = _post(text_server, {"texts": ["a red circle"]}, name="vae-shapes")
    assert r.status_code == 422 and "cannot text-decode" in r.json()["error"]["reason"]
    r = requests.post(f"{text_server}/v1/models/{TEXT}/generate", json={"n": 1}, timeout=60)
    assert r.status_code == 422
    models = {m["name"]: m for m in requests.get(f"{text_server}/v1/models", timeout=60).json()["models"]}
    assert models[TEXT]["capabilities"] == ["text-decode"]
    assert models[TEXT]["modes"] == ["generate"] and models[TEXT]["rerank"] is None and models[TEXT]["retrieval"] is None
    assert models[VQ_TEXT]["modes"] == ["generate", "retrieve"] and models[VQ_TEXT]["rerank"]["max_k"] == 32
    assert models[VQ_TEXT]["sampling"] == "codes" and models[VQ_TEXT]["retrieval"]["size"] > 1
    assert models[TEXT]["decoder"]["name"] == "vae-shapes" and models[TEXT]["decoder"]["version"] == 1
    assert models[TEXT]["runtime"]["torch_imported"] is False


def test_another_decoder_version_is_refused_at_load(registry, text_model):
    from latentforge.runtime.text import DecoderMismatchError
    from latentforge.serving.model_store import load_text_runtime

    rt = load_text_runtime(text_model, "vae-shapes@champion", registry["uri"], TEXT, "1", "champion")
    assert rt.describe()["decoder"]["version"] == 1
    with pytest.raises(DecoderMismatchError, match="trained against decoder vae-shapes version 1, not vae-shapes version 2"):
        load_text_runtime(text_model, "vae-shapes/2", registry["uri"], TEXT, "1", "champion")


def test_params_store_serves_the_text_models_that_have_a_champion(registry, text_model):
    """`latentforge serve --params-store` (the end of `make demo`) adds each family's `<decoder>-text`
    champion, bound to `<decoder>@champion`, with serving/config.yaml's deployment options for it."""
    from latentforge.pipelines.cli import text_models_with_champion
    from latentforge.serving.launch import resolve_config

    found = text_models_with_champion(registry["uri"], ["vae-shapes", "gan-shapes"])
    assert found == [{"name": TEXT, "alias": "champion", "decoder": "vae-shapes@champion"}]  # gan has no text model
    config = resolve_config(tracking_uri=registry["uri"], models=["vae-shapes", *found])
    app = config["applications"][0]
    assert app["args"]["models"] == [{"name": "vae-shapes"}, *found]
    deployment = next(d for d in app["deployments"] if d["name"] == TEXT)
    assert deployment["ray_actor_options"] == {"num_cpus": 0.1}  # config.yaml's own entry, not the template's
    assert {d["name"] for d in app["deployments"]} == {"ingress", "vae-shapes", TEXT}
