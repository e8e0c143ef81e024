"""Conditional risk control on return distributions (DVPO eqs. 5-9, used by DFPO's critic).

Each term compares a predicted sample set ``pred [..., K]`` (with grad: one-step flow samples or quantiles) with
target samples ``target [..., K']`` (no grad: distributional GAE targets). Both are sorted inside, so any order
and any ``K, K'`` work. Tails hold ``k_a = max(1, floor(alpha * K))`` lowest and ``k_b = max(1, floor(beta * K))``
highest samples, counted separately for prediction and target. Every term returns a per-token tensor ``[...]``
that is 0 where its condition already holds and positive otherwise; :func:`risk_loss` weights and averages them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dfpo.core.masked import masked_mean


def tail_size(num_samples: int, fraction: float) -> int:
    """``max(1, floor(fraction * num_samples))``."""
    return max(1, math.floor(fraction * num_samples + 1e-9))


def lower_tail(samples: Tensor, alpha: float) -> Tensor:
    """The ``k_a`` lowest samples, ascending: ``[..., K] -> [..., k_a]``."""
    return torch.sort(samples, dim=-1).values[..., : tail_size(samples.shape[-1], alpha)]


def upper_tail(samples: Tensor, beta: float) -> Tensor:
    """The ``k_b`` highest samples, ascending: ``[..., K] -> [..., k_b]``."""
    return torch.sort(samples, dim=-1).values[..., samples.shape[-1] - tail_size(samples.shape[-1], beta) :]


def cvar(samples: Tensor, alpha: float = 0.1) -> Tensor:
    """Lower-tail conditional value at risk: mean of the ``k_a`` lowest samples, ``[..., K] -> [...]``."""
    return lower_tail(samples, alpha).mean(-1)


def cvar_calibration(pred: Tensor, target: Tensor, alpha: float = 0.1) -> Tensor:
    """``(CVaR_alpha(pred) - CVaR_alpha(target))^2``: calibrate the lower tail. ``[..., K], [..., K'] -> [...]``."""
    return (cvar(pred, alpha) - cvar(target, alpha)) ** 2


def upper_tail_gain(pred: Tensor, target: Tensor, beta: float = 0.1) -> Tensor:
    """``(mean upper_beta(pred) - mean upper_beta(target))^2``: keep the high-value tail that drives exploration."""
    return (upper_tail(pred, beta).mean(-1) - upper_tail(target, beta).mean(-1)) ** 2


def _tail_var(tail: Tensor) -> Tensor:
    return tail.var(-1, unbiased=False)


def tail_shape(pred: Tensor, target: Tensor, alpha: float = 0.1, beta: float = 0.1) -> Tensor:
    """``relu(Var lower(pred) - Var lower(target)) + relu(Var upper(target) - Var upper(pred))``.

    Contracts a lower tail wider than the target's and expands an upper tail narrower than the target's.
    """
    lower = torch.relu(_tail_var(lower_tail(pred, alpha)) - _tail_var(lower_tail(target, alpha)))
    upper = torch.relu(_tail_var(upper_tail(target, beta)) - _tail_var(upper_tail(pred, beta)))
    return lower + upper


def mean_shift(pred: Tensor, target: Tensor) -> Tensor:
    """``relu(mean(target) - mean(pred))``: penalise a pessimistic bias of the predicted mean."""
    return torch.relu(target.mean(-1) - pred.mean(-1))


def _curvature(tail: Tensor) -> Tensor:
    if tail.shape[-1] < 3:
        return tail.new_zeros(tail.shape[:-1])
    second = tail[..., 2:] - 2 * tail[..., 1:-1] + tail[..., :-2]
    return (second**2).mean(-1)


def tail_curvature(pred: Tensor, target: Tensor, alpha: float = 0.1, beta: float = 0.1) -> Tensor:
    """Tails no more curved than the target's: ``relu(C(pred tail) - C(target tail))`` summed over both tails.

    ``C`` is the mean squared second difference of the sorted tail samples (0 with fewer than 3 samples).
    """
    lower = torch.relu(_curvature(lower_tail(pred, alpha)) - _curvature(lower_tail(target, alpha)))
    upper = torch.relu(_curvature(upper_tail(pred, beta)) - _curvature(upper_tail(target, beta)))
    return lower + upper


def head_consistency(heads: Tensor) -> Tensor:
    """Mean pairwise squared difference between ``N`` heads: ``[..., N, M] -> [...]`` (0 for ``N = 1``)."""
    n = heads.shape[-2]
    if n < 2:
        return heads.new_zeros(heads.shape[:-2])
    diff = heads.unsqueeze(-3) - heads.unsqueeze(-2)  # [..., N, N, M]
    return (diff**2).mean(-1).sum((-2, -1)) / (n * (n - 1))


def risk_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    alpha: float = 0.1,
    beta: float = 0.1,
    cvar_weight: float = 1.0,
    gain_weight: float = 1.0,
    shape_weight: float = 1.0,
    shift_weight: float = 0.0,
    curvature_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the risk terms, token-mean over ``mask [...]``; terms with weight 0 are not computed.

    ``pred [..., K]`` with grad, ``target [..., K']`` no grad. Metrics: ``critic/risk_<term>`` for each term.
    """
    terms = {
        "cvar": (cvar_weight, lambda: cvar_calibration(pred, target, alpha)),
        "gain": (gain_weight, lambda: upper_tail_gain(pred, target, beta)),
        "shape": (shape_weight, lambda: tail_shape(pred, target, alpha, beta)),
        "shift": (shift_weight, lambda: mean_shift(pred, target)),
        "curvature": (curvature_weight, lambda: tail_curvature(pred, target, alpha, beta)),
    }
    total = pred.new_zeros(())
    metrics: dict[str, float] = {}
    for name, (weight, term) in terms.items():
        if weight == 0.0:
            continue
        value = masked_mean(term(), mask)
        total = total + weight * value
        metrics[f"critic/risk_{name}"] = float(value.detach())
    return total, metrics
