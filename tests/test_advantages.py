import math

import pytest
import torch
from conftest import right_padded_mask

from dfpo.core import advantages
from dfpo.core.advantages import (
    adaptive_lambda,
    distributional_gae,
    dr_grpo,
    gae,
    group_metrics,
    grpo,
    reinforce_pp,
    reinforce_pp_baseline,
    returns_to_go,
    rloo,
)

LENGTHS = [7, 1, 4, 10, 3]
T = 10


def naive_gae(rewards, values, lengths, gamma, lam):
    adv = torch.zeros(len(lengths), T, dtype=torch.float64)
    for i, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[i, t + 1] if t + 1 < n else 0.0
            delta = rewards[i, t] + gamma * next_v - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    ret = adv + values * right_padded_mask(lengths, T).double()
    return adv, ret


def with_garbage_on_padding(x, mask, gen):
    pad = ~mask.bool()
    junk = torch.randn(x.shape, generator=gen, dtype=x.dtype) * 1e6
    junk[..., 0] = float("nan")
    if x.dim() > mask.dim():
        pad = pad[..., None].expand_as(x)
    return torch.where(pad, junk, x)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_naive_reverse_loop_whatever_is_on_padding(gen, gamma, lam):
    mask = right_padded_mask(LENGTHS, T)
    rewards = torch.randn(len(LENGTHS), T, generator=gen, dtype=torch.float64)
    values = torch.randn(len(LENGTHS), T, generator=gen, dtype=torch.float64)
    want_adv, want_ret = naive_gae(rewards, values, LENGTHS, gamma, lam)
    adv, ret = gae(
        with_garbage_on_padding(rewards, mask, gen), with_garbage_on_padding(values, mask, gen), mask, gamma, lam
    )
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)
    assert adv.shape == ret.shape == (len(LENGTHS), T)


def test_per_sequence_lambda_is_each_sequence_with_its_own_lambda(gen):
    """VAPO's length-adaptive lambda: one lambda per sequence, each row as GAE with that lambda alone."""
    mask = right_padded_mask(LENGTHS, T)
    rewards = torch.randn(len(LENGTHS), T, generator=gen, dtype=torch.float64)
    values = torch.randn(len(LENGTHS), T, 3, generator=gen, dtype=torch.float64)
    lam = adaptive_lambda(mask.sum(-1), alpha=0.2)
    assert lam.tolist() == pytest.approx([1 - 1 / (0.2 * n) if 0.2 * n > 1 else 0.0 for n in LENGTHS])
    adv, ret = distributional_gae(rewards, values, mask, 0.99, lam)
    for i in range(len(LENGTHS)):
        want_adv, want_ret = distributional_gae(rewards, values, mask, 0.99, float(lam[i]))
        torch.testing.assert_close(adv[i], want_adv[i])
        torch.testing.assert_close(ret[i], want_ret[i])
    assert float(adaptive_lambda(torch.tensor([1000.0]), 0.05)) == pytest.approx(0.98)


def test_gae_with_lambda_one_and_zero_values_is_returns_to_go(gen):
    mask = right_padded_mask(LENGTHS, T)
    rewards = torch.randn(len(LENGTHS), T, generator=gen)
    adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, returns_to_go(rewards, mask, gamma=0.9))
    # returns_to_go by its definition
    i = 0
    want = sum(0.9**s * float(rewards[i, s]) for s in range(LENGTHS[i]))
    assert float(returns_to_go(rewards, mask, 0.9)[i, 0]) == pytest.approx(want, rel=1e-5)


def test_distributional_gae_mean_over_samples_equals_gae_on_mean_value(gen):
    mask = right_padded_mask(LENGTHS, T)
    rewards = torch.randn(len(LENGTHS), T, generator=gen, dtype=torch.float64)
    samples = torch.randn(len(LENGTHS), T, 16, generator=gen, dtype=torch.float64)
    adv_k, targets = distributional_gae(
        with_garbage_on_padding(rewards, mask, gen), with_garbage_on_padding(samples, mask, gen), mask, 1.0, 0.95
    )
    assert adv_k.shape == targets.shape == (len(LENGTHS), T, 16)
    adv, ret = gae(rewards, samples.mean(-1), mask, 1.0, 0.95)
    torch.testing.assert_close(adv_k.mean(-1), adv)
    torch.testing.assert_close(targets.mean(-1), ret)
    # each sample follows its own reverse loop
    for k in (0, 7):
        want, _ = naive_gae(rewards, samples[..., k], LENGTHS, 1.0, 0.95)
        torch.testing.assert_close(adv_k[..., k], want)


def test_distributional_gae_terminal_target_is_the_reward():
    mask = right_padded_mask([3], 4)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    samples = torch.randn(1, 4, 8)
    _, targets = distributional_gae(rewards, samples, mask, 1.0, 0.95)
    torch.testing.assert_close(targets[0, 2], torch.ones(8))
    assert torch.all(targets[0, 3] == 0)


def scores_and_groups():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0])
    group = torch.tensor([7, 7, 7, 7, 2, 2, 2, 2, 9, 9, 9, 9])
    return scores, group


def by_definition(scores, group, fn):
    out = torch.zeros_like(scores)
    for g in group.unique():
        idx = (group == g).nonzero().flatten()
        out[idx] = fn(scores[idx])
    return out


def test_grpo_against_definition_and_degenerate_groups_are_zero_and_counted():
    scores, group = scores_and_groups()
    mask = right_padded_mask([3, 5, 1, 2, 4, 4, 4, 4, 6, 6, 1, 2], 6)

    def definition(s):
        if torch.all(s == s[0]):
            return torch.zeros_like(s)
        return (s - s.mean()) / (s.std() + 1e-6)

    adv, ret = grpo(scores, mask, group)
    want = by_definition(scores, group, definition)
    torch.testing.assert_close(adv, want[:, None] * mask)
    assert torch.equal(adv, ret)
    assert torch.all(adv[4:8] == 0)
    _, _, metrics = advantages.compute("grpo", scores=scores, mask=mask, group=group, values=None)
    assert metrics["adv/degenerate_groups"] == 1.0
    assert metrics["adv/groups"] == 3.0
    assert metrics["adv/degenerate_frac"] == pytest.approx(1 / 3)


def test_grpo_exact_zero_for_equal_scores_that_do_not_average_exactly():
    scores = torch.full((3,), 0.1)
    adv, _ = grpo(scores, torch.ones(3, 2), torch.zeros(3, dtype=torch.long))
    assert torch.all(adv == 0)


def test_dr_grpo_has_no_std_division():
    scores, group = scores_and_groups()
    mask = torch.ones(12, 3)
    adv, _ = dr_grpo(scores, mask, group)
    want = by_definition(scores, group, lambda s: s - s.mean())
    torch.testing.assert_close(adv, want[:, None].expand(12, 3))
    assert group_metrics(scores, group)["adv/degenerate_groups"] == 1.0


def test_rloo_is_reward_minus_leave_one_out_mean():
    scores, group = scores_and_groups()
    mask = torch.ones(12, 2)
    adv, _ = rloo(scores, mask, group)

    def definition(s):
        n = len(s)
        return torch.stack([s[i] - (s.sum() - s[i]) / (n - 1) for i in range(n)])

    torch.testing.assert_close(adv, by_definition(scores, group, definition)[:, None].expand(12, 2))
    single, _ = rloo(torch.tensor([1.0]), torch.ones(1, 2), torch.tensor([0]))
    assert torch.all(single == 0)


def test_reinforce_pp_whitens_returns_to_go_over_the_batch(gen):
    mask = right_padded_mask(LENGTHS, T)
    rewards = torch.randn(len(LENGTHS), T, generator=gen)
    adv, returns = reinforce_pp(rewards, mask, gamma=1.0)
    valid = mask.bool()
    g = returns_to_go(rewards, mask)
    torch.testing.assert_close(returns, g)
    want = (g[valid] - g[valid].mean()) / g[valid].std()
    torch.testing.assert_close(adv[valid], want, atol=1e-5, rtol=1e-5)
    assert torch.all(adv[~valid] == 0)
    assert float(adv[valid].mean()) == pytest.approx(0.0, abs=1e-6)


def test_reinforce_pp_baseline_subtracts_group_mean_then_whitens():
    scores, group = scores_and_groups()
    mask = right_padded_mask([3, 5, 1, 2, 4, 4, 4, 4, 6, 6, 1, 2], 6)
    adv, centred = reinforce_pp_baseline(scores, mask, group)
    want_c = by_definition(scores, group, lambda s: s - s.mean())[:, None] * mask
    torch.testing.assert_close(centred, want_c)
    valid = mask.bool()
    c = want_c[valid]
    torch.testing.assert_close(adv[valid], (c - c.mean()) / c.std(), atol=1e-5, rtol=1e-5)


def test_registry_lists_names_and_refuses_unknown():
    assert set(advantages.names()) == {
        "gae",
        "distributional_gae",
        "grpo",
        "dr_grpo",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
    }
    assert advantages.get("gae") is gae
    with pytest.raises(KeyError, match=r"unknown advantage estimator 'gea'.*registered: distributional_gae, dr_grpo"):
        advantages.get("gea")


def test_compute_passes_only_declared_inputs_and_names_missing_ones(gen):
    mask = right_padded_mask(LENGTHS, T)
    rewards = torch.randn(len(LENGTHS), T, generator=gen)
    values = torch.randn(len(LENGTHS), T, generator=gen)
    pool = {"rewards": rewards, "values": values, "mask": mask, "gamma": 1.0, "lam": 0.95, "scores": None}
    adv, _, metrics = advantages.compute("gae", **pool)
    torch.testing.assert_close(adv, gae(rewards, values, mask)[0])
    assert math.isfinite(metrics["adv/mean"])
    with pytest.raises(TypeError, match="'grpo' needs scores, group"):
        advantages.compute("grpo", **pool)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_a_sample_without_reward_is_left_out_of_its_group(name):
    """A skipped sample (reward None; the trainer scores it 0) changes no other sample's advantage and gets 0."""
    scores, group = scores_and_groups()
    lengths = [3, 5, 1, 2, 4, 4, 4, 4, 6, 6, 1, 2]
    want, _ = advantages.get(name)(scores, right_padded_mask(lengths, 6), group)
    # the same batch with a skipped sample in group 7, one in the all-equal group 2, and group 5 with only one
    skip = 0.0
    full_scores = torch.tensor([1.0, skip, 0.0, 0.0, 1.0, 0.5, 0.5, skip, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0, skip])
    full_group = torch.tensor([7, 7, 7, 7, 7, 2, 2, 2, 2, 2, 9, 9, 9, 9, 5])
    full_lengths = [3, 4, 5, 1, 2, 4, 4, 6, 4, 4, 6, 6, 1, 2, 3]
    valid = torch.ones(15, dtype=torch.bool)
    valid[[1, 7, 14]] = False
    mask = right_padded_mask(full_lengths, 6)
    adv, _ = advantages.get(name)(full_scores, mask, full_group, valid=valid)
    torch.testing.assert_close(adv[valid], want)
    assert torch.all(adv[~valid] == 0)


def test_group_metrics_count_only_valid_scores():
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    valid = torch.tensor([True, True, False, True, True, True])
    assert group_metrics(scores, group)["adv/degenerate_groups"] == 0.0
    assert group_metrics(scores, group, valid)["adv/degenerate_groups"] == 1.0  # group 0's valid scores agree
    _, _, metrics = advantages.compute("grpo", scores=scores, mask=torch.ones(6, 2), group=group, valid=valid)
    assert metrics["adv/degenerate_groups"] == 1.0
