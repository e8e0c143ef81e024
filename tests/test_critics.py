"""Scalar and quantile critics, pessimistic targets, and the flow critic's interface."""

import copy

import pytest
import torch
from conftest import right_padded_mask

from dfpo.core.advantages import gae
from dfpo.core.value_losses import clipped_mse
from dfpo.critics import (
    QuantileCritic,
    ScalarValueHead,
    ValueFlowCritic,
    bootstrap_weights,
    pessimistic_targets,
    stratified_noise,
)


def test_scalar_head_shapes_and_clipped_loss(gen):
    head = ScalarValueHead(16, num_heads=3)
    hidden = torch.randn(2, 5, 16, generator=gen)
    assert head(hidden).shape == (2, 5, 3)
    assert head.value(hidden).shape == (2, 5)
    mask = right_padded_mask([5, 2], 5)
    loss, metrics = head.loss(hidden, torch.ones(2, 5), mask, old_values=head(hidden).detach())
    loss.backward()
    assert head.proj.weight.grad is not None
    assert {"critic/vf_loss", "critic/vf_clipfrac", "critic/explained_var"} <= set(metrics)


def test_scalar_head_fits_returns(gen):
    head = ScalarValueHead(4, width=0)  # a linear head on linear returns
    hidden = torch.randn(64, 4, generator=gen)
    returns = hidden @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.3
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        loss, metrics = head.loss(hidden, returns, torch.ones(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["critic/explained_var"] > 0.99


def test_bootstrap_weights_are_keyed_by_seed_step_and_row():
    rows = torch.arange(400)
    w = bootstrap_weights(rows, 4, seed=3, step=7, p=0.5)
    assert w.shape == (400, 4) and set(w.unique().tolist()) == {0.0, 1.0}
    assert float(w.mean()) == pytest.approx(0.5, abs=0.05)
    # the same whatever the split: rows drawn in parts, or out of order, get their own masks
    parts = torch.cat([bootstrap_weights(rows[i : i + 64], 4, 3, 7, 0.5) for i in range(0, 400, 64)])
    assert torch.equal(parts, w)
    assert torch.equal(bootstrap_weights(rows.flip(0), 4, 3, 7, 0.5), w.flip(0))
    assert not torch.equal(bootstrap_weights(rows, 4, 3, 8, 0.5), w)  # a fresh mask each step
    assert not torch.equal(bootstrap_weights(rows, 4, 4, 7, 0.5), w)
    assert float(bootstrap_weights(rows, 4, 3, 7, 0.2).mean()) == pytest.approx(0.2, abs=0.05)
    assert torch.all(bootstrap_weights(rows, 4, 3, 7, 1.0) == 1)


def test_member_weights_of_ones_give_the_unmasked_loss(gen):
    head = ScalarValueHead(16, num_heads=3)
    hidden = torch.randn(4, 5, 16, generator=gen)
    returns = torch.randn(4, 5, generator=gen)
    mask = right_padded_mask([5, 2, 4, 1], 5)
    old = head(hidden).detach() + 0.3 * torch.randn(4, 5, 3, generator=gen)
    plain, plain_metrics = head.loss(hidden, returns, mask, old_values=old)
    plain.backward()
    grad = head.proj.weight.grad.clone()
    head.zero_grad()
    ones, metrics = head.loss(hidden, returns, mask, old_values=old, member_weights=torch.ones(4, 3))
    ones.backward()
    torch.testing.assert_close(ones, plain)
    torch.testing.assert_close(head.proj.weight.grad, grad)
    assert metrics == pytest.approx(plain_metrics, rel=1e-5)


def test_each_member_loss_is_a_masked_mean_over_its_own_tokens(gen):
    head = ScalarValueHead(8, num_heads=2)
    hidden = torch.randn(3, 4, 8, generator=gen)
    returns = torch.randn(3, 4, generator=gen)
    mask = right_padded_mask([4, 1, 3], 4)
    old = head(hidden).detach() + 0.3 * torch.randn(3, 4, 2, generator=gen)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    loss, _ = head.loss(hidden, returns, mask, old_values=old, member_weights=weights)
    values = head(hidden)
    members = [clipped_mse(values[..., e], old[..., e], returns, mask * weights[:, e, None])[0] for e in range(2)]
    torch.testing.assert_close(loss, torch.stack(members).mean())
    # split over calls, with each member's count over the whole batch, the parts add up to the whole
    counts = (weights * mask.sum(-1, keepdim=True)).sum(0)
    parts = [
        head.loss(hidden[r], returns[r], mask[r], old_values=old[r], member_weights=weights[r], member_tokens=counts)[0]
        for r in (slice(0, 1), slice(1, 3))
    ]
    torch.testing.assert_close(parts[0] + parts[1], loss)
    # a member that selects nothing here adds 0 to the mean over members
    first, _ = head.loss(hidden[:1], returns[:1], mask[:1], old_values=old[:1], member_weights=weights[:1])
    alone, _ = clipped_mse(values[:1, :, 0], old[:1, :, 0], returns[:1], mask[:1])
    torch.testing.assert_close(first, alone / 2)


def test_bootstrapped_members_disagree_where_plain_ones_agree():
    """Members with identical data solve the same least-squares problem and meet at its minimum whatever their
    initialisation; members with bootstrap masks fit different resamples, so their spread grows."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, 3, 6, generator=gen)  # 24 sequences of 3 tokens
    returns = hidden @ torch.randn(6, generator=gen) + torch.randn(24, 3, generator=gen)
    mask = torch.ones(24, 3)
    held_out = torch.randn(200, 6, generator=gen)
    torch.manual_seed(0)
    start = ScalarValueHead(6, num_heads=4, width=0)  # linear members: a convex problem each
    initial = float(start(held_out).detach().std(-1).mean())
    spread = {}
    for name, weights in (("plain", None), ("bootstrap", bootstrap_weights(torch.arange(24), 4, seed=0, step=1))):
        head = copy.deepcopy(start)
        opt = torch.optim.SGD(head.parameters(), lr=0.5)
        for _ in range(300):
            loss, _ = head.loss(hidden, returns, mask, member_weights=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        spread[name] = float(head(held_out).detach().std(-1).mean())
    assert spread["plain"] < 0.1 * initial
    assert spread["bootstrap"] > 3 * initial and spread["bootstrap"] > 30 * spread["plain"]


def test_pessimistic_targets_are_a_lower_envelope(gen):
    mask = right_padded_mask([6, 3], 6)
    rewards = torch.randn(2, 6, generator=gen)
    ensemble = torch.randn(2, 6, 4, generator=gen)
    worst = pessimistic_targets(rewards, ensemble, mask)
    for e in range(4):
        _, ret = gae(rewards, ensemble[..., e], mask)
        assert torch.all(worst <= ret + 1e-6)
    q = pessimistic_targets(rewards, ensemble, mask, quantile=0.5)
    assert torch.all(q >= worst - 1e-6)
    _, single = gae(rewards, ensemble[..., 0], mask)
    torch.testing.assert_close(pessimistic_targets(rewards, ensemble[..., :1], mask), single)
    assert torch.all(worst[1, 3:] == 0)


def test_quantile_critic_recovers_quantiles_of_a_known_distribution():
    """Quantile Huber (all pairs) on samples of a wide, skewed two-component mixture.

    ``kappa`` is in units of ``return_scale``: 0.1 here is DVPO's kappa = 1 in return units.
    """
    torch.manual_seed(0)
    critic = QuantileCritic(hidden_size=4, num_quantiles=20, num_heads=3, width=64, return_scale=10.0)
    context = torch.randn(1, 4)

    def draw(n):
        wide = torch.rand(n) < 0.3
        return torch.where(wide, 20.0 + 8.0 * torch.randn(n), -5.0 + 3.0 * torch.randn(n))

    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    steps = 800
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        targets = draw(16 * 64).view(16, 64)
        loss, metrics = critic.loss(context.expand(16, 4), targets, torch.ones(16), kappa=0.1, risk_weight=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    truth = draw(400_000)
    taus = (torch.arange(20) + 0.5) / 20
    want = torch.quantile(truth, taus)
    got = critic.quantiles(context)[0].detach()
    spread = float(truth.std())  # about 12.5
    assert float((got - want).abs().mean()) < 0.03 * spread
    assert float((got - want).abs().max()) < 0.1 * spread
    assert metrics["critic/consistency_loss"] < 0.05
    assert critic(context).shape == (1, 3, 20)


def test_quantile_critic_loss_has_risk_and_consistency_terms(gen):
    critic = QuantileCritic(8, num_quantiles=10, num_heads=2, width=16)
    hidden = torch.randn(3, 4, 8, generator=gen)
    loss, metrics = critic.loss(hidden, torch.randn(3, 4, 7, generator=gen), right_padded_mask([4, 1, 2], 4))
    loss.backward()
    assert {"critic/risk_cvar", "critic/risk_gain", "critic/risk_shape", "critic/consistency_loss"} <= set(metrics)
    assert critic.value(hidden).shape == (3, 4)


def test_stratified_noise_is_sorted_and_standard_normal_quantiles(gen):
    mid = stratified_noise((2,), 1000)
    assert torch.all(mid[:, 1:] > mid[:, :-1])
    assert float(mid.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(mid.std()) == pytest.approx(1.0, abs=0.01)
    jit = stratified_noise((3,), 8, jitter=True, generator=gen)
    assert torch.all(jit[:, 1:] >= jit[:, :-1])
    assert not torch.equal(jit[0], jit[1])


def test_flow_critic_starts_as_the_identity_flow(gen):
    critic = ValueFlowCritic(12, return_scale=2.0)
    hidden = torch.randn(3, 5, 12, generator=gen)
    samples = critic.sample(hidden, num_samples=16)
    assert samples.shape == (3, 5, 16)
    torch.testing.assert_close(samples, 2.0 * stratified_noise((3, 5), 16, std=critic.noise_std))
    torch.testing.assert_close(critic.value(hidden), torch.zeros(3, 5), atol=1e-6, rtol=0)
    bounded = ValueFlowCritic(12, value_range=(0.0, 1.0)).sample(hidden, 16).detach()
    assert float(bounded.min()) >= 0.0 and float(bounded.max()) <= 1.0


def test_flow_critic_loss_runs_with_every_option_and_any_k(gen):
    critic = ValueFlowCritic(12, width=16)
    hidden = torch.randn(2, 3, 12, generator=gen, requires_grad=True)
    mask = right_padded_mask([3, 2], 3)
    for k in (2, 5, 33):
        targets = torch.randn(2, 3, k, generator=gen)
        flow_matching = {"cfm_weight": 1.0}
        for options in (
            {},
            {**flow_matching, "coupling": "independent", "uncertainty_weight": "inverse", "consistency": "velocity"},
            {**flow_matching, "anchor": "td", "anchor_samples": targets + 0.1, "uncertainty_weight": "none",
             "consistency": "none"},
            {**flow_matching, "anchor": "none", "risk_weight": 0.0, "shift_weight": 1.0, "curvature_weight": 1.0},
            {"anchor": "mean", "consistency": "endpoint", "shape_weight": 1.0, "risk_targets": "token"},
        ):  # fmt: skip
            loss, metrics = critic.loss(hidden, targets, mask, generator=gen, **options)
            assert torch.isfinite(loss)
            loss.backward()
            assert ("critic/cfm_loss" in metrics) == ("cfm_weight" in options)
            assert ("critic/anchor_loss" in metrics) == (options.get("anchor") != "none")
            assert "critic/dist_std" in metrics
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_flow_critic_loss_sees_the_samples_of_as_many_euler_steps_as_inference(gen):
    critic = ValueFlowCritic(6, width=16)
    for p in critic.out.parameters():  # a non-trivial field, so that more steps give other samples
        torch.nn.init.normal_(p, std=0.5, generator=gen)
    hidden = torch.randn(2, 3, 6, generator=gen)
    targets = torch.randn(2, 3, 8, generator=gen)
    mask = torch.ones(2, 3)
    one, _ = critic.loss(hidden, targets, mask, generator=torch.Generator().manual_seed(0))
    same, _ = critic.loss(hidden, targets, mask, sample_steps=1, generator=torch.Generator().manual_seed(0))
    four, metrics = critic.loss(hidden, targets, mask, sample_steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one, same)
    assert not torch.allclose(one, four)
    # the loss's distribution is the one sample() gives with the same number of steps
    samples = critic.sample(hidden, 8, steps=4).detach()
    assert metrics["critic/dist_std"] == pytest.approx(float(samples.std(-1).mean()), rel=1e-4)
    with pytest.raises(ValueError, match="sample_steps must be >= 1"):
        critic.loss(hidden, targets, mask, sample_steps=0)


def test_flow_critic_refuses_bad_options(gen):
    critic = ValueFlowCritic(4, width=8)
    h = torch.randn(2, 4)
    with pytest.raises(ValueError, match="coupling='sort' is not one of sorted, independent"):
        critic.loss(h, torch.randn(2, 4), torch.ones(2), coupling="sort")
    with pytest.raises(ValueError, match="K >= 2"):
        critic.loss(h, torch.randn(2, 1), torch.ones(2))
    with pytest.raises(ValueError, match='anchor="td" needs anchor_samples'):
        critic.loss(h, torch.randn(2, 4), torch.ones(2), anchor="td")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        critic.sample(h, 4, steps=0)


def test_flow_critic_padding_does_not_affect_the_loss(gen):
    critic = ValueFlowCritic(6, width=16)
    hidden = torch.randn(1, 4, 6, generator=gen)
    targets = torch.randn(1, 4, 8, generator=gen)
    mask = right_padded_mask([2], 4)
    junk_h, junk_t = hidden.clone(), targets.clone()
    junk_h[0, 2:] = 1e4
    junk_t[0, 2:] = -1e4
    a, _ = critic.loss(hidden, targets, mask, generator=torch.Generator().manual_seed(0))
    b, _ = critic.loss(junk_h, junk_t, mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_scalar_head_normalises_its_input_like_the_other_critics_and_width_zero_is_linear(gen):
    hidden = torch.randn(3, 5, 12, generator=gen)
    head = ScalarValueHead(12, width=16)
    # LayerNorm first: a feature scale and shift common to every dimension does not change the value
    torch.testing.assert_close(head.value(hidden), head.value(10.0 * hidden + 3.0), atol=1e-4, rtol=1e-4)
    linear = ScalarValueHead(12, num_heads=2, width=0)
    assert sum(p.numel() for p in linear.parameters()) == 12 * 2 + 2
    torch.testing.assert_close(linear(hidden), hidden @ linear.proj.weight.T + linear.proj.bias)


@pytest.mark.parametrize("kind", ["scalar", "ensemble", "quantile", "flow"])
def test_every_critic_kind_implements_the_one_interface(kind, gen):
    """Built by name from one pool of options; outputs for the advantage estimator; targets that are the
    Monte-Carlo returns with lambda = 1; a finite loss whose gradient reaches the critic."""
    from dfpo.core.advantages import returns_to_go
    from dfpo.critics import Critic, CriticContext, build, names

    assert set(names()) == {"scalar", "ensemble", "quantile", "flow"}
    pool = {"width": 16, "heads": 3, "quantiles": 12, "samples": 8, "value_clip": 0.2, "bootstrap": 0.5,
            "flow": {"cfm_weight": 0.5}, "not_an_option_of_any_kind": 1}  # fmt: skip
    critic = build(kind, 10, **pool)
    assert isinstance(critic, Critic)
    mask = right_padded_mask([5, 2, 4], 5)
    hidden = torch.randn(3, 5, 10, generator=gen)
    with torch.no_grad():
        outputs = critic.outputs(hidden)
    assert set(outputs) == set(critic.output_keys)
    width = {"quantile": 12, "flow": 8}.get(kind)
    if width:
        assert outputs["samples"].shape == (3, 5, width)
    else:
        assert outputs["values"].shape == (3, 5) and outputs["ensemble"].shape[-1] == (3 if kind == "ensemble" else 1)
    rewards = torch.zeros(3, 5)
    rewards[0, 4], rewards[2, 3] = 1.0, 0.5
    targets = critic.targets(rewards, outputs, mask, 1.0, 1.0)
    goal = targets.mean(-1) if targets.dim() == 3 else targets
    torch.testing.assert_close(goal, returns_to_go(rewards, mask))
    context = CriticContext(rows=torch.arange(3), seed=0, step=1)
    loss, metrics = critic.training_loss(hidden, targets, mask, outputs, context)
    loss.backward()
    assert torch.isfinite(loss) and "critic/explained_var" in metrics
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())
    weights = critic.member_weights(torch.arange(6), 0, 1)
    assert (weights is not None) == (kind == "ensemble")
    with pytest.raises(KeyError, match="unknown critic 'gaussian'"):
        build("gaussian", 10)
