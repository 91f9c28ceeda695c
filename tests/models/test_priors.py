"""CodePrior: cached one-step logits agree with the full causal forward, sampling is valid, batched,
reproducible, greedy at top_k=1 and sensitive to temperature; conditioning on a code map works."""

from __future__ import annotations

import pytest
import torch

from latentforge.models.priors import CodePrior, pick_tokens

torch.set_num_threads(1)


def _prior(conditional: bool = False, **kw) -> CodePrior:
    torch.manual_seed(0)
    cond = dict(cond_codes=5, cond_size=(2, 2)) if conditional else {}
    return CodePrior(num_codes=7, height=4, width=4, dim=32, layers=2, heads=4, **cond, **kw).eval()


def test_forward_shape_and_causality():
    prior = _prior()
    codes = torch.randint(0, 7, (3, 4, 4))
    logits = prior(codes)
    assert logits.shape == (3, 16, 7)
    # Changing token 9 changes no logit at positions <= 9 (position i predicts token i from tokens < i).
    changed = codes.clone().view(3, 16)
    changed[:, 9] = (changed[:, 9] + 1) % 7
    other = prior(changed.view(3, 4, 4))
    torch.testing.assert_close(other[:, :10], logits[:, :10])
    assert not torch.allclose(other[:, 10:], logits[:, 10:])


@pytest.mark.parametrize("conditional", [False, True])
def test_cached_steps_match_full_forward(conditional):
    prior = _prior(conditional)
    codes = torch.randint(0, 7, (3, 16))
    cond = torch.randint(0, 5, (3, 2, 2)) if conditional else None
    full = prior(codes, cond)
    cache = prior.new_cache(3)
    assert cache.shape == (2, 2, 3, 4, 16, 8)
    cond_emb = prior.embed_condition(cond)
    prev = torch.zeros(3, dtype=torch.long)
    for i in range(16):
        # Tensor positions too: the step must trace with the position as a graph input.
        position = torch.tensor(i) if i % 2 else i
        logits, cache = prior.step_logits(prev, position, cache, cond_emb)
        torch.testing.assert_close(logits, full[:, i], atol=1e-5, rtol=1e-5)
        prev = codes[:, i]


@pytest.mark.parametrize("conditional", [False, True])
def test_sample_returns_valid_indices_in_batches(conditional):
    prior = _prior(conditional)
    cond = torch.randint(0, 5, (6, 2, 2)) if conditional else None
    codes = prior.sample(6, cond=cond, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (6, 4, 4) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < 7
    again = prior.sample(6, cond=cond, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, again)


def test_conditional_prior_needs_cond_of_the_right_shape():
    prior = _prior(conditional=True)
    with pytest.raises(ValueError, match="conditional"):
        prior.sample(2)
    with pytest.raises(ValueError, match="shape"):
        prior(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        _prior()(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 2, 2, dtype=torch.long))


def test_top_k_1_is_deterministic_and_greedy():
    prior = _prior()
    a = prior.sample(4, generator=torch.Generator().manual_seed(1), top_k=1)
    b = prior.sample(4, generator=torch.Generator().manual_seed(2), top_k=1)
    assert torch.equal(a, b)
    # Greedy: every token is the argmax of the prior given the earlier ones.
    assert torch.equal(prior(a).argmax(-1), a.view(4, 16))


def test_pick_tokens_respects_top_k_and_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).expand(4000, 5)
    noise = torch.rand(4000, 5, generator=torch.Generator().manual_seed(0))
    picks = pick_tokens(logits, noise, top_k=2)
    assert set(picks.tolist()) == {1, 3}
    # Sampling frequencies follow softmax(logits / T).
    for temperature in (0.5, 1.0, 2.0):
        freq = torch.bincount(pick_tokens(logits, noise, temperature), minlength=5).float() / 4000
        torch.testing.assert_close(freq, torch.softmax(logits[0] / temperature, -1), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        pick_tokens(logits, noise, temperature=0.0)


def test_temperature_changes_diversity():
    prior = _prior()
    with torch.no_grad():
        prior.head.bias.copy_(torch.linspace(0, 4, 7))  # a peaked, position-independent preference

    def distinct(temperature):
        codes = prior.sample(32, generator=torch.Generator().manual_seed(0), temperature=temperature)
        return len(torch.unique(codes)), float((codes == 6).float().mean())

    cold, hot = distinct(0.1), distinct(10.0)
    assert cold[0] < hot[0]
    assert cold[1] > 0.95 > hot[1]


def test_conditional_prior_learns_to_follow_its_condition():
    torch.manual_seed(0)
    prior = CodePrior(num_codes=5, height=4, width=4, dim=32, layers=1, heads=2, cond_codes=5, cond_size=(2, 2))
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(150):
        cond = torch.randint(0, 5, (16, 2, 2))
        target = cond.repeat_interleave(2, 1).repeat_interleave(2, 2)  # the codes copy the condition
        loss = prior.loss(target, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cond = torch.randint(0, 5, (8, 2, 2), generator=torch.Generator().manual_seed(1))
    codes = prior.eval().sample(8, cond=cond, top_k=1)
    assert torch.equal(codes, cond.repeat_interleave(2, 1).repeat_interleave(2, 2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple"):
        CodePrior(num_codes=4, height=2, width=2, dim=30, heads=4)
    with pytest.raises(ValueError, match="divide"):
        CodePrior(num_codes=4, height=4, width=4, cond_codes=3, cond_size=(3, 3))
    with pytest.raises(ValueError, match="shape"):
        _prior()(torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="n must"):
        _prior().sample(0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter: fast, enough here
def test_one_step_exports_to_onnx_and_matches(tmp_path):
    """The step is a pure graph (no in-place op, no data-dependent shape, noise as an input)."""
    ort = pytest.importorskip("onnxruntime")
    prior = _prior(conditional=True)

    class Step(torch.nn.Module):
        def __init__(self, prior):
            super().__init__()
            self.prior = prior

        def forward(self, prev, position, cache, cond_emb, noise):
            logits, cache = self.prior.step_logits(prev, position, cache, cond_emb)
            return pick_tokens(logits, noise), logits, cache

    cond = torch.randint(0, 5, (3, 2, 2))
    with torch.no_grad():
        cond_emb = prior.embed_condition(cond)
    names = ["prev", "position", "cache", "cond_emb", "noise"]
    args = (torch.zeros(3, dtype=torch.long), torch.tensor(0), prior.new_cache(3), cond_emb, torch.rand(3, 7))
    torch.onnx.export(Step(prior), args, str(tmp_path / "step.onnx"), input_names=names, dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "step.onnx"))
    cache, prev = prior.new_cache(3), torch.zeros(3, dtype=torch.long)
    onnx_cache = cache.numpy()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(prior.length):
            noise = torch.rand(3, 7, generator=g)
            logits, cache = prior.step_logits(prev, i, cache, cond_emb)
            token = pick_tokens(logits, noise)
            feed = dict(zip(names, (prev.numpy(), torch.tensor(i).numpy(), onnx_cache, cond_emb.numpy(), noise.numpy())))
            onnx_token, onnx_logits, onnx_cache = session.run(None, feed)
            torch.testing.assert_close(torch.from_numpy(onnx_logits), logits, atol=1e-5, rtol=1e-5)
            assert torch.equal(torch.from_numpy(onnx_token), token)
            prev = token
