"""Policy losses, registered by name. Each returns ``(loss, metrics)``.

Shapes: ``log_probs, old_log_probs, ref_log_probs, advantages, mask [B, T]`` (log-probs of the sampled response
tokens under the current, rollout and reference policies), ``log_z, rewards [B]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfpo.core.masked import aggregate_loss, masked_mean, masked_sum
from dfpo.core.registry import Registry

POLICY_LOSSES = Registry("policy loss")
register = POLICY_LOSSES.register
get = POLICY_LOSSES.get
names = POLICY_LOSSES.names


@register("ppo_clip")
def ppo_clip(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate with an asymmetric range ``[1 - clip_low, 1 + clip_high]``.

    ``loss_t = max(-A_t r_t, -A_t clip(r_t))`` with ``r_t = exp(log_probs - old_log_probs)``. With ``dual_clip = c``
    (``c > 1``), tokens with ``A_t < 0`` are further bounded by ``-c A_t`` so a huge ratio on a bad token cannot
    dominate. Where a clipped branch is the active one the token's gradient is exactly zero.

    Args:
        log_probs: ``[B, T]`` current policy, with grad.
        old_log_probs: ``[B, T]`` rollout policy, no grad.
        advantages: ``[B, T]``.
        mask: ``[B, T]``.
        aggregation: see :func:`dfpo.core.masked.aggregate_loss`.
        normalizer: the constant of ``seq-mean-token-sum-norm`` (default ``T``); pass the response length limit so
            that the loss does not change with a batch's padded width.
    Returns:
        ``(loss, metrics)`` with ``actor/clipfrac`` (tokens where clipping is active), ``actor/approx_kl`` (k3 of
        rollout vs current), ``actor/ratio_mean`` and, with dual clip, ``actor/dual_clipfrac``.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    metrics_clip = clipped > unclipped
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_active = (advantages < 0) & (per_token > bound)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, bound), per_token)
    loss = aggregate_loss(per_token, mask, aggregation, normalizer)
    with torch.no_grad():
        metrics = {
            "actor/pg_loss": float(loss),
            "actor/clipfrac": float(masked_mean(metrics_clip.float(), mask)),
            "actor/approx_kl": float(masked_mean(torch.exp(-log_ratio) + log_ratio - 1.0, mask)),
            "actor/ratio_mean": float(masked_mean(ratio, mask)),
        }
        if dual_clip is not None:
            metrics["actor/dual_clipfrac"] = float(masked_mean(dual_active.float(), mask))
    return loss, metrics


@register("flowrl")
def flowrl(
    log_probs: Tensor,
    old_log_probs: Tensor,
    ref_log_probs: Tensor,
    log_z: Tensor,
    rewards: Tensor,
    mask: Tensor,
    beta: float = 15.0,
    clip: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """FlowRL's trajectory balance against ``pi* ∝ exp(beta * r) pi_ref`` (arXiv 2509.15207).

    ``delta_i = log Z(x_i) + mean_t log pi(a_t) - beta * rhat_i - mean_t log pi_ref(a_t)`` and
    ``loss = mean_i w_i * delta_i^2`` over the sequences with at least one valid token (a row whose mask is empty,
    a skipped or masked-out response, has nothing to balance), with the detached sequence importance weight
    ``w_i = clip(exp(sum_t log pi - log pi_old), 1 - clip, 1 + clip)``.

    Args:
        log_probs: ``[B, T]`` current policy, with grad.
        old_log_probs, ref_log_probs: ``[B, T]`` rollout and reference policies, no grad.
        log_z: ``[B]`` learned log-partition of each prompt, with grad.
        rewards: ``[B]`` group-normalised rewards ``rhat``.
        mask: ``[B, T]``.
    Returns:
        ``(loss, metrics)``; the loss is 0 exactly when every ``delta_i`` of a non-empty row is 0.
    """
    count = mask.to(log_probs.dtype).sum(-1)
    rows = count > 0
    n_tokens = count.clamp_min(1.0)
    mean_logp = masked_sum(log_probs, mask, dim=-1) / n_tokens
    mean_ref = masked_sum(ref_log_probs, mask, dim=-1) / n_tokens
    delta = log_z + mean_logp - beta * rewards - mean_ref
    with torch.no_grad():
        seq_log_ratio = masked_sum(log_probs - old_log_probs, mask, dim=-1)
        weight = torch.exp(seq_log_ratio.clamp(-20.0, 20.0)).clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(weight * delta**2, rows)
    with torch.no_grad():
        metrics = {
            "actor/tb_loss": float(loss),
            "actor/tb_residual_abs": float(masked_mean(delta.abs(), rows)),
            "actor/log_z": float(masked_mean(log_z, rows)),
            "actor/is_weight_mean": float(masked_mean(weight, rows)),
        }
    return loss, metrics
