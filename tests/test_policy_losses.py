import pytest
import torch
from conftest import right_padded_mask

from dfpo.core import policy_losses
from dfpo.core.policy_losses import flowrl, ppo_clip


def ratio_grid():
    """Tokens covering every (sign of A) x (ratio below, inside, above the clip range) case."""
    ratios = torch.tensor([0.5, 0.79, 1.0, 1.1, 1.3, 2.5, 0.5, 0.79, 1.0, 1.1, 1.3, 2.5, 5.0])
    adv = torch.tensor([1.0] * 6 + [-1.0] * 6 + [-2.0])
    old = torch.zeros(1, 13)
    return old, ratios.log()[None], adv[None]


@pytest.mark.parametrize("clip_low,clip_high", [(0.2, 0.2), (0.2, 0.28)])
def test_ppo_clip_gradient_vanishes_exactly_where_the_clipped_branch_is_active(clip_low, clip_high):
    old, logp, adv = ratio_grid()
    logp = logp.clone().requires_grad_(True)
    mask = torch.ones(1, 13)
    loss, metrics = ppo_clip(
        logp, old, adv, mask, clip_low=clip_low, clip_high=clip_high, aggregation="seq-mean-token-sum"
    )
    loss.backward()
    ratio = logp.detach().exp()[0]
    a = adv[0]
    clipped = ((a > 0) & (ratio > 1 + clip_high)) | ((a < 0) & (ratio < 1 - clip_low))
    grad = logp.grad[0]
    assert torch.all(grad[clipped] == 0)
    # unclipped tokens: d(-A r)/d log r = -A r
    torch.testing.assert_close(grad[~clipped], (-a * ratio)[~clipped])
    assert metrics["actor/clipfrac"] == pytest.approx(float(clipped.float().mean()))


def test_ppo_dual_clip_bounds_negative_advantages_and_zeroes_their_gradient():
    old, logp, adv = ratio_grid()
    logp = logp.clone().requires_grad_(True)
    loss, metrics = ppo_clip(logp, old, adv, torch.ones(1, 13), dual_clip=3.0, aggregation="seq-mean-token-sum")
    loss.backward()
    # token 12: A = -2, ratio = 5 > 3: loss is -A * c = 6 and its gradient is zero
    assert float(logp.grad[0, 12]) == 0.0
    assert float(logp.grad[0, 10]) == pytest.approx(1.3)  # A=-1, r=1.3 < c: the unclipped gradient -A r
    assert float(logp.grad[0, 11]) == pytest.approx(2.5)
    assert metrics["actor/dual_clipfrac"] == pytest.approx(1 / 13)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_clip(logp, old, adv, torch.ones(1, 13), dual_clip=0.5)


def test_ppo_first_step_ratio_is_one_and_loss_is_minus_mean_advantage(gen):
    mask = right_padded_mask([4, 2], 5)
    logp = torch.randn(2, 5, generator=gen)
    adv = torch.randn(2, 5, generator=gen)
    loss, metrics = ppo_clip(logp, logp, adv, mask)
    assert float(loss) == pytest.approx(-float((adv * mask).sum() / mask.sum()), rel=1e-6)
    assert metrics["actor/clipfrac"] == 0.0
    assert metrics["actor/approx_kl"] == pytest.approx(0.0, abs=1e-7)


def test_dr_grpo_loss_with_a_constant_normalizer_does_not_depend_on_the_padded_width(gen):
    lengths = [4, 2, 5]
    logp = torch.randn(3, 5, generator=gen)
    old = logp + 0.1 * torch.randn(3, 5, generator=gen)
    adv = torch.randn(3, 5, generator=gen)
    losses = {}
    for width in (5, 9):
        # the same responses, padded further (with junk on the padding)
        junk = [torch.randn(3, width - 5, generator=gen) for _ in range(3)]
        inputs = [torch.cat([x, j], -1) for x, j in zip((logp, old, adv), junk, strict=True)]
        for normalizer in (None, 16):
            loss, _ = ppo_clip(*inputs, right_padded_mask(lengths, width), aggregation="seq-mean-token-sum-norm",
                               normalizer=normalizer)  # fmt: skip
            losses[width, normalizer] = float(loss)
    assert losses[5, 16] == pytest.approx(losses[9, 16], rel=1e-6)
    assert losses[5, None] == pytest.approx(losses[5, 16] * 16 / 5, rel=1e-6)  # the default divides by T
    assert losses[9, None] == pytest.approx(losses[5, None] * 5 / 9, rel=1e-6)


def flowrl_batch(gen):
    mask = right_padded_mask([5, 3, 4], 5)
    logp = torch.randn(3, 5, generator=gen) - 2
    ref = torch.randn(3, 5, generator=gen) - 2
    rewards = torch.tensor([1.0, -0.5, 0.2])
    n = mask.sum(-1)
    optimum = 15.0 * rewards + (ref * mask).sum(-1) / n - (logp * mask).sum(-1) / n
    return mask, logp, ref, rewards, optimum


def test_flowrl_is_zero_at_its_optimum(gen):
    mask, logp, ref, rewards, optimum = flowrl_batch(gen)
    log_z = optimum.clone().requires_grad_(True)
    loss, _ = flowrl(logp, logp, ref, log_z, rewards, mask)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-8)
    loss.backward()
    assert torch.allclose(log_z.grad, torch.zeros(3), atol=1e-6)


def test_flowrl_gradient_moves_log_z_towards_the_optimum(gen):
    mask, logp, ref, rewards, optimum = flowrl_batch(gen)
    start = optimum + torch.tensor([1.0, -2.0, 0.5])
    log_z = start.clone().requires_grad_(True)
    loss, _ = flowrl(logp, logp - 0.3, ref, log_z, rewards, mask)
    loss.backward()
    stepped = start - 0.05 * log_z.grad
    assert torch.all((stepped - optimum).abs() < (start - optimum).abs())
    # the detached importance weight is clipped: exp(0.3 * len) > 1.2, so w = 1.2 scales the gradient
    torch.testing.assert_close(log_z.grad, 2 * 1.2 * (start - optimum) / 3)


def test_flowrl_importance_weight_is_detached(gen):
    mask, logp, ref, rewards, optimum = flowrl_batch(gen)
    logp = logp.clone().requires_grad_(True)
    old = logp.detach() + 0.01
    loss, metrics = flowrl(logp, old, ref, optimum + 1.0, rewards, mask)
    loss.backward()
    # d/dlogp of mean_i w_i delta_i^2 with w constant: 2 w delta / (n B) per valid token
    n = mask.sum(-1, keepdim=True)
    w = torch.exp(((logp.detach() - old) * mask).sum(-1, keepdim=True)).clamp(0.8, 1.2)
    torch.testing.assert_close(logp.grad, 2 * w * 1.0 / n * mask / 3)
    assert metrics["actor/tb_residual_abs"] == pytest.approx(1.0, rel=1e-5)


def test_policy_loss_registry():
    assert policy_losses.names() == ["flowrl", "ppo_clip"]
    with pytest.raises(KeyError, match="registered: flowrl, ppo_clip"):
        policy_losses.get("ppo")


def test_flowrl_leaves_rows_with_an_empty_mask_out_of_its_mean(gen):
    mask, logp, ref, rewards, optimum = flowrl_batch(gen)
    start = optimum + torch.tensor([1.0, -2.0, 0.5])
    want, want_metrics = flowrl(logp, logp - 0.1, ref, start, rewards, mask)
    # a fourth row with nothing in the loss: a skipped sample or a masked-out truncated response
    log_z = torch.cat([start, torch.tensor([3.0])]).requires_grad_(True)
    empty = torch.cat([mask, torch.zeros(1, 5)])
    logp4, ref4 = torch.cat([logp, torch.randn(1, 5, generator=gen)]), torch.cat([ref, torch.zeros(1, 5)])
    loss, metrics = flowrl(logp4, logp4 - 0.1, ref4, log_z, torch.cat([rewards, torch.zeros(1)]), empty)
    torch.testing.assert_close(loss, want)
    assert metrics == pytest.approx(want_metrics)
    loss.backward()
    assert float(log_z.grad[3]) == 0.0
