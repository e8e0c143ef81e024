"""Noisy supervision: what the learner sees instead of the true reward.

Every noise model is seeded and deterministic: the noise applied to sample ``i`` of training step ``step`` depends
only on ``(seed, step, i)``, so a resumed run sees exactly the noise it would have seen. Each call returns the
observed and the true rewards and the realised noise rate, so a run always logs both. Noise is applied to training
rewards only, never to evaluation.

Specs accepted by :func:`make_noise`: ``clean``, ``flip(p)``, ``gaussian(sigma)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class NoisyRewards:
    """Rewards of one batch: ``observed`` (what the learner gets), ``true``, and the realised noise ``rate``
    (fraction of flipped labels for ``flip``; root-mean-square perturbation for ``gaussian``)."""

    observed: list[float]
    true: list[float]
    rate: float


class NoiseModel(Protocol):
    name: str

    def __call__(self, true_rewards: list[float], step: int) -> NoisyRewards: ...


def _generator(seed: int, step: int) -> torch.Generator:
    # A distinct, reproducible stream per (seed, step).
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


@dataclass(frozen=True)
class Clean:
    """No noise."""

    seed: int = 0
    name: str = "clean"

    def __call__(self, true_rewards: list[float], step: int) -> NoisyRewards:
        return NoisyRewards(list(true_rewards), list(true_rewards), 0.0)


@dataclass(frozen=True)
class Flip:
    """Symmetric label noise: each binary reward is flipped (0 <-> 1) with probability ``p``."""

    p: float
    seed: int = 0
    name: str = "flip"

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"flip(p) needs 0 <= p <= 1, got p={self.p}")

    def __call__(self, true_rewards: list[float], step: int) -> NoisyRewards:
        bad = [(i, r) for i, r in enumerate(true_rewards) if r not in (0.0, 1.0)]
        if bad:
            i, r = bad[0]
            raise ValueError(
                f"flip noise needs binary rewards (0 or 1), got {r} at index {i}; use gaussian(sigma) for graded scores"
            )
        flips = torch.rand(len(true_rewards), generator=_generator(self.seed, step)) < self.p
        observed = [1.0 - r if f else r for r, f in zip(true_rewards, flips.tolist(), strict=True)]
        rate = float(flips.float().mean()) if len(true_rewards) else 0.0
        return NoisyRewards(observed, list(true_rewards), rate)


@dataclass(frozen=True)
class Gaussian:
    """Additive Gaussian noise of standard deviation ``sigma`` on scores."""

    sigma: float
    seed: int = 0
    name: str = "gaussian"

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"gaussian(sigma) needs sigma >= 0, got {self.sigma}")

    def __call__(self, true_rewards: list[float], step: int) -> NoisyRewards:
        noise = self.sigma * torch.randn(len(true_rewards), generator=_generator(self.seed, step), dtype=torch.float64)
        observed = [r + n for r, n in zip(true_rewards, noise.tolist(), strict=True)]
        rate = float(noise.pow(2).mean().sqrt()) if len(true_rewards) else 0.0
        return NoisyRewards(observed, list(true_rewards), rate)


_SPEC = re.compile(r"^\s*(\w+)\s*(?:\(\s*([^)]*)\s*\))?\s*$")
_MODELS = {"clean": (Clean, None), "flip": (Flip, float), "gaussian": (Gaussian, float)}


def make_noise(spec: str, seed: int = 0) -> NoiseModel:
    """A noise model from its spec, e.g. ``"flip(0.2)"``; errors name the valid specs."""
    valid = "clean, flip(p), gaussian(sigma)"
    match = _SPEC.match(spec)
    if not match or match.group(1) not in _MODELS:
        raise ValueError(f"unknown noise {spec!r}; valid: {valid}")
    name, arg = match.groups()
    cls, parse = _MODELS[name]
    if parse is None:
        if arg:
            raise ValueError(f"noise {name!r} takes no argument, got {spec!r}")
        return cls(seed=seed)
    try:
        value = parse(arg)
    except (TypeError, ValueError):
        raise ValueError(f"noise {spec!r} needs a number, as in {name}(0.2); valid: {valid}") from None
    return cls(value, seed=seed)
