"""Per-token KL estimators between the policy and a frozen reference, from sampled-token log-probs.

With ``log_ratio = log pi(a) - log pi_ref(a)`` for ``a ~ pi``:

- ``k1 = log_ratio``: unbiased, high variance, can be negative (the KL-in-reward penalty);
- ``k2 = log_ratio^2 / 2``: biased, low variance, its gradient is the KL's gradient;
- ``k3 = exp(-log_ratio) + log_ratio - 1``: unbiased, non-negative, low variance (GRPO's KL loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfpo.core.masked import masked_mean

ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(log_probs: Tensor, ref_log_probs: Tensor, estimator: str = "k1", clamp: float = 20.0) -> Tensor:
    """Per-token KL estimate ``[B, T]`` from ``log_probs, ref_log_probs [B, T]``.

    The log-ratio is clamped to ``[-clamp, clamp]`` before ``exp`` so one outlier token cannot overflow ``k3``.
    """
    log_ratio = log_probs - ref_log_probs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-clamp, clamp)
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")


def kl_metrics(log_probs: Tensor, ref_log_probs: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean of each estimator over valid tokens, for logging (``kl/k1``, ``kl/k2``, ``kl/k3``)."""
    with torch.no_grad():
        return {f"kl/{e}": float(masked_mean(kl_estimate(log_probs, ref_log_probs, e), mask)) for e in ESTIMATORS}
