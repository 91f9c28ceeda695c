"""Running an exported model with ONNX Runtime and numpy alone: no PyTorch is imported here.

An export directory (``pipelines.export.export_model``) holds ``manifest.json`` and the ONNX graphs.
:func:`load_sessions` opens one ``onnxruntime.InferenceSession`` per graph; :class:`ModelRuntime` wraps
them with the operations serving offers (generate, encode, decode, reconstruct, interpolate,
anomaly-score, edit), each a few numpy lines over the graphs. Which operations a model offers follows from
its manifest (:data:`CAPABILITIES`), and so do its samplers (:func:`samplers`): ``"prior"`` and, where
one was fitted after training, an ex-post latent sampler such as ``"gmm"``, whose graph takes
``noise`` and ``uniform`` drawn here. VQ-VAE-2 samples by running its prior's single-step graphs in a
loop here (:func:`sample_codes`), the randomness drawn by numpy and fed in: no graph draws random
numbers. Editing translates an encoded latent along the difference of the mean latents of labelled
examples (:class:`Attributes`, stored with the export as ``attributes.npz``), then decodes.

The exporter imports the loading and sampling functions from here, so the code that parity-checked an
export is the code that serves it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT_VERSION = 1


class ExportError(RuntimeError):
    """An export could not be produced or read (a graph failed its checks, a manifest of another format);
    the message names the graph or file."""


# ----------------------------------------------------------------------------------------------------
# Sessions


def onnx_session(path: str | Path, providers: list[str] | None = None, spin: bool = True, threads: int = 0):
    """An ``onnxruntime.InferenceSession`` of the graph at ``path``.

    ``spin=False``: ORT's idle threads sleep instead of spin-waiting for the next run; on a machine
    where something else computes between runs (PyTorch in the parity checks, other replicas in
    serving) the spinning would starve it. ``threads``: intra-op threads (0: ORT's default, one per core).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def load_sessions(
    export_dir: str | Path, providers: list[str] | None = None, spin: bool = True, threads: int = 0
) -> tuple[dict, dict[str, Any]]:
    """``(manifest, {graph name: onnxruntime.InferenceSession})`` of an export directory.

    ``providers``: ONNX Runtime execution providers (default: CPU); ``spin``, ``threads``: see
    :func:`onnx_session` (``threads`` 0: one thread for the prior step graphs, one per core for the
    others). Raises ``FileNotFoundError`` without a manifest and :class:`ExportError` for a
    manifest of another ``format_version``.
    """
    export_dir = Path(export_dir)
    path = export_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir}: no manifest.json; is it an export directory (`latentforge export`)?")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {manifest.get('format_version')!r}; this code reads {FORMAT_VERSION}")
    # A prior step is ~100 tiny ops run hundreds of times per sample: with 2+ intra-op threads each op
    # pays a thread hand-off that costs more than its work (and much more on a busy machine), so these
    # graphs get one thread unless ``threads`` is set.
    steps = {level["graph"] for level in (manifest.get("sampling") or {}).get("levels", {}).values()}
    sessions = {
        name: onnx_session(export_dir / g["file"], providers, spin=spin, threads=threads or (1 if name in steps else 0))
        for name, g in manifest["graphs"].items()
    }
    return manifest, sessions


# ----------------------------------------------------------------------------------------------------
# VQ-VAE-2 sampling from the exported graphs


def pick_tokens_np(logits: np.ndarray, noise: np.ndarray, temperature: float | np.ndarray = 1.0,
                   top_k: int | None = None) -> np.ndarray:
    """numpy twin of :func:`models.priors.pick_tokens`: Gumbel-max over ``logits`` (B, K) / ``temperature``
    restricted to the ``top_k`` largest, with uniform ``noise`` (B, K) in [0, 1). ``temperature``: a
    number or one per row, (B, 1). Returns (B,) int64."""
    logits = logits.astype(np.float32) / np.asarray(temperature, dtype=np.float32)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = -np.partition(-logits, top_k - 1, axis=-1)[..., top_k - 1 : top_k]
        logits = np.where(logits < kth, np.float32(-np.inf), logits)
    u = np.clip(noise.astype(np.float32), 1e-10, 1.0 - 1e-7)
    return np.argmax(logits - np.log(-np.log(u)), axis=-1).astype(np.int64)


def sample_codes(
    sessions: dict[str, Any],
    manifest: dict,
    draws: list[tuple[int, np.random.Generator, float]],
    top_k: int | None = None,
) -> dict[str, np.ndarray]:
    """VQ-VAE-2 samples for several draws in one batch: top codes from the top prior's step graph,
    bottom codes given the top ones, then the decoder.

    ``draws``: ``(n, rng, temperature)`` per caller. Each draw takes its uniforms from its own ``rng``
    ((n, K) per step, in order), so a draw gives the same codes alone or batched with others (up to
    ONNX Runtime's float rounding at other batch sizes). Returns ``top_indices`` (N, ht, wt) int64,
    ``bottom_indices`` (N, hb, wb) int64 and ``images`` (N, C, H, W) float32 in [0, 1], N = sum of n,
    rows in the order of ``draws``.
    """
    sampling = manifest.get("sampling", {})
    if sampling.get("kind") != "prior":
        raise ValueError(f"{manifest.get('family')}: this export samples from {sampling.get('kind')!r}, not a code prior")
    for n, _, temperature in draws:
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    total = sum(n for n, _, _ in draws)
    k = sampling["num_codes"]
    temps = np.concatenate([np.full((n, 1), t, dtype=np.float32) for n, _, t in draws])
    codes: dict[str, np.ndarray] = {}
    for level in sampling["order"]:
        spec = sampling["levels"][level]
        cond_emb = None
        if "condition_graph" in spec:
            cond_emb = sessions[spec["condition_graph"]].run(["cond_emb"], {"top_indices": codes["top"]})[0]
        step = sessions[spec["graph"]]
        cache = np.zeros([total if d is None else d for d in spec["cache_shape"]], dtype=np.float32)
        prev = np.zeros(total, dtype=np.int64)
        out = np.empty((total, spec["length"]), dtype=np.int64)
        writes_kv = spec.get("step_output") == "new_kv"  # older exports return the whole new cache
        for i in range(spec["length"]):
            feed = {"prev_token": prev, "position": np.array(i, dtype=np.int64), "cache": cache}
            if cond_emb is not None:
                feed["cond_emb"] = cond_emb
            if writes_kv:
                # Only this position's keys/values come back; write them into the cache in place.
                logits, kv = step.run(["logits", "new_kv"], feed)
                cache[:, :, :, :, i : i + 1] = kv
            else:
                logits, cache = step.run(["logits", "new_cache"], feed)
            noise = np.concatenate([rng.random((n, k), dtype=np.float32) for n, rng, _ in draws])
            prev = pick_tokens_np(logits, noise, temps, top_k)
            out[:, i] = prev
        codes[level] = out.reshape(total, *spec["shape"])
    images = sessions[sampling["decoder"]].run(["images"], {"top_indices": codes["top"], "bottom_indices": codes["bottom"]})[0]
    return {"top_indices": codes["top"], "bottom_indices": codes["bottom"], "images": images}


def sample_vqvae2_onnx(
    sessions: dict[str, Any],
    manifest: dict,
    n: int,
    seed: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> dict[str, np.ndarray]:
    """Draw ``n`` VQ-VAE-2 samples with the exported graphs (no PyTorch); :func:`sample_codes` for one draw.

    Randomness is a ``numpy.random.default_rng(seed)`` whose uniforms feed the Gumbel-max pick outside
    the graphs, so a seed reproduces the draw. ``temperature`` scales the logits; ``top_k`` keeps the k
    likeliest codes at each step (``top_k=1``: greedy, the same codes as PyTorch's greedy sampler).
    """
    return sample_codes(sessions, manifest, [(n, np.random.default_rng(seed), temperature)], top_k)


# ----------------------------------------------------------------------------------------------------
# Editing by attribute vectors

ATTRIBUTES_FILE = "attributes.npz"
MAX_EDIT_STRENGTH = 3.0
# translate: z + s (mu_target - mu_source), the source value given or read as the nearest mean;
# difference: z + s (mu_target - the mean of the other values' means), whatever the image shows.
EDIT_METHODS = ("translate", "difference")


class EditRequestError(ValueError):
    """A bad edit: ``field`` is the request field at fault (``factor``, ``value``, ``source``, ``strength``)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class Attributes:
    """Mean latents of labelled examples per value of each factor: what an edit translates along.

    ``values``: factor -> the value names that had labelled examples; ``means``: factor -> (V, *latent)
    float32, row i the mean latent of the examples of ``values[factor][i]``; ``method``: one of
    :data:`EDIT_METHODS`.
    """

    values: dict[str, list[str]]
    means: dict[str, np.ndarray]
    method: str = "translate"

    def index(self, factor: str, value: str, field: str = "value") -> int:
        """The row of ``value`` in ``means[factor]``; an :class:`EditRequestError` naming the known ones."""
        if factor not in self.values:
            raise EditRequestError("factor", f"unknown factor {factor!r}; known: {', '.join(self.values)}")
        if value not in self.values[factor]:
            raise EditRequestError(field, f"{factor} has no value {value!r}; known: {', '.join(self.values[factor])}")
        return self.values[factor].index(value)

    def read(self, factor: str, latents: np.ndarray) -> np.ndarray:
        """The value each latent (B, *latent) is nearest to, by mean: (B,) int64 rows of ``values[factor]``."""
        means = self.means[factor].reshape(len(self.means[factor]), -1).astype(np.float64)
        flat = latents.reshape(len(latents), -1).astype(np.float64)
        distances = (flat**2).sum(1, keepdims=True) - 2 * flat @ means.T + (means**2).sum(1)[None]
        return np.argmin(distances, axis=1).astype(np.int64)

    def shift(self, factor: str, value: str, latents: np.ndarray, strength: float = 1.0,
              source: str | np.ndarray | None = None, method: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(edited latents (B, *latent) float32, source rows (B,) int64)``: ``latents`` moved towards
        ``value`` of ``factor`` by ``strength`` (0 to :data:`MAX_EDIT_STRENGTH`; 1 is the whole mean
        difference). ``source``: the images' current value (a name for all, or (B,) rows), read with
        :meth:`read` when None; ``method`` (default: :attr:`method`) see :data:`EDIT_METHODS`."""
        target = self.index(factor, value)
        if not 0.0 <= float(strength) <= MAX_EDIT_STRENGTH:
            raise EditRequestError("strength", f"{strength} is out of range [0, {MAX_EDIT_STRENGTH:g}]")
        means = self.means[factor]
        if source is None:
            rows = self.read(factor, latents)
        elif isinstance(source, str):
            rows = np.full(len(latents), self.index(factor, source, "source"), dtype=np.int64)
        else:
            rows = np.asarray(source, dtype=np.int64)
        method = method or self.method
        if method == "translate":
            delta = means[target][None] - means[rows]
        elif method == "difference":
            delta = np.broadcast_to(means[target] - np.delete(means, target, axis=0).mean(0), latents.shape)
        else:
            raise ValueError(f"unknown edit method {method!r}; choose one of: {', '.join(EDIT_METHODS)}")
        return (latents + np.float32(strength) * delta).astype(np.float32), rows

    def describe(self) -> dict[str, Any]:
        """What ``edit`` accepts, for ``GET /v1/models``."""
        return {"factors": self.values, "strength": [0.0, MAX_EDIT_STRENGTH], "method": self.method}


def load_attributes(export_dir: str | Path, manifest: dict) -> Attributes | None:
    """The export's :class:`Attributes` (its manifest's ``attributes`` entry and file), None without."""
    entry = manifest.get("attributes")
    if not entry:
        return None
    path = Path(export_dir) / entry["file"]
    if not path.is_file():
        raise ExportError(f"{path}: missing; the manifest names it as the attribute vectors' file")
    with np.load(path, allow_pickle=False) as arrays:
        means = {factor: arrays[factor].astype(np.float32) for factor in entry["values"]}
    return Attributes(values={f: list(v) for f, v in entry["values"].items()}, means=means, method=entry["method"])


# ----------------------------------------------------------------------------------------------------
# What a model offers, from its manifest

# Operation -> whether an export's manifest supports it. The HTTP routes ask this before running
# anything, so a model without the graphs an operation needs answers with a clear 4xx. A new operation
# (text-decode: a ``text_map`` graph) adds one line here, one method below and one route.
CAPABILITIES: dict[str, Callable[[dict], bool]] = {
    "generate": lambda m: (m.get("sampling") or {}).get("kind") in ("noise", "prior"),
    "encode": lambda m: "encoder" in m["graphs"],
    "decode": lambda m: "decoder" in m["graphs"],
    "reconstruct": lambda m: "encoder" in m["graphs"] and "decoder" in m["graphs"],
    # Paths between latents need a continuous latent space: VQ-VAE-2's decoder takes code indices.
    "interpolate": lambda m: "decoder" in m["graphs"] and m["latent"]["kind"] != "codes",
    "anomaly-score": lambda m: "encoder" in m["graphs"] and "decoder" in m["graphs"],
    # Attribute vectors are mean latents: a continuous latent, encoded and decoded, that has them.
    "edit": lambda m: "encoder" in m["graphs"] and "decoder" in m["graphs"] and m["latent"]["kind"] != "codes"
    and bool(m.get("attributes")),
}


def capabilities(manifest: dict) -> list[str]:
    """The operations (keys of :data:`CAPABILITIES`) this export supports, in that order."""
    return [op for op, supported in CAPABILITIES.items() if supported(manifest)]


def samplers(manifest: dict) -> tuple[list[str], str | None]:
    """``(samplers, default)`` of an export: the names ``generate`` accepts as ``sampler`` (``"prior"``
    first) and the one it uses when none is named; ``([], None)`` for a model that cannot generate.
    Exports from before samplers were recorded have the prior alone."""
    sampling = manifest.get("sampling") or {}
    if sampling.get("kind") not in ("noise", "prior"):
        return [], None
    names = list(sampling.get("samplers") or ["prior"])
    return names, sampling.get("default_sampler") or names[0]


# A graph call: (graph name, {input name: array with the batch first}) -> {output name: array}.
RunGraph = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


class ModelRuntime:
    """One exported model version, ready to serve: its manifest, sessions and the numpy operations.

    Every operation takes validated float32 arrays (images (B, C, H, W) in [0, 1], latents
    (B, *latent_shape)) and calls the graphs through ``run`` (default: the sessions directly), so that
    serving can pass a batching ``run`` with the same code. ``name``/``version``/``alias`` say which
    registered version this is.
    """

    def __init__(self, manifest: dict, sessions: dict[str, Any], name: str = "", version: str = "", alias: str | None = None,
                 attributes: Attributes | None = None):
        self.manifest, self.sessions, self.attributes = manifest, sessions, attributes
        self.name, self.version, self.alias = name, str(version), alias
        h, w, c = manifest["data"]["image_shape"]
        self.image_shape = (int(c), int(h), int(w))  # CHW, as the graphs take it
        self.latent_kind = manifest["latent"]["kind"]
        self.latent_shape = tuple(manifest["latent"]["shape"])
        self.capabilities = capabilities(manifest)
        self.samplers, self.default_sampler = samplers(manifest)

    @classmethod
    def from_export(cls, export_dir: str | Path, name: str = "", version: str = "", alias: str | None = None,
                    threads: int = 0) -> "ModelRuntime":
        manifest, sessions = load_sessions(export_dir, spin=False, threads=threads)
        return cls(manifest, sessions, name, version, alias, load_attributes(export_dir, manifest))

    # -- graphs ---------------------------------------------------------------------------------------

    def run_graph(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one graph on ``feeds``; returns every output by name."""
        names = list(self.manifest["graphs"][graph]["outputs"])
        return dict(zip(names, self.sessions[graph].run(names, feeds)))

    def decoder_inputs(self) -> dict[str, list]:
        """The decoder's inputs and their shapes without the batch (latent, or top/bottom indices)."""
        return {k: v[1:] for k, v in self.manifest["graphs"]["decoder"]["inputs"].items()}

    @property
    def anomaly_threshold(self) -> float | None:
        value = (self.manifest.get("metrics") or {}).get("anomaly_threshold")
        return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else None

    # -- operations -----------------------------------------------------------------------------------

    def noise(self, n: int, rng: np.random.Generator, temperature: float) -> np.ndarray:
        """The generator's input for one draw: standard normal (n, *noise_shape) scaled by ``temperature``."""
        shape = self.manifest["sampling"]["noise_shape"]
        return (rng.standard_normal((n, *shape), dtype=np.float32) * np.float32(temperature)).astype(np.float32)

    def check_sampler(self, sampler: str | None) -> str:
        """``sampler``, or the default one when None; a ``ValueError`` naming the choices when this export
        has no such sampler."""
        sampler = self.default_sampler if sampler is None else sampler
        if sampler not in self.samplers:
            have = ", ".join(self.samplers) or "none: it cannot generate"
            raise ValueError(f"{self.name or self.manifest['family']} has no sampler {sampler!r} (it has: {have})")
        return sampler

    def sampler_feeds(self, sampler: str, n: int, rng: np.random.Generator, temperature: float
                      ) -> tuple[str, dict[str, np.ndarray]]:
        """``(graph, feeds)`` of one draw of a noise family with a checked ``sampler``: the prior's
        generator on :meth:`noise`; a fitted sampler's graph on that noise and ``uniform`` (n,) in [0, 1)
        (which picks the mixture component), both drawn from ``rng`` in that order. ``temperature``
        scales the noise (the spread within a component), not the uniform."""
        noise = self.noise(n, rng, temperature)
        graph = (self.manifest["sampling"].get("sampler_graphs") or {}).get(sampler, "generator")
        if sampler == "prior":
            return graph, {"noise": noise}
        return graph, {"noise": noise, "uniform": rng.random(n, dtype=np.float32)}

    def generate(self, n: int, seed: int, temperature: float = 1.0, top_k: int | None = None,
                 run: RunGraph | None = None, sampler: str | None = None) -> np.ndarray:
        """``n`` new images (n, C, H, W) in [0, 1]; the same ``seed`` (and ``sampler``) gives the same images.

        Noise families: the graph of ``sampler`` (default: :attr:`default_sampler`) on noise drawn from
        the seed (:meth:`sampler_feeds`); VQ-VAE-2: its prior (:func:`sample_codes`). An unknown sampler
        is a ``ValueError``.
        """
        sampler = self.check_sampler(sampler)
        rng = np.random.default_rng(seed)
        if self.manifest["sampling"]["kind"] == "prior":
            return sample_codes(self.sessions, self.manifest, [(n, rng, temperature)], top_k)["images"]
        graph, feeds = self.sampler_feeds(sampler, n, rng, temperature)
        return (run or self.run_graph)(graph, feeds)["images"]

    def encode(self, images: np.ndarray, run: RunGraph | None = None) -> dict[str, np.ndarray]:
        """The encoder's outputs for images (B, C, H, W): ``mean``/``logvar``, ``latent`` or the code indices."""
        return (run or self.run_graph)("encoder", {"images": images})

    def decode(self, latents: dict[str, np.ndarray], run: RunGraph | None = None) -> np.ndarray:
        """Images (B, C, H, W) in [0, 1] from the decoder's inputs (see :meth:`decoder_inputs`)."""
        return np.clip((run or self.run_graph)("decoder", latents)["images"], 0.0, 1.0)

    def latent_of(self, encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The decoder's inputs from the encoder's outputs: a Gaussian encoder's mean, else as they are."""
        return {name: encoded[name] if name in encoded else encoded["mean"] for name in self.decoder_inputs()}

    def reconstruct(self, images: np.ndarray, run: RunGraph | None = None) -> np.ndarray:
        """Decode(encode(images)) (B, C, H, W) in [0, 1]; a VAE decodes its posterior mean."""
        return self.decode(self.latent_of(self.encode(images, run)), run)

    def anomaly_scores(self, images: np.ndarray, run: RunGraph | None = None) -> np.ndarray:
        """Per-image reconstruction MSE (B,) float64, the score ``latentforge evaluate`` thresholds."""
        recon = self.reconstruct(images, run)
        return np.square(images.astype(np.float64) - recon.astype(np.float64)).reshape(len(images), -1).mean(1)

    def interpolate(self, a: np.ndarray, b: np.ndarray, steps: int, run: RunGraph | None = None) -> np.ndarray:
        """Images (steps, C, H, W) decoded along the straight line from latent ``a`` to ``b`` (each
        (*latent_shape)), both ends included."""
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32).reshape(-1, *([1] * len(self.latent_shape)))
        path = ((1 - t) * a[None] + t * b[None]).astype(np.float32)
        return self.decode({"latent": path}, run)

    def edit(self, images: np.ndarray, factor: str, value: str, strength: float = 1.0, source: str | None = None,
             run: RunGraph | None = None) -> tuple[np.ndarray, list[str]]:
        """Images (B, C, H, W) edited to show ``value`` of ``factor``: encode, translate the latent by
        ``strength`` along the attribute vector (:meth:`Attributes.shift`), decode. Returns the images in
        [0, 1] and each image's source value (given, or read from its latent). A bad factor, value,
        source or strength is an :class:`EditRequestError`; a model without attributes a ``ValueError``."""
        if "edit" not in self.capabilities or self.attributes is None:
            raise ValueError(f"{self.name or self.manifest['family']} cannot edit: its export has no attribute vectors")
        latents = self.latent_of(self.encode(images, run))["latent"]
        edited, rows = self.attributes.shift(factor, value, latents, strength, source)
        names = self.attributes.values[factor]
        return self.decode({"latent": edited}, run), [names[r] for r in rows]

    def describe(self) -> dict[str, Any]:
        """What is served, for ``GET /v1/models``."""
        m = self.manifest
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "family": m["family"],
            "capabilities": self.capabilities,
            "samplers": self.samplers,
            "default_sampler": self.default_sampler,
            "image_shape": list(self.image_shape),
            "latent": m["latent"],
            "data": m.get("data"),
            "metrics": m.get("metrics") or {},
            "anomaly_threshold": self.anomaly_threshold,
            "edit": ({**self.attributes.describe(), "labels_per_value": m["attributes"].get("labels_per_value")}
                     if self.attributes is not None and "edit" in self.capabilities else None),
        }
