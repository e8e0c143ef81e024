"""Distributional critics trained as the trainer trains them recover the per-state return distribution.

Each token gets the K distributional-GAE targets of ONE trajectory (``lam = 1``: all K equal the trajectory's
return), so a state's distribution is only visible across trajectories (:mod:`dfpo.experiments.critic_fit`).
Bars: the mean within 0.02 and the std within 20% of the truth on Bernoulli and skewed returns, the flow's
one-step samples of a near point mass within 1.5x of its std, and CVaR_0.1 within 0.05 once samples are clamped
to the feasible range [0, 1].
"""

import pytest

from dfpo.critics import QuantileCritic, ValueFlowCritic
from dfpo.experiments.critic_fit import fit

WIDE = ("bernoulli(0.2)", "bernoulli(0.5)", "bernoulli(0.8)", "categorical(0.0:0.65, 0.5:0.2, 1.0:0.15)")
NARROW = "normal(0.5, 0.03)"


def quantile(h):
    return QuantileCritic(h, num_quantiles=200, num_heads=3, width=64, value_range=(0.0, 1.0))


def flow(h):
    return ValueFlowCritic(h, width=64, value_range=(0.0, 1.0))


def misses(result, names):
    """The states whose mean, std or CVaR miss the bars, with the figures."""
    out = []
    for name in names:
        mean, std, tail = result.mean[name], result.std[name], result.cvar[name]
        true_mean, true_std, true_tail = result.true_mean[name], result.true_std[name], result.true_cvar[name]
        if abs(mean - true_mean) > 0.02 or abs(std - true_std) > 0.2 * true_std or abs(tail - true_tail) > 0.05:
            out.append(f"{name}: mean {mean:.3f}/{true_mean:.3f} std {std:.3f}/{true_std:.3f} "
                       f"cvar {tail:.3f}/{true_tail:.3f}")  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize("make", [quantile, flow], ids=["quantile", "flow"])
def test_critic_recovers_per_state_distributions_from_one_trajectory_per_token(make):
    result = fit(make, steps=600)
    assert not misses(result, WIDE), misses(result, WIDE)
    narrow, true = result.std[NARROW], result.true_std[NARROW]
    assert true / 1.5 <= narrow <= 1.5 * true, f"near point mass: std {narrow:.4f} against {true:.4f}"


@pytest.mark.slow
def test_risk_terms_against_each_tokens_own_targets_collapse_the_distribution():
    """The bars can fail: DVPO's per-token risk terms pull both tails onto the observed return."""
    result = fit(quantile, {"risk_targets": "token"}, steps=600)
    assert len(misses(result, WIDE)) >= 2
    assert result.std["bernoulli(0.2)"] < 0.5 * result.true_std["bernoulli(0.2)"]
