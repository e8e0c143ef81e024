"""PPO's scalar value head, its ensemble form with bootstrap masks, and pessimistic targets for robust-Bellman PPO."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfpo.core.advantages import distributional_gae
from dfpo.core.masked import explained_variance, masked_mean, masked_sum
from dfpo.core.streams import stream_seed
from dfpo.core.value_losses import clipped_mse, clipped_squared_error
from dfpo.critics.base import CriticContext, register


class ScalarValueHead(nn.Module):
    """PPO's value head, or an ensemble of ``num_heads`` value heads (for robust-Bellman PPO).

    ``h -> LayerNorm -> Linear(H, width) -> SiLU -> Linear(width, width) -> SiLU -> Linear(width, num_heads)``: the
    same input normalisation and trunk as the quantile critic's, so that a comparison of critics compares what
    they predict (a mean or a distribution), not how their inputs are scaled or how deep their heads are.
    ``width=0`` gives the bare linear head ``V = w^T h + b`` on unnormalised features (the earlier head; an
    ablation). ``forward(hidden [..., H]) -> [..., num_heads]``; ``value(hidden) -> [...]`` is the mean over heads.
    """

    def __init__(self, hidden_size: int, num_heads: int = 1, width: int = 64, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_heads, self.width = num_heads, width
        if width:
            self.trunk: nn.Module = nn.Sequential(
                nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU()
            )
        else:
            self.trunk = nn.Identity()
        self.proj = nn.Linear(width or hidden_size, num_heads)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(self.trunk(hidden))

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
        member_weights: Tensor | None = None,
        member_tokens: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Clipped MSE of every head onto ``returns [B, ...]``.

        Without ``member_weights`` every head learns on every valid token (one mean over tokens and heads). With
        them, head ``e`` learns only on the sequences its bootstrap mask selects: its loss is the mean of its clipped
        MSE over their valid tokens, and the loss is the mean over heads.

        Args:
            hidden: ``[B, ..., H]``.
            returns: ``[B, ...]`` GAE returns (or pessimistic targets), no grad.
            mask: ``[B, ...]``.
            old_values: ``[B, ..., num_heads]`` (or ``[B, ...]`` for one head) from the rollout critic; without it the
                loss is unclipped.
            member_weights: ``[B, num_heads]`` 0/1 bootstrap mask of each sequence and head
                (:func:`bootstrap_weights`), no grad.
            member_tokens: ``[num_heads]`` what each head's token sum is divided by (default: its selected tokens
                here). A caller that splits a batch over several calls passes each head's count over the whole
                batch, so that the calls' losses add up to the batch's per-head means.
        """
        values = self(hidden)
        if old_values is None:
            old_values, clip = values.detach(), None
        elif old_values.dim() == values.dim() - 1:
            old_values = old_values.unsqueeze(-1)
        targets = returns.unsqueeze(-1).expand_as(values)
        if member_weights is None:
            return clipped_mse(values, old_values, targets, mask.unsqueeze(-1), clip)
        lead = (1,) * (mask.dim() - 1)
        heads = mask.unsqueeze(-1) * member_weights.reshape(member_weights.shape[0], *lead, -1).to(values.dtype)
        per_token, clipped_frac = clipped_squared_error(values, old_values, targets, clip)
        over = tuple(range(values.dim() - 1))
        if member_tokens is None:
            member_tokens = heads.sum(over)
        # a head that selects no token here adds 0 (its sum is 0), not 0 / 0
        denominator = torch.where(member_tokens > 0, member_tokens.to(values.dtype), 1.0)
        loss = 0.5 * (masked_sum(per_token, heads, dim=over) / denominator).mean()
        with torch.no_grad():
            metrics = {
                "critic/vf_loss": float(loss),
                "critic/vf_clipfrac": float(masked_mean(clipped_frac, heads)),
                "critic/explained_var": float(explained_variance(values, targets, heads)),
            }
        return loss, metrics


def bootstrap_weights(rows: Tensor, num_members: int, seed: int, step: int, p: float = 0.5) -> Tensor:
    """Bootstrap masks of an ensemble's members: ``[B, num_members]``, 1 with probability ``p`` and else 0.

    Member ``e`` trains on sequence ``b`` where the mask is 1, so that the members fit different resamples of the
    data and disagree where it is scarce. Each row draws from a stream of its own, keyed by ``(seed, step, row)``:
    a sequence's mask is the same however a batch is split over processes and micro-batches.

    Args:
        rows: ``[B]`` integer indices of the sequences in the step's whole batch.
    """
    draws = [
        torch.rand(num_members, generator=torch.Generator().manual_seed(stream_seed(seed, step, 3, row)))
        for row in rows.tolist()
    ]
    uniform = torch.stack(draws) if draws else torch.zeros(0, num_members)
    return (uniform < p).float().to(rows.device)


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


class ScalarCritic(ScalarValueHead):
    """PPO's critic (one head) and robust-Bellman PPO's (an ensemble), in the :class:`dfpo.critics.base.Critic`
    protocol: outputs ``values`` (the mean over members) and ``ensemble [..., E]``; targets are the pessimistic
    ``quantile`` of the members' GAE targets (for one member, plain GAE returns); members train on bootstrap
    resamples with probability ``bootstrap`` (0 or 1: every member on every sequence); the loss is the clipped MSE
    with ``value_clip`` (0: unclipped)."""

    output_keys = ("values", "ensemble")

    def __init__(
        self, hidden_size: int, num_heads: int = 1, width: int = 64, value_clip: float = 0.2,
        pessimism: float = 0.0, bootstrap: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(hidden_size, num_heads, width)
        self.value_clip, self.pessimism, self.bootstrap = value_clip, pessimism, bootstrap

    def outputs(self, hidden: Tensor) -> dict[str, Tensor]:
        ensemble = self(hidden)
        return {"values": ensemble.mean(-1), "ensemble": ensemble}

    def targets(self, rewards: Tensor, outputs: dict[str, Tensor], mask: Tensor, gamma: float, lam: float) -> Tensor:
        return pessimistic_targets(rewards, outputs["ensemble"], mask, gamma, lam, self.pessimism)

    def training_loss(
        self, hidden: Tensor, targets: Tensor, mask: Tensor, old: dict[str, Tensor], context: CriticContext
    ) -> tuple[Tensor, dict[str, float]]:
        weights = None if context.rows is None else self.member_weights(context.rows, context.seed, context.step)
        return self.loss(
            hidden, targets, mask, old_values=old["ensemble"], clip=self.value_clip or None,
            member_weights=None if weights is None else weights.to(hidden.device),
            member_tokens=context.member_tokens,
        )  # fmt: skip

    def member_weights(self, rows: Tensor, seed: int, step: int) -> Tensor | None:
        if self.num_heads < 2 or self.bootstrap in (0.0, 1.0):
            return None
        return bootstrap_weights(rows.cpu(), self.num_heads, seed, step, self.bootstrap)


@register("scalar")
def scalar_critic(hidden_size: int, width: int = 64, value_clip: float = 0.2) -> ScalarCritic:
    """PPO's value head."""
    return ScalarCritic(hidden_size, 1, width, value_clip)


@register("ensemble")
def ensemble_critic(
    hidden_size: int, heads: int = 4, width: int = 64, value_clip: float = 0.2, pessimism: float = 0.0,
    bootstrap: float = 0.5,
) -> ScalarCritic:  # fmt: skip
    """Robust-Bellman PPO's ensemble of ``heads`` value heads on one trunk."""
    return ScalarCritic(hidden_size, heads, width, value_clip, pessimism, bootstrap)
