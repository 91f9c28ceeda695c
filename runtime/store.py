"""Where exported models are stored: the MLflow tracking URI as every process must see it."""

from __future__ import annotations

from pathlib import Path


def absolute_uri(uri: str, base: Path | None = None) -> str:
    """Make a local store absolute (``sqlite:///relative.db``, a plain path): Ray workers, Serve replicas
    and MLflow must not depend on the caller's working directory. A relative path is resolved against
    ``base`` (default: the working directory). Remote URIs are returned unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path(base or ".") / uri[len(prefix):]).resolve())
    if "://" in uri:
        return uri
    return str((Path(base or ".") / uri).resolve())
