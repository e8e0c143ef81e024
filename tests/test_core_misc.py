"""Masked ops, aggregation, KL estimators and value losses."""

import pytest
import torch
from conftest import right_padded_mask

from dfpo.core.kl import kl_estimate, kl_metrics
from dfpo.core.masked import aggregate_loss, explained_variance, masked_mean, masked_var, masked_whiten
from dfpo.core.value_losses import clipped_mse, flow_matching, quantile_huber, quantile_huber_pairs


def test_masked_stats_ignore_nan_on_padding(gen):
    mask = right_padded_mask([3, 1], 4)
    x = torch.randn(2, 4, generator=gen)
    x[0, 3] = float("nan")
    x[1, 1:] = float("inf")
    valid = x[mask.bool()]
    assert float(masked_mean(x, mask)) == pytest.approx(float(valid.mean()))
    assert float(masked_var(x, mask)) == pytest.approx(float(valid.var()), rel=1e-5)
    w = masked_whiten(x, mask)
    assert torch.isfinite(w).all()
    assert float(w[mask.bool()].mean()) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.stack([x[0, :3].mean(), x[1, 0]]))


def test_aggregations():
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = right_padded_mask([3, 1], 4)
    assert float(aggregate_loss(loss, mask, "token-mean")) == pytest.approx(10 / 4)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum-norm")) == pytest.approx((6 + 4) / 2 / 4)
    assert float(aggregate_loss(loss, mask, "seq-mean-token-sum-norm", normalizer=10)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="valid: token-mean"):
        aggregate_loss(loss, mask, "mean")


def test_explained_variance():
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4)
    assert float(explained_variance(t, t, m)) == pytest.approx(1.0)
    assert float(explained_variance(torch.full_like(t, 2.5), t, m)) == pytest.approx(0.0)


def test_kl_estimators(gen):
    p = torch.distributions.Categorical(logits=torch.randn(6, generator=gen))
    q = torch.distributions.Categorical(logits=torch.randn(6, generator=gen))
    torch.manual_seed(0)
    a = p.sample((200_000,))
    logp, logq = p.log_prob(a)[None], q.log_prob(a)[None]
    true = float(torch.distributions.kl_divergence(p, q))
    k1 = float(kl_estimate(logp, logq, "k1").mean())
    k3_tokens = kl_estimate(logp, logq, "k3")
    assert k1 == pytest.approx(true, abs=0.02)
    assert float(k3_tokens.mean()) == pytest.approx(true, abs=0.02)
    assert float(k3_tokens.min()) >= 0.0
    assert float(kl_estimate(logp, logq, "k2").min()) >= 0.0
    assert set(kl_metrics(logp, logq, torch.ones_like(logp))) == {"kl/k1", "kl/k2", "kl/k3"}
    with pytest.raises(ValueError, match="valid: k1, k2, k3"):
        kl_estimate(logp, logq, "k4")


def test_clipped_mse_takes_the_worse_branch_and_blocks_its_gradient():
    values = torch.tensor([[1.0, 0.1]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, -1.0]])
    loss, metrics = clipped_mse(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> clipped branch, no gradient
    # token 1: unclipped (0.1+1)^2=1.21, clipped (0.1+1)^2 equal -> unclipped
    assert float(loss.detach()) == pytest.approx(0.5 * (3.24 + 1.21) / 2)
    loss.backward()
    assert float(values.grad[0, 0]) == 0.0
    assert float(values.grad[0, 1]) == pytest.approx(0.5 * 2 * 1.1 / 2)
    assert metrics["critic/vf_clipfrac"] == 0.5


def test_quantile_huber_minimiser_is_the_quantile_for_small_kappa(gen):
    samples = torch.distributions.Exponential(1.0).sample((4000,))
    q = torch.zeros(1, 5, requires_grad=True)
    opt = torch.optim.Adam([q], lr=0.05)
    for _ in range(600):
        loss, _ = quantile_huber(q, samples[None], torch.ones(1), kappa=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
    taus = (torch.arange(5) + 0.5) / 5
    torch.testing.assert_close(q.detach()[0], torch.quantile(samples, taus), atol=0.03, rtol=0.0)


@pytest.mark.parametrize("kappa", [1.0, 0.3, 0.02])
def test_quantile_huber_sorted_form_equals_all_pairs(gen, kappa):
    """The prefix-sum form gives the same loss and gradient as the direct sum over every (quantile, target) pair,
    with targets tied, far outliers beyond kappa on both sides, several heads and a mask."""
    quantiles = (0.7 * torch.randn(5, 7, 3, 50, generator=gen)).requires_grad_()
    targets = torch.randn(5, 7, 1, 40, generator=gen)
    targets[..., :5] = targets[..., 5:10]
    targets[0, 0, 0, 0], targets[1, 2, 0, 3] = 25.0, -30.0
    quantiles.data[2, 2, 1, :4] = targets[2, 2, 0, :4]  # quantiles exactly on targets (u = 0)
    mask = (torch.rand(5, 7, 1, generator=gen) > 0.3).float()
    fast, metrics = quantile_huber(quantiles, targets, mask, kappa)
    (fast_grad,) = torch.autograd.grad(fast, quantiles)
    direct, _ = quantile_huber_pairs(quantiles, targets, mask, kappa)
    (direct_grad,) = torch.autograd.grad(direct, quantiles)
    torch.testing.assert_close(fast, direct, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast_grad, direct_grad, rtol=1e-4, atol=1e-9)
    assert metrics["critic/quantile_loss"] == pytest.approx(float(direct.detach()), rel=1e-5)


def test_flow_matching_weighting():
    pred = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    target = torch.zeros(2, 2)
    loss, _ = flow_matching(pred, target, torch.ones(2), weight=torch.tensor([2.0, 0.5]))
    assert float(loss) == pytest.approx((2 * 1.0 + 0.5 * 2.0) / 2)
