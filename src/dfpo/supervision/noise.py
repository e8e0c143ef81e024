"""Noisy supervision: what the learner sees instead of the true reward.

Every noise model is seeded and deterministic: the noise applied to sample ``i`` of training step ``step`` depends
only on ``(seed, step, i)``, so a resumed run sees exactly the noise it would have seen. Each call returns the
observed and the true rewards and the realised noise rate, so a run always logs both. Noise is applied to training
rewards only, never to evaluation.

Every noise model scores a batch the same way, ``noise.score(task, completions, examples, step, first=0) ->
NoisyRewards`` (``first``: where this batch starts in the step's whole batch, when processes share a step): the
true reward is always ``task.score`` against the gold answer. ``flip`` and ``gaussian`` perturb that reward;
``pseudo_label(n)`` scores against the majority vote of n samples of the starting policy
(:class:`PseudoLabel`). A ``None`` reward (a user reward that skips a sample) stays ``None``.

``reward_model`` scores with a learned reward model (:mod:`dfpo.supervision.reward_model`, for the dialogue task).

Specs accepted by :func:`make_noise`: ``clean``, ``flip(p)``, ``gaussian(sigma)``, ``pseudo_label(n)``,
``reward_model``.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dfpo.supervision.base import LabelContext, NoiseError, NoiseHooks, NoiseModel, NoisyRewards
from dfpo.tasks.base import majority_vote

if TYPE_CHECKING:
    from dfpo.tasks.base import Task

__all__ = ["Clean", "Flip", "Gaussian", "NoiseError", "NoiseModel", "NoisyRewards", "PseudoLabel", "make_noise"]


class RewardNoise(NoiseHooks, ABC):
    """Noise applied to the true reward itself: subclasses implement ``__call__(true_rewards, step)``."""

    @abstractmethod
    def __call__(self, true_rewards: list[float], step: int, index: list[int] | None = None) -> NoisyRewards:
        """Observed rewards for ``true_rewards`` (none of them ``None``) at training step ``step``; ``index`` gives
        each reward's sample index in the step's batch, whose draw it gets (default ``0, 1, ...``)."""

    def score(
        self,
        task: Task,
        completions: list[str],
        examples: list[dict[str, Any]],
        step: int,
        first: int = 0,
        completion_ids: list[list[int]] | None = None,
    ) -> NoisyRewards:
        true = task.score_batch(completions, examples, completion_ids)
        kept = [i for i, r in enumerate(true) if r is not None]
        noisy = self([true[i] for i in kept], step, [first + i for i in kept])
        observed: list[float | None] = [None] * len(true)
        for i, value in zip(kept, noisy.observed, strict=True):
            observed[i] = value
        return NoisyRewards(observed, true, noisy.rate)


def _draws(kind: str, seed: int, step: int, index: list[int] | None, n: int) -> torch.Tensor:
    """Draw ``index[j]`` of a distinct, reproducible stream per ``(seed, step)``, for ``j < n``: uniform or normal."""
    index = list(range(n)) if index is None else index
    if len(index) != n:
        raise ValueError(f"index has {len(index)} entries for {n} rewards")
    if not index:
        return torch.zeros(0)
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    if kind == "uniform":
        return torch.rand(max(index) + 1, generator=g)[index]
    return torch.randn(max(index) + 1, generator=g, dtype=torch.float64)[index]


@dataclass(frozen=True)
class Clean(RewardNoise):
    """No noise."""

    seed: int = 0
    name: str = "clean"

    def __call__(self, true_rewards: list[float], step: int, index: list[int] | None = None) -> NoisyRewards:
        return NoisyRewards(list(true_rewards), list(true_rewards), 0.0)


@dataclass(frozen=True)
class Flip(RewardNoise):
    """Symmetric label noise: each binary reward is flipped (0 <-> 1) with probability ``p``."""

    p: float
    seed: int = 0
    name: str = "flip"

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"flip(p) needs 0 <= p <= 1, got p={self.p}")

    def __call__(self, true_rewards: list[float], step: int, index: list[int] | None = None) -> NoisyRewards:
        bad = [(i, r) for i, r in enumerate(true_rewards) if r not in (0.0, 1.0)]
        if bad:
            i, r = bad[0]
            raise NoiseError(
                f"noise=flip({self.p}) needs binary rewards (0 or 1), but the reward was {r} for sample {i}: use "
                "noise=gaussian(sigma) for graded scores, or noise=clean"
            )
        flips = _draws("uniform", self.seed, step, index, len(true_rewards)) < self.p
        observed = [1.0 - r if f else r for r, f in zip(true_rewards, flips.tolist(), strict=True)]
        rate = float(flips.float().mean()) if len(true_rewards) else 0.0
        return NoisyRewards(observed, list(true_rewards), rate)


@dataclass(frozen=True)
class Gaussian(RewardNoise):
    """Additive Gaussian noise of standard deviation ``sigma`` on scores."""

    sigma: float
    seed: int = 0
    name: str = "gaussian"

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"gaussian(sigma) needs sigma >= 0, got {self.sigma}")

    def __call__(self, true_rewards: list[float], step: int, index: list[int] | None = None) -> NoisyRewards:
        noise = self.sigma * _draws("normal", self.seed, step, index, len(true_rewards))
        observed = [r + n for r, n in zip(true_rewards, noise.tolist(), strict=True)]
        rate = float(noise.pow(2).mean().sqrt()) if len(true_rewards) else 0.0
        return NoisyRewards(observed, list(true_rewards), rate)


_SPEC = re.compile(r"^\s*(\w+)\s*(?:\(\s*([^)]*)\s*\))?\s*$")


@dataclass(frozen=True)
class PseudoLabel(NoiseHooks):
    """Test-time-RL supervision: the majority answer of ``n`` samples of the starting policy replaces the gold one.

    Call :meth:`label` once, before training, on the training examples; it adds ``pseudo_answer`` (``None`` when
    no sample had a marked answer: every completion then scores 0) and returns the pseudo-label accuracy. The
    realised rate of :meth:`score` is the fraction of samples whose observed reward differs from the true one.
    """

    n: int
    seed: int = 0
    name: str = "pseudo_label"
    # in training: each prompt's label {"answer", "right"}, keyed by the prompt, kept in checkpoints
    labels: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)
    needs_reference = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"pseudo_label(n) needs n >= 1 samples per prompt, got n={self.n}")

    def label(
        self,
        model: Any,
        tokenizer: Any,
        task: Task,
        examples: list[dict[str, Any]],
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        batch_size: int = 64,
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """``examples`` with ``pseudo_answer`` set by majority vote, and ``{"accuracy", "abstain_rate",
        "agreement"}``: the share of pseudo-labels that are right, that are missing, and the mean share of the n
        votes that the winning answer got. Sampling is seeded by ``seed``."""
        from dfpo.generation.rollout import generate

        prompts = [task.prompt_text(tokenizer, e) for e in examples for _ in range(self.n)]
        torch.manual_seed(self.seed)
        completions, _ = generate(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p)
        labelled, right, missing, agreement = [], 0.0, 0, 0.0
        for i, example in enumerate(examples):
            pseudo, share = majority_vote(task, example, completions[i * self.n : (i + 1) * self.n])
            labelled.append({**example, "pseudo_answer": pseudo})
            missing += pseudo is None
            agreement += share
            right += task.score_answer(pseudo, example) if pseudo is not None else 0.0
        count = max(1, len(examples))
        return labelled, {"accuracy": right / count, "abstain_rate": missing / count, "agreement": agreement / count}

    def prepare(self, examples: list[dict[str, Any]], context: LabelContext) -> list[dict[str, Any]]:
        """``examples`` with their pseudo-label: the majority vote of the *starting* policy, computed the first
        time an example is drawn, and drawn from a forked generator so that labelling never moves the training's
        random stream."""
        keys = [json.dumps(e["prompt"], sort_keys=True) for e in examples]
        todo = [e for e, k in zip(examples, keys, strict=True) if k not in self.labels]
        new: dict[str, Any] = {}
        if todo:
            with torch.random.fork_rng():
                labelled, _ = self.label(context.model, context.tokenizer, context.task, todo, context.temperature,
                                         context.top_p, context.max_new_tokens)  # fmt: skip
            for e in labelled:
                right = e["pseudo_answer"] is not None and context.task.score_answer(e["pseudo_answer"], e) > 0.5
                new[json.dumps(e["prompt"], sort_keys=True)] = {"answer": e["pseudo_answer"], "right": bool(right)}
        # every process keeps every label: any may draw the example later, and the first saves them
        for labels in context.gather(new):
            self.labels.update(labels)
        return [{**e, "pseudo_answer": self.labels[k]["answer"]} for e, k in zip(examples, keys, strict=True)]

    def state(self) -> dict[str, Any]:
        return self.labels

    def load_state(self, state: dict[str, Any]) -> None:
        self.labels.clear()
        self.labels.update(state)

    def metrics(self) -> dict[str, float]:
        if not self.labels:
            return {}
        return {"reward/pseudo_label_accuracy": sum(v["right"] for v in self.labels.values()) / len(self.labels)}

    def score(
        self,
        task: Task,
        completions: list[str],
        examples: list[dict[str, Any]],
        step: int,
        first: int = 0,
        completion_ids: list[list[int]] | None = None,
    ) -> NoisyRewards:
        if examples and "pseudo_answer" not in examples[0]:
            raise ValueError("pseudo_label noise scores against pseudo-labels: call PseudoLabel.label on the examples")
        true = task.score_batch(completions, examples, completion_ids)
        pseudo = [{**e, "answer": e["pseudo_answer"]} for e in examples]
        observed = [
            None if t is None else (0.0 if e["pseudo_answer"] is None else task.score(c, e))
            for c, e, t in zip(completions, pseudo, true, strict=True)
        ]
        pairs = [(o, t) for o, t in zip(observed, true, strict=True) if t is not None]
        rate = sum(o != t for o, t in pairs) / len(pairs) if pairs else 0.0
        return NoisyRewards(observed, true, rate)


_MODELS = {
    "clean": (Clean, None),
    "flip": (Flip, float),
    "gaussian": (Gaussian, float),
    "pseudo_label": (PseudoLabel, int),
}


def make_noise(spec: str, seed: int = 0) -> NoiseModel:
    """A noise model from its spec, e.g. ``"flip(0.2)"``; errors name the valid specs."""
    valid = "clean, flip(p), gaussian(sigma), pseudo_label(n), reward_model"
    match = _SPEC.match(spec)
    if not match or match.group(1) not in {*_MODELS, "reward_model"}:
        raise ValueError(f"unknown noise {spec!r}; valid: {valid}")
    name, arg = match.groups()
    if name == "reward_model":
        if arg:
            raise ValueError(f"noise 'reward_model' takes no argument, got {spec!r}")
        from dfpo.supervision.reward_model import RewardModelNoise  # loads a backbone: only on demand

        return RewardModelNoise(seed=seed)
    cls, parse = _MODELS[name]
    if parse is None:
        if arg:
            raise ValueError(f"noise {name!r} takes no argument, got {spec!r}")
        return cls(seed=seed)
    try:
        value = parse(arg)
    except (TypeError, ValueError):
        example = "8" if parse is int else "0.2"
        raise ValueError(f"noise {spec!r} needs a number, as in {name}({example}); valid: {valid}") from None
    return cls(value, seed=seed)
