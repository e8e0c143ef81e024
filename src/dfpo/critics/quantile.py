"""DVPO's distributional critic: ``N`` heads of ``M`` quantiles over a shared MLP on hidden states."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfpo.core.masked import explained_variance, masked_mean
from dfpo.core.risk import cvar, head_consistency, risk_loss
from dfpo.core.value_losses import quantile_huber
from dfpo.critics.base import CriticContext, DistributionalTargets, register


class QuantileCritic(DistributionalTargets, nn.Module):
    """Quantile critic (DVPO, arXiv 2512.03847).

    ``h -> LayerNorm -> Linear(H, width) -> SiLU -> Linear(width, width) -> SiLU -> N heads of M quantiles``.
    Outputs are in return units, ``return_scale`` times the raw head output, so a head initialised near zero
    starts near ``V = 0`` whatever the reward scale.

    Args:
        hidden_size: backbone hidden size ``H``.
        num_quantiles: ``M`` quantile levels ``tau_i = (i + 1/2) / M`` per head (DVPO: 200).
        num_heads: ``N`` heads (DVPO: 3); the critic's distribution is their mean.
        width: hidden width of the shared MLP.
        return_scale: typical return magnitude; ``kappa`` of the loss is in these units.
        value_range: optional ``(low, high)`` feasible return range; :meth:`quantiles` and :meth:`targets` clamp
            to it.
        loss_options: keyword options of :meth:`loss` used by :meth:`training_loss` (``kappa``, ``risk_weight``,
            ...).

    In the :class:`dfpo.critics.base.Critic` protocol it outputs ``samples`` (the sorted quantiles) and trains on
    distributional GAE targets.
    """

    def __init__(
        self,
        hidden_size: int,
        num_quantiles: int = 200,
        num_heads: int = 3,
        width: int = 256,
        return_scale: float = 1.0,
        value_range: tuple[float, float] | None = None,
        loss_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.num_quantiles, self.num_heads, self.return_scale = num_quantiles, num_heads, return_scale
        self.value_range, self.loss_options = value_range, dict(loss_options or {})
        self.trunk = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
        )
        self.heads = nn.Linear(width, num_heads * num_quantiles)
        nn.init.normal_(self.heads.weight, std=1e-3)
        nn.init.zeros_(self.heads.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """Per-head quantiles, ``[..., H] -> [..., N, M]`` in return units (unsorted)."""
        raw = self.heads(self.trunk(hidden))
        return self.return_scale * raw.unflatten(-1, (self.num_heads, self.num_quantiles))

    def quantiles(self, hidden: Tensor) -> Tensor:
        """The critic's distribution: mean over heads, sorted, clamped to ``value_range``, ``[..., H] -> [..., M]``."""
        q = torch.sort(self(hidden).mean(-2), dim=-1).values
        return q if self.value_range is None else q.clamp(*self.value_range)

    def value(self, hidden: Tensor) -> Tensor:
        """``V = mean of the quantiles``, ``[..., H] -> [...]``."""
        return self(hidden).mean((-2, -1))

    def loss(
        self,
        hidden: Tensor,
        target_samples: Tensor,
        mask: Tensor,
        *,
        kappa: float = 0.02,
        risk_weight: float = 0.1,
        risk_alpha: float = 0.1,
        risk_beta: float = 0.1,
        cvar_weight: float = 1.0,
        gain_weight: float = 1.0,
        shape_weight: float = 1.0,
        shift_weight: float = 0.0,
        curvature_weight: float = 0.0,
        consistency_weight: float = 0.1,
        risk_targets: str = "pooled",
    ) -> tuple[Tensor, dict[str, float]]:
        """Quantile Huber of every head onto the targets + ``risk_weight`` * risk terms on the mean head
        + ``consistency_weight`` * mean pairwise squared difference between heads.

        Args:
            hidden: ``[..., H]``.
            target_samples: ``[..., K]`` distributional GAE targets (any ``K``), no grad.
            mask: ``[...]``.
        Returns:
            ``(loss, metrics)``: ``critic/quantile_loss``, ``critic/risk_*``, ``critic/consistency_loss``,
            ``critic/value_mean``, ``critic/dist_std``, ``critic/cvar``, ``critic/explained_var``.
        """
        heads = self(hidden) / self.return_scale  # [..., N, M], normalised units
        targets = target_samples.detach() / self.return_scale
        qh_loss, metrics = quantile_huber(heads, targets.unsqueeze(-2), mask.unsqueeze(-1), kappa=kappa)
        mean_head = heads.mean(-2)
        risk, risk_metrics = risk_loss(
            mean_head, targets, mask, risk_alpha, risk_beta, cvar_weight, gain_weight, shape_weight,
            shift_weight, curvature_weight, risk_targets,
        )  # fmt: skip
        consistency = masked_mean(head_consistency(heads), mask)
        loss = qh_loss + risk_weight * risk + consistency_weight * consistency
        with torch.no_grad():
            dist = mean_head * self.return_scale
            metrics.update(risk_metrics)
            metrics.update(
                {
                    "critic/loss": float(loss),
                    "critic/consistency_loss": float(consistency),
                    "critic/value_mean": float(masked_mean(dist.mean(-1), mask)),
                    "critic/dist_std": float(masked_mean(dist.std(-1), mask)),
                    "critic/cvar": float(masked_mean(cvar(dist, risk_alpha), mask)),
                    "critic/explained_var": float(explained_variance(dist.mean(-1), target_samples.mean(-1), mask)),
                }
            )
        return loss, metrics

    # -- the Critic protocol -----------------------------------------------------------------------------------

    def outputs(self, hidden: Tensor) -> dict[str, Tensor]:
        return {"samples": self.quantiles(hidden)}

    def training_loss(
        self, hidden: Tensor, targets: Tensor, mask: Tensor, old: dict[str, Tensor], context: CriticContext
    ) -> tuple[Tensor, dict[str, float]]:
        return self.loss(hidden, targets, mask, **self.loss_options)


@register("quantile")
def quantile_critic(
    hidden_size: int, quantiles: int = 200, heads: int = 3, width: int = 64, return_scale: float = 1.0,
    value_range: tuple[float, float] | None = None, kappa: float = 0.02, risk_weight: float = 0.1,
    risk_targets: str = "pooled",
) -> QuantileCritic:  # fmt: skip
    """DVPO's critic: ``heads`` x ``quantiles`` quantiles, quantile Huber with ``kappa``, risk terms."""
    options = {"kappa": kappa, "risk_weight": risk_weight, "risk_targets": risk_targets}
    return QuantileCritic(hidden_size, quantiles, heads, width, return_scale, value_range, options)
