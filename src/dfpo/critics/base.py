"""One interface for every critic kind, and the registry that builds them by name.

A trainer treats every critic alike (:class:`Critic`): it asks for the critic's **outputs** on the rollout's hidden
states (``values [N, T]`` for the advantage estimator, ``samples [N, T, K]`` for a distributional one, and whatever
else the critic's own targets need), builds the critic's **targets** from the per-token rewards and those outputs,
and trains it with its **loss**, which gets the outputs of the rollout as ``old`` (for a clipped value loss) and a
:class:`CriticContext` with what a loss may need beyond the batch (which global rows it sees, reproducible draws).
Kinds are registered like the advantage estimators (:data:`CRITICS`); ``build(kind, hidden_size, **options)`` passes
each builder the options its signature declares, so a trainer hands every builder the same pool of options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from dfpo.core.advantages import distributional_gae
from dfpo.core.registry import Registry

CRITICS = Registry("critic")
register = CRITICS.register


@dataclass(frozen=True)
class CriticContext:
    """What a critic's loss may need beyond hidden states, targets and mask; every field is optional.

    Attributes:
        rows: ``[N]`` the sequences' rows in the step's global batch (bootstrap masks are keyed by them).
        seed, step: the run's seed and the training step (keys of reproducible draws).
        uniform: ``uniform(shape) -> Tensor`` of U(0, 1) draws keyed by the global batch, so that a loss that draws
            noise does not depend on how the batch is split over processes or micro-batches.
        member_tokens: ``[E]`` what each member of a bootstrapped ensemble divides its token sum by, when a batch
            is split over several calls.
    """

    rows: Tensor | None = None
    seed: int = 0
    step: int = 0
    uniform: Callable[[tuple[int, ...]], Tensor] | None = None
    member_tokens: Tensor | None = None


@runtime_checkable
class Critic(Protocol):
    """The protocol every critic kind implements (an ``nn.Module``). ``N`` sequences, ``T`` response tokens."""

    output_keys: tuple[str, ...]

    def outputs(self, hidden: Tensor) -> dict[str, Tensor]:
        """What the advantage estimator and the critic's own targets need, from ``hidden [N, T, H]``, no grad:
        ``values [N, T]`` (scalar kinds) or ``samples [N, T, K]`` (distributional kinds), and more."""
        ...

    def targets(self, rewards: Tensor, outputs: dict[str, Tensor], mask: Tensor, gamma: float, lam: float) -> Tensor:
        """Training targets from per-token ``rewards [N, T]`` and the rollout's ``outputs``: ``[N, T]`` or
        ``[N, T, K]``, zero on padding."""
        ...

    def training_loss(
        self, hidden: Tensor, targets: Tensor, mask: Tensor, old: dict[str, Tensor], context: CriticContext
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss on ``hidden [n, T, H]`` (with grad) against ``targets`` of those rows; ``old`` holds the
        rollout's outputs of the same rows. Returns ``(loss, metrics)``; the loss is a token mean over ``mask``."""
        ...

    def member_weights(self, rows: Tensor, seed: int, step: int) -> Tensor | None:
        """``[len(rows), E]`` per-member weights of the step's global ``rows`` (a bootstrapped ensemble), or None."""
        ...


class DistributionalTargets:
    """What the distributional kinds share: their ``samples`` output, distributional GAE targets clamped to the
    critic's ``value_range`` (when it has one), and no ensemble members."""

    output_keys = ("samples",)
    value_range: tuple[float, float] | None = None

    def targets(self, rewards: Tensor, outputs: dict[str, Tensor], mask: Tensor, gamma: float, lam: float) -> Tensor:
        targets = distributional_gae(rewards, outputs["samples"], mask, gamma, lam)[1]
        return targets if self.value_range is None else targets.clamp(*self.value_range) * mask.unsqueeze(-1)

    def member_weights(self, rows: Tensor, seed: int, step: int) -> None:
        return None


def build(kind: str, hidden_size: int, /, **options: Any) -> nn.Module:
    """A new critic of registered ``kind`` on features of size ``hidden_size``; ``options`` not declared by the
    kind's builder are ignored (one pool of options serves every kind)."""
    return CRITICS.call(kind, hidden_size=hidden_size, **options)


def names() -> list[str]:
    """The registered critic kinds."""
    return CRITICS.names()
