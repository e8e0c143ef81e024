"""What every noise model returns and promises: :class:`NoisyRewards` and the :class:`NoiseModel` interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dfpo.tasks.base import Task


class NoiseError(ValueError):
    """A noise model that cannot apply to the rewards it was given (flips of a graded reward)."""


@dataclass(frozen=True)
class NoisyRewards:
    """Rewards of one batch: ``observed`` (what the learner gets), ``true``, and the realised noise ``rate``
    (fraction of flipped labels for ``flip``; root-mean-square perturbation for ``gaussian``; fraction of samples
    whose observed reward differs from the true one for ``pseudo_label``; mean absolute difference for
    ``reward_model``). ``None`` marks a sample the reward skips."""

    observed: list[float | None]
    true: list[float | None]
    rate: float


class NoiseModel(Protocol):
    name: str

    def score(
        self,
        task: Task,
        completions: list[str],
        examples: list[dict[str, Any]],
        step: int,
        first: int = 0,
        completion_ids: list[list[int]] | None = None,
    ) -> NoisyRewards:
        """Observed and true rewards of ``completions`` (one example each) at training step ``step``; ``first`` is
        the index of the first completion in the step's whole batch (a process's share starts there)."""
        ...
