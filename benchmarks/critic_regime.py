"""Distributional critics in the trainer's regime (one trajectory's targets per token) against known per-state
return distributions: the figures docs/algorithms.md quotes.

Trains each configuration with :func:`dfpo.experiments.critic_fit.fit` (600 steps of 32 trajectories of 6 tokens,
``lam = 1``, five states: Bernoulli 0.2 / 0.5 / 0.8, a skewed three-point return, a near point mass of std 0.03)
and prints learned / true mean, std, CVaR_0.1 and W1 per state.

Run: ``.venv/bin/python benchmarks/critic_regime.py`` (about a minute and a half on 2 cores).
"""

from __future__ import annotations

import torch

from dfpo.critics import QuantileCritic, ValueFlowCritic
from dfpo.experiments.critic_fit import fit


def quantile(h: int) -> QuantileCritic:
    return QuantileCritic(h, num_quantiles=200, num_heads=3, width=64, value_range=(0.0, 1.0))


def flow(h: int) -> ValueFlowCritic:
    return ValueFlowCritic(h, width=64, value_range=(0.0, 1.0))


def flow_unit_noise(h: int) -> ValueFlowCritic:
    return ValueFlowCritic(h, width=64, noise_std=1.0, value_range=(0.0, 1.0))


RUNS = {
    "quantile critic, defaults (kappa 0.02, pooled risk terms)": (quantile, {}),
    "quantile critic, kappa 1 and per-token risk terms (DVPO as written)": (
        quantile, {"kappa": 1.0, "risk_targets": "token"}
    ),
    "quantile critic, per-token risk terms": (quantile, {"risk_targets": "token"}),
    "flow critic, defaults (quantile anchor, no flow matching, pooled risk terms)": (flow, {}),
    "flow critic, flow matching weight 1 added": (flow, {"cfm_weight": 1.0}),
    "flow critic, earlier defaults (flow matching, mean anchor, velocity consistency 1, noise 1, per-token risk)": (
        flow_unit_noise,
        {"cfm_weight": 1.0, "anchor": "mean", "consistency_weight": 1.0, "risk_targets": "token"},
    ),
}  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    for title, (make, options) in RUNS.items():
        result = fit(make, options)
        print(f"\n{title}\n| state | mean | std | CVaR_0.1 | W1 |\n|---|---|---|---|---|")
        for r in result.rows():
            print(f"| {r['state']} | {r['mean']:.3f} / {r['true_mean']:.3f} | {r['std']:.3f} / {r['true_std']:.3f} "
                  f"| {r['cvar']:.3f} / {r['true_cvar']:.3f} | {r['w1']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
