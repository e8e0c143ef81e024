"""The update phase: PPO epochs over minibatches, gradients accumulated over micro-batches, and the critic's extra
steps (:func:`update`).

Every loss is scaled by its micro-batch's share of its minibatch over all processes (:class:`MinibatchTotals`), so
that the gradients summed over micro-batches and processes are those of the whole minibatch's loss. The flow
critic's loss draws noise keyed by (step, minibatch, draw) over the global batch (:func:`keyed_uniform`): the same
draws however the batch is split over processes.
"""

from __future__ import annotations

import itertools
import math
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dfpo import distributed
from dfpo.core.kl import kl_estimate
from dfpo.core.masked import masked_mean
from dfpo.core.streams import stream_seed
from dfpo.critics import CriticContext
from dfpo.generation.rollout import prompt_groups, response_forward, trunk_hidden
from dfpo.training.step import Experience, MinibatchTotals, PolicyOutput, Updated

if TYPE_CHECKING:
    from dfpo.training.trainer import Trainer


def update(t: Trainer, exp: Experience, fault: tuple[str, str] | None) -> Updated:
    """``actor.epochs`` passes over ``actor.minibatches`` minibatches, then ``critic.updates - 1`` critic steps
    on the whole batch; ``fault`` names what upstream of the losses is already NaN or inf (None: nothing)."""
    metrics, skipped, fault, key = epochs(t, exp, fault)
    if t.critic_updates > 1 and t.critic is not None:
        metrics.update(critic_steps(t, exp, t.critic_updates - 1, key))
    t.refresh_rollout_policy()
    return Updated(metrics, skipped, fault)


def epochs(
    t: Trainer, exp: Experience, fault: tuple[str, str] | None
) -> tuple[dict[str, float], bool, tuple[str, str] | None, int]:
    """The PPO epochs: returns the mean metrics, whether any minibatch was skipped, the fault that skipped it, and
    the last draw key used."""
    c = t.config
    actor_active = t.actor_active
    local = exp.ids.shape[0]
    offset, n = exp.first_row, t.world.size * local
    size = n // c.actor.minibatches
    micro = exp.micro or size
    records: list[dict[str, float]] = []
    skipped, key = False, 0
    t.policy.train()
    for epoch in range(c.actor.epochs):
        # the same permutation of the global batch on every rank; each rank runs its own rows of each minibatch
        stream = torch.Generator().manual_seed(stream_seed(c.seed, t.step, 1, epoch))
        if t.sharded:
            # sharded forwards are collectives: every process runs the same number of rows per minibatch, its
            # own rows in one order shared by all (with one minibatch, the same as the global order)
            mine = torch.randperm(local, generator=stream)
            order = torch.stack([mine + r * local for r in range(t.world.size)], 1).reshape(-1)
        else:
            order = torch.randperm(n, generator=stream)
        for rows in order.split(size):
            # in row order, micro-batches hold the answers to one prompt together (it then runs once); the
            # minibatch's gradient is the same whatever its micro-batches
            rows = rows.sort().values
            mine = rows[(rows >= offset) & (rows < offset + local)] - offset
            key += 1  # the critic loss's draws in this minibatch
            record, ok, fault = minibatch(t, exp, mine, totals(t, exp, rows), micro, actor_active, key, fault)
            records.append(record)
            skipped |= not ok
    t.policy.eval()
    out = distributed.mean_metrics(mean_metrics(records), t.world)
    out["actor/lr"] = t.optimizers["actor_schedule"].get_last_lr()[0]
    out["actor/active"] = float(actor_active)
    return out, skipped, fault, key


def minibatch(
    t: Trainer, exp: Experience, rows: Tensor, sizes: MinibatchTotals, micro: int, actor_active: bool, key: int,
    fault: tuple[str, str] | None,
) -> tuple[dict[str, float], bool, tuple[str, str] | None]:  # fmt: skip
    """One optimizer step on a minibatch of ``sizes`` (over all processes), of which this process holds ``rows``,
    ``micro`` sequences per forward/backward. Returns its metrics, whether the step was taken, and the fault."""
    c = t.config
    t.actor_opt.zero_grad(set_to_none=True)
    if t.critic_opt is not None:
        t.critic_opt.zero_grad(set_to_none=True)
    records = []
    total_loss = 0.0
    for part in rows.split(micro):
        loss, record = losses(t, exp, part, actor_active, sizes, key)
        if loss.requires_grad:
            loss.backward()
        total_loss += float(loss.detach())
        records.append(record)
    record = mean_metrics(records)
    actor_params = [p for g in t.actor_opt.param_groups for p in g["params"]]
    critic_params = [p for g in t.critic_opt.param_groups for p in g["params"]] if t.critic_opt else []
    distributed.sum_gradients(actor_params + critic_params, t.world)
    total_loss = distributed.sum_scalar(total_loss, t.world)
    norms = {"actor/grad_norm": clip(actor_params, c.actor.grad_clip)}
    if t.critic_opt is not None:
        norms["critic/grad_norm"] = clip(critic_params, c.critic.grad_clip)
    record.update(norms)
    if not math.isfinite(total_loss) or not all(math.isfinite(v) for v in norms.values()):
        if fault is None:  # nothing upstream was: name the losses and gradients that are not finite
            parts = {k: v for k, v in {**record, "loss": total_loss}.items() if not math.isfinite(v)}
            fault = ("a NaN or inf in " + ", ".join(f"{k}={v}" for k, v in parts.items()),
                     "lower actor.lr or critic.lr")  # fmt: skip
        print(f"step {t.step}: {fault[0]}; update skipped", file=sys.stderr)
        return record, False, fault
    if actor_active or (t.critic is not None and c.critic.backbone == "shared"):
        t.actor_opt.step()
        if actor_active:
            t.optimizers["actor_schedule"].step()
    if t.critic_opt is not None:
        t.critic_opt.step()
    return record, True, fault


def losses(
    t: Trainer, exp: Experience, part: Tensor, actor_active: bool, sizes: MinibatchTotals, key: int
) -> tuple[Tensor, dict[str, float]]:
    """The micro-batch ``part``'s share of the minibatch loss (actor + KL loss + critic), scaled so that the
    gradients accumulated over micro-batches equal the gradient of the whole minibatch's loss."""
    c = t.config
    ids, attn, mask = exp.ids[part], exp.attn[part], exp.mask[part]
    token_frac = float(mask.sum() / sizes.tokens)
    policy_grad = t.policy_needs_grad()
    loss = torch.zeros(())
    record: dict[str, float] = {}
    hidden = None
    if exp.policy is not None:  # the forward already ran, with gradients, while scoring
        logp, hidden = exp.policy.log_probs[part], None if exp.policy.hidden is None else exp.policy.hidden[part]
    elif policy_grad or t.critic_on_policy:
        out = policy_forward(t, ids, attn, exp.width, policy_grad)
        logp, hidden = out.log_probs, out.hidden
    if actor_active:  # (then the policy forward ran, with gradients)
        actor_loss, m = t.objective.loss(exp, part, logp, mask)
        loss = loss + actor_loss * t.objective.share(mask, sizes)
        record.update(m)
        if c.kl.mode == "loss":
            kl = masked_mean(kl_estimate(logp, exp.ref_logp[part], c.kl.estimator), mask)
            loss = loss + c.kl.coef * kl * token_frac
            record["actor/kl_loss"] = float(kl.detach())
    if t.critic is not None:
        if t.trunk is not None:
            with t.precision():
                hidden = trunk_hidden(t.trunk, ids, attn, exp.width, _rows(exp.critic_states, part))
        elif c.critic.backbone == "frozen":
            hidden = hidden.detach()
        # an ensemble member's mean is over its tokens in the whole minibatch, in units of this part's share
        member_tokens = None if sizes.member_tokens is None else sizes.member_tokens * token_frac
        critic_loss_, m = critic_loss(t, hidden.float(), exp, part, mask, key, member_tokens)
        weight = c.critic.coef if c.critic.backbone == "shared" else 1.0
        loss = loss + weight * critic_loss_ * token_frac
        record.update(m)
    return loss, record


def critic_steps(t: Trainer, exp: Experience, steps: int, key: int) -> dict[str, float]:
    """``steps`` more critic gradient steps on the whole batch (the critic's targets stay those of this step),
    draw keys from ``key + 1``: a head on the policy's features (frozen or shared) trains alone from the features
    saved while scoring, so the policy never moves in them; a separate critic trunk runs its forward and backward
    again, ``exp.micro`` sequences at a time (0: all at once). Returns the loss and explained variance after them."""
    rows = torch.arange(exp.mask.shape[0])
    sizes = totals(t, exp, torch.arange(exp.global_mask.shape[0]))
    share = float(exp.mask.sum() / sizes.tokens)  # of the global batch
    parts = rows.split(exp.micro) if exp.micro and t.trunk is not None else [rows]
    local_tokens = exp.mask.sum().clamp_min(1.0)
    record: dict[str, float] = {}
    params = [p for g in t.critic_opt.param_groups for p in g["params"]]
    for _ in range(steps):
        key += 1
        t.critic_opt.zero_grad(set_to_none=True)
        total = 0.0
        for part in parts:
            mask = exp.mask[part]
            frac = share * float(mask.sum() / local_tokens)
            if t.trunk is None:
                hidden = exp.critic_hidden[part]
            else:
                with t.precision():
                    states = _rows(exp.critic_states, part)
                    hidden = trunk_hidden(t.trunk, exp.ids[part], exp.attn[part], exp.width, states).float()
            member_tokens = None if sizes.member_tokens is None else sizes.member_tokens * frac
            loss, record = critic_loss(t, hidden, exp, part, mask, key, member_tokens)
            (loss * frac).backward()
            total += float(loss.detach()) * frac
        distributed.sum_gradients(params, t.world)
        total = distributed.sum_scalar(total, t.world)
        norm = clip(params, t.config.critic.grad_clip)
        if not (math.isfinite(total) and math.isfinite(norm)):
            break  # a non-finite step is not taken; the next training step tries again
        t.critic_opt.step()
    return distributed.mean_metrics({
        "critic/extra_steps_loss": record.get("critic/loss", record.get("critic/vf_loss", float("nan"))),
        "critic/extra_steps_explained_var": record.get("critic/explained_var", float("nan")),
    }, t.world)  # fmt: skip


def _rows(tensor: Tensor | None, part: Tensor) -> Tensor | None:
    return None if tensor is None else tensor[part]


def critic_loss(
    t: Trainer, hidden: Tensor, exp: Experience, part: Tensor, mask: Tensor, key: int,
    member_tokens: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:  # fmt: skip
    """The critic's loss on this process's rows ``part`` (``hidden [n, R, H]`` with grad), its noise drawn under
    ``key``; ``member_tokens [E]``: what a bootstrapped ensemble's members divide their token sums by (default:
    their tokens in ``part``)."""
    context = CriticContext(
        rows=part + exp.first_row, seed=t.config.seed, step=t.step, uniform=keyed_uniform(t, exp, part, key),
        member_tokens=member_tokens,
    )  # fmt: skip
    old = {k: exp.critic[k][part] for k in t.critic.output_keys}
    return t.critic.training_loss(hidden, exp.targets[part], mask, old, context)


def keyed_uniform(t: Trainer, exp: Experience, part: Tensor, key: int) -> Any:
    """U(0, 1) draws for the flow critic's loss on this process's rows ``part``: each draw is made for the whole
    global batch ``[G, R, ...]`` from a stream of its own (step, minibatch, draw) and this process's rows and
    response width are kept, so the loss is the same however the batch is split over processes."""
    n, width = exp.global_mask.shape
    rows = part + exp.first_row
    calls = itertools.count()

    def uniform(shape: tuple[int, ...]) -> Tensor:
        g = torch.Generator().manual_seed(stream_seed(t.config.seed, t.step, 2, key, next(calls)))
        return torch.rand((n, width, *shape[2:]), generator=g)[rows, : shape[1]]

    return uniform


def totals(t: Trainer, exp: Experience, rows: Tensor) -> MinibatchTotals:
    """The size of the minibatch of the step's global ``rows``; a bootstrapped ensemble critic's per-member
    weights ``[len(rows), E]`` give each member's tokens."""
    lengths = exp.global_mask[rows].sum(-1)
    weights = None if t.critic is None else t.critic.member_weights(rows, t.config.seed, t.step)
    return MinibatchTotals(
        sequences=len(rows), responses=int((lengths > 0).sum()), tokens=max(float(lengths.sum()), 1.0),
        member_tokens=None if weights is None else (weights.to(lengths.device) * lengths[:, None]).sum(0),
    )  # fmt: skip


def policy_forward(t: Trainer, ids: Tensor, attn: Tensor, width: int, grad: bool) -> PolicyOutput:
    """The policy's response log-probs ``[N, R]`` (and hidden states ``[N, R, H]`` for a critic on its trunk);
    with ``actor.checkpoint_prompts = k``, run ``k`` prompts' rows at a time, recomputed during the backward."""
    c = t.config

    def forward(i: Tensor, a: Tensor) -> tuple[Tensor, Tensor | None]:
        return response_forward(t.policy, i, a, width, c.rollout.temperature, t.critic_on_policy)

    with torch.set_grad_enabled(grad), t.precision():
        if not (grad and c.actor.checkpoint_prompts):
            return PolicyOutput(*forward(ids, attn))
        per = prompt_groups(ids, attn, width)
        k = c.actor.checkpoint_prompts
        groups = [torch.cat(per[j : j + k]) for j in range(0, len(per), k)]
        outs = [checkpoint(forward, ids[g], attn[g], use_reentrant=False) for g in groups]
    back = torch.empty(len(ids), dtype=torch.long)
    back[torch.cat(groups)] = torch.arange(len(ids))  # rows back in their order
    logp = torch.cat([o[0] for o in outs])[back]
    return PolicyOutput(logp, torch.cat([o[1] for o in outs])[back] if t.critic_on_policy else None)


def micro_batch(t: Trainer, length: int) -> int:
    """Sequences per forward/backward in this step's update (0: a whole minibatch): ``actor.micro_batch``, or
    under ``actor.micro_tokens`` as many as fit at the step's padded ``length``, the longest over all processes
    so that every process runs the same number of passes."""
    c = t.config
    if not c.actor.micro_tokens:
        return c.actor.micro_batch
    length = int(distributed.max_scalar(float(length), t.world))
    return micro_rows(c.actor.micro_tokens, length, c.rollout.samples)


def micro_rows(budget: int, length: int, samples: int) -> int:
    """Sequences per forward/backward under a budget of ``budget`` token positions, for sequences padded to
    ``length``: as many as fit (at least one), and a whole number of prompts' ``samples`` when one prompt's fit,
    so that a prompt's rows run their shared prompt once."""
    fit = max(1, budget // length)
    return fit - fit % samples if fit >= samples else fit


def clip(params: list[Tensor], max_norm: float) -> float:
    """Clip the gradients of ``params`` to ``max_norm`` (0: no clipping); returns their norm before."""
    if any(distributed.is_sharded(p) for p in params):
        return distributed.clip_grad_norm(params, max_norm)
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    return float(norm)


def mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the records that have it."""
    keys = {k for r in records for k in r}
    return {k: float(np.mean([r[k] for r in records if k in r])) for k in sorted(keys)}
