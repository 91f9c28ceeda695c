"""Batching across requests in a model replica: graph calls and VQ-VAE-2 draws of concurrent requests
run as one ONNX Runtime call.

The replica's ``serve.batch`` methods hand their batches to a :class:`Coalescer`, which runs
:func:`run_grouped` (or :func:`sample_grouped`) one call at a time in a worker thread. Serve closes a
batch when its wait ends even while the previous batch still runs, so under load the batches that
queue behind a running one stay small (1-2 requests of 32 waiting, measured); the coalescer therefore
merges every batch that waits into the next call, up to ``max_batch_size``, and under load waits
``batch_wait_timeout_s`` for more when the call is not full.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from latentforge.runtime.images import ModelRuntime, sample_codes


def run_grouped(calls: list[tuple[ModelRuntime, str, dict[str, np.ndarray]]]) -> list[dict[str, np.ndarray]]:
    """Run graph calls ``(runtime, graph, feeds)`` of many requests: one ONNX Runtime call per
    (version, graph), inputs stacked along the batch axis (B_i, ...) -> (sum B_i, ...) and the outputs
    split back. Returns one output dict per call, in order."""
    groups: dict[tuple[int, str], list[int]] = defaultdict(list)
    for i, (rt, graph, _) in enumerate(calls):
        groups[(id(rt), graph)].append(i)
    results: list[Any] = [None] * len(calls)
    for (_, graph), idx in groups.items():
        rt = calls[idx[0]][0]
        feeds = {k: np.concatenate([calls[i][2][k] for i in idx]) for k in calls[idx[0]][2]}
        out = rt.run_graph(graph, feeds)
        bounds = np.cumsum([0] + [len(next(iter(calls[i][2].values()))) for i in idx])
        for j, i in enumerate(idx):
            results[i] = {k: v[bounds[j] : bounds[j + 1]] for k, v in out.items()}
    return results


def sample_grouped(draws: list[tuple[ModelRuntime, int, int, float, int | None]]) -> list[np.ndarray]:
    """VQ-VAE-2 draws ``(runtime, n, seed, temperature, top_k)`` of many requests: one prior sampling
    loop per (version, top_k). Returns per draw its images (n, C, H, W) in [0, 1], in order."""
    groups: dict[tuple[int, int | None], list[int]] = defaultdict(list)
    for i, (rt, _, _, _, top_k) in enumerate(draws):
        groups[(id(rt), top_k)].append(i)
    results: list[Any] = [None] * len(draws)
    for (_, top_k), idx in groups.items():
        rt = draws[idx[0]][0]
        spec = [(draws[i][1], np.random.default_rng(draws[i][2]), draws[i][3]) for i in idx]
        images = np.clip(sample_codes(rt.sessions, rt.manifest, spec, top_k)["images"], 0.0, 1.0)
        bounds = np.cumsum([0] + [n for n, _, _ in spec])
        for j, i in enumerate(idx):
            results[i] = images[bounds[j] : bounds[j + 1]]
    return results


class Coalescer:
    """Runs ``fn(items) -> results`` one call at a time in a worker thread; whatever is submitted while
    a call runs waits, and the waiting items go together into the next call (at most ``max_items``).

    ``submit`` returns one future per item at once, without waiting for the call: a ``serve.batch``
    method returns them, so Serve's batch slot is free again and the next batch it forms joins the
    queue here instead of waiting for the slot with its contents fixed.

    ``linger_s``: under load (the last call merged several items) a call that is not full waits this
    long first, since more requests are on their way; an idle replica runs a lone request at once, so
    the wait costs nothing at concurrency 1."""

    def __init__(self, fn: Callable[[list], list], max_items: int, linger_s: float = 0.0):
        self.fn, self.max_items, self.linger_s = fn, max_items, linger_s
        self.waiting: list[tuple[Any, asyncio.Future]] = []
        self.drain_task: asyncio.Task | None = None
        self.last_size = 0

    def submit(self, items: list) -> list[asyncio.Future]:
        """Queue ``items`` for the next call; returns one future per item, resolved with its result
        (or the call's exception)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.waiting.extend(zip(items, futures))
        if self.drain_task is None or self.drain_task.done():
            self.drain_task = loop.create_task(self._drain())
        return futures

    async def _drain(self) -> None:
        while self.waiting:
            size = max(1, self.max_items)
            if self.last_size > 1 and len(self.waiting) < size and self.linger_s > 0:
                await asyncio.sleep(self.linger_s)
            take, self.waiting = self.waiting[:size], self.waiting[size:]
            self.last_size = len(take)
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in take])
            except Exception as exc:  # every caller of this call sees its error, the next call goes on
                results = [exc] * len(take)
            for (_, future), result in zip(take, results):
                if future.done():  # the caller went away
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
