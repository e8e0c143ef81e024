"""Conditional risk control on return distributions (DVPO eqs. 5-9, used by DFPO's critic).

Each term compares a predicted sample set ``pred [..., K]`` (with grad: one-step flow samples or quantiles) with
target samples ``target [..., K']`` (no grad: distributional GAE targets). Both are sorted inside, so any order
and any ``K, K'`` work. Tails hold ``k_a = max(1, floor(alpha * K))`` lowest and ``k_b = max(1, floor(beta * K))``
highest samples, counted separately for prediction and target.

Two forms, chosen by :func:`risk_loss`'s ``targets``:

- ``"pooled"`` (the default): each tail statistic of the prediction is regressed by squared error onto a
  per-token estimate whose expectation, over the trajectories that reach alike states, is that statistic of
  the return distribution *pooled* over them. A trainer gives each token the targets of ONE trajectory (at
  the last token all ``K'`` equal its observed return), so a token's own targets have no spread; the
  distribution is only visible across trajectories, and a squared error's minimiser is the conditional mean of
  its target. The estimates use the prediction's own value-at-risk ``v`` (no grad):
  ``E[g(Y) | Y <= q_alpha] = g(q) + E[(g(Y) - g(q)) 1{Y < q}] / alpha`` at the true quantile ``q`` holds for any
  ``g`` and any distribution, atoms included (Rockafellar-Uryasev), so at calibration the estimates are unbiased.
  :func:`pooled_cvar`, :func:`pooled_upper_mean`, :func:`pooled_tail_spread`.
- ``"token"``: each term compares the prediction's tails with those of the token's own targets
  (:func:`cvar_calibration`, :func:`upper_tail_gain`, :func:`tail_shape`), as DVPO writes them. Under one
  trajectory per token this pulls both tails onto the observed return and collapses the distribution to its
  mean; kept as an ablation and for i.i.d. targets.

Every term returns a per-token tensor ``[...]``; :func:`risk_loss` weights and averages them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def quantile_at(sorted_samples: Tensor, level: float) -> Tensor:
    """The ``level``-quantile of ``K`` sorted samples read as quantiles at levels ``(k + 1/2) / K``, linearly
    interpolated between neighbours (clamped to the extreme samples): ``[..., K] -> [...]``."""
    k = sorted_samples.shape[-1]
    position = min(max(level * k - 0.5, 0.0), k - 1.0)
    low = math.floor(position)
    high = min(low + 1, k - 1)
    frac = position - low
    return (1.0 - frac) * sorted_samples[..., low] + frac * sorted_samples[..., high]


def pooled_cvar(target: Tensor, var: Tensor, alpha: float) -> Tensor:
    """Per-token estimate of the pooled lower-tail CVaR_alpha: ``v + mean_k((y_k - v) 1{y_k < v}) / alpha``.

    ``target [..., K']``, ``var [...]`` the predicted alpha-quantile ``v`` (no grad) -> ``[...]``. Its expectation
    over the trajectories is the CVaR of the pooled distribution when ``v`` is its alpha-quantile.
    """
    below = (target - var.unsqueeze(-1)).clamp_max(0.0)
    return var + below.mean(-1) / alpha


def pooled_upper_mean(target: Tensor, var: Tensor, beta: float) -> Tensor:
    """Per-token estimate of the pooled mean of the upper ``beta`` tail: ``w + mean_k((y_k - w) 1{y_k > w}) /
    beta`` with ``w`` the predicted (1 - beta)-quantile ``var [...]`` (no grad). ``target [..., K'] -> [...]``."""
    above = (target - var.unsqueeze(-1)).clamp_min(0.0)
    return var + above.mean(-1) / beta


def pooled_tail_spread(target: Tensor, var: Tensor, fraction: float, lower: bool) -> Tensor:
    """Per-token estimate of a pooled tail's mean squared distance from its boundary ``var [...]``:
    ``mean_k((y_k - v)^2 1{y_k beyond v}) / fraction``, the lower tail's (``lower``) or the upper one's."""
    gap = target - var.unsqueeze(-1)
    beyond = gap.clamp_max(0.0) if lower else gap.clamp_min(0.0)
    return (beyond**2).mean(-1) / fraction


def pooled_risk_terms(pred: Tensor, target: Tensor, alpha: float, beta: float) -> dict[str, Callable[[], Tensor]]:
    """The pooled forms of the CVaR, upper-tail and tail-shape terms, each ``() -> [...]`` (computed on demand).

    ``cvar``: ``(CVaR_alpha(pred) - pooled_cvar)^2``; ``gain``: the same for the upper ``beta`` tail's mean;
    ``shape``: for each tail, the squared difference between the prediction's mean squared distance of its tail
    samples from the boundary and :func:`pooled_tail_spread`.
    """
    ordered = torch.sort(pred, dim=-1).values
    with torch.no_grad():
        low_var, high_var = quantile_at(ordered, alpha), quantile_at(ordered, 1.0 - beta)
    k = ordered.shape[-1]
    low, high = ordered[..., : tail_size(k, alpha)], ordered[..., k - tail_size(k, beta) :]

    def shape() -> Tensor:
        low_spread = ((low - low_var.unsqueeze(-1)) ** 2).mean(-1)
        high_spread = ((high - high_var.unsqueeze(-1)) ** 2).mean(-1)
        return (low_spread - pooled_tail_spread(target, low_var, alpha, lower=True)) ** 2 + (
            high_spread - pooled_tail_spread(target, high_var, beta, lower=False)
        ) ** 2

    return {
        "cvar": lambda: (low.mean(-1) - pooled_cvar(target, low_var, alpha)) ** 2,
        "gain": lambda: (high.mean(-1) - pooled_upper_mean(target, high_var, beta)) ** 2,
        "shape": shape,
    }


RISK_TARGETS = ("pooled", "token")


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
    targets: str = "pooled",
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the risk terms, token-mean over ``mask [...]``; terms with weight 0 are not computed.

    ``pred [..., K]`` with grad, ``target [..., K']`` no grad. ``targets``: ``"pooled"`` calibrates the CVaR,
    upper-tail and shape terms against the distribution pooled over trajectories, ``"token"`` against each
    token's own targets (see the module docstring). ``shift`` and ``curvature`` (off by default) always compare
    with the token's own targets. Metrics: ``critic/risk_<term>`` for each term.
    """
    if targets not in RISK_TARGETS:
        raise ValueError(f"risk targets={targets!r} is not one of {', '.join(RISK_TARGETS)}")
    if targets == "pooled":
        pooled = pooled_risk_terms(pred, target, alpha, beta)
        cvar_term, gain_term, shape_term = pooled["cvar"], pooled["gain"], pooled["shape"]
    else:
        cvar_term = lambda: cvar_calibration(pred, target, alpha)  # noqa: E731
        gain_term = lambda: upper_tail_gain(pred, target, beta)  # noqa: E731
        shape_term = lambda: tail_shape(pred, target, alpha, beta)  # noqa: E731
    terms = {
        "cvar": (cvar_weight, cvar_term),
        "gain": (gain_weight, gain_term),
        "shape": (shape_weight, shape_term),
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
