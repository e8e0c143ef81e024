"""Each risk term is zero where its condition holds, positive otherwise, and its gradient points the right way."""

import pytest
import torch

from dfpo.core.risk import (
    cvar,
    cvar_calibration,
    head_consistency,
    lower_tail,
    mean_shift,
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
    total, metrics = risk_loss(pred, target, mask, shift_weight=0.0, curvature_weight=0.0)
    assert set(metrics) == {"critic/risk_cvar", "critic/risk_gain", "critic/risk_shape"}
    assert float(total.detach()) == pytest.approx(0.01 + 0.01, rel=1e-4)
    total, metrics = risk_loss(pred, target, mask, cvar_weight=0.0, gain_weight=0.0, shape_weight=0.0)
    assert float(total.detach()) == 0.0 and metrics == {}
