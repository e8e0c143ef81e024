"""PPO's scalar value head, its ensemble form, and pessimistic targets for robust-Bellman PPO."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfpo.core.advantages import distributional_gae
from dfpo.core.value_losses import clipped_mse


class ScalarValueHead(nn.Module):
    """``V(s_t) = w^T h_t + b``, or an ensemble of ``num_heads`` such heads (for robust-Bellman PPO).

    ``forward(hidden [..., H]) -> [..., num_heads]``; ``value(hidden) -> [...]`` is the mean over heads.
    """

    def __init__(self, hidden_size: int, num_heads: int = 1, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.proj = nn.Linear(hidden_size, num_heads)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden)

    def value(self, hidden: Tensor) -> Tensor:
        """Mean value over heads, ``[..., H] -> [...]``."""
        return self(hidden).mean(-1)

    def loss(
        self,
        hidden: Tensor,
        returns: Tensor,
        mask: Tensor,
        old_values: Tensor | None = None,
        clip: float | None = 0.2,
    ) -> tuple[Tensor, dict[str, float]]:
        """Clipped MSE of every head onto ``returns [...]``.

        Args:
            hidden: ``[..., H]``.
            returns: ``[...]`` GAE returns (or pessimistic targets), no grad.
            mask: ``[...]``.
            old_values: ``[..., num_heads]`` (or ``[...]`` for one head) from the rollout critic; without it the
                loss is unclipped.
        """
        values = self(hidden)
        if old_values is None:
            old_values, clip = values.detach(), None
        elif old_values.dim() == values.dim() - 1:
            old_values = old_values.unsqueeze(-1)
        return clipped_mse(values, old_values, returns.unsqueeze(-1).expand_as(values), mask.unsqueeze(-1), clip)


def pessimistic_targets(
    rewards: Tensor,
    ensemble_values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    quantile: float = 0.0,
) -> Tensor:
    """Robust-Bellman value targets: a lower quantile over an ensemble of GAE targets.

    Each member ``e`` gives ``R_t^e = V_t^e + A_t^e`` (GAE bootstrapped on its own values); the target is
    ``min_e R_t^e`` (``quantile=0``) or the ``quantile``-th quantile over members, the worst case of the TD target
    over the ensemble's uncertainty. One member reduces to ordinary GAE returns.

    Args:
        rewards: ``[B, T]``.
        ensemble_values: ``[B, T, E]`` values of each ensemble member, no grad.
        mask: ``[B, T]``.
    Returns:
        ``[B, T]`` targets, zero on padding.
    """
    _, targets = distributional_gae(rewards, ensemble_values, mask, gamma, lam)
    if quantile <= 0.0:
        return targets.min(-1).values
    return torch.quantile(targets, quantile, dim=-1)
