"""The values a training step's phases hand each other (:mod:`dfpo.training.phases`).

Shapes: ``P`` prompts and ``N = P x rollout.samples`` sequences of this process, ``G`` sequences of the step over
all processes (``N`` in one process), ``L`` tokens of prompt and response, ``R`` response tokens (the longest
response), ``H`` the critic's feature size, ``K`` return samples of a distributional critic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from dfpo.generation.rollout import Rollout
from dfpo.supervision.base import NoisyRewards


@dataclass
class Sampled:
    """The step's prompts and the responses sampled to them.

    Attributes:
        first: the index of this process's first prompt among the step's prompts.
        examples: ``P`` task examples drawn for the step (with their pseudo-labels under that noise).
        prompts: ``P`` rendered prompts, fitted to the model's context.
        truncated_prompts: how many of them were cut to fit (``rollout.long_prompts=truncate``).
        rollout: the responses: ``input_ids [N, P_len + R]``, ``response_mask [N, R]``, ``prompt_index [N]``.
        per_sequence: ``N`` examples, the one each sequence answers.
    """

    first: int
    examples: list[dict[str, Any]]
    prompts: list[str]
    truncated_prompts: int
    rollout: Rollout
    per_sequence: list[dict[str, Any]]


@dataclass
class Rewarded:
    """The responses' rewards: what the learner observes and the true ones beside them.

    Attributes:
        noisy: the noise model's lists (``observed`` and ``true``, ``None`` for a skipped response) and its rate.
        components: each user reward function's mean this step (empty for built-in verifiers).
        kept: ``[N]`` bool, responses with a reward.
        scores: ``[N]`` observed rewards (0 where not kept).
        true: ``[N]`` true rewards (0 where not kept).
        mask: ``[N, R]`` float, the response tokens that count in the losses (kept, and not truncated when
            ``rollout.mask_truncated``).
    """

    noisy: NoisyRewards
    components: dict[str, float]
    kept: Tensor
    scores: Tensor
    true: Tensor
    mask: Tensor


@dataclass
class PolicyOutput:
    """The update's policy forward run early, while scoring (one epoch of one minibatch: the fused path).

    Attributes:
        log_probs: ``[N, R]`` response log-probs, with gradients; detached they are the rollout policy's.
        hidden: ``[N, R, H]`` the policy's hidden states for a critic on its trunk, or None.
    """

    log_probs: Tensor
    hidden: Tensor | None


@dataclass(kw_only=True)
class Scored:
    """The rollout scored without gradients.

    Attributes:
        width: ``R``.
        micro: sequences per forward/backward in the update (0: a whole minibatch).
        old_logp: ``[N, R]`` the rollout policy's log-probs.
        ref_logp: ``[N, R]`` the reference model's, or None without one.
        critic: the critic's outputs (``values [N, R]``, ``samples [N, R, K]``, ...; empty without a critic).
        critic_hidden: ``[N, R, H]`` the critic's input features (detached), kept for extra critic steps on the
            policy's features and for observers; else None.
        inputs: the actor objective's per-sequence inputs (FlowRL: ``prompt_features [N, H]``).
        policy: the fused path's policy forward, or None.
        critic_states: ``[N, L, H]`` the frozen lower layers' output of a critic trunk that trains only its top
            layers (``critic.trunk_layers``), computed once here for every critic pass of the step; else None.
    """

    width: int
    micro: int
    old_logp: Tensor
    ref_logp: Tensor | None
    critic: dict[str, Tensor]
    critic_hidden: Tensor | None
    inputs: dict[str, Tensor]
    policy: PolicyOutput | None = None
    critic_states: Tensor | None = None


@dataclass(kw_only=True)
class Experience(Scored):
    """What the update learns from: the scored rollout (:class:`Scored`'s fields, this process's rows; ``inputs``
    with the objective's step inputs, FlowRL's ``seq_reward [N]``), and:

    Attributes:
        ids: ``[N, L]`` prompt and response tokens; ``attn``: ``[N, L]`` their attention mask.
        mask: ``[N, R]`` tokens in the losses; ``global_mask``: ``[G, R]`` the same over every process.
        first_row: this process's first row in the global batch.
        advantages: ``[N, R]`` the actor's (whitened for critic-based algorithms).
        targets: ``[N, R]`` or ``[N, R, K]`` the critic's.
    """

    ids: Tensor
    attn: Tensor
    mask: Tensor
    global_mask: Tensor
    first_row: int
    advantages: Tensor
    targets: Tensor


@dataclass
class Estimated:
    """The advantages phase's result: what the update learns from, and the step's global per-sequence tensors.

    Attributes:
        experience: see :class:`Experience`.
        rewards: ``[N, R]`` per-token rewards as the learner saw them (this process's rows).
        scores, true, kept, group, lengths, truncated: ``[G]`` observed and true rewards, whether each has one,
            its prompt's index in the step, its response length and whether it was cut (over every process).
        metrics: KL, advantage-estimator and critic metrics of the step.
    """

    experience: Experience
    rewards: Tensor
    scores: Tensor
    true: Tensor
    kept: Tensor
    group: Tensor
    lengths: Tensor
    truncated: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Updated:
    """The update's result.

    Attributes:
        metrics: the mean of the minibatches' metrics (and of the extra critic steps').
        skipped: whether a minibatch had a NaN or inf loss or gradient (its update was not taken).
        fault: why, and what to do about it (``(what, fix)``), or None.
    """

    metrics: dict[str, float]
    skipped: bool
    fault: tuple[str, str] | None


@dataclass(frozen=True)
class MinibatchTotals:
    """A minibatch's size over all processes: each micro-batch's losses are scaled by their share of it, so that
    the gradients accumulated over micro-batches and processes are those of the whole minibatch's losses."""

    sequences: int  # every sequence: the share of sequence-mean losses
    responses: int  # sequences with at least one token in the loss: FlowRL's mean is over them
    tokens: float  # response tokens in the loss: the share of token-mean losses
    member_tokens: Tensor | None = None  # [E] the tokens each member of a bootstrapped ensemble critic trains on


@dataclass(frozen=True)
class StepData:
    """What an observer of a training step sees (this process's rows, before the update), for measurements such
    as the critic-learning benchmark.

    Attributes:
        step: the training step.
        examples: ``N`` task examples, one per sequence.
        mask: ``[N, R]`` tokens that count.
        rewards: ``[N, R]`` per-token rewards as the learner saw them.
        values: ``[N, R]`` scalar critics' values, or None.
        samples: ``[N, R, K]`` distributional critics' samples (sorted), or None.
        features: ``[N, R, H]`` the critic's input features (detached), or None without a critic.
    """

    step: int
    examples: list[dict[str, Any]]
    mask: Tensor
    rewards: Tensor
    values: Tensor | None
    samples: Tensor | None
    features: Tensor | None
