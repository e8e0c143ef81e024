"""What every noise model returns and promises: :class:`NoisyRewards`, the :class:`NoiseModel` interface, and the
hooks a training loop calls on every noise model (:class:`NoiseHooks`; no-ops unless a model needs them)."""

from __future__ import annotations

from collections.abc import Callable
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
    """Every noise model: :meth:`score`, and the training loop's hooks of :class:`NoiseHooks` (its subclasses)."""

    name: str
    needs_reference: bool

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

    def prepare(self, examples: list[dict[str, Any]], context: LabelContext) -> list[dict[str, Any]]: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class LabelContext:
    """What a noise model that labels the training examples itself needs from the trainer.

    Attributes:
        model: the starting policy (the frozen reference model).
        tokenizer, task: the run's tokenizer and task.
        temperature, top_p, max_new_tokens: the rollout's sampling settings.
        gather: ``gather(obj) -> [obj of every process]`` (``[obj]`` in one process), so that every process keeps
            every label.
    """

    model: Any
    tokenizer: Any
    task: Task
    temperature: float
    top_p: float
    max_new_tokens: int
    gather: Callable[[Any], list[Any]] = lambda obj: [obj]


class NoiseHooks:
    """What a training loop asks of every noise model besides :meth:`NoiseModel.score`; each default does nothing,
    so a noise model overrides only what it needs (pseudo-labels use them all)."""

    needs_reference = False  # True: the trainer loads the frozen starting policy for :meth:`prepare`

    def prepare(self, examples: list[dict[str, Any]], context: LabelContext) -> list[dict[str, Any]]:
        """The step's examples as :meth:`NoiseModel.score` needs them (for instance with labels attached)."""
        return examples

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run scores exactly as it would have (JSON-able)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` from a checkpoint."""

    def metrics(self) -> dict[str, float]:
        """Metrics of the supervision itself, logged every step."""
        return {}
