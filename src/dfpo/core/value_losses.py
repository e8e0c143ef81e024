"""Critic losses: clipped MSE (scalar), quantile Huber (DVPO), distributional flow matching (DFPO).

Each returns ``(loss, metrics)``; the loss is a token mean over ``mask``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfpo.core.masked import explained_variance, masked_mean


def clipped_squared_error(
    values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's per-position value error ``max((V - R)^2, (clip(V, V_old ± clip) - R)^2)``, and a float tensor that is
    1 where the clipped term is the larger. All tensors share one shape; ``clip=None`` gives the plain squared error.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return unclipped, torch.zeros_like(unclipped)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def clipped_mse(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """PPO's value loss ``0.5 * max((V - R)^2, (clip(V, V_old ± clip) - R)^2)``.

    ``values`` (with grad), ``old_values``, ``returns``, ``mask``: ``[B, T]``. ``clip=None`` gives plain MSE.
    Metrics: ``critic/vf_loss``, ``critic/vf_clipfrac``, ``critic/explained_var``.
    """
    per_token, clipped_frac = clipped_squared_error(values, old_values, returns, clip)
    loss = 0.5 * masked_mean(per_token, mask)
    with torch.no_grad():
        metrics = {
            "critic/vf_loss": float(loss),
            "critic/vf_clipfrac": float(masked_mean(clipped_frac, mask)),
            "critic/explained_var": float(explained_variance(values, returns, mask)),
        }
    return loss, metrics


def quantile_levels(num_quantiles: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Midpoint quantile levels ``tau_i = (i + 1/2) / M``, ``[M]``."""
    return (torch.arange(num_quantiles, device=device, dtype=dtype or torch.float32) + 0.5) / num_quantiles


def quantile_huber(
    quantiles: Tensor,
    targets: Tensor,
    mask: Tensor,
    kappa: float = 0.02,
    taus: Tensor | None = None,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Quantile-Huber regression of ``M`` predicted quantiles onto ``K`` target samples, over all pairs.

    ``rho_tau(u) = |tau - 1{u < 0}| * H_kappa(u) / kappa`` with ``u = target_j - quantile_i`` and the Huber
    loss ``H_kappa``; averaged over the ``M x K`` pairs, then over valid tokens. ``kappa -> 0`` is the pinball
    loss whose minimiser is the exact quantile; with ``kappa`` large against the return spread the minimiser
    drifts towards an expectile (``kappa = 1`` on 0/1 returns learns a mean of 0.27 for a Bernoulli(0.2)
    return), so keep ``kappa`` small against the spread (default 0.02 return units).

    The sum over all pairs is computed exactly without forming the ``[..., M, K]`` pair tensor: with the targets
    sorted, each quantile splits them into four runs (``u < -kappa``, ``-kappa <= u < 0``, ``0 <= u <= kappa``,
    ``u > kappa``) on each of which the loss is a polynomial in the target, so prefix sums of ``t`` and ``t^2``
    give it in ``O((M + K) log K)`` per position instead of ``O(M K)`` (DVPO's 200 x 200 pairs per head and token
    otherwise dominate a step). The sums run in float64 around each position's target mean, so the polynomial
    expansion loses no precision; :func:`quantile_huber_pairs` is the direct form.

    Args:
        quantiles: ``[..., M]`` predictions at levels ``taus`` (default midpoints), with grad.
        targets: ``[..., K]`` target samples (broadcastable to ``quantiles``' leading dims), no grad.
        mask: ``[...]``.
        weight: ``[...]`` per-token weight (no grad); default 1.
    """
    if taus is None:
        taus = quantile_levels(quantiles.shape[-1], quantiles.device, quantiles.dtype)
    num_quantiles, num_targets = quantiles.shape[-1], targets.shape[-1]
    lead = torch.broadcast_shapes(quantiles.shape[:-1], targets.shape[:-1])
    t = targets.detach().to(torch.float64)
    center = t.mean(-1, keepdim=True)
    t = torch.sort(t - center, dim=-1).values.expand(*lead, num_targets).contiguous()
    q = (quantiles.to(torch.float64) - center).expand(*lead, num_quantiles)
    zero = torch.zeros((*lead, 1), dtype=torch.float64, device=t.device)
    s1 = torch.cat([zero, t.cumsum(-1)], -1)  # s1[..., j] = sum of the j smallest targets
    s2 = torch.cat([zero, (t * t).cumsum(-1)], -1)
    qd = q.detach().contiguous()
    below_far = torch.searchsorted(t, qd - kappa)  # targets with u < -kappa
    below = torch.searchsorted(t, qd)  # u < 0
    near = torch.searchsorted(t, qd + kappa, right=True)  # u <= kappa

    def run(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """count, sum t and sum t^2 of the sorted targets lo..hi-1."""
        return (hi - lo).to(torch.float64), s1.gather(-1, hi) - s1.gather(-1, lo), s2.gather(-1, hi) - s2.gather(-1, lo)

    first = torch.zeros_like(below)
    last = torch.full_like(below, num_targets)
    n_a, sum_a, _ = run(first, below_far)
    n_b, sum_b, sq_b = run(below_far, below)
    n_c, sum_c, sq_c = run(below, near)
    n_d, sum_d, _ = run(near, last)
    tau = taus.to(torch.float64)
    lower = kappa * (n_a * (q - 0.5 * kappa) - sum_a) + 0.5 * (sq_b - 2 * q * sum_b + n_b * q * q)
    upper = 0.5 * (sq_c - 2 * q * sum_c + n_c * q * q) + kappa * (sum_d - n_d * (q + 0.5 * kappa))
    pairs = (1.0 - tau) * lower + tau * upper  # [..., M]: each quantile's loss summed over the K targets
    per_token = (pairs.sum(-1) / (kappa * num_quantiles * num_targets)).to(quantiles.dtype)
    if weight is not None:
        per_token = per_token * weight
    loss = masked_mean(per_token, mask)
    return loss, {"critic/quantile_loss": float(loss.detach())}


def quantile_huber_pairs(
    quantiles: Tensor, targets: Tensor, mask: Tensor, kappa: float = 0.02, taus: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """:func:`quantile_huber` computed directly over the ``[..., M, K]`` pairs (memory and time ``O(M K)``)."""
    if taus is None:
        taus = quantile_levels(quantiles.shape[-1], quantiles.device, quantiles.dtype)
    u = targets.unsqueeze(-2) - quantiles.unsqueeze(-1)  # [..., M, K]
    abs_u = u.abs()
    huber = torch.where(abs_u <= kappa, 0.5 * u**2, kappa * (abs_u - 0.5 * kappa))
    weight = (taus.unsqueeze(-1) - (u.detach() < 0).to(u.dtype)).abs()
    per_token = (weight * huber / kappa).mean(dim=(-2, -1))
    loss = masked_mean(per_token, mask)
    return loss, {"critic/quantile_loss": float(loss.detach())}


def flow_matching(
    predicted_velocity: Tensor, target_velocity: Tensor, mask: Tensor, weight: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Distributional conditional flow matching: ``mean_k w_t * (v_pred - u)^2``, then a token mean.

    Args:
        predicted_velocity: ``[..., K]`` ``v(x_tau, tau | h)`` at the ``K`` coupled (noise, target) pairs.
        target_velocity: ``[..., K]`` ``u = target - noise`` of the straight path, no grad.
        mask: ``[...]``.
        weight: ``[...]`` per-token weight (e.g. the uncertainty weight), no grad; default 1.
    """
    per_token = ((predicted_velocity - target_velocity) ** 2).mean(-1)
    if weight is not None:
        per_token = per_token * weight
    loss = masked_mean(per_token, mask)
    return loss, {"critic/cfm_loss": float(loss.detach())}
