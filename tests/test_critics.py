"""Scalar and quantile critics, pessimistic targets, and the flow critic's interface."""

import pytest
import torch
from conftest import right_padded_mask

from dfpo.core.advantages import gae
from dfpo.critics import QuantileCritic, ScalarValueHead, ValueFlowCritic, pessimistic_targets, stratified_noise


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
    head = ScalarValueHead(4)
    hidden = torch.randn(64, 4, generator=gen)
    returns = hidden @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.3
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        loss, metrics = head.loss(hidden, returns, torch.ones(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics["critic/explained_var"] > 0.99


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
