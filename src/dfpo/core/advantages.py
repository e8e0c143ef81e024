"""Advantage estimators, registered by name.

Shapes: ``B`` sequences, ``T`` response tokens (right-padded), ``K`` return samples per token. ``mask [B, T]`` is
1 on response tokens. ``rewards [B, T]`` are per-token rewards (the outcome reward on the last response token plus
any per-token KL penalty); ``scores [B]`` are outcome rewards; ``group [B]`` holds integer ids that tie the samples
of one prompt together; ``valid [B]`` (optional, bool) marks the samples that have a reward: the group-based
estimators leave the others out of their group's statistics and give them advantage 0. Every estimator returns
``(advantages, returns)``, both ``[B, T]`` (``[B, T, K]`` for the distributional one) and zero on padding;
``returns`` is what a critic would regress to (for critic-free estimators it equals the advantages).

Use ``get(name)`` for the function, or ``compute(name, **inputs)`` to call it with whatever it declares and get
``(advantages, returns, metrics)`` back, ``metrics`` describing the groups for group-based estimators.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfpo.core.masked import masked_mean, masked_whiten
from dfpo.core.registry import Registry

ADVANTAGES = Registry("advantage estimator")
register = ADVANTAGES.register
get = ADVANTAGES.get
names = ADVANTAGES.names


def _reverse_scan(deltas: Tensor, mask: Tensor, decay: float | Tensor) -> Tensor:
    """``out_t = delta_t + decay * out_{t'}`` where ``t'`` is the next valid position after ``t``.

    ``deltas [B, T, ...]``, ``mask [B, T]``, ``decay`` a float or one per sequence ``[B]``. Masked positions output
    0 and are skipped (the carry passes through them unchanged), so padding never enters the recursion.
    """
    valid = mask.bool().reshape(mask.shape + (1,) * (deltas.dim() - 2))
    if isinstance(decay, Tensor):
        decay = decay.to(deltas.dtype).reshape(decay.shape[:1] + (1,) * (deltas.dim() - 2))
    out = torch.zeros_like(deltas)
    carry = torch.zeros_like(deltas[:, 0])
    for t in range(deltas.shape[1] - 1, -1, -1):
        carry = torch.where(valid[:, t], deltas[:, t] + decay * carry, carry)
        out[:, t] = torch.where(valid[:, t], carry, 0.0)
    return out


def _next_valid(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` at the next valid position after each ``t`` (0 after the last one). ``x [B, T, ...]``."""
    valid = mask.bool().reshape(mask.shape + (1,) * (x.dim() - 2))
    nxt = torch.zeros_like(x)
    carry = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        nxt[:, t] = carry
        carry = torch.where(valid[:, t], x[:, t], carry)
    return nxt


def _td_lambda(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float | Tensor
) -> tuple[Tensor, Tensor]:
    """GAE over trailing sample dims: ``rewards [B, T]``, ``values [B, T, ...]``, ``lam`` a float or ``[B]``."""
    valid = mask.bool().reshape(mask.shape + (1,) * (values.dim() - 2))
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    values = torch.where(valid, values, zero)
    rewards = torch.where(mask.bool(), rewards.to(values.dtype), zero).reshape(
        valid.shape[:2] + (1,) * (values.dim() - 2)
    )
    deltas = rewards + gamma * _next_valid(values, mask) - values
    advantages = _reverse_scan(deltas, mask, gamma * lam)
    returns = torch.where(valid, advantages + values, zero)
    return advantages, returns


def adaptive_lambda(lengths: Tensor, alpha: float) -> Tensor:
    """VAPO's length-adaptive lambda, ``1 - 1 / (alpha * l)`` per sequence of ``l`` response tokens, floored at 0:
    long responses get lambda near 1 (little bias from the critic over many tokens), short ones less variance.
    ``lengths [B] -> [B]``."""
    return (1.0 - 1.0 / (alpha * lengths.to(torch.float32).clamp_min(1.0))).clamp_min(0.0)


@register("gae")
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float | Tensor = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last valid token is 0),
    ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns_t = A_t + V_t``.

    Args:
        rewards: ``[B, T]`` per-token rewards.
        values: ``[B, T]`` value of the state before each response token (from the critic, no grad).
        mask: ``[B, T]`` response mask; values and rewards at padded positions are ignored.
        lam: a float, or one per sequence ``[B]`` (:func:`adaptive_lambda`).
    Returns:
        ``(advantages [B, T], returns [B, T])``, zero on padding.
    """
    return _td_lambda(rewards, values, mask, gamma, lam)


@register("distributional_gae")
def distributional_gae(
    rewards: Tensor, samples: Tensor, mask: Tensor, gamma: float = 1.0, lam: float | Tensor = 0.95
) -> tuple[Tensor, Tensor]:
    """GAE applied to each of ``K`` return samples (DVPO eq. 2).

    ``delta_t^k = r_t + gamma * Z_{t+1}^k - Z_t^k``, ``A_t^k = delta_t^k + gamma * lam * A_{t+1}^k``,
    ``Zhat_t^k = Z_t^k + A_t^k``. Sample ``k`` at ``t`` bootstraps from sample ``k`` at ``t + 1``: with sorted
    (quantile-ordered) samples this propagates each quantile level. ``mean_k A_t^k`` equals :func:`gae` on
    ``V = mean_k Z^k``.

    Args:
        rewards: ``[B, T]``.
        samples: ``[B, T, K]`` return samples (or quantiles) from the critic before this update, no grad.
        mask: ``[B, T]``.
    Returns:
        ``(advantages [B, T, K], targets [B, T, K])``: per-sample advantages and the critic's target samples.
    """
    return _td_lambda(rewards, samples, mask, gamma, lam)


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """``G_t = sum_{s >= t} gamma^(s - t) r_s`` over valid positions. ``rewards, mask [B, T] -> [B, T]``."""
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    return _reverse_scan(torch.where(mask.bool(), rewards, zero), mask, gamma)


def _group_index(group: Tensor) -> tuple[Tensor, int]:
    ids, inverse = torch.unique(group, return_inverse=True)
    return inverse, ids.numel()


def group_stats(scores: Tensor, group: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample statistics of each sample's group: ``mean``, ``std`` (unbiased), ``size``, ``degenerate``.

    Only the ``valid`` samples (default: all) count: a sample without a reward is in no group's mean, std or size,
    and gets its group's statistics like the others. ``degenerate`` marks groups whose valid scores are all equal
    (or that have none): they carry no learning signal for group-relative estimators.
    ``scores [B]``, ``group [B]``, ``valid [B]`` -> each ``[B]``.
    """
    inverse, n = _group_index(group)
    counted = torch.ones_like(scores, dtype=torch.float64) if valid is None else valid.to(torch.float64)
    # where() so that whatever stands in for a missing reward (0, NaN) never reaches a statistic
    scores = torch.where(counted > 0, scores.to(torch.float64), 0.0)
    size = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(0, inverse, counted)
    total = torch.zeros_like(size).index_add_(0, inverse, scores)
    mean = total / size.clamp_min(1.0)
    sq = torch.zeros_like(size).index_add_(0, inverse, (scores - mean[inverse]) ** 2 * counted)
    std = torch.sqrt(sq / (size - 1).clamp_min(1.0))
    inf = float("inf")  # a group without valid scores has lo > hi: degenerate
    lo = torch.full_like(size, inf).scatter_reduce_(0, inverse, scores.masked_fill(counted == 0, inf), "amin")
    hi = torch.full_like(size, -inf).scatter_reduce_(0, inverse, scores.masked_fill(counted == 0, -inf), "amax")
    return {"mean": mean[inverse], "std": std[inverse], "size": size[inverse], "degenerate": (lo >= hi)[inverse]}


def group_metrics(scores: Tensor, group: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """Counts for logging: number of groups, and how many (and what fraction) have all-equal valid scores."""
    inverse, n = _group_index(group)
    degenerate = torch.zeros(n, dtype=torch.bool, device=scores.device)
    degenerate[inverse] = group_stats(scores, group, valid)["degenerate"]
    count = int(degenerate.sum())
    return {"adv/groups": float(n), "adv/degenerate_groups": float(count), "adv/degenerate_frac": count / n}


def _without_reward(valid: Tensor | None, like: Tensor) -> Tensor:
    """``[B]`` bool: the samples that have no reward (none without ``valid``)."""
    return torch.zeros_like(like, dtype=torch.bool) if valid is None else ~valid.bool()


def _broadcast(per_seq: Tensor, mask: Tensor) -> Tensor:
    return per_seq.to(torch.float32)[:, None] * mask.to(torch.float32)


@register("grpo")
def grpo(
    scores: Tensor, mask: Tensor, group: Tensor, valid: Tensor | None = None, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """GRPO: ``A_i = (R_i - mean_g R) / (std_g R + eps)`` broadcast to every response token.

    ``scores [B]``, ``mask [B, T]``, ``group [B]``, ``valid [B]`` -> ``(advantages [B, T], returns [B, T])``.
    Groups whose valid scores are all equal, and samples that are not valid, get exactly zero advantage.
    """
    stats = group_stats(scores, group, valid)
    adv = (scores.to(torch.float64) - stats["mean"]) / (stats["std"] + eps)
    adv = torch.where(stats["degenerate"] | _without_reward(valid, scores), 0.0, adv)
    out = _broadcast(adv, mask)
    return out, out


@register("dr_grpo")
def dr_grpo(scores: Tensor, mask: Tensor, group: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: ``A_i = R_i - mean_g R`` (no std division); pair it with the ``seq-mean-token-sum-norm`` loss.

    ``scores [B]``, ``mask [B, T]``, ``group [B]``, ``valid [B]`` -> ``(advantages [B, T], returns [B, T])``.
    """
    stats = group_stats(scores, group, valid)
    skip = stats["degenerate"] | _without_reward(valid, scores)
    adv = torch.where(skip, 0.0, scores.to(torch.float64) - stats["mean"])
    out = _broadcast(adv, mask)
    return out, out


@register("rloo")
def rloo(scores: Tensor, mask: Tensor, group: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RLOO: ``A_i = R_i - mean_{j != i, j in g} R_j`` over the valid samples; singleton groups get 0.

    ``scores [B]``, ``mask [B, T]``, ``group [B]``, ``valid [B]`` -> ``(advantages [B, T], returns [B, T])``.
    """
    stats = group_stats(scores, group, valid)
    n = stats["size"]
    s = scores.to(torch.float64)
    loo_mean = (stats["mean"] * n - s) / (n - 1).clamp_min(1.0)
    adv = torch.where(stats["degenerate"] | (n < 2) | _without_reward(valid, scores), 0.0, s - loo_mean)
    out = _broadcast(adv, mask)
    return out, out


@register("reinforce_pp")
def reinforce_pp(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """REINFORCE++: returns-to-go of the per-token rewards (KL in the reward), whitened over the whole batch.

    ``rewards, mask [B, T]`` -> ``(advantages [B, T], returns [B, T])``; ``returns`` are the raw returns-to-go.
    """
    returns = returns_to_go(rewards, mask, gamma)
    return masked_whiten(returns, mask), returns


@register("reinforce_pp_baseline")
def reinforce_pp_baseline(
    scores: Tensor, mask: Tensor, group: Tensor, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline: subtract the group mean of the outcome reward, broadcast, whiten over the batch.

    ``scores [B]``, ``mask [B, T]``, ``group [B]``, ``valid [B]`` -> ``(advantages [B, T], returns [B, T])``. Use
    it with KL as a loss. Degenerate groups are 0 before whitening, so they only shift with the batch mean; samples
    that are not valid are 0 and left out of the whitening statistics.
    """
    stats = group_stats(scores, group, valid)
    counted = mask * (~_without_reward(valid, scores)).to(mask.dtype)[:, None]
    centred = _broadcast(scores.to(torch.float64) - stats["mean"], counted)
    return masked_whiten(centred, counted), centred


def compute(name: str, /, **inputs: Tensor | float | None) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Call estimator ``name`` with the inputs it declares; returns ``(advantages, returns, metrics)``.

    ``metrics`` has the mean and std of the advantages over valid tokens and, for group-based estimators, the
    group counts of :func:`group_metrics`.
    """
    advantages, returns = ADVANTAGES.call(name, **inputs)
    mask = inputs["mask"]
    token_mask = mask if advantages.dim() == mask.dim() else mask[..., None]
    adv_mean = masked_mean(advantages, token_mask)
    metrics = {
        "adv/mean": float(adv_mean),
        "adv/std": float(masked_mean((advantages - adv_mean) ** 2, token_mask).sqrt()),
    }
    if "group" in ADVANTAGES.inputs(name)[0]:
        metrics.update(group_metrics(inputs["scores"], inputs["group"], inputs.get("valid")))
    return advantages, returns, metrics
