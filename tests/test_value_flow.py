"""The value-flow critic learns whole return distributions, read off in one Euler step.

A context vector selects one of three known 1-D distributions. Each step, every token gets K = 64 fresh i.i.d.
draws of its distribution as target samples (what distributional GAE hands the critic), and the critic is trained
only through ``ValueFlowCritic.loss``. Its one-step samples at the K stratified levels are compared with the
true quantiles at the same levels: the mean absolute difference is the 1-Wasserstein distance between the two
K-point distributions, and the bar is 5% of the distribution's standard deviation.
"""

import pytest
import torch

from dfpo.core.risk import cvar
from dfpo.critics import ValueFlowCritic

K = 64
TOKENS_PER_CONTEXT = 8
NAMES = ("bimodal", "skewed", "near point mass")


def draw(which: int, n: int) -> torch.Tensor:
    if which == 0:  # two well-separated modes, std about 1.0
        return torch.where(torch.rand(n) < 0.5, -1.0, 1.0) + 0.15 * torch.randn(n)
    if which == 1:  # exponential: skewness 2, long upper tail, std 0.8
        return 0.8 * torch.distributions.Exponential(1.0).sample((n,)) - 0.3
    return 0.4 + 0.1 * torch.randn(n)  # std 0.1: a tenth of the others'


def train(steps: int, seed: int = 0, noise_std: float = 0.25, **options) -> tuple[ValueFlowCritic, torch.Tensor]:
    torch.manual_seed(seed)
    contexts = torch.randn(3, 8)
    critic = ValueFlowCritic(hidden_size=8, width=64, noise_std=noise_std)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    hidden = contexts.repeat_interleave(TOKENS_PER_CONTEXT, 0)
    mask = torch.ones(len(hidden))
    for _ in range(steps):
        targets = torch.cat([draw(c, TOKENS_PER_CONTEXT * K).view(TOKENS_PER_CONTEXT, K) for c in range(3)])
        loss, _ = critic.loss(hidden, targets, mask, **options)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return critic, contexts


def truth(which: int) -> tuple[torch.Tensor, torch.Tensor]:
    """True quantiles at the K midpoint levels, and a large sample."""
    torch.manual_seed(100 + which)
    sample = draw(which, 400_000)
    return torch.quantile(sample, (torch.arange(K) + 0.5) / K), sample


@pytest.fixture(scope="module")
def trained():
    return train(steps=1500)


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1, 2], ids=NAMES)
def test_one_step_samples_match_the_distribution(trained, which):
    critic, contexts = trained
    quantiles, sample = truth(which)
    spread = float(sample.std())
    with torch.no_grad():
        one_step = critic.sample(contexts[which : which + 1], num_samples=K)[0]
    assert torch.all(one_step[1:] >= one_step[:-1]), "stratified one-step samples are sorted quantiles"
    w1 = float((one_step - quantiles).abs().mean())
    assert w1 < 0.05 * spread, f"{NAMES[which]}: W1 {w1:.4f} >= 5% of std {spread:.4f}"
    assert float(one_step.std()) == pytest.approx(spread, rel=0.05)
    assert float(cvar(one_step, 0.1)) == pytest.approx(float(cvar(quantiles, 0.1)), abs=0.05 * spread)
    # pointwise quantiles away from the bimodal's jump at 0.5, where any smooth map is off pointwise
    for level in (0.1, 0.25, 0.75, 0.9):
        i = int(level * K)
        assert float(one_step[i]) == pytest.approx(float(quantiles[i]), abs=0.1 * spread)


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1, 2], ids=NAMES)
def test_one_step_and_eight_step_samples_agree(trained, which):
    critic, contexts = trained
    _, sample = truth(which)
    with torch.no_grad():
        one = critic.sample(contexts[which : which + 1], num_samples=K, steps=1)
        eight = critic.sample(contexts[which : which + 1], num_samples=K, steps=8)
    assert float((one - eight).abs().mean()) < 0.05 * float(sample.std())


@pytest.mark.slow
def test_independent_coupling_collapses_the_one_step_distribution():
    """Flow matching alone: sorted coupling keeps the spread in one step, independent pairing loses it.

    With independent pairs the optimal field at tau = 0 is E[X1] - eps, so one Euler step lands on the mean.
    (In the full loss the risk terms also act on the one-step samples and partly restore the spread.)
    """
    flow_matching_only = {"cfm_weight": 1.0, "anchor": "none", "consistency": "none", "risk_weight": 0.0}
    for coupling, check in (("sorted", lambda r: r > 0.9), ("independent", lambda r: r < 0.5)):
        critic, contexts = train(steps=500, noise_std=1.0, coupling=coupling, **flow_matching_only)
        for which in (0, 1):  # the wide distributions
            _, sample = truth(which)
            with torch.no_grad():
                ratio = float(critic.sample(contexts[which : which + 1], num_samples=K).std() / sample.std())
            assert check(ratio), f"{coupling} coupling, {NAMES[which]}: one-step std ratio {ratio:.2f}"
