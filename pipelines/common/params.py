"""Reading ``params.yaml`` and applying ``--set key=value`` overrides.

``params.yaml`` is the single source of truth for pipeline runs (DVC tracks it). Nothing here runs at
import time: callers pass the path they want read.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from latentforge.pipelines.common.errors import ParamsError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Parse a params YAML file into a dict (a mapping at the top level is required)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(params).__name__}")
    return params


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``params`` with each ``dotted.key=value`` set; the value is parsed as YAML.

    Only existing keys can be set, so a typo (``data.nmae=x``) is an error rather than a silent no-op.
    """
    params = copy.deepcopy(params)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = params
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a mapping)"
                where = ".".join(parts[:depth]) or "params"
                raise ParamsError(f"override {key!r}: unknown key {part!r} under {where}; known: {known}")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return params


def section(params: dict[str, Any], key: str) -> dict[str, Any]:
    """The mapping at dotted ``key`` (``"data.shapes"``), or a ParamsError naming what is missing."""
    node: Any = params
    for depth, part in enumerate(key.split(".")):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"params: missing section {'.'.join(key.split('.')[: depth + 1])!r}")
        node = node[part]
    if not isinstance(node, dict):
        raise ParamsError(f"params: {key!r} must be a mapping, got {type(node).__name__}")
    return node


def check_keys(values: dict[str, Any], schema: dict[str, type | tuple[type, ...]], where: str) -> dict[str, Any]:
    """Check that ``values`` has exactly the keys of ``schema`` with values of the given types.

    Returns ``values`` with ints accepted where floats are expected. ``None`` is accepted only where the
    schema lists ``type(None)``.
    """
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ParamsError(f"params {where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(schema))}")
    missing = sorted(set(schema) - set(values))
    if missing:
        raise ParamsError(f"params {where}: missing key(s) {', '.join(missing)}")
    out = {}
    for key, expected in schema.items():
        value = values[key]
        types = expected if isinstance(expected, tuple) else (expected,)
        ok = any(
            (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (t is int and isinstance(value, int) and not isinstance(value, bool))
            or (t not in (int, float) and isinstance(value, t))
            for t in types
        )
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ParamsError(f"params {where}.{key}: expected {names}, got {value!r}")
        out[key] = float(value) if float in types and isinstance(value, int) and int not in types else value
    return out
