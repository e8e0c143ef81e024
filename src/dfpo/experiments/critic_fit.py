"""Distributional critics fitted in the trainer's regime, against known per-state return distributions.

The trainer gives each response token the ``K`` distributional-GAE targets of ONE trajectory: with
``lam = 1`` every target of every token equals the trajectory's observed return, and with ``lam < 1`` they mix
that return with the critic's own bootstrapped samples. A return *distribution* is therefore only visible pooled
over the many trajectories whose states look alike. This module reproduces that regime on synthetic states:
each trajectory draws a state (a context vector plus per-token feature noise), runs ``length`` tokens, and ends
with a return drawn from the state's known distribution; the critic is trained only through its ``loss`` on the
targets :func:`dfpo.core.advantages.distributional_gae` builds from its own samples. :func:`fit` then reports,
per state, the learned mean, std, lower-tail CVaR and the 1-Wasserstein distance to the true distribution.

Pure torch: usable from tests, benchmarks and notebooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dfpo.core.risk import cvar


@dataclass(frozen=True)
class Distribution:
    """A known 1-D return distribution: a name and a sampler ``draw(n, generator) -> Tensor [n]``."""

    name: str
    draw: Callable[[int, torch.Generator], Tensor]

    def reference(self, n: int = 200_000, seed: int = 12345) -> Tensor:
        """A large sorted sample of the distribution, ``[n]``: the truth the critic is compared with."""
        return torch.sort(self.draw(n, torch.Generator().manual_seed(seed))).values


def bernoulli(p: float) -> Distribution:
    """Return 1 with probability ``p``, else 0 (a verifier's reward)."""
    return Distribution(f"bernoulli({p})", lambda n, g: (torch.rand(n, generator=g) < p).float())


def categorical(values: tuple[float, ...], probs: tuple[float, ...]) -> Distribution:
    """A discrete distribution on ``values`` (e.g. a skewed three-point reward)."""
    v, p = torch.tensor(values), torch.tensor(probs)
    name = "categorical(" + ", ".join(f"{a}:{b}" for a, b in zip(values, probs, strict=True)) + ")"
    return Distribution(name, lambda n, g: v[torch.multinomial(p, n, replacement=True, generator=g)])


def normal(mean: float, std: float) -> Distribution:
    """``N(mean, std^2)``: with a small ``std``, a near point mass."""
    return Distribution(f"normal({mean}, {std})", lambda n, g: mean + std * torch.randn(n, generator=g))


def skewed() -> Distribution:
    """A right-skewed three-point return: mostly 0, sometimes 0.5, rarely 1 (mean 0.25, std 0.34)."""
    return categorical((0.0, 0.5, 1.0), (0.65, 0.2, 0.15))


DEFAULT_STATES = (bernoulli(0.2), bernoulli(0.5), bernoulli(0.8), skewed(), normal(0.5, 0.03))


@dataclass(frozen=True)
class FitResult:
    """Per-state comparison of a fitted critic with the truth (each a dict keyed by the state's name)."""

    mean: dict[str, float] = field(default_factory=dict)
    true_mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    true_std: dict[str, float] = field(default_factory=dict)
    cvar: dict[str, float] = field(default_factory=dict)
    true_cvar: dict[str, float] = field(default_factory=dict)
    w1: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[dict[str, float | str]]:
        return [
            {"state": k, "mean": self.mean[k], "true_mean": self.true_mean[k], "std": self.std[k],
             "true_std": self.true_std[k], "cvar": self.cvar[k], "true_cvar": self.true_cvar[k], "w1": self.w1[k]}
            for k in self.mean
        ]  # fmt: skip


def learned_distribution(critic: torch.nn.Module, hidden: Tensor) -> Tensor:
    """The critic's return distribution read finely, ``[..., H] -> [..., K]``: a flow critic's 256 one-step samples,
    a quantile critic's quantiles (its outputs)."""
    if hasattr(critic, "sample"):
        return critic.sample(hidden, 256)
    return critic.outputs(hidden)["samples"]


def w1_distance(samples: Tensor, reference: Tensor) -> float:
    """1-Wasserstein distance between the equally weighted ``samples [K]`` and a large sorted ``reference [n]``:
    the mean over levels u of |Q_samples(u) - Q_reference(u)|, on a grid of ``n`` levels."""
    n = reference.shape[0]
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    s = torch.sort(samples.double()).values
    idx = (levels * s.shape[0]).long().clamp_max(s.shape[0] - 1)
    return float((s[idx] - reference.double()).abs().mean())


def fit(
    make_critic: Callable[[int], torch.nn.Module],
    loss_options: dict | None = None,
    states: tuple[Distribution, ...] = DEFAULT_STATES,
    steps: int = 600,
    trajectories: int = 32,
    length: int = 6,
    lam: float = 1.0,
    lr: float = 3e-3,
    hidden_size: int = 16,
    feature_noise: float = 0.1,
    seed: int = 0,
) -> FitResult:
    """Train ``make_critic(hidden_size)`` in the trainer's regime and compare it with the truth.

    Each step draws ``trajectories`` trajectories of ``length`` tokens; each picks a state uniformly, its tokens'
    features are the state's context vector plus ``feature_noise`` Gaussian noise, and its return (the reward on
    its last token) is one draw of the state's distribution. The critic is driven through its
    :class:`dfpo.critics.Critic` interface, as the trainer drives it: its outputs at each token (no grad), its
    targets from them (``gamma = 1``, ``lam``), its loss with ``loss_options``. Evaluated on the noiseless
    contexts.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    contexts = torch.randn(len(states), hidden_size, generator=g)
    critic = make_critic(hidden_size)
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    mask = torch.ones(trajectories, length)
    options = dict(loss_options or {})
    for _ in range(steps):
        which = torch.randint(len(states), (trajectories,), generator=g)
        hidden = contexts[which][:, None, :] + feature_noise * torch.randn(
            trajectories, length, hidden_size, generator=g
        )
        returns = torch.stack([states[int(w)].draw(1, g)[0] for w in which])
        rewards = torch.zeros(trajectories, length)
        rewards[:, -1] = returns
        with torch.no_grad():
            outputs = critic.outputs(hidden)
        targets = critic.targets(rewards, outputs, mask, 1.0, lam)
        loss, _ = critic.loss(hidden, targets, mask, **options)
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = FitResult()
    with torch.no_grad():
        learned = learned_distribution(critic, contexts)
    for i, state in enumerate(states):
        ref, got = state.reference(), learned[i]
        result.mean[state.name], result.true_mean[state.name] = float(got.mean()), float(ref.mean())
        result.std[state.name], result.true_std[state.name] = float(got.std(unbiased=False)), float(ref.std())
        result.cvar[state.name] = float(cvar(got, 0.1))
        result.true_cvar[state.name] = float(cvar(ref, 0.1))
        result.w1[state.name] = w1_distance(got, ref)
    return result
