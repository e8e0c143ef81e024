"""One training step as named phases over typed values (:mod:`dfpo.training.step`), shared by DFPO and every
baseline. :func:`train_step` reads top to bottom as the algorithm:

1. **sample** (:func:`sample`): the next prompts in the seeded data order (each process its contiguous share),
   the noise model's preparation of them (pseudo-labels), and ``rollout.samples`` responses to each -> ``Sampled``;
2. **reward** (:func:`reward`): the true reward against the gold answer and the observed one through the noise
   model -> ``Rewarded``;
3. **score** (:func:`score`): without gradients, the rollout policy's and the reference's log-probs, the critic's
   outputs and the actor objective's inputs -> ``Scored``;
4. **advantages** (:func:`advantages`): per-token rewards (less ``kl.coef * KL`` when the KL is in the reward),
   gathered over processes, the registered estimator (:mod:`dfpo.core.advantages`), whitened, and the critic's
   targets -> ``Estimated`` (its ``Experience`` is what the update learns from);
5. **update** (:func:`dfpo.training.update.update`): PPO epochs over minibatches, the critic's extra steps ->
   ``Updated``;
6. **metrics** (:func:`metrics`): rewards, lengths, noise, throughput.

Algorithms differ only through the registries (estimators, policy losses, critics) and two interfaces: the actor's
:class:`~dfpo.training.objectives.Objective` and the noise model's hooks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dfpo import distributed
from dfpo.core import advantages as estimators
from dfpo.core.kl import kl_estimate, kl_metrics
from dfpo.core.masked import explained_variance, masked_mean, masked_whiten
from dfpo.core.streams import stream_seed
from dfpo.generation.rollout import (
    Rollout,
    concat_rollouts,
    fit_prompts,
    forward_positions,
    response_forward,
    trunk_hidden,
)
from dfpo.generation.rollout import (
    sample as sample_responses,
)
from dfpo.supervision.base import LabelContext
from dfpo.training import update as updates
from dfpo.training.step import Estimated, Experience, PolicyOutput, Rewarded, Sampled, Scored, StepData, Updated

if TYPE_CHECKING:
    from dfpo.training.trainer import Trainer


def train_step(t: Trainer) -> tuple[dict[str, float], Updated, list[dict[str, Any]]]:
    """One step of ``t`` at ``t.step``: returns its metrics, the update's result and two sample completions."""
    times: dict[str, float] = {}
    with _timed(times, "generate"):
        sampled = sample(t)
    with _timed(times, "reward"):
        rewarded = reward(t, sampled)
    with _timed(times, "score"):
        scored = score(t, sampled, rewarded)
    estimated = advantages(t, sampled, rewarded, scored)
    for observe in t.observers:
        observe(StepData(t.step, sampled.per_sequence, rewarded.mask, estimated.rewards, scored.critic.get("values"),
                         scored.critic.get("samples"), scored.critic_hidden))  # fmt: skip
    with _timed(times, "update"):
        updated = updates.update(t, estimated.experience, nonfinite_inputs(t, rewarded, scored))
    return metrics(t, sampled, rewarded, estimated, updated, times), updated, _samples(t, sampled, rewarded)


@contextlib.contextmanager
def _timed(times: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    times[phase] = time.perf_counter() - start


def sample(t: Trainer) -> Sampled:
    """Draw the step's prompts (every process the same global draw, each answering its contiguous share), let the
    noise model prepare them (pseudo-labels), fit them to the context, and sample the responses."""
    c = t.config
    first, stop = t.world.shard(c.rollout.prompts)
    examples = [t.train[i] for i in t.data.take(c.rollout.prompts)][first:stop]
    context = LabelContext(t.ref, t.tokenizer, t.task, c.rollout.temperature, c.rollout.top_p,
                           c.rollout.max_new_tokens, lambda obj: distributed.gather_objects(obj, t.world))  # fmt: skip
    examples = t.noise.prepare(examples, context)
    prompts, cut = [t.task.prompt_text(t.tokenizer, e) for e in examples], 0
    if c.rollout.long_prompts == "truncate":  # (with "refuse", any prompt over the limit stopped the run at start)
        prompts, cut = fit_prompts(t.tokenizer, prompts, t.prompt_limit)
    t.policy.eval()
    rollout = _generate(t, prompts, first)
    return Sampled(first, examples, prompts, cut, rollout, [examples[i] for i in rollout.prompt_index.tolist()])


def _generate(t: Trainer, prompts: list[str], first: int) -> Rollout:
    """``rollout.samples`` responses to each of ``prompts`` (the step's prompts ``first``, ``first + 1``, ...),
    ``rollout.generate_prompts`` prompts per generate call, each call on its own stream seeded by the seed, the
    step and the position of its first prompt in the step: the main random stream is left as it was."""
    r = t.config.rollout
    chunk = r.generate_prompts or len(prompts)
    model = t.rollout_policy or t.policy
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(prompts), chunk):
        seed = stream_seed(t.config.seed, t.step, 0, first + start)
        some = prompts[start : start + chunk]
        if t.engine is not None:
            parts.append(t.engine.sample(some, r.samples, r.max_new_tokens, r.temperature, r.top_p, seed % 2**31))
            continue
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            settings = (r.samples, r.max_new_tokens, r.temperature, r.top_p)
            parts.append(sample_responses(model, t.tokenizer, some, *settings))
    return concat_rollouts(parts, t.tokenizer.pad_token_id)


def reward(t: Trainer, sampled: Sampled) -> Rewarded:
    """Score the responses: the learner sees the noise model's observed reward, the true one is kept beside it."""
    c, rollout = t.config, sampled.rollout
    noisy = t.noise.score(t.task, rollout.completions, sampled.per_sequence, t.step,
                          sampled.first * c.rollout.samples, rollout.completion_ids)  # fmt: skip
    components = dict(getattr(t.task, "last_components", {}))  # each user reward function's mean
    on = {"device": t.device}
    kept = torch.tensor([o is not None for o in noisy.observed], **on)
    scores = torch.tensor([o if o is not None else 0.0 for o in noisy.observed], dtype=torch.float32, **on)
    true = torch.tensor([r if r is not None else 0.0 for r in noisy.true], dtype=torch.float32, **on)
    mask = rollout.response_mask.float() * kept[:, None]
    if c.rollout.mask_truncated:
        mask = mask * (~rollout.truncated)[:, None]
    return Rewarded(noisy, components, kept, scores, true, mask)


def score(t: Trainer, sampled: Sampled, rewarded: Rewarded) -> Scored:
    """The rollout's log-probs, critic outputs and objective inputs, without gradients. With one epoch of one
    minibatch in one micro-batch (``t.fused``) the update's policy forward runs here, with gradients: its detached
    log-probs are the rollout policy's (the ratio is exactly 1, as in a separate pass)."""
    rollout = sampled.rollout
    ids, attn, width = rollout.input_ids, rollout.attention_mask, rewarded.mask.shape[1]
    micro = updates.micro_batch(t, ids.shape[1])
    policy = None
    if t.fused and (not micro or micro >= len(ids)):
        t.policy.train()
        policy = updates.policy_forward(t, ids, attn, width, t.policy_needs_grad())
    logp, ref, hidden, critic, inputs, states = _score_rows(t, ids, attn, width, rollout.prompt_length, policy)
    return Scored(width=width, micro=micro, old_logp=logp, ref_logp=ref, critic=critic, critic_hidden=hidden,
                  inputs=inputs, policy=policy, critic_states=states)  # fmt: skip


@torch.no_grad()
def _score_rows(
    t: Trainer, ids: Tensor, attn: Tensor, width: int, prompt_length: int, policy: PolicyOutput | None
) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Tensor], dict[str, Tensor], Tensor | None]:
    """:func:`score`'s forwards, ``rollout.batch_size`` rows at a time: old and reference log-probs, critic
    features and outputs, objective inputs, and the frozen lower layers' states of a split critic trunk."""
    c = t.config
    split = t.trunk is not None and hasattr(t.trunk, "lower")
    logps, refs, features, states = [], [], [], []
    critic: dict[str, list[Tensor]] = {}
    inputs: dict[str, list[Tensor]] = {}
    for rows in torch.arange(ids.shape[0]).split(c.rollout.batch_size):
        i, a = ids[rows], attn[rows]
        with t.precision():
            if policy is None:
                logp, hidden = response_forward(t.policy, i, a, width, c.rollout.temperature, t.critic_on_policy)
            else:
                logp = policy.log_probs[rows].detach()
                hidden = None if policy.hidden is None else policy.hidden[rows].detach()
            if t.ref is not None:
                refs.append(response_forward(t.ref, i, a, width, c.rollout.temperature)[0])
            if split:
                states.append(t.trunk.lower(i, a, width))
            if t.trunk is not None:
                hidden = trunk_hidden(t.trunk, i, a, width, states[-1] if split else None)
            for key, value in t.objective.score_inputs(t.policy, i, a, prompt_length).items():
                inputs.setdefault(key, []).append(value)
        logps.append(logp)
        if t.critic is not None:
            for key, value in t.critic.outputs(hidden.float()).items():
                critic.setdefault(key, []).append(value)
            if (t.critic_updates > 1 and t.trunk is None) or t.observers:  # extra steps, observers
                features.append(hidden.detach().float())
    cat = torch.cat
    return (cat(logps), cat(refs) if refs else None, cat(features) if features else None,
            {k: cat(v) for k, v in critic.items()}, {k: cat(v) for k, v in inputs.items()},
            cat(states) if states else None)  # fmt: skip


def advantages(t: Trainer, sampled: Sampled, rewarded: Rewarded, scored: Scored) -> Estimated:
    """Per-token rewards and advantages over the global batch: with several processes, every process gathers the
    per-token tensors of all, computes what one process would, and keeps its own rows."""
    c, world, mask, rollout = t.config, t.world, rewarded.mask, sampled.rollout
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    rewards = rewarded.scores[:, None] * last
    if scored.ref_logp is not None and c.kl.mode == "reward":
        rewards = rewards - c.kl.coef * kl_estimate(scored.old_logp, scored.ref_logp, c.kl.estimator) * mask
    local = {"rewards": rewards, "mask": mask, "scores": rewarded.scores, "true": rewarded.true,
             "kept": rewarded.kept.float(), "group": rollout.prompt_index + sampled.first,
             "lengths": rollout.response_mask.sum(-1).float(), "truncated": rollout.truncated.float(),
             "old_logp": scored.old_logp}  # fmt: skip
    if scored.ref_logp is not None:
        local["ref_logp"] = scored.ref_logp
    local.update(scored.critic)
    g = {k: distributed.gather_rows(v, world) for k, v in local.items()}
    g_mask = g["mask"]
    out: dict[str, float] = kl_metrics(g["old_logp"], g["ref_logp"], g_mask) if "ref_logp" in g else {}
    lam: float | Tensor = c.advantage.lam
    if c.advantage.adaptive_lam:
        lam = estimators.adaptive_lambda(g_mask.sum(-1), c.advantage.adaptive_lam)
    adv, returns, adv_metrics = estimators.compute(
        c.advantage.estimator, rewards=g["rewards"], values=g.get("values"), samples=g.get("samples"),
        scores=g["scores"], mask=g_mask, group=g["group"], valid=g["kept"].bool(), gamma=c.advantage.gamma, lam=lam,
    )  # fmt: skip
    out.update(adv_metrics)
    if adv.dim() == 3:  # distributional: per-sample advantages; the actor uses their mean
        adv = adv.mean(-1)
    # the critic's targets with their own lambda (decoupled GAE): 1 gives Monte-Carlo returns
    targets = returns
    if t.critic is not None:
        outputs = {k: g[k] for k in t.critic.output_keys}
        targets = t.critic.targets(g["rewards"], outputs, g_mask, c.advantage.gamma, c.advantage.critic_lam)
    if c.actor.whiten:
        adv = masked_whiten(adv, g_mask)
    if t.critic is not None:
        out.update(critic_metrics(g, targets, c.advantage.gamma))
    width, rows = mask.shape[1], slice(world.rank * len(mask), (world.rank + 1) * len(mask))
    inputs = {**scored.inputs, **t.objective.step_inputs(adv, g_mask, rows)}
    exp = Experience(
        **{**vars(scored), "inputs": inputs}, ids=rollout.input_ids, attn=rollout.attention_mask, mask=mask,
        global_mask=g_mask, first_row=rows.start, advantages=adv[rows, :width], targets=targets[rows, :width],
    )  # fmt: skip
    return Estimated(exp, rewards, g["scores"], g["true"], g["kept"].bool(), g["group"], g["lengths"],
                     g["truncated"], out)  # fmt: skip


def critic_metrics(g: dict[str, Tensor], targets: Tensor, gamma: float) -> dict[str, float]:
    """How well the values the advantages used predict, over the step's whole batch ``g``: explained variance
    against the critic's targets and against the Monte-Carlo returns (lambda = 1, what a value should equal), and
    the values' mean bias against those returns."""
    mask = g["mask"]
    values = g["values"] if "values" in g else g["samples"].mean(-1)
    goal = targets.mean(-1) if targets.dim() == 3 else targets
    mc = estimators.returns_to_go(g["rewards"], mask, gamma)
    return {
        "critic/explained_var": float(explained_variance(values, goal, mask)),
        "critic/explained_var_mc": float(explained_variance(values, mc, mask)),
        "critic/value_bias": float(masked_mean(values - mc, mask)),
    }


def nonfinite_inputs(t: Trainer, rewarded: Rewarded, scored: Scored) -> tuple[str, str] | None:
    """What upstream of the losses is NaN or inf this step, and what to do about it: the rewards, or the policy's
    or the reference model's log-probs (from which the KL comes); None when all are finite."""
    c, scores, kept = t.config, rewarded.scores, rewarded.kept
    bad = kept & ~torch.isfinite(scores)
    if bad.any():
        return (f"a NaN or inf reward for {int(bad.sum())} of {len(scores)} responses (task {c.task!r}, "
                f"noise={c.noise})", "check the reward function or reward model")  # fmt: skip
    on = rewarded.mask.bool()
    for logp, who in ((scored.old_logp, "the policy"), (scored.ref_logp, "the reference model")):
        if logp is not None and (bad := on & ~torch.isfinite(logp)).any():
            kl = f", so in the KL to the reference (kl.mode={c.kl.mode})" if t.ref is not None else ""
            return (f"a NaN or inf in {who}'s log-probs at {int(bad.sum())} response tokens{kl}",
                    f"check {who}'s weights and precision={c.precision}, or lower actor.lr")  # fmt: skip
    return None


def metrics(
    t: Trainer, sampled: Sampled, rewarded: Rewarded, est: Estimated, updated: Updated, times: dict[str, float]
) -> dict[str, float]:
    """The step's logged metrics over the global batch (rank 0's times: every process works on its share at once)."""
    c, world, exp = t.config, t.world, est.experience
    tokens = distributed.sum_scalar(float(exp.attn.sum()), world)
    kept, scores, true, lengths = est.kept, est.scores, est.true, est.lengths
    out = {**est.metrics, **updated.metrics}
    out.update({
        "step": t.step,
        "data/epoch": t.data.epoch,
        "data/truncated_prompts": distributed.sum_scalar(float(sampled.truncated_prompts), world),
        "reward/observed": float(scores[kept].mean()) if kept.any() else 0.0,
        "reward/true": float(true[kept].mean()) if kept.any() else 0.0,
        "reward/observed_std": float(scores[kept].std()) if kept.sum() > 1 else 0.0,
        "reward/noise_rate": distributed.mean_metrics({"rate": rewarded.noisy.rate}, world)["rate"],
        "reward/signal_share": signal_share(scores[kept], true[kept]),
        "reward/prompt_share": prompt_share(scores[kept], est.group[kept]),
        "reward/skipped": float((~kept).sum()),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response_length/clip_ratio": float(est.truncated.mean()),
        "train/skipped_update": float(updated.skipped),
        "perf/generate_tokens_per_s": float(lengths.sum()) / max(times["generate"], 1e-9),
        "perf/score_tokens_per_s": tokens / max(times["score"], 1e-9),
        "perf/update_tokens_per_s": tokens * c.actor.epochs / max(times["update"], 1e-9),
        "perf/micro_batch": float(min(exp.micro or len(exp.mask), len(exp.mask) // c.actor.minibatches)),
        "perf/forward_positions": distributed.sum_scalar(float(forward_positions(exp.ids, exp.attn, exp.width)), world),
        "perf/step_s": sum(times.values()),
        "perf/threads": float(t.threads),
        **{f"perf/{k}_s": v for k, v in times.items()},
    })  # fmt: skip
    if rewarded.components:
        out.update(distributed.mean_metrics({f"reward/{k}": v for k, v in rewarded.components.items()}, world))
    out.update(t.noise.metrics())
    return out


def _samples(t: Trainer, sampled: Sampled, rewarded: Rewarded) -> list[dict[str, Any]]:
    """The step's first two completions, with their prompt and rewards, for the log."""
    rollout, noisy = sampled.rollout, rewarded.noisy
    return [
        {"step": t.step, "prompt": sampled.prompts[int(rollout.prompt_index[i])], "completion": rollout.completions[i],
         "observed": noisy.observed[i], "true": noisy.true[i]}
        for i in range(min(2, len(rollout.completions)))
    ]  # fmt: skip


def signal_share(observed: Tensor, true: Tensor) -> float:
    """The share of the observed reward's variance that the true reward explains, ``corr(observed, true)^2``
    over a step's samples: the ceiling of a critic's explained variance at the last token when the noise is
    independent of the state (flips at rate ``p``: ``(1 - 2p)^2 Var(true) / Var(observed)``). 1 when there is no
    variance to explain."""
    if observed.numel() < 2 or float(observed.std()) == 0.0:
        return 1.0
    if float(true.std()) == 0.0:
        return 0.0
    return float(torch.corrcoef(torch.stack([observed, true]))[0, 1] ** 2)


def prompt_share(observed: Tensor, group: Tensor) -> float:
    """The share of the observed reward's variance that lies between prompts, ``1 - within / total`` (pooled
    within-prompt variance over the total): what a critic that knew each prompt's success rate, and nothing about
    its response, could explain at the first response token. Not clipped at 0, so that its mean over steps is not
    biased upwards: a step with no variance between prompts gives a small negative value as often as a positive
    one."""
    groups = [observed[group == g] for g in group.unique()]
    groups = [g for g in groups if g.numel() > 1]
    count = sum(g.numel() for g in groups)
    if observed.numel() < 2 or float(observed.var()) == 0.0 or count <= len(groups):
        return 0.0
    within = sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / (count - len(groups))
    return 1.0 - within / float(observed.var())
