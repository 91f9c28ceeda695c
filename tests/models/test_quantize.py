"""VectorQuantizerEMA: return shape, straight-through gradient, EMA maths, dead-code restart, and a real
two-process torch.distributed (gloo, loopback only) run whose codebooks must stay identical."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from latentforge.models.quantize import VectorQuantizerEMA

torch.set_num_threads(1)


def test_returns_quantized_indices_loss_with_shapes():
    vq = VectorQuantizerEMA(num_codes=16, dim=4).eval()
    z = torch.randn(3, 4, 5, 6)
    out = vq(z)
    assert isinstance(out, tuple) and len(out) == 3
    quantized, indices, loss = out
    assert quantized.shape == z.shape and quantized.dtype == z.dtype
    assert indices.shape == (3, 5, 6) and indices.dtype == torch.int64
    assert 0 <= int(indices.min()) and int(indices.max()) < 16
    assert loss.dim() == 0
    # The loss is the commitment term with the default weight 0.25.
    torch.testing.assert_close(loss, 0.25 * F.mse_loss(z, quantized))


def test_codes_from_indices_round_trips_and_codes_are_nearest():
    vq = VectorQuantizerEMA(num_codes=8, dim=3).eval()
    z = torch.randn(2, 3, 4, 4)
    quantized, indices, _ = vq(z)
    torch.testing.assert_close(vq.codes_from_indices(indices), quantized)
    assert torch.equal(vq.nearest(z), indices)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(torch.cdist(flat, vq.embed).argmin(1), indices.reshape(-1))


def test_straight_through_gradient_is_identity():
    vq = VectorQuantizerEMA(num_codes=8, dim=3).eval()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    quantized, _, _ = vq(z)
    (quantized * 3).sum().backward()
    torch.testing.assert_close(z.grad, torch.full_like(z, 3.0))


def test_eval_and_update_false_leave_the_codebook_alone():
    vq = VectorQuantizerEMA(num_codes=8, dim=3)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()(torch.randn(2, 3, 4, 4))
    vq.train()(torch.randn(2, 3, 4, 4), update=False)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_update_with_zero_decay_moves_codes_to_cluster_means():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(num_codes=4, dim=2, decay=0.0, eps=1e-9, dead_threshold=0.0)
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [100.0, 100.0]]))
    vq.embed_avg.copy_(vq.embed)
    z = torch.tensor([[0.5, 0.0], [-0.5, 1.0], [9.0, 1.0], [11.0, 0.0], [0.0, 9.0]]).t().reshape(1, 2, 1, 5)
    _, indices, _ = vq.train()(z)
    assert indices.tolist() == [[[0, 0, 1, 1, 2]]]
    torch.testing.assert_close(vq.cluster_size, torch.tensor([2.0, 2.0, 1.0, 0.0]))
    torch.testing.assert_close(vq.embed[:3], torch.tensor([[0.0, 0.5], [10.0, 0.5], [0.0, 9.0]]))
    torch.testing.assert_close(vq.last_usage, torch.tensor(0.75))


def test_usage_and_perplexity():
    vq = VectorQuantizerEMA(num_codes=4, dim=2).eval()
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    vq(vq.embed.t().reshape(1, 2, 2, 2))  # every code once
    torch.testing.assert_close(vq.last_usage, torch.tensor(1.0))
    torch.testing.assert_close(vq.last_perplexity, torch.tensor(4.0))
    vq(torch.zeros(1, 2, 2, 2))  # one code only
    stats = vq.stats()
    torch.testing.assert_close(stats["usage"], torch.tensor(0.25))
    torch.testing.assert_close(stats["perplexity"], torch.tensor(1.0))


@pytest.mark.parametrize("threshold, revived", [(1.0, True), (0.0, False)])
def test_dead_code_restart_revives_a_collapsed_codebook(threshold, revived):
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(num_codes=32, dim=4, dead_threshold=threshold)
    # Collapse: every code identical and far from the data, so everything maps to code 0.
    vq.embed.fill_(50.0)
    vq.embed_avg.fill_(50.0)
    data = lambda: torch.randn(8, 4, 4, 4)  # noqa: E731
    vq.eval()(data())
    assert float(vq.last_usage) == pytest.approx(1 / 32)
    vq.train()
    for _ in range(3):
        vq(data())
    vq.eval()(data())
    if revived:
        assert float(vq.last_usage) > 0.5
        assert int((vq.embed.abs().amax(1) < 10).sum()) >= 31  # restarted codes live among the data
    else:
        assert float(vq.last_usage) == pytest.approx(1 / 32)


def test_autocast_bf16_input():
    vq = VectorQuantizerEMA(num_codes=8, dim=3)
    z = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized, indices, loss = vq(z.bfloat16())
    assert quantized.dtype == torch.bfloat16 and indices.shape == (2, 4, 4)
    assert vq.embed.dtype == torch.float32 and torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------------
# Two real processes, gloo over loopback, each rank fed different data.

WORLD = 2


def _data(rank: int, step: int, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 4, 3, 3, generator=g) + rank  # the ranks see different distributions


def _gathered_equal(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    results: dict[str, object] = {}

    # Reference before joining the group: one process fed both ranks' batches at once.
    torch.manual_seed(0)
    reference = VectorQuantizerEMA(num_codes=16, dim=4, dead_threshold=0.0).train()
    for step in range(3):
        reference(torch.cat([_data(0, step), _data(1, step)]))

    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        # A: all-reduced EMA statistics == the single-process update on the union of the batches.
        torch.manual_seed(0)
        vq = VectorQuantizerEMA(num_codes=16, dim=4, dead_threshold=0.0).train()
        for step in range(3):
            vq(_data(rank, step))
        results["ema_matches_reference"] = torch.allclose(vq.embed, reference.embed, atol=1e-5) and torch.allclose(
            vq.cluster_size, reference.cluster_size, atol=1e-5
        )
        results["ema_identical"] = _gathered_equal(vq.embed) and _gathered_equal(vq.cluster_size)

        # B: dead-code restarts (a high threshold forces many) keep the ranks identical.
        torch.manual_seed(1 + rank)  # different RNG streams: only rank 0's picks may be used
        vq = VectorQuantizerEMA(num_codes=32, dim=4, dead_threshold=4.0).train()
        vq.embed.copy_(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)))
        vq.embed_avg.copy_(vq.embed)
        restarted = 0
        for step in range(3):
            vq(_data(rank, step))
            restarted += int(vq.last_restarted)
        results["restarted"] = restarted
        results["restart_identical"] = _gathered_equal(vq.embed) and _gathered_equal(vq.embed_avg)

        # C: the generic loop through DDP (as pipelines/train.py calls it) keeps whole models identical;
        # without DDP's buffer broadcast, only the quantiser's own all-reduce keeps the codebooks equal.
        from torch.nn.parallel import DistributedDataParallel as DDP

        from latentforge.models import train_step
        from latentforge.models.vqvae2 import VQVAE2, VQVAE2Config

        for broadcast_buffers in (True, False):
            torch.manual_seed(0)
            model = VQVAE2(VQVAE2Config.tiny(image_size=8, hidden_channels=8, num_codes=8, code_dim=4, prior_dim=16))
            ddp = DDP(model, find_unused_parameters=True, broadcast_buffers=broadcast_buffers)
            optimizers = model.configure_optimizers()
            for step in range(2):
                images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(10 * step + rank))
                batch = {"image": images, "label": torch.full((4,), -1), "index": torch.arange(4)}
                logs = train_step(model, optimizers, batch, step, forward=ddp)
            flat = torch.cat([v.detach().float().reshape(-1) for v in model.state_dict().values()])
            results[f"ddp_identical_broadcast_{broadcast_buffers}"] = _gathered_equal(flat)
            results[f"ddp_logs_{broadcast_buffers}"] = sorted(logs)

        # D: the staged schedule through DDP: at the switch every rank stops using the autoencoder at
        # once (its parameters are unused everywhere, so they keep no gradient and do not move).
        torch.manual_seed(0)
        model = VQVAE2(VQVAE2Config.tiny(image_size=8, hidden_channels=8, num_codes=8, code_dim=4, prior_dim=16, vq_steps=1))
        ddp = DDP(model, find_unused_parameters=True)
        optimizers = model.configure_optimizers()
        for step in range(3):
            images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(10 * step + rank))
            batch = {"image": images, "label": torch.full((4,), -1), "index": torch.arange(4)}
            if step == 1:
                frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prior_")}
            train_step(model, optimizers, batch, step, forward=ddp)
        flat = torch.cat([v.detach().float().reshape(-1) for v in model.state_dict().values()])
        results["staged_identical"] = _gathered_equal(flat)
        results["staged_frozen"] = all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    old = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo listens on loopback only; the FileStore needs no port
    try:
        mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    finally:
        if old is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = old
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_distributed_ema_statistics_are_all_reduced(distributed_results):
    for r in distributed_results:
        assert r["ema_identical"] is True
        assert r["ema_matches_reference"] is True


def test_distributed_dead_code_restart_keeps_codebooks_identical(distributed_results):
    for r in distributed_results:
        assert r["restarted"] > 0
        assert r["restart_identical"] is True


def test_distributed_ddp_train_step_keeps_models_identical(distributed_results):
    for r in distributed_results:
        assert r["ddp_identical_broadcast_True"] is True
        assert r["ddp_identical_broadcast_False"] is True
        assert "usage_top" in r["ddp_logs_True"] and "prior_ce_bottom" in r["ddp_logs_True"]


def test_distributed_staged_vqvae2_freezes_the_autoencoder_on_every_rank(distributed_results):
    for r in distributed_results:
        assert r["staged_identical"] is True
        assert r["staged_frozen"] is True
