"""Ray plumbing (driver side): join or start the cluster, read its resources, ask an autoscaler for more."""

from __future__ import annotations

import os
from typing import Any


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one (only on 127.0.0.1)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")


def cluster_resources() -> dict[str, Any]:
    """The live cluster's CPU and GPU totals and its number of alive nodes."""
    import ray

    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"CPU": res.get("CPU", 0.0), "GPU": res.get("GPU", 0.0), "nodes": len(nodes)}


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Ask an autoscaling cluster for ``bundles`` (an empty list clears the request); a no-op elsewhere."""
    try:
        from ray.autoscaler.sdk import request_resources as _request

        _request(bundles=bundles)
    except Exception:  # no autoscaler (a local or fixed-size cluster): nothing to ask
        pass
