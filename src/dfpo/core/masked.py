"""Masked reductions, whitening and loss aggregation.

``mask`` is a float or bool tensor broadcastable to ``x`` with 1 on valid (response) positions and 0 on padding.
Values at masked-out positions never influence a result, even when they are NaN or inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _zero_masked(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    mask = mask.to(x.dtype) if x.is_floating_point() else mask.float()
    # where() rather than multiply, so that NaN/inf on padding cannot leak through 0 * inf.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device)), mask


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of ``x [...]`` over valid positions (all dims, or ``dim``)."""
    x, _ = _zero_masked(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x [...]`` over valid positions; 0 where there are none."""
    x, m = _zero_masked(x, mask)
    m = m.expand_as(x)
    if dim is None:
        return x.sum() / m.sum().clamp_min(1.0)
    return x.sum(dim) / m.sum(dim).clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x [...]`` over all valid positions (a scalar), with Bessel's correction by default."""
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    n = masked_sum(torch.ones_like(x), mask)
    if unbiased:
        return sq / (n - 1).clamp_min(1.0)
    return sq / n.clamp_min(1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / std`` with statistics over valid positions of ``x [...]``; padding is set to 0.

    With ``shift_mean=False`` only the scale is normalised and the mean is kept.
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)[0]


def aggregate_loss(loss: Tensor, mask: Tensor, mode: str = "token-mean", normalizer: float | None = None) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    - ``token-mean``: mean over every valid token of the batch (long responses weigh more).
    - ``seq-mean-token-mean``: mean over tokens within each sequence, then over sequences (GRPO's original).
    - ``seq-mean-token-sum``: sum over tokens within each sequence, then mean over sequences.
    - ``seq-mean-token-sum-norm``: token sum divided by a constant ``normalizer`` (default ``T``), then mean over
      sequences: Dr. GRPO's length-unbiased form.
    """
    if mode == "token-mean":
        return masked_mean(loss, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum-norm":
        norm = float(loss.shape[-1]) if normalizer is None else float(normalizer)
        return (masked_sum(loss, mask, dim=-1) / norm).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")


def explained_variance(predictions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(targets - predictions) / Var(targets)`` over valid positions (a scalar); 1 is a perfect fit."""
    var_t = masked_var(targets, mask)
    return 1.0 - masked_var(targets - predictions, mask) / var_t.clamp_min(1e-12)
