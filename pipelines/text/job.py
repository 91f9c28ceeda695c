"""Resolving a ``train-text`` job: the ``text`` params, the decoder (``--model``) and the data, all
checked before Ray starts (:func:`resolve_text_job`)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentforge.models import MODELS, ConfigError
from latentforge.pipelines.common.errors import DataError, RegistryError
from latentforge.pipelines.common.files import sha256_file
from latentforge.pipelines.common.params import ParamsError, apply_overrides, check_keys, section
from latentforge.pipelines.common.tracking import fluent_tracking, tracking_uri
from latentforge.pipelines.prepare import read_manifest
from latentforge.pipelines.text.encoders import ENCODERS, minilm_dir

TEXT_SCHEMA: dict[str, Any] = {
    "encoder": str,
    "hashed_dim": int,
    "aligned_fraction": (int, float),
    "holdout": list,
    "holdout_strict": list,
    "epochs": int,
    "batch_size": int,
    "lr": (int, float),
    "hidden_dim": int,
    "layers": int,
    "code_rank": int,
    "dropout": (int, float),
    "sample_std": (int, float),
    "family_sample_std": (dict, type(None)),
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
    "captions_dir": str,
    "eval_prompts": int,
}
BANK_SPACES = ("residuals", "captions")  # what text.bank_whitening whitens (models.text.retrieval_space)


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
        """``<text.output_dir>/<family>``: the stage output."""
        return Path(self.text["output_dir"]) / self.family


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


def check_holdouts(text: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Validate ``text.holdout`` (tier a: held out of the aligned pairs) and ``text.holdout_strict`` (tier
    b: also of the pseudo-captions and the bank); a combination in both is a ParamsError."""
    tier_a = holdout_pairs(text["holdout"], manifest)
    both = set(tier_a) & set(holdout_pairs(text["holdout_strict"], manifest))
    if both:
        values = manifest["factor_values"]
        names = [[values["shape"][s], values["colour"][c]] for s, c in sorted(both)]
        raise ParamsError(f"params text.holdout and text.holdout_strict both name {names}: a combination is in one tier")


def resolve_text_job(params: dict[str, Any], model: str, overrides: list[str] | None = None,
                     num_workers: int | None = None, run_name: str | None = None) -> TextJob:
    """Check params, the decoder and the data before Ray starts. ``overrides``: ``key=value`` of the
    ``text`` section (``epochs=5``) or dotted params (``text.epochs=5``)."""
    dotted = [o if "." in o.partition("=")[0] else f"text.{o}" for o in overrides or []]
    params = apply_overrides(params, dotted)
    text = check_keys(dict(section(params, "text")), TEXT_SCHEMA, "text")
    if num_workers is not None:
        text["num_workers"] = num_workers
    check_text(text)
    if text["encoder"].startswith("minilm"):
        minilm_dir()

    decoder_dir, ref = resolve_decoder(params, model)
    meta = json.loads((Path(decoder_dir) / "config.json").read_text())
    family = decoder_family(decoder_dir, meta, text)
    text["sample_std"] = (text["family_sample_std"] or {}).get(family, text["sample_std"])
    data = section(params, "data")
    data_dir = Path(data["output_dir"]) / data["name"]
    manifest = read_manifest(data_dir)
    check_data(decoder_dir, meta, ref, data_dir, manifest)
    check_holdouts(text, manifest)
    if text["pseudo_ratio"] > 0:
        # Imported here: pipelines.text.captions imports this module (through .aligned).
        from latentforge.pipelines.text.captions import check_captions

        check_captions(text, manifest)

    digest_key = {k: text[k] for k in TEXT_SCHEMA if k not in ("num_workers", "cpus_per_worker", "output_dir", "captions_dir", "eval_prompts")}
    digest_key.update(decoder=ref.get("sha256"), data=manifest["data_hash"])
    digest = hashlib.sha256(json.dumps(digest_key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return TextJob(
        family=family, decoder_dir=str(decoder_dir), decoder_ref=ref, text=text, data_dir=str(data_dir.resolve()),
        manifest=manifest, run_name=run_name or f"{family}-{data['name']}-text-{digest}",
        tracking_uri=tracking_uri(params), experiment=section(params, "mlflow")["experiment"],
    )


def check_text(text: dict[str, Any]) -> None:
    """Raise a ParamsError naming the first ``text`` setting out of its range."""
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
    if text["sample_std"] < 0:
        raise ParamsError(f"params text.sample_std must be >= 0, got {text['sample_std']}")
    per_family = text["family_sample_std"] or {}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in per_family.values()):
        raise ParamsError(f"params text.family_sample_std must map family names to spreads >= 0, got {per_family!r}")
    if text["bank_text_weight"] < 0:
        raise ParamsError(f"params text.bank_text_weight must be >= 0, got {text['bank_text_weight']}")
    if text["bank_whitening"] is not None and text["bank_whitening"] <= 0:
        raise ParamsError(f"params text.bank_whitening must be > 0 or null (a plain cosine), got {text['bank_whitening']}")
    if text["bank_space"] not in BANK_SPACES:
        raise ParamsError(f"params text.bank_space must be one of {', '.join(BANK_SPACES)}, got {text['bank_space']!r}")
    if text["pseudo_ratio"] > 0 and text["encoder"] == "minilm-word-attention":
        raise ParamsError("params text.pseudo_ratio > 0 needs one embedding per caption; the captioner cannot give "
                          "minilm-word-attention its words (use minilm-words, minilm or hashed, or pseudo_ratio=0)")


def decoder_family(decoder_dir: str, meta: dict[str, Any], text: dict[str, Any]) -> str:
    """The ``models.MODELS`` family of the decoder whose ``config.json`` is ``meta``, checked usable for
    text conditioning with these ``text`` settings."""
    cls = next((c for c in MODELS.values() if c.__name__ == meta.get("class")), None)
    if cls is None:
        raise ConfigError(f"{decoder_dir} holds a {meta.get('class')!r}, not a model family of models.MODELS")
    family = next(name for name, c in MODELS.items() if c is cls)
    if text["finetune_decoder"] and hasattr(cls, "decode_indices"):
        raise ParamsError(f"params text.finetune_decoder: {family} f_tau is trained on codes, not through the decoder; "
                          "it applies to flat-latent decoders")
    if not hasattr(cls, "decode_indices") and not meta["config"].get("latent_dim"):
        raise ConfigError(f"{family}: text conditioning needs a flat latent (latent_dim) or code maps (VQ-VAE-2)")
    return family


def check_data(decoder_dir: str, meta: dict[str, Any], ref: dict[str, Any], data_dir: Path, manifest: dict[str, Any]) -> None:
    """Raise a DataError when the prepared data is not what the decoder makes or was trained on."""
    h, w, c = manifest["image_shape"]
    if (meta["config"]["image_size"], meta["config"]["channels"]) != (h, c):
        raise DataError(f"the decoder in {decoder_dir} makes {meta['config']['image_size']}px x {meta['config']['channels']} "
                        f"images; the data {manifest['name']} has {h}x{w}x{c}")
    if ref.get("data_hash") and ref["data_hash"] != manifest["data_hash"]:
        raise DataError(f"the decoder was trained on data {ref['data_hash'][:12]}, but {data_dir} holds "
                        f"{manifest['data_hash'][:12]}; prepare the data it was trained on")


def resolve_decoder(params: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """``--model`` -> (a local save_pretrained directory, the decoder reference recorded with the text model).

    A directory with ``config.json``; a family name (``<train.output_dir>/<family>/model``); or a
    registered model ``name``, ``name@alias`` or ``name/version`` (its export's ``model/`` is downloaded).
    """
    path = Path(model)
    if model in MODELS and not path.exists():
        path = Path(section(params, "train")["output_dir"]) / model / "model"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no trained {model} at {path}; run `latentforge train --model {model}` first")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; give a save_pretrained directory or a registered model")
        ref = {"source": "checkpoint", "name": None, "version": None, "path": str(path.resolve()),
               "sha256": sha256_file(path / "model.safetensors")}
        metrics = path.parent / "metrics.json"
        if metrics.is_file():
            ref["data_hash"] = json.loads(metrics.read_text()).get("data_hash")
            ref["mlflow_run_id"] = json.loads(metrics.read_text()).get("mlflow_run_id")
        return str(path), ref
    return download_registered(params, model)


def experiment_decoder(model: str, record_path: Path) -> str:
    """The decoder a ``train-text`` stage trains against inside a DVC experiment: ``<name>/<version>`` of
    the version that the experiment's register stage wrote to ``record_path`` (``--record``).

    An experiment never moves ``champion``, so ``--model <name>@champion`` would pair the experiment's
    text model with the production decoder instead of the decoder the experiment trained. ``model``
    (``--model``), when it is ``<name>@<alias>``, must name the same registered model.
    """
    try:
        record = json.loads(Path(record_path).read_text())
        name, version = str(record["name"]), int(record["version"])
    except FileNotFoundError:
        raise RegistryError(f"{record_path}: no register record; the register stage writes it (`latentforge register "
                            f"--record {record_path}`)") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise RegistryError(f"{record_path}: not a register record with a name and a version ({exc})") from None
    named = model.split("@", 1)[0] if "@" in model else None
    if named is not None and named != name:
        raise RegistryError(f"--model {model} names {named}, but {record_path} records a version of {name}")
    return f"{name}/{version}"


def download_registered(params: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """A registered ``name``, ``name@alias`` or ``name/version`` (the latest for a bare name): its export's
    ``model/`` copied to ``<text.output_dir>/.decoders/<name>-v<version>`` (once), and its reference."""
    # Imported here: mlflow (and pipelines.registry, which loads mlflow.pyfunc) only for a registered --model.
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from latentforge.pipelines.registry import connect

    uri = tracking_uri(params)
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
        # fluent_tracking: the models:/ URI resolves against this store's registry, not MLflow's default one.
        with tempfile.TemporaryDirectory() as tmp, fluent_tracking(uri):
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
           "sha256": sha256_file(cache / "model.safetensors"), "data_hash": (mv.tags or {}).get("data_hash"),
           "mlflow_run_id": mv.run_id}
    return str(cache), ref
