"""The ``export`` stage: a trained model -> parity-checked ONNX graphs + ``manifest.json``.

``export_model(model_dir, prepared_dir, out_dir)`` loads a ``save_pretrained`` directory, exports every
graph its family needs with ``torch.onnx.export`` (the torch.export-based exporter, a dynamic batch
axis, opset :data:`OPSET`; :mod:`pipelines.onnx_graphs`), checks each graph (``onnx.checker`` with
``full_check``, no random op) and compares ONNX Runtime against PyTorch on real test images and on
random latents, noise and codes. Only when every graph passes is the export directory written (a
temporary sibling, then renamed), so an existing export is replaced on success only. Serving and the
registry read nothing but the manifest and the graphs (:func:`load_sessions`); VQ-VAE-2 sampling runs
the prior-step graphs in a loop outside ONNX (:func:`sample_vqvae2_onnx`), with the randomness drawn by
numpy and fed in.

Graphs (inputs -> outputs; ``B`` is the dynamic batch):

* ``encoder``: ``images`` (B, C, H, W) float32 in [0, 1] -> ``mean``, ``logvar`` (Gaussian: vae),
  ``latent`` (the deterministic autoencoders, aae) or ``top_indices``, ``bottom_indices`` int64
  (vqvae2). Not for gan (no encoder) nor glo (its encoder is an optimisation).
* ``decoder``: ``latent`` (B, *latent_shape) -> ``images``; vqvae2: ``top_indices``, ``bottom_indices``.
* ``generator``: ``noise`` (B, *noise_shape) standard normal -> ``images``: ``model.sample(noise=)``,
  for every family whose ``sample`` takes noise (all but vqvae2): the ``"prior"`` sampler.
* ``generator_<kind>`` (a model with a fitted ``latent_sampler``, models/samplers.py, kind ``gmm``):
  ``noise`` (B, D) standard normal and ``uniform`` (B,) in [0, 1) -> ``images``: the sampler's
  deterministic ``transform`` then ``decode``, ``model.sample(sampler=<kind>, noise=, uniform=)``.

The manifest's ``sampling`` names the samplers an export offers (``samplers``: ``["prior", "gmm"]``),
the one to use when a caller names none (``default_sampler``: the fitted one where there is one, since
it draws latents where the decoder was trained) and each one's graph (``sampler_graphs``).
* vqvae2: ``prior_top_step`` (``prev_token`` (B,), ``position`` () int64, ``cache``) -> ``logits``
  (B, K), ``new_kv`` (2, layers, B, heads, 1, hd): this position's keys and values, which the sampler
  writes into slot ``position`` of its cache (manifest ``step_output: new_kv``; exports before it output
  the whole ``new_cache``); ``prior_bottom_step`` (the same plus ``cond_emb``); ``prior_bottom_condition``
  (``top_indices`` -> ``cond_emb``).

A family with a continuous latent and an encoder graph (VAE, the autoencoders, AAE) on data with
factors or classes also gets its attribute vectors (:mod:`pipelines.attributes`): ``attributes.npz``
and the manifest's ``attributes`` entry, which serving's ``edit`` reads.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from latentforge.models import MODELS, ConfigError, PretrainedModel
from latentforge.models.glo import GLO
from latentforge.models.text import latent_shape_of
from latentforge.models.vqvae2 import VQVAE2
from latentforge.pipelines.attributes import edit_settings, train_attributes, write_attributes
from latentforge.pipelines.common.errors import DataError
from latentforge.pipelines.common.files import atomic_directory
from latentforge.pipelines.common.params import section
from latentforge.pipelines.common.tracking import git_commit
from latentforge.pipelines.imaging import batch_to_tensor
from latentforge.pipelines.onnx_graphs import OPSET, Decoder, Graph, IndexDecoder, compare, export_graphs, torch_threads
from latentforge.pipelines.prepare import load_split, read_manifest

# The torch-free half (reading an export, VQ-VAE-2 sampling) lives in runtime, which serving uses and which
# must not import torch; it is re-exported here so that the exporter checks exports with the code that serves them.
from latentforge.runtime.images import FORMAT_VERSION, ExportError, load_sessions, pick_tokens_np, sample_vqvae2_onnx

__all__ = ["FORMAT_VERSION", "ExportError", "export_model", "export_from_params", "load_sessions",
           "pick_tokens_np", "sample_vqvae2_onnx"]

MAX_PARITY_IMAGES = 16
PREPROCESSING = "uint8 HWC -> float32 NCHW / 255"
# Above this many bytes of weights a graph keeps them in a side file (<graph>.onnx.data): protobuf
# cannot hold more than 2 GiB in one message.
EXTERNAL_DATA_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------------------
# What gets exported: thin modules around the models' public surface (the decoders are in onnx_graphs)


class _Encoder(nn.Module):
    """images (B, C, H, W) -> the family's encoder outputs (see the module docstring)."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, images: Tensor):
        out = self.model.encode(images)
        if self.kind == "codes":
            return out.indices[0], out.indices[1]
        if self.kind == "gaussian":
            return out.mean, out.logvar
        return out.latent


class _Generator(nn.Module):
    """noise (B, *noise_shape) -> images: ``model.sample(noise=noise)``, deterministic given the noise."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, noise: Tensor) -> Tensor:
        return self.model.sample(noise.shape[0], noise=noise).images


class _CodeDistributionGenerator(nn.Module):
    """GLO's ``sample(noise=)`` with its code distribution frozen into the graph.

    GLO fits a Gaussian to its learned codes (a float64 Cholesky factorisation, which ONNX has no op
    for) on every ``sample`` call. The fit depends on the weights only, so it is done once here and
    kept as constants; the rest is :meth:`models.glo.GLO.latent_from_noise` and ``decode``. Parity
    is checked against ``model.sample`` itself.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        mean, scale_tril = model.code_distribution()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("scale_tril_t", scale_tril.detach().t().contiguous())

    def forward(self, noise: Tensor) -> Tensor:
        latent = nn.functional.normalize(self.mean + noise @ self.scale_tril_t, dim=1)
        return self.model.decode(latent).images


class _SamplerGenerator(nn.Module):
    """noise (B, D), uniform (B,) -> images: a fitted latent sampler's ``transform``, then ``decode``.

    The sampler is kept out of the model's module tree (models/base.py), so it is registered here,
    where the exporter sees its buffers as the graph's weights. Parity is checked against
    ``model.sample(sampler=...)`` itself.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.sampler = model, model.latent_sampler

    def forward(self, noise: Tensor, uniform: Tensor) -> Tensor:
        return self.model.decode(self.sampler.transform(noise, uniform)).images


class _PriorStep(nn.Module):
    """One cached autoregressive step of a :class:`models.priors.CodePrior`."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, prev_token: Tensor, position: Tensor, cache: Tensor, cond_emb: Tensor | None = None):
        return self.prior.step_kv(prev_token, position, cache, cond_emb)


class _PriorCondition(nn.Module):
    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, top_indices: Tensor) -> Tensor:
        return self.prior.embed_condition(top_indices)


# ----------------------------------------------------------------------------------------------------
# The stage


def export_model(
    model_dir: str | Path,
    prepared_dir: str | Path,
    out_dir: str | Path,
    metrics: dict | None = None,
    source: dict | None = None,
    atol: float = 1e-4,
    edit: dict | None = None,
    sample_grids: list[str | Path] | None = None,
) -> dict:
    """Export the model in ``model_dir`` to ONNX graphs + ``manifest.json`` in ``out_dir``; returns the manifest.

    ``prepared_dir``: the prepared data the model was trained on (its test split is the parity data and
    its manifest gives the data set's name and hash). ``metrics`` (evaluation figures) and ``source``
    (``mlflow_run_id``, ``git_commit`` ...) are recorded in the manifest as given. ``atol``: the largest
    allowed absolute difference between ONNX Runtime and PyTorch on any float output; indices must
    match exactly (but for exact ties between two codes, see :func:`_check_codes`). ``edit``: the
    ``edit`` params of the attribute vectors (:func:`pipelines.attributes.edit_settings`; None: the
    defaults). ``sample_grids``: the evaluation's sample grid PNGs (``samples.png`` ...), copied under
    ``sample_grids/`` and listed in the manifest's ``sample_grids`` (file name -> path), so that the
    model card of the served version shows them. Raises :class:`ExportError` on any failure, having
    written nothing.
    """
    edit = edit_settings({"edit": edit})
    grids = _checked_sample_grids(sample_grids or [])
    model_dir, prepared_dir, out_dir = Path(model_dir), Path(prepared_dir), Path(out_dir)
    if read_manifest(prepared_dir).get("kind") == "timeseries":
        return export_series_model(model_dir, prepared_dir, out_dir, metrics, source, atol)
    model, family, data_manifest = _load_model(model_dir, prepared_dir)
    images = _parity_images(prepared_dir)
    with torch.no_grad():
        graphs, latent, sampling = _plan(model, images)
        attributes = None
        if latent["kind"] != "codes" and any(g.name == "encoder" for g in graphs):
            attributes = train_attributes(model, prepared_dir, data_manifest, edit["labels_per_value"], edit["seed"],
                                          edit["method"])

    with atomic_directory(out_dir) as tmp:
        export_graphs(graphs, tmp, atol, external=_weight_bytes(model) > EXTERNAL_DATA_BYTES)
        shutil.copytree(model_dir, tmp / "model")
        manifest = {
            "format_version": FORMAT_VERSION,
            "family": family,
            "model_class": type(model).__name__,
            "model_config": model.config.to_dict(),
            "data": {
                "name": data_manifest.get("name"),
                "data_hash": data_manifest.get("data_hash"),
                "image_shape": [int(v) for v in data_manifest["image_shape"]],
            },
            "pixel_range": [0, 1],
            "layout": "NCHW",
            "preprocessing": PREPROCESSING,
            "latent": latent,
            "sampling": sampling,
            "graphs": {g.name: _graph_entry(g) for g in graphs},
            "parity": {g.name: g.parity for g in graphs},
            "parity_index_ties": {g.name: g.ties for g in graphs if g.ties},
            "parity_atol": atol,
            "metrics": dict(metrics or {}),
            "source": dict(source or {}),
            "opset": OPSET,
        }
        if attributes is not None:
            manifest["attributes"] = write_attributes(tmp, *attributes, edit["labels_per_value"])
        if grids:
            manifest["sample_grids"] = _copy_sample_grids(grids, tmp)
        # Not key-sorted: a graph's inputs and outputs are listed in the graph's own order.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


SAMPLE_GRIDS_DIR = "sample_grids"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _checked_sample_grids(paths: list[str | Path]) -> list[Path]:
    """``paths`` as Paths, each an existing PNG file, their names distinct; else :class:`ExportError`."""
    grids = [Path(p) for p in paths]
    for grid in grids:
        if not grid.is_file():
            raise ExportError(f"sample grid {grid}: no such file")
        with grid.open("rb") as f:
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                raise ExportError(f"sample grid {grid}: not a PNG file")
    names = [g.name for g in grids]
    if len(set(names)) != len(names):
        raise ExportError(f"sample grids with the same file name: {', '.join(sorted(names))}")
    return grids


def _copy_sample_grids(grids: list[Path], out_dir: Path) -> dict[str, str]:
    """Copy ``grids`` into ``out_dir/sample_grids``; returns the manifest's entry (file name -> path in the export)."""
    (out_dir / SAMPLE_GRIDS_DIR).mkdir()
    for grid in grids:
        shutil.copyfile(grid, out_dir / SAMPLE_GRIDS_DIR / grid.name)
    return {grid.name: f"{SAMPLE_GRIDS_DIR}/{grid.name}" for grid in grids}


def _load_model(model_dir: Path, prepared_dir: Path) -> tuple[PretrainedModel, str, dict[str, Any]]:
    """The model in eval mode, its family and the prepared data's manifest, checked to fit each other."""
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"no model at {model_dir} (no config.json); give a save_pretrained directory")
    data_manifest = read_manifest(prepared_dir)
    model = PretrainedModel.from_pretrained(model_dir)
    model.eval()  # a GAN decodes with its EMA generator in eval mode only
    family = next((name for name, cls in MODELS.items() if cls is type(model)), None)
    if family is None:
        raise ExportError(f"{type(model).__name__} is not a registered family (models.MODELS)")
    config = model.config
    image_shape = [int(v) for v in data_manifest["image_shape"]]  # H, W, C
    expected = [config.image_size, config.image_size, config.channels]
    if image_shape != expected:
        raise ExportError(
            f"the data {data_manifest.get('name')!r} at {prepared_dir} has {_hwc(image_shape)} images but the model "
            f"in {model_dir} takes {_hwc(expected)}; export with the data the model was trained on"
        )
    return model, family, data_manifest


def _parity_images(prepared_dir: Path) -> Tensor:
    """Up to :data:`MAX_PARITY_IMAGES` test images (N >= 2, C, H, W) float32 in [0, 1]: the parity data."""
    test = load_split(prepared_dir, "test")["images"][:MAX_PARITY_IMAGES]
    if len(test) == 0:
        raise DataError(f"{prepared_dir}: the test split is empty; parity needs real images (give data.splits.test > 0)")
    images = batch_to_tensor(np.array(test))  # a writable copy (the split is a read-only buffer)
    if len(images) < 2:  # the export traces a batch of 2 (a batch of 1 would be specialised as static)
        images = images.repeat(2, 1, 1, 1)
    return images


def _graph_entry(graph: Graph) -> dict[str, Any]:
    """The manifest's entry of one exported graph: its file, input and output shapes, dtypes."""
    return {
        "file": graph.file,
        "inputs": {k: shape for k, (shape, _) in graph.inputs.items()},
        "outputs": {k: shape for k, (shape, _) in graph.outputs.items()},
        "dtypes": {k: dtype for k, (_, dtype) in {**graph.inputs, **graph.outputs}.items()},
    }


# ----------------------------------------------------------------------------------------------------
# Planning the graphs of a family


def _plan(model: nn.Module, images: Tensor) -> tuple[list[Graph], dict, dict]:
    """The graphs ``model`` needs, with their parity checks, plus the manifest's latent and sampling."""
    gen = torch.Generator().manual_seed(0)
    c = model.config
    img = [None, c.channels, c.image_size, c.image_size]
    graphs: list[Graph] = []

    if isinstance(model, VQVAE2):
        return _plan_vqvae2(model, images, gen, img)

    latent_shape = list(latent_shape_of(model))
    lat = [None, *latent_shape]
    real_latents: Tensor | None = None
    kind = "deterministic"
    if model.has_encoder and not isinstance(model, GLO):
        enc = model.encode(images)
        kind = "gaussian" if enc.mean is not None else "deterministic"
        outputs = {"mean": (lat, "float32"), "logvar": (lat, "float32")} if kind == "gaussian" else {"latent": (lat, "float32")}
        real_latents = enc.point

        def check_encoder(session, atol, kind=kind):
            out = model.encode(images)
            ref = {"mean": out.mean, "logvar": out.logvar} if kind == "gaussian" else {"latent": out.latent}
            return compare("encoder", session, {"images": images}, ref, atol, "the test images"), {}

        graphs.append(Graph("encoder", _Encoder(model, kind), {"images": (img, "float32")}, outputs,
                            (images[:2],), {"images": 0}, check_encoder))
    elif isinstance(model, GLO):
        real_latents = model.codes.weight[:MAX_PARITY_IMAGES].detach()  # the codes of training images

    random_latents = torch.randn((3, *latent_shape), generator=gen)

    def check_decoder(session, atol):
        cases = [("random latents", random_latents)]
        if real_latents is not None:
            cases.insert(0, ("latents of the test images" if not isinstance(model, GLO) else "learned codes", real_latents))
        worst = 0.0
        for label, z in cases:
            worst = max(worst, compare("decoder", session, {"latent": z}, {"images": model.decode(z).images}, atol, label))
        return worst, {}

    graphs.append(Graph("decoder", Decoder(model), {"latent": (lat, "float32")}, {"images": (img, "float32")},
                        (random_latents[:2],), {"latent": 0}, check_decoder))

    sampling: dict[str, Any] = {"kind": "none"}
    if "noise" in inspect.signature(model.sample).parameters:
        noise = torch.randn((5, *latent_shape), generator=gen)
        module = _CodeDistributionGenerator(model) if isinstance(model, GLO) else _Generator(model)

        def check_generator(session, atol):
            ref = model.sample(noise.shape[0], noise=noise).images
            return compare("generator", session, {"noise": noise}, {"images": ref}, atol, "random noise"), {}

        graphs.append(Graph("generator", module, {"noise": (lat, "float32")}, {"images": (img, "float32")},
                            (noise[:2],), {"noise": 0}, check_generator))
        sampling = {"kind": "noise", "graph": "generator", "noise_shape": latent_shape, "distribution": "standard_normal",
                    "samplers": ["prior"], "default_sampler": "prior", "sampler_graphs": {"prior": "generator"}}
        if model.latent_sampler is not None:
            _plan_sampler(graphs, sampling, model, img, gen)
    return graphs, {"kind": kind, "shape": latent_shape}, sampling


def _plan_sampler(graphs: list[Graph], sampling: dict, model: nn.Module, img: list, gen: torch.Generator) -> None:
    """Append the graph of the model's fitted latent sampler (``generator_<kind>``) to ``graphs`` and
    make it the default sampler in ``sampling``. Parity: random noise with uniforms that pick every
    component, the ends of [0, 1) included."""
    kind, dim = model.latent_sampler.kind, model.latent_sampler.dim
    name = f"generator_{kind}"
    weights = model.latent_sampler.weights.detach().float().cpu()
    cumulative = torch.cumsum(weights, 0) / weights.sum()
    middles = cumulative - weights / weights.sum() / 2  # the middle of each component's interval
    uniform = torch.cat([torch.tensor([0.0, 1.0 - 2.0**-24]), middles])
    noise = torch.randn((len(uniform), dim), generator=gen)

    def check_sampler(session, atol):
        ref = model.sample(len(noise), noise=noise, uniform=uniform, sampler=kind).images
        feed = {"noise": noise, "uniform": uniform}
        return compare(name, session, feed, {"images": ref}, atol, "random noise and uniforms"), {}

    graphs.append(Graph(name, _SamplerGenerator(model), {"noise": ([None, dim], "float32"), "uniform": ([None], "float32")},
                        {"images": (img, "float32")}, (noise[:2], uniform[:2]), {"noise": 0, "uniform": 0}, check_sampler))
    sampling["samplers"].append(kind)
    sampling["sampler_graphs"][kind] = name
    sampling["default_sampler"] = kind


def _plan_vqvae2(model, images: Tensor, gen: torch.Generator, img: list) -> tuple[list[Graph], dict, dict]:
    c = model.config
    k = c.num_codes
    ht, wt = model.top_shape
    hb, wb = model.bottom_shape
    top_real, bottom_real = model.encode(images).indices
    top_rand = torch.randint(0, k, (3, ht, wt), generator=gen)
    bottom_rand = torch.randint(0, k, (3, hb, wb), generator=gen)
    top_spec, bottom_spec = ([None, ht, wt], "int64"), ([None, hb, wb], "int64")

    def check_encoder(session, atol):
        return _check_codes(model, session, images, atol)

    def check_decoder(session, atol):
        worst = 0.0
        for label, top, bottom in (("codes of the test images", top_real, bottom_real), ("random codes", top_rand, bottom_rand)):
            ref = {"images": model.decode_indices(top, bottom).images}
            worst = max(worst, compare("decoder", session, {"top_indices": top, "bottom_indices": bottom}, ref, atol, label))
        return worst, {}

    graphs = [
        Graph("encoder", _Encoder(model, "codes"), {"images": (img, "float32")},
              {"top_indices": top_spec, "bottom_indices": bottom_spec}, (images[:2],), {"images": 0}, check_encoder),
        Graph("decoder", IndexDecoder(model), {"top_indices": top_spec, "bottom_indices": bottom_spec},
              {"images": (img, "float32")}, (top_rand[:2], bottom_rand[:2]), {"top_indices": 0, "bottom_indices": 0},
              check_decoder),
    ]
    levels = {
        "top": _plan_prior(graphs, "top", model.prior_top, (top_real, top_rand), None, k),
        "bottom": _plan_prior(graphs, "bottom", model.prior_bottom, (bottom_real, bottom_rand), (top_real, top_rand), k),
    }
    latent = {
        "kind": "codes",
        "shape": list(model.latent_shape),  # encode(x).latent in PyTorch; the graphs exchange indices
        "num_codes": k,
        "levels": ["top", "bottom"],
        "indices": {"top": [ht, wt], "bottom": [hb, wb]},
    }
    sampling = {
        "kind": "prior",
        "samplers": ["prior"],
        "default_sampler": "prior",
        "num_codes": k,
        "order": ["top", "bottom"],  # bottom is conditioned on top
        "levels": levels,
        "decoder": "decoder",
    }
    return graphs, latent, sampling


def _plan_prior(graphs: list[Graph], level: str, prior, codes: tuple[Tensor, Tensor], cond: tuple[Tensor, Tensor] | None,
                num_codes: int) -> dict[str, Any]:
    """Append the graphs of one VQ-VAE-2 prior level to ``graphs``; return the level's sampling entry.

    ``codes``: (codes of the test images, random codes) of this level, (N, h, w) int64; ``cond``: the
    same of the top level for the bottom prior (conditioned on it), None for the top prior. The step
    graph's parity is teacher-forced over every position; a conditioned level also gets its
    ``prior_<level>_condition`` graph (``top_indices`` -> ``cond_emb``).
    """
    real, rand = codes
    cond_real, cond_rand = cond if cond is not None else (None, None)
    cache = list(prior.new_cache(1).shape)
    cache[2] = None
    name = f"prior_{level}_step"
    inputs = {"prev_token": ([None], "int64"), "position": ([], "int64"), "cache": (cache, "float32")}
    batch_axes = {"prev_token": 0, "cache": 2}
    example: tuple[Tensor, ...] = (rand[:2, 0, 0].clone(), torch.tensor(1), prior.new_cache(2))
    if cond_real is not None:
        inputs["cond_emb"] = ([None, prior.length, prior.dim], "float32")
        batch_axes["cond_emb"] = 0
        example += (prior.embed_condition(cond_rand[:2]),)

    def check_step(session, atol):
        worst = 0.0
        for label, codes, cond in (("codes of the test images", real, cond_real), ("random codes", rand, cond_rand)):
            worst = max(worst, _check_prior_steps(name, prior, session, codes, cond, atol, label))
        return worst, {}

    kv = [*cache[:4], 1, cache[5]]
    graphs.append(Graph(name, _PriorStep(prior), inputs,
                        {"logits": ([None, num_codes], "float32"), "new_kv": (kv, "float32")},
                        example, batch_axes, check_step))
    entry = {"graph": name, "shape": [prior.height, prior.width], "length": prior.length, "cache_shape": cache,
             "step_output": "new_kv"}
    if cond_real is not None:
        cond_graph = f"prior_{level}_condition"
        entry["condition_graph"] = cond_graph

        def check_condition(session, atol):
            worst = 0.0
            for label, cond in (("codes of the test images", cond_real), ("random codes", cond_rand)):
                ref = {"cond_emb": prior.embed_condition(cond)}
                worst = max(worst, compare(cond_graph, session, {"top_indices": cond}, ref, atol, label))
            return worst, {}

        graphs.append(Graph(cond_graph, _PriorCondition(prior), {"top_indices": ([None, *cond_real.shape[1:]], "int64")},
                            {"cond_emb": ([None, prior.length, prior.dim], "float32")},
                            (cond_rand[:2],), {"top_indices": 0}, check_condition))
    return entry


# ----------------------------------------------------------------------------------------------------
# Parity checks beyond onnx_graphs.compare


def _check_prior_steps(graph: str, prior, session, codes: Tensor, cond: Tensor | None, atol: float, label: str) -> float:
    """Teacher-force ``codes`` through every position with PyTorch's and ONNX's step, each on its own
    cache (as sampling does: ONNX's ``new_kv`` written into its cache in place); compare the logits and
    the caches at every step."""
    with torch_threads(1):
        return _teacher_force(graph, prior, session, codes, cond, atol, label)


def _teacher_force(graph: str, prior, session, codes: Tensor, cond: Tensor | None, atol: float, label: str) -> float:
    b = codes.shape[0]
    flat = codes.reshape(b, -1)
    cond_emb = prior.embed_condition(cond) if cond is not None else None
    cache = prior.new_cache(b)
    onnx_cache = cache.numpy().copy()  # written in place below
    worst = 0.0
    for i in range(prior.length):
        prev = flat[:, i - 1] if i else torch.zeros(b, dtype=torch.long)
        logits, cache = prior.step_logits(prev, i, cache, cond_emb)
        feed = {"prev_token": prev.numpy(), "position": np.array(i, dtype=np.int64), "cache": onnx_cache}
        if cond_emb is not None:
            feed["cond_emb"] = cond_emb.numpy()
        onnx_logits, onnx_kv = session.run(["logits", "new_kv"], feed)
        onnx_cache[:, :, :, :, i : i + 1] = onnx_kv
        for name, actual, expected in (("logits", onnx_logits, logits), ("new_kv", onnx_cache, cache)):
            diff = float(np.max(np.abs(actual.astype(np.float64) - expected.numpy().astype(np.float64))))
            if not np.isfinite(diff) or diff > atol:
                raise ExportError(
                    f"parity: graph {graph!r}, output {name!r}: max |onnx - torch| = {diff:.3g} > atol {atol:g} "
                    f"at position {i} on {label}"
                )
            worst = max(worst, diff)
    return worst


def _check_codes(model, session, images: Tensor, atol: float) -> tuple[float, dict[str, int]]:
    """VQ-VAE-2 encoder parity: the ONNX indices must equal PyTorch's, except at exact ties.

    ONNX Runtime's convolutions sum in another order than PyTorch's, so an encoder output can move by
    ~1e-6. Where it lies (within that) as near to two codes, the argmin may pick either: both are the
    nearest code, neither answer is wrong. A differing index is accepted only when PyTorch's distances
    to the two codes agree within ``1e-4`` of their scale (a tie); any other difference fails. A top
    tie changes the input of the bottom quantiser, so the bottom codes of that image are not compared.
    """
    captured: dict[str, Tensor] = {}
    hooks = [
        quantizer.register_forward_hook(lambda mod, args, out, level=level: captured.__setitem__(level, args[0]))
        for level, quantizer in (("top", model.vq_t), ("bottom", model.vq_b))
    ]
    try:
        top, bottom = model.encode(images).indices
    finally:
        for hook in hooks:
            hook.remove()
    onnx_top, onnx_bottom = session.run(["top_indices", "bottom_indices"], {"images": images.numpy()})
    ties: dict[str, int] = {}
    same_top = np.ones(len(images), dtype=bool)
    for level, name, ref, got, quantizer in (
        ("top", "top_indices", top.numpy(), onnx_top, model.vq_t),
        ("bottom", "bottom_indices", bottom.numpy(), onnx_bottom, model.vq_b),
    ):
        if got.shape != ref.shape or got.dtype != np.int64:
            raise ExportError(f"parity: graph 'encoder', output {name!r}: {got.dtype} {got.shape}, expected int64 {ref.shape}")
        rows = same_top if level == "bottom" else np.ones(len(images), dtype=bool)
        differ = (got != ref) & rows[:, None, None]
        n_ties = 0
        for b, y, x in zip(*np.nonzero(differ)):
            z = captured[level][b, :, y, x].double()
            e = quantizer.embed.double()
            a, o = int(ref[b, y, x]), int(got[b, y, x])
            gap = abs(float((z - e[a]).square().sum() - (z - e[o]).square().sum()))
            scale = float(z.square().sum() + e[a].square().sum() + e[o].square().sum())
            if gap > 1e-4 * max(scale, 1.0):
                raise ExportError(
                    f"parity: graph 'encoder', output {name!r}: {int(differ.sum())} of {ref.size} indices differ "
                    f"from PyTorch (image {b}, cell {y},{x}: {o} vs {a}, distance gap {gap:.3g}, not a tie)"
                )
            n_ties += 1
        ties[name] = n_ties
        if level == "top":
            same_top = ~np.any(got != ref, axis=(1, 2))
    return 0.0, {k: v for k, v in ties.items() if v}


# ----------------------------------------------------------------------------------------------------
# From params (the CLI)


def export_from_params(
    params: dict, family: str, out: str | Path | None = None, metrics_path: str | Path | None = None
) -> tuple[Path, dict]:
    """Resolve the paths of ``latentforge export --model <family>`` from ``params`` and export.

    Model: ``<train.output_dir>/<family>/model``; data: ``<data.output_dir>/<data.name>``; metrics:
    ``metrics_path`` or, when present, ``artifacts/evaluate/<family>/metrics.json``; sample grids: the
    evaluation's ``plots/*samples.png`` beside that metrics file (none without); source: the
    training run recorded in ``<train.output_dir>/<family>/metrics.json``. Returns ``(out_dir, manifest)``.
    """
    if family not in MODELS:
        raise ConfigError(f"unknown model family {family!r}; choose one of: {', '.join(sorted(MODELS))}")
    train_dir = Path(section(params, "train")["output_dir"]) / family
    model_dir = train_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"no trained model at {model_dir}; run `latentforge train --model {family}` (or `dvc repro`) first")
    data = section(params, "data")
    prepared_dir = Path(data["output_dir"]) / data["name"]
    data_hash = read_manifest(prepared_dir).get("data_hash")

    source: dict[str, Any] = {"model_dir": str(model_dir), "git_commit": git_commit()}
    train_metrics_path = train_dir / "metrics.json"
    if train_metrics_path.is_file():
        trained = json.loads(train_metrics_path.read_text())
        if trained.get("data_hash") and data_hash and trained["data_hash"] != data_hash:
            raise ExportError(
                f"{model_dir} was trained on data {trained['data_hash'][:12]}, but {prepared_dir} holds "
                f"{data_hash[:12]}; re-run `latentforge train --model {family}` on this data"
            )
        source.update({k: trained[k] for k in ("mlflow_run_id", "mlflow_model_id", "run_name", "checkpoint", "val_metric", "val_score") if k in trained})

    if metrics_path is not None:
        metrics_path = Path(metrics_path)
        if not metrics_path.is_file():
            raise FileNotFoundError(f"--metrics {metrics_path}: no such file")
    else:
        evaluate_dir = Path(((params.get("evaluate") or {}).get("output_dir")) or "artifacts/evaluate")
        candidate = evaluate_dir / family / "metrics.json"
        metrics_path = candidate if candidate.is_file() else None
    metrics = {}
    sample_grids = []
    if metrics_path is not None:
        # Each sampler's grid of samples (samples.png, gmm_samples.png ...), drawn by evaluate.
        sample_grids = sorted((metrics_path.parent / "plots").glob("*samples.png"))
        try:
            metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as exc:
            raise ExportError(f"{metrics_path}: not valid JSON ({exc})") from None
        if not isinstance(metrics, dict):
            raise ExportError(f"{metrics_path}: expected a JSON object of metrics")

    if out is None:
        out = Path(((params.get("export") or {}).get("output_dir")) or "artifacts/export") / family
    out = Path(out)
    manifest = export_model(model_dir, prepared_dir, out, metrics=metrics, source=source, edit=params.get("edit"),
                             sample_grids=sample_grids)
    return out, manifest


# ----------------------------------------------------------------------------------------------------
# Time series: one graph, ``reconstruct``


class _Reconstruct(nn.Module):
    """``windows`` (B, T, F) in [0, 1] -> ``reconstruction`` (B, T, F): ``model.reconstruct_series``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, windows: Tensor) -> Tensor:
        return self.model.reconstruct_series(windows)


def export_series_model(model_dir: Path, prepared_dir: Path, out_dir: Path, metrics: dict | None, source: dict | None,
                        atol: float) -> dict:
    """:func:`export_model` for a sequence model trained on a time series (prepared data of kind
    ``timeseries``): the ``reconstruct`` graph, checked against PyTorch on the test part's windows and on
    the per-point scores of the val part (runtime.series.point_scores through both), and a manifest with
    the window, channels, the train-part scaling and the threshold ``evaluate`` chose (``metrics``)."""
    from latentforge.pipelines.series import load_series_part, load_windows
    from latentforge.runtime.series import point_scores

    data_manifest = read_manifest(prepared_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"no model at {model_dir} (no config.json); give a save_pretrained directory")
    model = PretrainedModel.from_pretrained(model_dir).eval()
    family = next((name for name, cls in MODELS.items() if cls is type(model)), None)
    window, channels = data_manifest["window"], data_manifest["channels"]
    if not getattr(model, "is_series", False) or (model.steps, model.features) != (window, channels):
        raise ExportError(f"the model in {model_dir} does not take this data's windows of {window} points x {channels} "
                          f"channel(s); export with the data the model was trained on")
    windows = torch.from_numpy(load_windows(prepared_dir, data_manifest, "test")["windows"][:MAX_PARITY_IMAGES].copy())
    if len(windows) < 2:
        raise DataError(f"{prepared_dir}: the test part has fewer than 2 windows; parity needs real windows")
    val = load_series_part(prepared_dir, data_manifest, "val")["values"]
    shape = [None, window, channels]

    def check(session, atol):
        diff = compare("reconstruct", session, {"windows": windows}, {"reconstruction": model.reconstruct_series(windows)},
                       atol, "the test windows")
        if len(val) >= window:
            run = lambda x: session.run(None, {"windows": x})[0]  # noqa: E731
            ours = point_scores(val, window, lambda x: model.reconstruct_series(torch.from_numpy(x)).numpy())
            gap = float(np.abs(point_scores(val, window, run) - ours).max())
            if gap > atol:
                raise ExportError(f"graph 'reconstruct': per-point scores of the val part differ by {gap:.3g} (> {atol:g})")
            diff = max(diff, gap)
        return diff, {}

    graph = Graph("reconstruct", _Reconstruct(model), {"windows": (shape, "float32")},
                  {"reconstruction": (shape, "float32")}, (windows[:2],), {"windows": 0}, check)
    metrics = dict(metrics or {})
    with atomic_directory(out_dir) as tmp:
        with torch.no_grad():
            export_graphs([graph], tmp, atol)
        shutil.copytree(model_dir, tmp / "model")
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "timeseries",
            "family": family,
            "model_class": type(model).__name__,
            "model_config": model.config.to_dict(),
            "data": {
                "name": data_manifest["name"],
                "data_hash": data_manifest["data_hash"],
                "window": window,
                "channels": channels,
                "channel_names": data_manifest["channel_names"],
                "normalisation": data_manifest["normalisation"],
            },
            "preprocessing": "raw points -> (x - train min) / (train max - train min) per channel -> windows sliding by one point",
            "scoring": "a point's score: the mean over the windows covering it of the channel-mean squared reconstruction error",
            "threshold": metrics.get("threshold"),
            "graphs": {graph.name: _graph_entry(graph)},
            "parity": {graph.name: graph.parity},
            "parity_atol": atol,
            "metrics": metrics,
            "source": dict(source or {}),
            "opset": OPSET,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------------------------------
# Helpers


def _hwc(shape: list[int]) -> str:
    return "x".join(str(v) for v in shape)


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
