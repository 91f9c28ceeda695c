"""ONNX graph helpers both exporters share (images: :mod:`pipelines.export`, text: :mod:`pipelines.text.export`).

A :class:`Graph` is one torch module to export with its declared inputs and outputs, an example input,
its batch axes and its parity check. :func:`export_graphs` exports a list of them into a directory: each
with ``torch.onnx.export`` (the torch.export-based exporter, a dynamic batch axis, opset :data:`OPSET`),
rewritten without ``CastLike``, checked by ``onnx.checker`` (``full_check``), refused when it holds a
random op or when its signature differs from the declared one, then compared against PyTorch in an
ONNX Runtime session (:func:`compare`). The first failure raises :class:`ExportError`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from latentforge.pipelines.common.progress import progress
from latentforge.runtime.images import ExportError, onnx_session

OPSET = 18
# Ops that draw random numbers inside a graph: none may appear (DESIGN.md, "Exported graphs").
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"})


@dataclass
class Graph:
    """One graph to export. ``inputs``/``outputs``: name -> (shape with None for the batch, dtype);
    ``batch_axes``: input name -> its batch axis (absent: static). ``check(session, atol)`` compares ONNX
    Runtime with PyTorch and returns ``(max_abs_diff, index_ties)``; :func:`export_graphs` fills ``file``,
    ``parity`` and ``ties``."""

    name: str
    module: nn.Module
    inputs: dict[str, tuple[list[int | None], str]]
    outputs: dict[str, tuple[list[int | None], str]]
    example: tuple[Tensor, ...]
    batch_axes: dict[str, int]
    check: Callable[[Any, float], tuple[float, dict[str, int]]]
    file: str = ""
    parity: float = 0.0
    ties: dict[str, int] = field(default_factory=dict)


class Decoder(nn.Module):
    """``latent`` (B, *latent_shape) -> ``images`` (B, C, H, W): ``model.decode(latent).images``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, latent: Tensor) -> Tensor:
        return self.model.decode(latent).images


class IndexDecoder(nn.Module):
    """``top_indices`` (B, ht, wt), ``bottom_indices`` (B, hb, wb) int64 -> ``images`` (B, C, H, W) (VQ-VAE-2)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, top_indices: Tensor, bottom_indices: Tensor) -> Tensor:
        return self.model.decode_indices(top_indices, bottom_indices).images


def export_graphs(graphs: list[Graph], directory: Path, atol: float, external: bool = False) -> None:
    """Export each graph to ``directory/<name>.onnx`` and check its parity at once (a failure stops early).

    Sets each graph's ``file``, ``parity`` and ``ties``. ``external``: keep weights in side files
    (``<graph>.onnx.data``). Raises :class:`ExportError` on the first failure.
    """
    with reuse_onnx_registry():
        for graph in progress(graphs, f"export {len(graphs)} ONNX graphs", unit="graphs"):
            graph.file = f"{graph.name}.onnx"
            export_graph(graph, directory / graph.file, external)
            session = onnx_session(directory / graph.file, spin=False)
            with torch.no_grad():
                graph.parity, graph.ties = graph.check(session, atol)


def export_graph(graph: Graph, path: Path, external: bool) -> None:
    """Export ``graph.module`` to ``path`` (batch axes dynamic) and check it; raises :class:`ExportError`."""
    batch = torch.export.Dim("batch", min=1)
    names = list(graph.inputs)
    dynamic = tuple({graph.batch_axes[n]: batch} if n in graph.batch_axes else None for n in names)
    graph.module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph.module, graph.example, str(path), input_names=names, output_names=list(graph.outputs),
                opset_version=OPSET, dynamo=True, dynamic_shapes=dynamic, external_data=external, verbose=False,
            )
    except Exception as exc:  # the exporter's errors are long; the first line says what failed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"graph {graph.name!r}: torch.onnx.export failed: {first}") from exc
    _cast_like_to_cast(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"graph {graph.name!r}: onnx.checker rejected it: {exc}") from exc
    found = sorted(graph_op_types(path) & RANDOM_OPS)
    if found:
        raise ExportError(f"graph {graph.name!r} contains random ops ({', '.join(found)}); noise must be an input")
    _check_signature(graph, onnx.load(str(path), load_external_data=False))


def _cast_like_to_cast(path: Path) -> None:
    """Rewrite ``CastLike(x, like)`` as ``Cast(x, to=<element type of like>)``, its definition.

    The exporter leaves CastLike nodes on constants; ONNX Runtime has no kernel to fold them and warns
    about each one whenever a session is created (every serving replica). Types come from ONNX shape
    inference; a node whose target type is unknown is left as it is. Parity is checked afterwards.
    """
    proto = onnx.load(str(path), load_external_data=False)  # initializers keep their external references
    if not any(n.op_type == "CastLike" for n in proto.graph.node):
        return
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    types.update({t.name: t.data_type for t in inferred.initializer})
    for node in proto.graph.node:
        if node.op_type == "CastLike" and types.get(node.input[1]):
            cast = onnx.helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=types[node.input[1]])
            node.CopyFrom(cast)
    onnx.save(proto, str(path))


def _op_types(g) -> set[str]:
    """Every node op type of an ONNX graph, its subgraphs (If/Loop bodies) included."""
    ops = set()
    for node in g.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.g.node:
                ops |= _op_types(attr.g)
            for sub in attr.graphs:
                ops |= _op_types(sub)
    return ops


def graph_op_types(path: str | Path) -> set[str]:
    """All op types in the ONNX file at ``path`` (nodes of the graph, its subgraphs and its functions)."""
    proto = onnx.load(str(path), load_external_data=False)
    ops = _op_types(proto.graph)
    for fn in proto.functions:
        ops |= {n.op_type for n in fn.node}
    return ops


def _check_signature(graph: Graph, proto) -> None:
    """The exported graph's declared inputs/outputs are the names, dtypes and shapes the manifest states."""
    declared = {v.name: v for v in [*proto.graph.input, *proto.graph.output]}
    for name, (shape, dtype) in {**graph.inputs, **graph.outputs}.items():
        if name not in declared:
            raise ExportError(f"graph {graph.name!r}: no input/output named {name!r} (has {', '.join(declared)})")
        t = declared[name].type.tensor_type
        got_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if got_dtype != dtype or len(dims) != len(shape) or any(s is not None and s != d for s, d in zip(shape, dims)):
            raise ExportError(f"graph {graph.name!r}: {name!r} is {got_dtype} {dims}, expected {dtype} {shape}")
        if any(s is None and d is not None for s, d in zip(shape, dims)):
            raise ExportError(f"graph {graph.name!r}: {name!r} has a fixed batch size {dims}; the batch axis must be dynamic")


def compare(graph: str, session, feed: dict[str, Tensor], ref: dict[str, Tensor], atol: float, label: str) -> float:
    """Max |ONNX - PyTorch| over ``ref``'s outputs (name -> PyTorch tensor) when ``session`` runs ``feed``;
    raises :class:`ExportError` naming ``graph``, the output and ``label`` (the inputs) above ``atol``."""
    got = session.run(list(ref), {k: v.detach().cpu().numpy() for k, v in feed.items()})
    worst = 0.0
    for (name, expected), actual in zip(ref.items(), got):
        expected = expected.detach().cpu().numpy()
        if actual.shape != expected.shape:
            raise ExportError(f"parity: graph {graph!r}, output {name!r}: shape {actual.shape} != PyTorch {expected.shape} on {label}")
        diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) if actual.size else 0.0
        if not np.isfinite(diff) or diff > atol:
            raise ExportError(
                f"parity: graph {graph!r}, output {name!r}: max |onnx - torch| = {diff:.3g} > atol {atol:g} on {label}"
            )
        worst = max(worst, diff)
    return worst


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run PyTorch on ``n`` intra-op threads inside the block. One decoding step works on (B, 1, D)
    tensors, far too small to split: with a thread pool each op pays a barrier, which makes the
    step loop 10-100x slower on a busy machine than on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_REGISTRIES: dict[Any, Any] = {}


@contextlib.contextmanager
def reuse_onnx_registry() -> Iterator[None]:
    """Build the exporter's aten -> ONNX function registry once per process, not once per graph.

    ``torch.onnx.export`` (dynamo) rebuilds it from the onnxscript torchlib sources on every call, about
    3 s of ``inspect.getsource`` that dwarfs the export of a small graph. The registry depends only on
    the opset and we register no custom op into it, so reusing it changes nothing in the graphs. It is a
    private torch API (no public way to pass or cache the registry exists in ``torch.onnx.export``), tested
    on torch 2.13 (requirements.lock); where it is missing or moved this does nothing and every export pays
    the full price, so no torch version range is excluded for it.
    """
    try:
        from torch.onnx._internal.exporter import _registration

        registry_cls = _registration.ONNXRegistry
        original = registry_cls.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(cls, *args, **kwargs)
        return _REGISTRIES[key]

    # Building it logs a warning per torchvision op ("torchvision is not installed"), irrelevant here.
    logger = logging.getLogger(_registration.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    registry_cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_cls.from_torchlib = original
        logger.setLevel(level)
