"""Each risk term is zero where its condition holds, positive otherwise, and its gradient points the right way."""

import pytest
import torch

from dfpo.core.risk import (
    cvar,
    cvar_calibration,
    head_consistency,
    lower_tail,
    mean_shift,
    pooled_cvar,
    pooled_tail_spread,
    pooled_upper_mean,
    risk_loss,
    tail_curvature,
    tail_shape,
    tail_size,
    upper_tail,
    upper_tail_gain,
)

K = 20  # tails of 2 samples at alpha = beta = 0.1


def base():
    return torch.linspace(-1.0, 1.0, K)


def grad_of(term, pred, target):
    pred = pred.clone().requires_grad_(True)
    value = term(pred, target)
    value.sum().backward()
    return value.detach(), pred.grad


def test_tail_helpers():
    x = torch.tensor([3.0, -1.0, 2.0, 0.0, 5.0, 1.0, 4.0, -2.0, 6.0, 7.0])
    assert tail_size(10, 0.1) == 1 and tail_size(10, 0.25) == 2 and tail_size(3, 0.1) == 1
    assert lower_tail(x, 0.2).tolist() == [-2.0, -1.0]
    assert upper_tail(x, 0.2).tolist() == [6.0, 7.0]
    assert float(cvar(x, 0.2)) == -1.5


def test_cvar_calibration():
    target = base()
    zero, _ = grad_of(cvar_calibration, target[torch.randperm(K)], target)  # order does not matter
    assert float(zero) == 0.0
    pred = target.clone()
    pred[:2] += 0.05  # lower tail too optimistic (still the two lowest)
    value, grad = grad_of(cvar_calibration, pred, target)
    assert float(value) > 0
    assert torch.all(grad[:2] > 0) and torch.all(grad[2:] == 0)  # descent lowers the tail samples


def test_upper_tail_gain():
    target = base()
    assert float(upper_tail_gain(target.flip(0), target)) == 0.0
    pred = target.clone()
    pred[-2:] -= 0.05  # upper tail too low (still the two highest)
    value, grad = grad_of(upper_tail_gain, pred, target)
    assert float(value) > 0
    assert torch.all(grad[-2:] < 0) and torch.all(grad[:-2] == 0)  # descent raises the top samples


def test_tail_shape_contracts_lower_and_expands_upper():
    target = base()
    narrower_low = target.clone()
    narrower_low[0] = target[1] - 0.01  # lower tail narrower than target: condition holds
    wider_up = target.clone()
    wider_up[-1] = target[-1] + 0.5  # upper tail wider than target: condition holds
    assert float(tail_shape(narrower_low, target)) == 0.0
    assert float(tail_shape(wider_up, target)) == 0.0

    wide_low = target.clone()
    wide_low[0] -= 0.5
    value, grad = grad_of(tail_shape, wide_low, target)
    assert float(value) > 0
    assert grad[0] < 0 and grad[1] > 0  # descent pulls the two lowest samples together

    narrow_up = target.clone()
    narrow_up[-1] = narrow_up[-2] + 0.01
    value, grad = grad_of(tail_shape, narrow_up, target)
    assert float(value) > 0
    assert grad[-1] < 0 and grad[-2] > 0  # push the two highest samples apart


def test_mean_shift():
    target = base()
    assert float(mean_shift(target + 0.1, target)) == 0.0
    value, grad = grad_of(mean_shift, target - 0.2, target)
    assert float(value) == pytest.approx(0.2, rel=1e-5)
    assert torch.all(grad < 0)


def test_tail_curvature():
    target = torch.linspace(-1.0, 1.0, 40)  # tails of 4 samples, straight: zero curvature
    assert float(tail_curvature(target, target)) == 0.0
    bent = target.clone()
    bent[1] -= 0.2
    value, grad = grad_of(tail_curvature, bent, target)
    assert float(value) > 0
    # one gradient step on the bent sample straightens the tail
    stepped = bent - 0.1 * grad
    assert float(tail_curvature(stepped, target)) < float(value)


def test_head_consistency():
    heads = torch.randn(5, 1, 7).expand(5, 3, 7).clone()
    assert torch.all(head_consistency(heads) == 0)
    heads[:, 0] += 1.0
    # pairs (0,1), (0,2) differ by 1 in every quantile: 2 * 2 ordered pairs of 6 have squared difference 1
    torch.testing.assert_close(head_consistency(heads), torch.full((5,), 4 / 6))


def test_risk_loss_weights_and_metrics():
    target = base().expand(3, K)
    pred = (target + 0.1).requires_grad_(True)
    mask = torch.tensor([1.0, 1.0, 0.0])
    total, metrics = risk_loss(pred, target, mask, shift_weight=0.0, curvature_weight=0.0, targets="token")
    assert set(metrics) == {"critic/risk_cvar", "critic/risk_gain", "critic/risk_shape"}
    assert float(total.detach()) == pytest.approx(0.01 + 0.01, rel=1e-4)
    with pytest.raises(ValueError, match="pooled, token"):
        risk_loss(pred, target, mask, targets="tokens")
    total, metrics = risk_loss(pred, target, mask, cvar_weight=0.0, gain_weight=0.0, shape_weight=0.0)
    assert float(total.detach()) == 0.0 and metrics == {}


def test_pooled_tail_estimates_are_unbiased_over_trajectories():
    """One return per token (all K' targets equal): averaged over tokens, the per-token estimates at the true
    quantile give the pooled CVaR, upper-tail mean and tail spreads, atoms included."""
    g = torch.Generator().manual_seed(0)
    returns = torch.where(torch.rand(200_000, generator=g) < 0.3, 1.0, 0.0) + 0.5 * (
        torch.rand(200_000, generator=g) < 0.1
    )  # atoms at 0, 0.5, 1, 1.5
    target = returns[:, None].expand(-1, 4)
    ordered = torch.sort(returns).values
    n = len(ordered)
    for alpha in (0.1, 0.25):
        q_low, q_high = torch.quantile(returns, alpha), torch.quantile(returns, 1 - alpha)
        var_low, var_high = q_low.expand(n), q_high.expand(n)
        true_low, true_high = ordered[: int(alpha * n)], ordered[n - int(alpha * n) :]
        assert float(pooled_cvar(target, var_low, alpha).mean()) == pytest.approx(float(true_low.mean()), abs=0.01)
        upper = float(pooled_upper_mean(target, var_high, alpha).mean())
        assert upper == pytest.approx(float(true_high.mean()), abs=0.01)
        spread = float(pooled_tail_spread(target, var_low, alpha, lower=True).mean())
        assert spread == pytest.approx(float(((true_low - q_low) ** 2).mean()), abs=0.01)


def test_pooled_risk_terms_do_not_pull_a_calibrated_distribution_onto_each_token():
    """A prediction equal to the pooled quantiles is (close to) stationary under the pooled terms, while the
    per-token terms push its tails towards each token's own return."""
    levels = (torch.arange(K) + 0.5) / K
    truth = (levels > 0.7).float()  # quantiles of Bernoulli(0.3)
    returns = (torch.rand(4000, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    target = returns[:, None].expand(-1, 8)
    mask = torch.ones(len(returns))
    grads = {}
    for form in ("pooled", "token"):
        pred = truth.expand(len(returns), K).clone().requires_grad_(True)
        total, _ = risk_loss(pred, target, mask, targets=form)
        total.backward()
        grads[form] = float(pred.grad.sum(0).abs().max() * len(returns))
    assert grads["pooled"] < 0.1 * grads["token"], grads
