"""Critic losses: clipped MSE (scalar), quantile Huber (DVPO), distributional flow matching (DFPO).

Each returns ``(loss, metrics)``; the loss is a token mean over ``mask``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfpo.core.masked import explained_variance, masked_mean


def clipped_mse(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """PPO's value loss ``0.5 * max((V - R)^2, (clip(V, V_old ± clip) - R)^2)``.

    ``values`` (with grad), ``old_values``, ``returns``, ``mask``: ``[B, T]``. ``clip=None`` gives plain MSE.
    Metrics: ``critic/vf_loss``, ``critic/vf_clipfrac``, ``critic/explained_var``.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token, clipped_frac = unclipped, torch.zeros_like(unclipped)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (clipped_values - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipped_frac = (clipped > unclipped).float()
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
    quantiles: Tensor, targets: Tensor, mask: Tensor, kappa: float = 1.0, taus: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Quantile-Huber regression of ``M`` predicted quantiles onto ``K`` target samples, over all pairs.

    ``rho_tau(u) = |tau - 1{u < 0}| * H_kappa(u) / kappa`` with ``u = target_j - quantile_i`` and the Huber
    loss ``H_kappa``; averaged over the ``M x K`` pairs, then over valid tokens. ``kappa -> 0`` is the pinball
    loss whose minimiser is the exact quantile; with ``kappa`` large against the return spread the minimiser
    drifts towards an expectile, so scale returns (or ``kappa``) accordingly.

    Args:
        quantiles: ``[..., M]`` predictions at levels ``taus`` (default midpoints), with grad.
        targets: ``[..., K]`` target samples, no grad.
        mask: ``[...]``.
    """
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
